// Throughput, C->B and B->C (iperf3, -R for B->C), six modes interleaved round by round so that
// drift hits them alike:
//   routed       C -> S -> B's iperf3, no shell
//   stitched     C -> shell (--plain-core) -> B's iperf3, the same server routed uses, stitched with
//                `tcp-stitch stitch --all` as soon as iperf3's control and data connections are
//                relaying; only the 1-s intervals that start >= 1 s after the stitch returned count
//   routed + B relay  C -> S -> B's forwarder (the core's relay code) -> iperf3 on B's loopback
//   stitched + B relay  C -> shell -> `tcp-stitch core` -> iperf3 on B's loopback, stitched the same
//                way: a stitched connection that still ends in a core relaying to its backend, and
//                "routed + B relay" is its like-for-like baseline
//   shell relay  C -> shell (--plain-core, phase 2, never stitched) -> B's iperf3
//   haproxy      C -> HAProxy (TCP mode) on A -> B's iperf3
// Around the shell runs it reads the shell's CPU (utime + stime): the whole run for phase 2, only the
// counted intervals for phase 3. For stitched runs it also reads the core's CPU over the same window.
// Then routed and stitched again with GRO on every veth (measureThroughputGro): Linux's veth hands
// each packet to the CPU that sent it, so a flow whose sender sends from both vCPUs arrives out of
// order, which no NIC with a receive queue per flow does; with GRO on, a veth receives through NAPI,
// one CPU at a time, in order.
import { drainDiagnosis } from './diagnose.ts';
import { PORTS, cpuBetween, cpuSeconds, cpuTrace, say, settle, stitchAllCli, untilStatus, type Bed, type Pair } from './bed.ts';

export type Mode = 'routed' | 'stitched' | 'routed + B relay' | 'stitched + B relay' | 'shell relay' | 'haproxy';
/** Run order within a round: each stitched mode right after its baseline, so that both see the same load. */
export const MODES: Mode[] = ['routed', 'stitched', 'routed + B relay', 'stitched + B relay', 'shell relay', 'haproxy'];

export interface Run {
  mode: Mode; round: number; reverse: boolean;
  /** Mean rate (stitched: over the counted intervals only). */
  gbps: number;
  /** Sender retransmissions over the whole run (as iperf3 reports them). */
  retransmits: number;
  /** Bytes received over the whole run. */
  bytes: number;
  /** Shell runs: shell CPU seconds and bytes for the measured part (whole run / counted intervals). */
  shellCpu?: number; shellBytes?: number;
  /** Stitched runs. */
  stitch?: {
    /** When `tcp-stitch stitch --all` returned, seconds after iperf3 was launched; how long it took. */
    returnedAtS: number; cliMs: number; lines: string[];
    /** The 1-s intervals counted, and the rates of those before the stitch (for context). */
    counted: Array<{ start: number; end: number; gbps: number; bytes: number }>;
    beforeGbps: number[];
    /** Core CPU seconds per wall second over the counted intervals (its relay to the backend; none for a plain core). */
    coreCpuPerS?: number;
    /** Shell CPU seconds per wall second over the counted intervals. */
    shellCpuPerS: number;
  };
  error?: string;
}

interface IperfJson {
  intervals: Array<{ sum: { start: number; end: number; bytes: number; bits_per_second: number } }>;
  end: { sum_received: { bits_per_second: number; bytes: number }; sum_sent: { retransmits?: number } };
  error?: string;
}

async function iperf(bed: Bed, host: string, port: number, seconds: number, reverse: boolean): Promise<IperfJson> {
  const r = await bed.topo.c.run('iperf3', ['-c', host, '-p', String(port), '-t', String(seconds), '-i', '1', '-J', ...(reverse ? ['-R'] : [])], { timeoutMs: (seconds + 40) * 1000 });
  let j: IperfJson;
  try { j = JSON.parse(r.stdout) as IperfJson; } catch { throw new Error(`iperf3 to ${host}:${port} gave no JSON (exit ${r.code}): ${r.stderr.trim().slice(0, 300)}`); }
  if (j.error || r.code !== 0) throw new Error(`iperf3 to ${host}:${port}: ${j.error ?? `exit ${r.code}`}`);
  return j;
}

