// TCP round trip (1-byte ping-pong over one connection, bench/rtt-probe.c's client --wait in C
// against its echo server on B, both in C: a JavaScript probe's own pauses of 1.5-3 ms every few ms
// were most of what it measured): routed, through the shell (phase 2), and stitched (the
// connection is stitched before the first ping). Then the handover as a live connection sees it:
// the same ping-pong, stitched after a third of its pings; the round trips that overlap its
// handover (decision → phase 3 in the shell's log, widened by the log's 1 ms resolution) against
// the others of the same run.
import { JsonProc } from '../test/bed.ts';
import { PORTS, quantile, stitchAllDirect, untilStatus, type Bed, type ConnView } from './bed.ts';
import { shellHandover } from './handover.ts';

export interface Rtt { n: number; p50Us: number; p99Us: number }
export interface RttHandover {
  n: number;
  /** Decision → phase 3 at the shell (its log, ms). */
  handoverMs: number;
  /** Round trips that overlap the handover, and the others. */
  during: { n: number; p50Us: number; maxUs: number };
  outside: { n: number; p50Us: number; p99Us: number; maxUs: number };
}

async function one(bed: Bed, host: string, port: number, n: number, stitch: boolean): Promise<Rtt> {
  const p = new JsonProc('rtt client', bed.topo.c.spawn(bed.rttProbe, ['client', host, String(port), String(n), '--wait'], { stdio: ['pipe', 'pipe', 'pipe'] }));
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

async function midRun(bed: Bed, n: number): Promise<RttHandover> {
  const pair = bed.pairs.rtt;
  const p = new JsonProc('rtt client', bed.topo.c.spawn(bed.rttProbe, ['client', bed.topo.a.addr, String(PORTS.shell.rtt), String(n), '--wait', '--timeline'], { stdio: ['pipe', 'pipe', 'pipe'] }));
  try {
    const logsFrom = pair.logs.shell.length;
    const conn = await p.wait((o) => o.event === 'connected', 'connected');
    const mine = (cs: ConnView[]) => cs.filter((c) => c.client.port === conn.port);
    await untilStatus(pair, (cs) => mine(cs).some((c) => c.state === 'relaying'), 'the RTT connection relaying');
    p.line('go');
    const [c] = mine(await untilStatus(pair, (cs) => mine(cs).some((x) => x.bytesFromClient >= n / 3), 'a third of the pings', 60_000, 5));
    const { outcomes } = await stitchAllDirect(pair);
    if (outcomes.length !== 1 || !outcomes[0]!.ok) throw new Error(`stitching the RTT connection: ${JSON.stringify(outcomes)}`);
    const r = await p.wait((o) => o.event === 'done', 'RTT result', 120_000);
    const w = shellHandover(pair.logs.shell.slice(logsFrom), [], new Set([c!.id])).windows.get(c!.id);
    if (!w) throw new Error('the shell logged no decision → phase 3 for the RTT connection: its stitch did not finish while it pinged');
    const [from, to] = [w[0] - 1, w[1] + 1];
    const timeline = r.timeline as Array<[number, number]>;
    const during = timeline.filter(([at, us]) => at < to && at + us / 1000 > from).map(([, us]) => us);
    const outside = timeline.filter(([at, us]) => !(at < to && at + us / 1000 > from)).map(([, us]) => us);
    return {
      n, handoverMs: w[1] - w[0],
      during: { n: during.length, p50Us: quantile(during, 0.5), maxUs: Math.max(...during) },
      outside: { n: outside.length, p50Us: quantile(outside, 0.5), p99Us: quantile(outside, 0.99), maxUs: Math.max(...outside) },
    };
  } finally {
    p.child.stdin?.end();
  }
}

export async function measureRtt(bed: Bed, n: number): Promise<{ routed: Rtt; shellRelay: Rtt; stitched: Rtt; handover: RttHandover | { error: string } }> {
  const { a, b } = bed.topo;
  const routed = await one(bed, b.addr, PORTS.rtt, n, false);
  const shellRelay = await one(bed, a.addr, PORTS.shell.rtt, n, false);
  const stitched = await one(bed, a.addr, PORTS.shell.rtt, n, true);
  // Three times the pings: the stitch lands after a third, with room to spare after it.
  const handover = await midRun(bed, 3 * n).catch((e: Error) => ({ error: e.message }));
  return { routed, shellRelay, stitched, handover };
}
