// TCP round trip (1-byte ping-pong over one connection, test/fixtures/rtt.ts's client --wait against
// its echo server on B): routed, through the shell (phase 2), and stitched (the
// connection is stitched before the first ping).
import { JsonProc } from '../test/bed.ts';
import { nodeInNs } from '../test/hosts.ts';
import { PORTS, stitchAllDirect, untilStatus, type Bed } from './bed.ts';

export interface Rtt { n: number; p50Us: number; p99Us: number }

async function one(bed: Bed, host: string, port: number, n: number, stitch: boolean): Promise<Rtt> {
  const p = new JsonProc('rtt client', nodeInNs(bed.topo.c, 'test/fixtures/rtt.ts', ['client', host, String(port), String(n), '--wait'], { stdio: ['pipe', 'pipe', 'pipe'] }));
  try {
    const conn = await p.wait((o) => o.event === 'connected', 'connected');
    if (stitch) {
      const pair = bed.pairs.rtt;
      await untilStatus(pair, (cs) => cs.some((c) => c.client.port === conn.port && c.state === 'relaying'), 'the RTT connection relaying');
      const { outcomes } = await stitchAllDirect(pair);
      const bad = outcomes.filter((o) => !o.ok);
      if (outcomes.length !== 1 || bad.length) throw new Error(`stitching the RTT connection: ${JSON.stringify(outcomes)}`);
      await untilStatus(pair, (cs) => cs.some((c) => c.client.port === conn.port && c.phase === 3), 'the RTT connection in phase 3');
    }
    p.line('go');
    const r = await p.wait((o) => o.event === 'done', 'RTT result', 120_000);
    return { n: r.n as number, p50Us: r.p50Us as number, p99Us: r.p99Us as number };
  } finally {
    p.child.stdin?.end();
  }
}

export async function measureRtt(bed: Bed, n: number): Promise<{ routed: Rtt; shellRelay: Rtt; stitched: Rtt }> {
  const { a, b } = bed.topo;
  const routed = await one(bed, b.addr, PORTS.rtt, n, false);
  const shellRelay = await one(bed, a.addr, PORTS.shell.rtt, n, false);
  const stitched = await one(bed, a.addr, PORTS.shell.rtt, n, true);
  return { routed, shellRelay, stitched };
}
