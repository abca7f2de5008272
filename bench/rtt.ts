// TCP round trip (1-byte ping-pong over one connection, bench/rtt-probe.c's client --wait in C
// against its echo server on B, both in C: a JavaScript probe's own pauses of 1.5-3 ms every few ms
// were most of what it measured): routed, through the shell (phase 2), and stitched (the
// connection is stitched before the first ping). Then the handover as a live connection sees it,
// over several connections one after another: the same ping-pong, stitched after a third of its
// pings; the longest round trip that overlaps the handover (decision → phase 3 in the shell's log,
// widened by the log's 1 ms resolution), against the longest in windows of the same length
// outside it on the same connection (phase 2 before, phase 3 after): the baseline a single
// maximum of ~100 round trips can be compared with. Every other connection runs with the switch
// daemon and the shell on separate vCPUs, as on their separate hosts S and A: here they share two,
// and the daemon's work on the STITCH otherwise delays the shell's relaying of the pings.
import { execFileSync } from 'node:child_process';
import { availableParallelism } from 'node:os';
import { JsonProc } from '../test/bed.ts';
import { PORTS, quantile, stitchAllDirect, untilStatus, type Bed, type ConnView } from './bed.ts';
import { shellHandover } from './handover.ts';

export interface Rtt { n: number; p50Us: number; p99Us: number }
/** One connection stitched mid-run. */
export interface LiveHandover {
  /** Decision → phase 3 at the shell (its log, ms). */
  handoverMs: number;
  /** Round trips that overlap the handover: how many, the longest, when it began (ms after the decision). */
  during: number;
  longestUs: number;
  longestAtMs: number;
  /** The longest round trip of each window of the handover's length outside it. */
  windowMaxUs: number[];
  /** Every round trip outside the handover. */
  outsideUs: number[];
}
/** How many round trips, and their p50, p99 and max (µs). */
export interface Spread { n: number; p50Us: number; p99Us: number; maxUs: number }
export interface RttHandover {
  /** Pings per connection. */
  n: number;
  runs: Array<Omit<LiveHandover, 'windowMaxUs' | 'outsideUs'>>;
  /** The longest round trip during each handover, across the runs. */
  longest: Spread;
  /** The same for the windows of the same length outside the handovers. */
  windows: Spread;
  /** Every round trip outside the handovers. */
  outside: Spread;
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

async function midRun(bed: Bed, n: number): Promise<LiveHandover> {
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
    const during: Array<[number, number]> = [];
    const outsideUs: number[] = [];
    // Windows of the handover's length, counted back from it and on after it.
    const windows = new Map<number, number>();
    for (const [at, us] of r.timeline as Array<[number, number]>) {
      if (at < to && at + us / 1000 > from) { during.push([at, us]); continue; }
      outsideUs.push(us);
      const k = at < from ? -1 - Math.floor((from - at) / (to - from)) : Math.floor((at - to) / (to - from));
      windows.set(k, Math.max(windows.get(k) ?? 0, us));
    }
    if (!during.length) throw new Error(`no round trip overlapped the handover (${w[0]}-${w[1]} ms): the pings ended before it`);
    const [longestAt, longestUs] = during.reduce((m, x) => (x[1] > m[1] ? x : m));
    return { handoverMs: w[1] - w[0], during: during.length, longestUs, longestAtMs: longestAt - w[0], windowMaxUs: [...windows.values()], outsideUs };
  } finally {
    p.child.stdin?.end();
  }
}

const spread = (xs: number[]): Spread => ({ n: xs.length, p50Us: quantile(xs, 0.5), p99Us: quantile(xs, 0.99), maxUs: Math.max(...xs) });

const summary = (n: number, runs: LiveHandover[]): RttHandover => ({
  n, runs: runs.map(({ windowMaxUs, outsideUs, ...run }) => run),
  longest: spread(runs.map((r) => r.longestUs)),
  windows: spread(runs.flatMap((r) => r.windowMaxUs)), outside: spread(runs.flatMap((r) => r.outsideUs)),
});

/** Runs fn with the switch daemon on the last vCPU and the RTT shell on the others (all their threads), then lets both run anywhere again. */
async function apart<T>(bed: Bed, fn: () => Promise<T>): Promise<T> {
  const cpus = availableParallelism();
  if (cpus < 2) throw new Error(`one vCPU: the switch daemon and the shell cannot be kept apart`);
  const pin = (pid: number | undefined, list: string) => execFileSync('taskset', ['-a', '-p', '-c', list, String(pid)], { stdio: 'ignore' });
  const [sw, shell] = [bed.sw.child.pid, bed.pairs.rtt.shell.pid];
  try {
    pin(sw, String(cpus - 1));
    pin(shell, `0-${cpus - 2}`);
    return await fn();
  } finally {
    pin(sw, `0-${cpus - 1}`);
    pin(shell, `0-${cpus - 1}`);
  }
}

type LiveResult = RttHandover | { error: string };

/** 2 × `liveRuns` connections stitched mid-run, n pings each, alternating: all processes free to run
 *  on any vCPU (as everything else in the bench), and the switch daemon kept apart from the shell. */
async function live(bed: Bed, n: number, liveRuns: number): Promise<{ shared: LiveResult; apart: LiveResult }> {
  const shared: LiveHandover[] = [], kept: LiveHandover[] = [];
  let apartError: string | undefined;
  for (let i = 0; i < liveRuns; i++) {
    shared.push(await midRun(bed, n));
    if (apartError === undefined) await apart(bed, () => midRun(bed, n)).then((r) => kept.push(r), (e: Error) => { apartError = e.message; });
  }
  return { shared: summary(n, shared), apart: apartError === undefined ? summary(n, kept) : { error: apartError } };
}

export async function measureRtt(bed: Bed, n: number, liveRuns: number): Promise<{ routed: Rtt; shellRelay: Rtt; stitched: Rtt; handover: LiveResult; handoverApart: LiveResult }> {
  const { a, b } = bed.topo;
  const routed = await one(bed, b.addr, PORTS.rtt, n, false);
  const shellRelay = await one(bed, a.addr, PORTS.shell.rtt, n, false);
  const stitched = await one(bed, a.addr, PORTS.shell.rtt, n, true);
  const { shared: handover, apart: handoverApart } = await live(bed, n, liveRuns).catch((e: Error) => ({ shared: { error: e.message }, apart: { error: e.message } }));
  return { routed, shellRelay, stitched, handover, handoverApart };
}
