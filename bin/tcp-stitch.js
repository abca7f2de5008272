#!/usr/bin/env node
// Launcher: the project is TypeScript run through tsx's loader (no build step to forget).
import { register } from 'tsx/esm/api';

register();
const { main } = await import('./cli.ts');
process.exitCode = await main(process.argv.slice(2));
