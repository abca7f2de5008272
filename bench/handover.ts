// The handover under load: `conns` connections through the load shell, each sending `size` bytes each
// way at full speed (test/fixtures/load-client.ts in C against test/fixtures/echo-backend.ts behind
// the core), all stitched at once (the request `tcp-stitch stitch --all` sends) once every one of
// them is moving data both ways. Runs alternate with the same load left on the shell path, so the
// retransmissions and retransmission timeouts (netstat at C and B, before/after) a stitch causes
// can be told from those the load causes anyway.
//
// Handover time, per connection:
//  - shell: "connection phase" to "stitching" (the decision) -> to "stitched" (phase 3), from the
//    shell's log timestamps (1 ms resolution). Includes the STITCH exchange, the drain, the switch's
//    state poll (every 10 ms) and the NOTIFY.
//  - datapath: first packet after the commit -> PHASE_STITCHED, from the stitch_state entry the
//    eBPF program keeps (first_ns, stitched_ns; read from the pinned map right after the call).
import { join } from 'node:path';
import { PHASE_STITCHED, STITCH_STATE_SIZE, decodeStitchState, u32Key, type StitchStateVal } from '../switch/bpf/layout.ts';
import * as native from '../switch/native/index.ts';
import { waitForLine } from '../test/bed.ts';
import { nodeInNs } from '../test/hosts.ts';
import { PORTS, connections, say, stitchAllDirect, untilStatus, type Bed } from './bed.ts';

const COUNTERS = ['Tcp.RetransSegs', 'TcpExt.TCPTimeouts', 'TcpExt.TCPLossProbes', 'TcpExt.TCPSACKDiscard', 'TcpExt.TCPDSACKIgnoredOld',
  'TcpExt.PAWSEstab', 'Tcp.InCsumErrors', 'TcpExt.TCPSpuriousRTOs'] as const;
type Counters = Record<(typeof COUNTERS)[number], number>;

export interface HandoverRun {
  stitched: boolean; round: number; conns: number; sizeBytes: number;
  /** Load duration (load-client's own figure) and whether every byte arrived exactly. */
  loadMs: number; exact: boolean;
  /** Counter deltas over the run, at C and at B. */
  c: Counters; b: Counters;
  stitch?: {
    /** The whole `stitch --all` request (all connections concurrently). */
    callMs: number; ok: number; failed: string[];
    /** Per connection, milliseconds. */
    shellMs: number[]; datapathMs: number[];
    /** Bytes the shell relayed before the stitch, all connections. */
    relayedBefore: number;
  };
  error?: string;
}

async function netstat(bed: Bed): Promise<{ c: Counters; b: Counters }> {
  const [c, b] = await Promise.all([bed.topo.c.netstat(), bed.topo.b.netstat()]);
  const pick = (x: Record<string, number>) => Object.fromEntries(COUNTERS.map((k) => [k, x[k] ?? 0])) as Counters;
  return { c: pick(c), b: pick(b) };
}
const diff = (x: Counters, y: Counters) => Object.fromEntries(COUNTERS.map((k) => [k, y[k] - x[k]])) as Counters;

function datapathStates(bed: Bed, ids: number[]): StitchStateVal[] {
  const fd = native.objGet(join(bed.mapsDir, 'stitch_state'));
  try {
    return ids.map((id) => native.mapLookup(fd, u32Key(id), STITCH_STATE_SIZE)).filter((v): v is Buffer => v !== null).map(decodeStitchState);
  } finally {
    native.closeFd(fd);
  }
}

/** Per connection: shell log time from 'stitching' to 'stitched', ms. */
function shellHandover(lines: string[], ids: Set<string>): number[] {
  const at = new Map<string, { stitching?: number; stitched?: number }>();
  for (const l of lines) {
    if (!l.includes('"connection phase"')) continue;
    const o = JSON.parse(l) as { connectionId: string; to: string; timestamp: string };
    if (!ids.has(o.connectionId) || (o.to !== 'stitching' && o.to !== 'stitched')) continue;
    const e = at.get(o.connectionId) ?? {};
    e[o.to] = Date.parse(o.timestamp);
    at.set(o.connectionId, e);
  }
  return [...at.values()].filter((e) => e.stitching !== undefined && e.stitched !== undefined).map((e) => e.stitched! - e.stitching!);
}

