// The handover under load: `conns` connections through the load shell, each sending `size` bytes each
// way at full speed (test/fixtures/load-client.ts in C against test/fixtures/echo-backend.ts behind
// the core), all stitched at once (the request `tcp-stitch stitch --all` sends) once every one of
// them is moving data both ways (1 MiB moved each way). Runs alternate with the same load left on
// the shell path, and with the same load stitched while idle before it began (nothing in the shell,
// no drain), so the retransmissions and retransmission timeouts (netstat at C and B, before/after)
// the handover causes can be told from those the load causes anyway on either path.
//
// Handover time, per connection:
//  - shell: "connection phase" to "stitching" (the decision) -> to "stitched" (phase 3), from the
//    shell's log timestamps (1 ms resolution). Includes the STITCH exchange, the drain, the switch's
//    state poll (every 10 ms) and the NOTIFY.
//  - datapath: first packet after the commit -> PHASE_STITCHED, from the stitch_state entry the
//    eBPF program keeps (first_ns, stitched_ns; read from the pinned map right after the call).
import { join } from 'node:path';
import {
  PHASE_STITCHED, STITCH_CFG_SIZE, STITCH_FORCE_STITCHED, STITCH_STATE_SIZE, decodeStitchCfg, decodeStitchState, type StitchStateVal,
} from '../switch/bpf/layout.ts';
import * as native from '../switch/native/index.ts';
import { waitForLine } from '../test/bed.ts';
import { nodeInNs } from '../test/hosts.ts';
import { drainDiagnosis } from './diagnose.ts';
import { PORTS, connections, say, settle, stitchAllDirect, untilStatus, type Bed, type ConnView } from './bed.ts';

const COUNTERS = ['Tcp.RetransSegs', 'TcpExt.TCPTimeouts', 'TcpExt.TCPLossProbes', 'TcpExt.TCPSACKDiscard', 'TcpExt.TCPDSACKIgnoredOld',
  'TcpExt.PAWSEstab', 'Tcp.InCsumErrors', 'TcpExt.TCPSpuriousRTOs'] as const;
type Counters = Record<(typeof COUNTERS)[number], number>;

export interface HandoverRun {
  stitched: boolean; round: number; conns: number; sizeBytes: number;
  /** Stitched while idle, before the load started: the RTOs the stitched path has without a handover. */
  fromStart?: boolean;
  /** Load duration (load-client's own figure) and whether every byte arrived exactly. */
  loadMs: number; exact: boolean;
  /** Counter deltas over the run, at C and at B. */
  c: Counters; b: Counters;
  stitch?: {
    /** The whole `stitch --all` request (all connections concurrently). */
    callMs: number; ok: number; failed: string[];
    /** Per connection, milliseconds: the shell's view, and the datapath's (stitches the program
     *  itself switched to PHASE_STITCHED on a packet; the others are in `datapath`). */
    shellMs: number[]; datapathMs: number[];
    /** The parts of shellMs until the switch had installed the stitch (its log), and until the agent
     *  had its answer (the agent's "stitch installed"). */
    shellToSwitchMs: number[]; shellToInstalledMs: number[];
    datapath: DatapathView[];
    /** Bytes the shell relayed before the stitch, all connections. */
    relayedBefore: number;
  };
  /** Stitched while idle (fromStart): per connection, decision -> phase 3 at the shell and
   *  decision -> installed at the switch, milliseconds; the whole request. */
  idle?: { shellMs: number[]; shellToSwitchMs: number[]; callMs: number };
  /** Connections the shell still held 5 s after the load ended (it never learnt they closed). */
  leftAtShell?: number;
  /** Something worth knowing that did not spoil the run. */
  note?: string;
  /** What spoiled it (the counters are still those of the run). */
  error?: string;
}

async function netstat(bed: Bed): Promise<{ c: Counters; b: Counters }> {
  const [c, b] = await Promise.all([bed.topo.c.netstat(), bed.topo.b.netstat()]);
  const pick = (x: Record<string, number>) => Object.fromEntries(COUNTERS.map((k) => [k, x[k] ?? 0])) as Counters;
  return { c: pick(c), b: pick(b) };
}
const diff = (x: Counters, y: Counters) => Object.fromEntries(COUNTERS.map((k) => [k, y[k] - x[k]])) as Counters;

/** One stitch as the datapath last showed it (watched from the install until the request returned). */
export interface DatapathView {
  id: number; phase: 'installed' | 'draining' | 'stitched' | 'failed';
  /** The daemon set FORCE_STITCHED: the drain condition held for two polls with no packet (idle). */
  forced: boolean;
  /** first packet after the commit -> drain condition first held / -> PHASE_STITCHED, ms. */
  toDrainOkMs?: number; toStitchedMs?: number;
}

