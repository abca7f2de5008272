// Phase 2 end to end on the namespace hosts, through the real CLI: curl on C fetches from a real HTTP
// server on B behind `tcp-stitch core --forward`, through `tcp-stitch shell` on A; and 200 concurrent
// connections each moving 4 MiB both ways at once.
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createTopology, nodeCommand, requirePrivileges, type Topology } from './hosts.ts';
import { payload, sha256 } from './helpers.ts';
import { SHELL_PORT, startSegmented, waitForLine, waitForLog } from './bed.ts';

describe('e2e phase 2 (namespaces)', function () {
  this.timeout(180000);
  let topo: Topology | undefined;
  let dir: string | undefined;
  before(function () { requirePrivileges(this); });
  afterEach(async () => {
    await topo?.destroy();
    topo = undefined;
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  it('e2e phase 2 - curl on C fetches 50 MiB from an HTTP server on B through shell and core, sha256 equal', async () => {
    topo = await createTopology();
    dir = mkdtempSync(join(tmpdir(), 'tcp-stitch-http-'));
    const file = payload(50 << 20, 77);
    writeFileSync(join(dir, 'big.bin'), file);
    const bed = await startSegmented(topo, { backend: 'http', httpRoot: dir });
    const r = await topo.c.runOk('sh', ['-c', `curl -sS --fail http://${bed.shellAddr}:${SHELL_PORT}/big.bin | sha256sum`], { timeoutMs: 120000 });
    assert.equal(r.stdout.split(' ')[0], sha256(file));
    // The shell relayed it (phase 2) and logs the connection's end with its byte counts once both
    // FINs have passed, which can be after curl has exited.
    const [line] = await waitForLog(bed.shell, bed.logs.shell, /"connection closed"/);
    const closed = JSON.parse(line!);
    assert.equal(closed.phase, 2);
    assert.ok(closed.bytesFromCore > 50 << 20, `shell relayed ${closed.bytesFromCore} bytes from the core`);
  });

  it('e2e phase 2 - 200 concurrent connections, 4 MiB both ways at once, byte-exact at both ends', async () => {
    topo = await createTopology();
    const bed = await startSegmented(topo, { backend: 'echo' });
    const results: Array<{ seed: number; ok: boolean }> = [];
    bed.backend.stdout!.on('data', (d: Buffer) => {
      for (const l of String(d).split('\n')) if (l.startsWith('{')) results.push(JSON.parse(l));
    });
    const [cmd, args] = nodeCommand('test/fixtures/load-client.ts', [bed.shellAddr, String(SHELL_PORT), '200', String(4 << 20)]);
    const r = await topo.c.runOk(cmd, args, { timeoutMs: 150000 });
    const summary = JSON.parse(r.stdout.trim().split('\n').pop()!);
    assert.deepEqual(summary.failed, [], 'C side: every connection received exactly payload(seed + 1)');
    // Every connection reported by the backend once it saw EOF; wait for the last of those lines.
    while (results.length < 200) await waitForLine(bed.backend, /^\{/, 30000).then((l) => { if (!results.some((x) => x.seed === JSON.parse(l).seed)) results.push(JSON.parse(l)); });
    assert.equal(results.length, 200);
    assert.deepEqual(results.filter((x) => !x.ok), [], 'B side: every connection received exactly payload(seed)');
  });
});