async function one(bed: Bed, round: number, stitch: boolean, conns: number, size: number): Promise<HandoverRun> {
  const pair = bed.pairs.load;
  await untilStatus(pair, (cs) => cs.length === 0, 'no connection left from the previous run', 30_000, 50);
  const before = await netstat(bed);
  const client = nodeInNs(bed.topo.c, 'test/fixtures/load-client.ts', [bed.topo.a.addr, String(PORTS.shell.load), String(conns), String(size)], { stdio: ['ignore', 'pipe', 'pipe'] });
  const done = waitForLine(client, /^\{/, 240_000);
  done.catch(() => undefined);
  try {
    return await loadRun(bed, round, stitch, conns, size, before, done);
  } finally {
    if (client.exitCode === null && client.signalCode === null) client.kill('SIGKILL'); // ours, by its pid
  }
}

async function loadRun(bed: Bed, round: number, stitch: boolean, conns: number, size: number, before: { c: Counters; b: Counters }, done: Promise<string>): Promise<HandoverRun> {
  const pair = bed.pairs.load;
  let stitchPart: HandoverRun['stitch'];
  // Stitch (or, for the comparison run, do nothing) once every connection moves data both ways.
  const loaded = await untilStatus(pair, (cs) => cs.length === conns && cs.every((c) => c.state === 'relaying' && Math.min(c.bytesFromClient, c.bytesFromCore) >= 2 << 20),
    `${conns} connections relaying, 2 MiB each way`, 60_000);
  if (stitch) {
    const { outcomes, ms } = await stitchAllDirect(pair);
    const after = await connections(pair);
    const ids = after.filter((c) => c.stitchId !== undefined && outcomes.some((o) => o.ok && o.id === c.id)).map((c) => c.stitchId!);
    const states = datapathStates(bed, ids).filter((s) => s.phase === PHASE_STITCHED && s.firstNs > 0n && s.stitchedNs >= s.firstNs);
    stitchPart = {
      callMs: ms, ok: outcomes.filter((o) => o.ok).length, failed: outcomes.filter((o) => !o.ok).map((o) => `${o.id}: ${o.error}`),
      shellMs: [], datapathMs: states.map((s) => Number(s.stitchedNs - s.firstNs) / 1e6),
      relayedBefore: loaded.reduce((s, c) => s + c.bytesFromClient + c.bytesFromCore, 0),
    };
    stitchPart.shellMs = shellHandover(pair.logs.shell, new Set(outcomes.filter((o) => o.ok).map((o) => o.id)));
  }
  const result = JSON.parse(await done) as { ok: boolean; failed: unknown[]; ms: number };
  await untilStatus(pair, (cs) => cs.length === 0, 'every load connection closed at the shell', 60_000, 50).catch((e: Error) => say(`  warning: ${e.message}`));
  const after = await netstat(bed);
  return {
    stitched: stitch, round, conns, sizeBytes: size, loadMs: result.ms, exact: result.ok && result.failed.length === 0,
    c: diff(before.c, after.c), b: diff(before.b, after.b), ...(stitchPart && { stitch: stitchPart }),
  };
}

export async function measureHandover(bed: Bed, rounds: number, conns: number, size: number): Promise<HandoverRun[]> {
  const runs: HandoverRun[] = [];
  for (let round = 0; round < rounds; round++) {
    for (const stitch of [true, false]) {
      let r: HandoverRun;
      try {
        r = await one(bed, round, stitch, conns, size);
      } catch (e) {
        r = { stitched: stitch, round, conns, sizeBytes: size, loadMs: NaN, exact: false, c: {} as Counters, b: {} as Counters, error: (e as Error).message };
      }
      runs.push(r);
      const s = r.stitch;
      say(`handover round ${round + 1}/${rounds} ${stitch ? 'stitched' : 'no stitch'}: ${r.error ? `FAILED: ${r.error}` :
        `${conns} x ${size >> 20} MiB each way in ${r.loadMs} ms, exact ${r.exact}; retrans C ${r.c['Tcp.RetransSegs']} B ${r.b['Tcp.RetransSegs']}, RTOs C ${r.c['TcpExt.TCPTimeouts']} B ${r.b['TcpExt.TCPTimeouts']}` +
        (s ? `; stitch call ${s.callMs.toFixed(0)} ms, ${s.ok}/${conns} ok, shell max ${Math.max(...s.shellMs)} ms, datapath max ${Math.max(...s.datapathMs).toFixed(2)} ms` : '')}`);
    }
  }
  return runs;
}