const PHASES = ['installed', 'draining', 'stitched', 'failed'] as const;

/**
 * Watches the switch's pinned stitch_state and stitch_cfg maps (every 10 ms, from this process) and
 * keeps the last state of every stitch that was not there when it started: a stitch's entries go
 * away when its connection ends, which may be before the stitch request returns.
 */
function watchDatapath(bed: Bed): { stop(): DatapathView[] } {
  const st = native.objGet(join(bed.mapsDir, 'stitch_state')), cfg = native.objGet(join(bed.mapsDir, 'stitch_cfg'));
  const keys = () => {
    const out: Buffer[] = [];
    for (let k = native.mapNextKey(st, null, 4); k && out.length < 8192; k = native.mapNextKey(st, k, 4)) out.push(Buffer.from(k));
    return out;
  };
  const before = new Set(keys().map((k) => k.readUInt32LE(0)));
  const last = new Map<number, { x: StitchStateVal; flags: number }>();
  const read = () => {
    for (const k of keys()) {
      const id = k.readUInt32LE(0);
      if (before.has(id)) continue;
      const v = native.mapLookup(st, k, STITCH_STATE_SIZE), c = native.mapLookup(cfg, k, STITCH_CFG_SIZE);
      if (v) last.set(id, { x: decodeStitchState(v), flags: c ? decodeStitchCfg(c).flags : last.get(id)?.flags ?? 0 });
    }
  };
  const timer = setInterval(read, 10);
  return {
    stop() {
      clearInterval(timer);
      try { read(); } finally { native.closeFd(st); native.closeFd(cfg); }
      return [...last].map(([id, { x, flags }]) => {
        const ms = (t: bigint) => (x.firstNs > 0n && t >= x.firstNs ? Number(t - x.firstNs) / 1e6 : undefined);
        return {
          id, phase: PHASES[x.phase] ?? 'failed', forced: (flags & STITCH_FORCE_STITCHED) !== 0,
          ...(x.drainOkNs > 0n && { toDrainOkMs: ms(x.drainOkNs) }), ...(x.phase === PHASE_STITCHED && { toStitchedMs: ms(x.stitchedNs) }),
        };
      });
    },
  };
}

/**
 * Per connection, from the shell's log: 'stitching' (the decision) -> 'stitched' (phase 3); when the
 * agent had the switch's answer to its STITCH ("stitch installed", with the stitch id); and, from the
 * switch's log (same clock), when the switch had installed that stitch in the datapath.
 */
export function shellHandover(lines: string[], switchLines: string[], ids: Set<string>): { total: number[]; toInstalled: number[]; toSwitch: number[]; windows: Map<string, [number, number]> } {
  const at = new Map<string, { stitching?: number; installed?: number; stitched?: number; stitchId?: number }>();
  for (const l of lines) {
    const phase = l.includes('"connection phase"'), inst = l.includes('"stitch installed"');
    if (!phase && !inst) continue;
    const o = JSON.parse(l) as { connectionId: string; to?: string; timestamp: string; stitchId?: number };
    const key = inst ? 'installed' : o.to;
    if (!ids.has(o.connectionId) || (key !== 'stitching' && key !== 'stitched' && key !== 'installed')) continue;
    const e = at.get(o.connectionId) ?? {};
    e[key] = Date.parse(o.timestamp);
    if (inst) e.stitchId = o.stitchId;
    at.set(o.connectionId, e);
  }
  const atSwitch = new Map<number, number>();
  for (const l of switchLines) {
    if (!/"stitch(es)? installed"/.test(l) || !l.includes('"switch-control"')) continue;
    const o = JSON.parse(l) as { id?: number; stitches?: Array<{ id: number }>; timestamp: string };
    for (const { id } of o.stitches ?? [{ id: o.id! }]) atSwitch.set(id, Date.parse(o.timestamp));
  }
  const done = [...at.values()].filter((e) => e.stitching !== undefined && e.stitched !== undefined);
  return {
    total: done.map((e) => e.stitched! - e.stitching!),
    toInstalled: done.filter((e) => e.installed !== undefined).map((e) => e.installed! - e.stitching!),
    toSwitch: done.filter((e) => e.stitchId !== undefined && atSwitch.has(e.stitchId)).map((e) => atSwitch.get(e.stitchId!)! - e.stitching!),
    /** Per connection id: [decision, phase 3], epoch ms. */
    windows: new Map([...at].filter(([, e]) => e.stitching !== undefined && e.stitched !== undefined).map(([id, e]) => [id, [e.stitching!, e.stitched!]])),
  };
}