const summary = (j: IperfJson) => ({
  gbps: j.end.sum_received.bits_per_second / 1e9, retransmits: j.end.sum_sent.retransmits ?? 0, bytes: j.end.sum_received.bytes,
});

async function plain(bed: Bed, mode: Mode, seconds: number, reverse: boolean): Promise<Omit<Run, 'mode' | 'round' | 'reverse'>> {
  const { a, b } = bed.topo;
  if (mode === 'routed') return summary(await iperf(bed, b.addr, PORTS.routedIperf, seconds, reverse));
  if (mode === 'routed + B relay') return summary(await iperf(bed, b.addr, PORTS.forward, seconds, reverse));
  if (mode === 'haproxy') return summary(await iperf(bed, a.addr, PORTS.haproxy, seconds, reverse));
  await settle(bed.pairs.iperf);
  const pid = bed.pairs.iperf.shell.pid!;
  const cpu0 = cpuSeconds(pid);
  const s = summary(await iperf(bed, a.addr, PORTS.shell.iperf, seconds, reverse));
  return { ...s, shellCpu: cpuSeconds(pid) - cpu0, shellBytes: s.bytes };
}

async function stitched(bed: Bed, p: Pair, seconds: number, reverse: boolean): Promise<Omit<Run, 'mode' | 'round' | 'reverse'>> {
  const old = await settle(p);
  const logsFrom = bed.sw.logs.length;
  const shellTrace = cpuTrace(p.shell.pid!), coreTrace = p.core && cpuTrace(p.core.pid!);
  try {
    const launched = performance.now();
    // Stitching takes about a second; run long enough to leave `seconds` of counted intervals.
    const running = iperf(bed, bed.topo.a.addr, p.port, seconds + 3, reverse);
    running.catch(() => undefined);
    // iperf3's clock starts when its data connection is up: the first status that shows it.
    let dataAt = 0;
    await untilStatus(p, (all) => {
      const cs = all.filter((c) => !old.has(c.id));
      if (cs.length === 2 && !dataAt) dataAt = performance.now();
      return cs.length === 2 && cs.every((c) => c.state === 'relaying') && cs.some((c) => (reverse ? c.bytesFromCore : c.bytesFromClient) > 1 << 20);
    }, 'iperf3 control and data connections relaying', 20_000);
    const st = await stitchAllCli(bed.topo, p);
    const returned = performance.now();
    const j = await running;
    const shellSamples = shellTrace.stop(), coreSamples = coreTrace?.stop();
    if (!st.ok) return { ...summary(j), gbps: NaN, error: `stitch --all failed: ${st.lines.join(' | ')}` };
    const returnedAtS = (returned - launched) / 1000; // on iperf3's clock this is conservative: its clock starts later
    const counted = j.intervals.filter((i) => i.sum.start >= returnedAtS + 1 && i.sum.end - i.sum.start > 0.5)
      .map((i) => ({ start: i.sum.start, end: i.sum.end, gbps: i.sum.bits_per_second / 1e9, bytes: i.sum.bytes }));
    const stitchStartS = (returned - st.ms - dataAt) / 1000; // on iperf3's clock, roughly
    const beforeGbps = j.intervals.filter((i) => i.sum.end <= stitchStartS).map((i) => i.sum.bits_per_second / 1e9);
    if (counted.length === 0) {
      const stuck = drainDiagnosis(bed.sw.logs.slice(logsFrom));
      const last = j.intervals.at(-1)?.sum.end ?? 0;
      return {
        ...summary(j), gbps: NaN,
        error: `the stitch returned ${returnedAtS.toFixed(1)} s after iperf3 started (its test lasted ${last.toFixed(1)} s): no interval to count` +
          (stuck.length ? `; the drain did not complete until the test ended (${stuck.join('; ')})` : ''),
      };
    }
    // (C->B: iperf3's client intervals count bytes sent; over these seconds that differs from bytes
    // received by at most what the socket buffers hold, well under 1 %.)
    const secs = counted.reduce((s, i) => s + (i.end - i.start), 0);
    const bytes = counted.reduce((s, i) => s + i.bytes, 0);
    // The counted intervals on the wall clock: iperf3's 0 is about when its data connection appeared.
    const from = dataAt + counted[0]!.start * 1000, to = dataAt + counted.at(-1)!.end * 1000;
    const shellCpu = cpuBetween(shellSamples, from, to), coreCpu = coreSamples && cpuBetween(coreSamples, from, to);
    const wall = (to - from) / 1000;
    return {
      ...summary(j), gbps: (bytes * 8) / secs / 1e9, shellCpu, shellBytes: bytes,
      stitch: { returnedAtS, cliMs: st.ms, lines: st.lines, counted, beforeGbps, coreCpuPerS: coreCpu === undefined ? undefined : coreCpu / wall, shellCpuPerS: shellCpu / wall },
    };
  } finally {
    shellTrace.stop(); coreTrace?.stop();
  }
}

