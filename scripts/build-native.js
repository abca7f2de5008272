#!/usr/bin/env node
// Builds the native parts: the switch's eBPF object (clang), its map addon and the SDK's splice relay
// addon (node-gyp).
// Runs as the root package's postinstall because npm 11 runs no dependency's script it was not told to.
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const steps = [
  { dir: 'switch/bpf', when: 'Makefile', cmd: 'make', args: ['-s', '-C', 'switch/bpf'] },
  ...['switch/native', 'sdk/native'].map((dir) => ({ dir, when: 'binding.gyp', cmd: process.execPath,
    args: [join(dirname(process.execPath), '../lib/node_modules/npm/node_modules/node-gyp/bin/node-gyp.js'),
      'rebuild', '--silent', '--nodedir=/usr', '--directory', dir] })),
];
for (const s of steps) {
  if (!existsSync(join(root, s.dir, s.when))) continue;
  const r = spawnSync(s.cmd, s.args, { cwd: root, stdio: 'inherit' });
  if (r.status !== 0) {
    console.error(`tcp-stitch: building ${s.dir} failed (${s.cmd} exited ${r.status}); ` +
      'on Debian run: apt-get install clang llvm libbpf-dev bpftool');
    process.exit(1);
  }
}