/** How long a load may take before its run is declared stalled. */
const LOAD_TIMEOUT_MS = 30_000;

/** mid-load: stitched once each connection moved 1 MiB each way; none: left on the shell path;
 *  from-start: stitched idle, then the load (load-client --wait), so no byte is in the shell. */
async function one(bed: Bed, round: number, mode: 'mid-load' | 'none' | 'from-start', conns: number, size: number): Promise<HandoverRun> {
  const stitch = mode === 'mid-load';
  const pair = bed.pairs.load;
  const old = await settle(pair);
  const swLogsFrom = bed.sw.logs.length;
  const before = await netstat(bed);
  const fromStart = mode === 'from-start';
  const client = nodeInNs(bed.topo.c, 'test/fixtures/load-client.ts', [bed.topo.a.addr, String(PORTS.shell.load), String(conns), String(size), ...(fromStart ? ['--wait'] : [])],
    { stdio: [fromStart ? 'pipe' : 'ignore', 'pipe', 'pipe'] });
  const ready = fromStart ? waitForLine(client, /^ready$/, 60_000) : undefined;
  ready?.catch(() => undefined);
  const done = waitForLine(client, /^\{/, LOAD_TIMEOUT_MS + (fromStart ? 60_000 : 0));
  done.catch(() => undefined);
  // Where it stands when something does not finish: the connections still at the shell, by state,
  // and the drains the switch logged slow.
  const whereStuck = async () => {
    const stuck = (await connections(pair).catch(() => [] as ConnView[])).filter((c) => !old.has(c.id));
    const slow = drainDiagnosis(bed.sw.logs.slice(swLogsFrom));
    return `${stuck.length} connections still at the shell (${[...new Set(stuck.map((c) => c.state))].join(', ')})` +
      (slow.length ? `; drains logged slow: ${slow.slice(0, 3).join('; ')}${slow.length > 3 ? `; ... (${slow.length})` : ''}` : '');
  };
  const run: HandoverRun = { stitched: stitch || fromStart, ...(fromStart && { fromStart }), round, conns, sizeBytes: size, loadMs: NaN, exact: false, c: {} as Counters, b: {} as Counters };
  try {
    if (fromStart) {
      await ready;
      const { outcomes, ms } = await stitchAllDirect(pair);
      const okIds = new Set(outcomes.filter((o) => o.ok).map((o) => o.id));
      const sh = shellHandover(pair.logs.shell, bed.sw.logs.slice(swLogsFrom), okIds);
      run.idle = { shellMs: sh.total, shellToSwitchMs: sh.toSwitch, callMs: ms };
      if (okIds.size < conns) run.note = `${conns - okIds.size} of ${conns} idle connections not stitched`;
      client.stdin!.end('go\n');
    }
    // Stitch (or, for the comparison run, do nothing) once every connection moves data both ways.
    const seen = new Set<string>();
    const mine = (cs: ConnView[]) => cs.filter((c) => !old.has(c.id));
    const loaded = fromStart ? [] : mine(await untilStatus(pair, (all) => {
      const cs = mine(all);
      for (const c of cs) seen.add(c.id);
      return seen.size === conns && cs.every((c) => c.clientEnded || c.coreEnded || (c.state === 'relaying' && Math.min(c.bytesFromClient, c.bytesFromCore) >= 1 << 20));
    }, `${conns} connections relaying, 1 MiB each way`, 60_000));
    if (stitch) {
      const watch = watchDatapath(bed);
      let views: DatapathView[] = [];
      const { outcomes, ms } = await stitchAllDirect(pair).finally(() => { views = watch.stop(); });
      const okIds = new Set(outcomes.filter((o) => o.ok).map((o) => o.id));
      const sh = shellHandover(pair.logs.shell, bed.sw.logs.slice(swLogsFrom), okIds);
      run.stitch = {
        callMs: ms, ok: okIds.size, failed: outcomes.filter((o) => !o.ok).map((o) => `${o.id}: ${o.error}`),
        shellMs: sh.total, shellToSwitchMs: sh.toSwitch, shellToInstalledMs: sh.toInstalled, datapath: views,
        datapathMs: views.filter((x) => x.toStitchedMs !== undefined).map((x) => x.toStitchedMs!),
        relayedBefore: loaded.reduce((a, c) => a + c.bytesFromClient + c.bytesFromCore, 0),
      };
      if (okIds.size < conns) run.note = `${conns - okIds.size} of ${conns} connections not stitched (finished sending before the stitch, or refused)`;
    }
    try {
      const result = JSON.parse(await done) as { ok: boolean; failed: unknown[]; ms: number };
      run.loadMs = result.ms;
      run.exact = result.ok && result.failed.length === 0;
    } catch {
      run.error = `the load did not complete within ${LOAD_TIMEOUT_MS / 1000} s: ${await whereStuck()}`;
    }
  } catch (e) {
    run.error = `${(e as Error).message}: ${await whereStuck()}`;
  } finally {
    if (client.exitCode === null && client.signalCode === null) client.kill('SIGKILL'); // ours, by its pid
  }
  const left = [...await settle(pair)].filter((id) => !old.has(id));
  if (left.length) run.leftAtShell = left.length;
  const after = await netstat(bed);
  run.c = diff(before.c, after.c);
  run.b = diff(before.b, after.b);
  return run;
}

export async function measureHandover(bed: Bed, rounds: number, conns: number, size: number,
  modes: Array<'mid-load' | 'none' | 'from-start'> = ['mid-load', 'none', 'from-start']): Promise<HandoverRun[]> {
  const runs: HandoverRun[] = [];
  for (let round = 0; round < rounds; round++) {
    for (const mode of modes) {
      const r = await one(bed, round, mode, conns, size);
      runs.push(r);
      const s = r.stitch;
      say(`handover round ${round + 1}/${rounds} ${mode.padEnd(10)}: ${r.error ? `FAILED: ${r.error}` : `${conns} x ${size >> 20} MiB each way in ${r.loadMs} ms, exact ${r.exact}`}` +
        `; retrans C ${r.c['Tcp.RetransSegs']} B ${r.b['Tcp.RetransSegs']}, RTOs C ${r.c['TcpExt.TCPTimeouts']} B ${r.b['TcpExt.TCPTimeouts']}` +
        (s ? `; stitch call ${s.callMs.toFixed(0)} ms, ${s.ok}/${conns} ok, shell max ${Math.max(...s.shellMs)} ms, datapath max ${Math.max(...s.datapathMs).toFixed(2)} ms` : '') +
        (r.note ? `; ${r.note}` : '') + (r.leftAtShell ? `; ${r.leftAtShell} connections still at the shell 5 s after the load` : ''));
    }
  }
  return runs;
}

/** The shell host's TCP buffer limit for measureHandoverCapped. */
export const SHELL_BUFFER_CAP = 256 << 10;

/**
 * Mid-load stitches and their unstitched control, with A's TCP buffers capped (the max of
 * net.ipv4.tcp_rmem and tcp_wmem in A's namespace; restored after): the shell's backlog, which the
 * drain waits on, is bounded by its sockets' buffers. The control run shows what the cap costs
 * the shell path.
 */
export async function measureHandoverCapped(bed: Bed, rounds: number, conns: number, size: number, cap = SHELL_BUFFER_CAP): Promise<HandoverRun[]> {
  const { a } = bed.topo;
  const keys = ['net.ipv4.tcp_rmem', 'net.ipv4.tcp_wmem'];
  const old = await Promise.all(keys.map(async (k) => (await a.runOk('sysctl', ['-n', k])).stdout.trim().split(/\s+/)));
  const set = (vals: string[][]) => a.runOk('sysctl', ['-w', ...keys.map((k, i) => `${k}=${vals[i]!.join(' ')}`)]);
  await set(old.map(([min, dflt]) => [min!, String(Math.min(Number(dflt), cap)), String(cap)]));
  try {
    return await measureHandover(bed, rounds, conns, size, ['mid-load', 'none']);
  } finally {
    await set(old);
  }
}

/** The shell's own cap for measureHandoverSocketBuffer: the kernel keeps twice it, SHELL_BUFFER_CAP. */
export const SHELL_SOCKET_BUFFER = SHELL_BUFFER_CAP / 2;

/**
 * The same rounds with the cap set by the shell on its own sockets (`tcp-stitch shell
 * --socket-buffer`), the host's sysctls untouched: the load shell restarted with it, and without
 * it after.
 */
export async function measureHandoverSocketBuffer(bed: Bed, rounds: number, conns: number, size: number, bytes = SHELL_SOCKET_BUFFER): Promise<HandoverRun[]> {
  await bed.restartShell('load', ['--socket-buffer', String(bytes)]);
  try {
    return await measureHandover(bed, rounds, conns, size, ['mid-load', 'none']);
  } finally {
    await bed.restartShell('load', []);
  }
}
