// The demo (the README's first command): builds the hosts C, S, A, B as network namespaces, runs the
// switch on S, the core on B and the shell on A through the real CLI, fetches a file from a real HTTP
// server on B with curl on C through the shell, stitches the connection live an eighth of the way in
// (`tcp-stitch stitch --all`), shows the shell's view while it flows (its relay counters stop at the
// stitch), verifies the bytes, cleans up.
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { createHash, randomBytes } from 'node:crypto';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createTopology, nodeCommand, type Topology } from '../test/hosts.ts';
import { SHELL_PORT, startSegmented, startSwitch, waitForLog } from '../test/bed.ts';
import { formatKeyFile, generateKey } from '../switch/index.ts';

const SIZE = 256 << 20;
const say = (s: string) => process.stdout.write(s + '\n');

say(`tcp-stitch demo: four hosts as network namespaces (198.18.0.0/15 only)

   C 198.18.1.2 ──── S (switch) ──── B 198.18.3.2   switch: tcp-stitch switch (eBPF) on S
                                                             core:  tcp-stitch core, HTTP server behind it
                           │
                     A 198.18.2.2                           shell: tcp-stitch shell (agent inside)
`);

let topo: Topology | undefined;
const dir = mkdtempSync(join(tmpdir(), 'tcp-stitch-demo-'));
const cleanup = async () => { await topo?.destroy(); rmSync(dir, { recursive: true, force: true }); };
process.on('SIGINT', () => { void cleanup().then(() => process.exit(130)); });
try {
  topo = await createTopology({ bpffs: true });
  say(`hosts up: ${topo.hosts.map((h) => h.ns).join(', ')}`);
  const file = randomBytes(SIZE);
  writeFileSync(join(dir, 'data.bin'), file);
  const keyFile = join(dir, 'key');
  writeFileSync(keyFile, formatKeyFile([generateKey()]), { mode: 0o600 });
  await startSwitch(topo, ['--key-file', keyFile]);
  const bed = await startSegmented(topo, { backend: 'http', httpRoot: dir, coreArgs: ['--key-file', keyFile] },
    ['--switch', 'auto', '--key-file', keyFile, '--policy', join(import.meta.dirname, 'policies/manual.json')]);
  await waitForLog(bed.shell, bed.logs.shell, /"stitching available"/);
  say(`switch on S found by the shell's agent; core on B; shell on A at ${bed.shellAddr}:${SHELL_PORT}.`);
  say(`C fetches ${SIZE >> 20} MiB through the shell; an eighth of the way in, \`tcp-stitch stitch --all\` takes the shell out:\n`);

  const [cmd, args] = ['sh', ['-c', `curl -sS --fail --limit-rate 40M -o /dev/stdout http://${bed.shellAddr}:${SHELL_PORT}/data.bin | sha256sum`]];
  const fetch = topo.c.runOk(cmd, args, { timeoutMs: 300000 });
  const [scmd, sargs] = nodeCommand('bin/tcp-stitch.js', ['status', '--json', '--control', bed.controlPath]);
  const [tcmd, targs] = nodeCommand('bin/tcp-stitch.js', ['stitch', '--all', '--control', bed.controlPath]);
  let last = '';
  let stitched = false;
  for (let done = false; !done;) {
    done = await Promise.race([fetch.then(() => true), new Promise<boolean>((r) => setTimeout(() => r(false), 500))]);
    let st = JSON.parse((await topo.a.runOk(scmd, sargs)).stdout);
    if (!stitched && st.connections.some((c: { bytesFromCore: number }) => c.bytesFromCore > SIZE / 8)) {
      stitched = true;
      say(`  $ tcp-stitch stitch --all\n  ${(await topo.a.runOk(tcmd, targs)).stdout.trim()}`);
      st = JSON.parse((await topo.a.runOk(scmd, sargs)).stdout);
    }
    for (const c of st.connections) {
      const line = `  connection ${c.id.slice(0, 8)}  phase ${c.phase} (${c.state})  C->B ${c.bytesFromClient} B  B->C ${(c.bytesFromCore / 2 ** 20).toFixed(1)} MiB`;
      if (line !== last) say(line);
      last = line;
    }
  }
  const got = (await fetch).stdout.split(' ')[0];
  const want = createHash('sha256').update(file).digest('hex');
  say(`\nsha256 at C: ${got}\nsha256 at B: ${want}\n${got === want ? 'verified: byte-exact' : 'MISMATCH'}`);
  const closed = bed.logs.shell.map((l) => JSON.parse(l)).filter((e) => e.message === 'connection closed');
  for (const e of closed) say(`shell: connection closed (${e.reason}) in phase ${e.phase}: it relayed ${e.bytesFromClient} bytes C->B and ${(e.bytesFromCore / 2 ** 20).toFixed(1)} MiB B->C, all before the stitch; the switch carried the rest`);
  process.exitCode = got === want ? 0 : 1;
} catch (err) {
  say(`demo failed: ${(err as Error).message}`);
  process.exitCode = 1;
} finally {
  await cleanup();
  say('hosts removed.');
}
