// Mocha root hooks (.mocharc.json "require"): every process the tests start keeps its conf state
// (agent/settings.ts: the last discovery, per control socket) in a directory of this run, removed
// at the end, instead of piling files up in the user's ~/.config.
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const dir = mkdtempSync(join(tmpdir(), 'tcp-stitch-test-config-'));
process.env.XDG_CONFIG_HOME = dir;

export const mochaHooks = {
  afterAll() { rmSync(dir, { recursive: true, force: true }); },
};