/** The targets' two modes: the rounds after the first `rounds` run only these. */
const TARGET_MODES: Mode[] = ['routed', 'stitched'];

/** `rounds` rounds of every mode, then routed and stitched alone up to `targetRounds`: single runs
 *  on these shared vCPUs range over ±25 %, and the targets' ratio is a median of medians. */
export async function measureThroughput(bed: Bed, rounds: number, seconds: number, targetRounds = rounds): Promise<Run[]> {
  const runs: Run[] = [];
  const total = Math.max(rounds, targetRounds);
  for (let round = 0; round < total; round++) runs.push(...await oneRound(bed, round, total, round < rounds ? MODES : TARGET_MODES, seconds));
  return runs;
}

/** One round: each mode C->B, then B->C. A run that fails is kept, with its error. */
async function oneRound(bed: Bed, round: number, total: number, modes: Mode[], seconds: number, label = ''): Promise<Run[]> {
  const runs: Run[] = [];
  for (const mode of modes) {
    for (const reverse of [false, true]) {
      let r: Run;
      try {
        const m = mode === 'stitched' ? await stitched(bed, bed.pairs.iperf, seconds, reverse)
          : mode === 'stitched + B relay' ? await stitched(bed, bed.pairs.iperfCore, seconds, reverse)
          : await plain(bed, mode, seconds, reverse);
        r = { mode, round, reverse, ...m };
      } catch (e) {
        r = { mode, round, reverse, gbps: NaN, retransmits: 0, bytes: 0, error: (e as Error).message };
      }
      runs.push(r);
      const core = r.stitch?.coreCpuPerS === undefined ? '' : `core ${r.stitch.coreCpuPerS.toFixed(2)} CPU, `;
      const extra = r.stitch ? ` (stitched at ${r.stitch.returnedAtS.toFixed(2)} s, ${r.stitch.counted.length} intervals; ${core}shell ${r.stitch.shellCpuPerS.toFixed(3)} CPU)` : '';
      say(`round ${round + 1}/${total}${label && ` ${label}`} ${mode.padEnd(18)} ${reverse ? 'B->C' : 'C->B'} ${r.error ? `FAILED: ${r.error}` : `${r.gbps.toFixed(2)} Gbit/s, ${r.retransmits} retransmits${extra}`}`);
    }
  }
  return runs;
}

/** GRO on, or off (Linux's default for a veth), on every veth of the topology. */
async function setGro(bed: Bed, on: boolean): Promise<void> {
  for (const h of bed.topo.hosts) {
    const links = (await h.runOk('ip', ['-o', 'link', 'show', 'type', 'veth'])).stdout;
    for (const m of links.matchAll(/^\d+: ([^@:\s]+)/gm)) await h.runOk('ethtool', ['-K', m[1]!, 'gro', on ? 'on' : 'off']);
  }
}

/** `rounds` rounds of routed and stitched, both ways, with GRO on every veth; GRO off again after. */
export async function measureThroughputGro(bed: Bed, rounds: number, seconds: number): Promise<Run[]> {
  const runs: Run[] = [];
  await setGro(bed, true);
  try {
    for (let round = 0; round < rounds; round++) runs.push(...await oneRound(bed, round, rounds, TARGET_MODES, seconds, 'GRO on'));
  } finally {
    await setGro(bed, false);
  }
  return runs;
}
