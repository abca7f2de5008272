// `npm run bench`: every figure measured side by side in one run on one topology of namespace hosts,
// reported against the routed path measured in the same run (these machines are noisy) and against
// the targets. Writes bench/out/report.{md,json}.
//
//   bench/bed.ts         the topology and everything started on it (switch, cores, shells, HAProxy)
//   bench/throughput.ts  routed / stitched / routed + B relay / stitched + B relay / shell relay /
//                        HAProxy, both ways; shell CPU per GiB in phase 2 and 3; routed and stitched
//                        again with GRO on every veth
//   bench/rtt.ts         round trip routed / relayed / stitched (bench/rtt-probe.c), and the
//                        round trips of a ping-pong stitched while it runs, also with the switch
//                        daemon and the shell kept on separate vCPUs
//   bench/handover.ts    stitching loaded connections: handover time, retransmissions, RTOs; again
//                        with the shell host's TCP buffers capped, and with the shell's own --socket-buffer
//   bench/installs.ts    stitch installs per second (datapath maps, control protocol); the switch
//                        daemon's CPU at a full table of idle stitches (bench/daemon-load.ts)
//   bench/diagnose.ts    which half of the drain condition a stuck stitch waits on (switch log)
//   bench/report.ts      targets table, tables, report.json
//
// Environment: BENCH_ROUNDS (3), BENCH_TARGET_ROUNDS (15: rounds of routed and stitched; a median of
// 9 moved by ±0.04 between runs of the same code), BENCH_GRO_ROUNDS (10), BENCH_SECONDS (6), BENCH_RTT_SAMPLES (3000),
// BENCH_LIVE_RUNS (10: connections stitched mid-ping-pong, and as many kept apart), BENCH_HANDOVER_ROUNDS (2),
// BENCH_HANDOVER_CONNS (20), BENCH_HANDOVER_MIB (40).
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { availableParallelism } from 'node:os';
import { join } from 'node:path';
import { PROJECT_ROOT } from '../test/hosts.ts';
import { say, startBed, type Bed } from './bed.ts';
import { measureHandover, measureHandoverCapped, measureHandoverSocketBuffer } from './handover.ts';
import { measureDaemon, measureInstalls } from './installs.ts';
import { render, type Raw } from './report.ts';
import { measureRtt } from './rtt.ts';
import { measureThroughput, measureThroughputGro } from './throughput.ts';

const num = (name: string, dflt: number) => {
  const v = Number(process.env[name] ?? dflt);
  if (!Number.isFinite(v) || v <= 0) throw new Error(`${name} must be a positive number`);
  return v;
};
const settings = {
  rounds: num('BENCH_ROUNDS', 3), targetRounds: num('BENCH_TARGET_ROUNDS', 15), groRounds: num('BENCH_GRO_ROUNDS', 10), seconds: num('BENCH_SECONDS', 6), rttSamples: num('BENCH_RTT_SAMPLES', 3000),
  liveRuns: num('BENCH_LIVE_RUNS', 10),
  handoverRounds: num('BENCH_HANDOVER_ROUNDS', 2), handoverConns: num('BENCH_HANDOVER_CONNS', 20), handoverMiB: num('BENCH_HANDOVER_MIB', 40),
};
const out = join(PROJECT_ROOT, 'bench/out');
const started = performance.now();
const raw: Raw = {
  when: new Date().toISOString(), kernel: readFileSync('/proc/sys/kernel/osrelease', 'utf8').trim(), cpus: availableParallelism(), runtimeS: 0, parts: {},
  settings, throughput: [], handover: [], errors: [],
};

/** Runs one part; a failure is recorded and the bench goes on with the next. */
async function part<T>(name: string, fn: () => Promise<T>): Promise<T | undefined> {
  say(`--- ${name}`);
  const t = performance.now();
  try { return await fn(); } catch (e) {
    raw.errors.push(`${name}: ${(e as Error).message}`);
    say(`${name} failed: ${(e as Error).stack}`);
    return undefined;
  } finally {
    raw.parts[name] = (performance.now() - t) / 1000;
  }
}

let bed: Bed | undefined;
try {
  const t = performance.now();
  bed = await startBed();
  raw.parts.setup = (performance.now() - t) / 1000;
  const b = bed;
  raw.throughput = (await part('throughput', () => measureThroughput(b, settings.rounds, settings.seconds, settings.targetRounds))) ?? [];
  raw.throughputGro = (await part('throughput, GRO on', () => measureThroughputGro(b, settings.groRounds, settings.seconds))) ?? [];
  raw.rtt = await part('round trip', () => measureRtt(b, settings.rttSamples, settings.liveRuns));
  raw.handover = (await part('handover', () => measureHandover(b, settings.handoverRounds, settings.handoverConns, settings.handoverMiB << 20))) ?? [];
  raw.handoverCapped = (await part('capped handover', () => measureHandoverCapped(b, settings.handoverRounds, settings.handoverConns, settings.handoverMiB << 20))) ?? [];
  raw.handoverSocketBuffer = (await part('socket-buffer handover', () => measureHandoverSocketBuffer(b, settings.handoverRounds, settings.handoverConns, settings.handoverMiB << 20))) ?? [];
  raw.installs = await part('installs', () => measureInstalls(b.topo.bpffs!));
  raw.daemon = await part('daemon', () => measureDaemon(b.topo.s, b.topo.bpffs!));
} finally {
  await bed?.close();
}
raw.runtimeS = (performance.now() - started) / 1000;
const { md, json } = render(raw);
mkdirSync(out, { recursive: true });
writeFileSync(join(out, 'report.json'), JSON.stringify(json, null, 2) + '\n');
writeFileSync(join(out, 'report.md'), md);
process.stdout.write(md);
