// The eBPF datapath of the reference switch: loads switch/bpf/stitch.bpf.o, attaches it (tc clsact,
// direct action) to the ingress of S's interfaces and the egress of the shell's (combined mode), and
// drives its maps through the native addon (switch/native): one bpf(2) call per map update, never a
// bpftool process per stitch.
//
// Lifecycle: createEbpfDatapath() loads and attaches (bpftool prog load + pin, tc filter ... bpf da
// object-pinned), install()/remove() write the maps with the commit-key pattern, a poll timer
// (unref'd) turns the datapath's per-stitch state into onStateChange events, close() detaches
// everything: filters, the clsact qdiscs it created, pins, a bpffs it mounted, every fd.
//
// Daemon restart: with a bpffs given, the pin directory is stable (<bpffs>/tcp-stitch-<shellIface>).
// A daemon that stops with stitches installed leaves the program attached and the pins in place; the
// next one adopts them (maps, tracked handshakes, stitches with their generations) instead of
// loading afresh. docs/datapath.md, "Daemon restart".
//
// docs/datapath.md: maps byte by byte and the per-packet decision table; docs/handover.md: the drain.

import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync, readdirSync, rmSync, rmdirSync, statSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { ClosedError, DatapathError, InvalidArgumentError } from '../sdk/errors.ts';
import { componentLogger, type Logger } from '../sdk/log.ts';
import {
  FLOW_KEY_SIZE, FLOW_SACK_OK, FLOW_SYN, FLOW_TS_OK, FLOW_VAL_SIZE, FLOW_WS_OK, GLOBAL_CFG_SIZE, LEG_VAL_SIZE,
  MAP_NAMES, MAX_STITCHES, PHASE_DRAINING, PHASE_FAILED, PHASE_INSTALLED, PHASE_STITCHED, SIDE_CLIENT, SIDE_CORE, SIDE_SACK, SIDE_TS, STATS,
  STATS_COUNT, STITCH_CFG_SIZE, STITCH_FORCE_STITCHED, STITCH_START_STITCHED, STITCH_STATE_SIZE, TERM_FIN,
  TERM_FIN_ACKED, TERM_RST, decodeFlowVal, decodeLegVal, decodeStitchCfg, decodeStitchState, encodeFlowKey, peekStitchState,
  encodeGlobalCfg, encodeLegVal, encodeStitchCfg, encodeStitchStateInit, u32Key,
  type FlowKey, type FlowVal, type GlobalCfg, type MapName, type ShellPrefix, type StatName, type StitchCfg,
  type StitchSide, type StitchStateVal,
} from './bpf/layout.ts';
import * as native from './native/index.ts';
import type { AdoptedStitch, Datapath, DatapathCloseOptions, StitchSpec, StitchState, StitchStatus } from './stitch-types.ts';

const run = promisify(execFile);
const here = dirname(fileURLToPath(import.meta.url));

/** Where `make -C switch/bpf` puts the object. */
export const STITCH_OBJECT = join(here, 'bpf', 'stitch.bpf.o');
/** skb->mark of the clones the program sends back through itself on their way to the shell. */
export const DEFAULT_CLONE_MARK = 0x5717c10e;
/** tc filter priority our filters use (and remove by). */
const TC_PREF = 0x5717 & 0xffff;

export interface EbpfDatapathOptions {
  /** S's interface toward the shell (A). */
  shellIface: string;
  /** Interfaces to attach to (ingress). Default: every interface of the namespace but loopback. */
  ifaces?: string[];
  /** The shell's addresses (or prefixes, 'a.b.c.d/n'); at most 4. Default: the connected prefixes
   *  of shellIface, i.e. everything on the shell's side of S. */
  shellAddresses?: string[];
  /** Clamp the MSS of the shell's SYNs to this (for paths with a smaller MTU). Default: off. */
  mssClamp?: number;
  /** A mounted bpffs to pin under, in the stable directory <bpffs>/tcp-stitch-<shellIface>: what an
   *  earlier daemon left there is adopted, and close() leaves the fast path up while stitches remain
   *  (docs/datapath.md, "Daemon restart"). Default: a bpffs mounted for this datapath under
   *  /run/tcp-stitch/ (`ip netns exec` gives a fresh mount namespace without one), a private pin
   *  directory, and everything removed at close: stitches do not survive the daemon. */
  bpffs?: string;
  logger?: Logger;
  /** Drop injector: translated packets dropped per million (stands in for netem). Default 0. */
  dropPerMillion?: number;
  /** Override the interfaces translated packets leave by; default: learned from each handshake. */
  clientIface?: string;
  coreIface?: string;
  /** The compiled object; default switch/bpf/stitch.bpf.o. */
  objectPath?: string;
  /** State poll period while a stitch drains; default 10 ms (SETTLED_POLL_MS once all are settled). */
  pollIntervalMs?: number;
  /** A drain whose shell holds nothing and whose streams short of window saw no new data for this
   *  long is finished (rule 11, docs/handover.md); default QUIET_DRAIN_MS. */
  quietDrainMs?: number;
  /** From this many stitches due in one poll, the state table is read in one batch call; default
   *  BATCH_READ_FROM. */
  batchReadFrom?: number;
  /** false: skip the handover drain (the shell is known to hold nothing). Default true. */
  drain?: boolean;
  /** skb->mark tagging clones for the shell; default DEFAULT_CLONE_MARK. */
  cloneMark?: number;
}

export interface EbpfDatapath extends Datapath {
  installMany(specs: StitchSpec[]): Promise<Array<Error | undefined>>;
  /** The pin directory (prog, maps/). */
  readonly pinDir: string;
  /** The pin directory is the stable one (bpffs given): it may outlive this daemon. */
  readonly persistent: boolean;
  /** Interfaces the program is attached to. */
  readonly ifaces: readonly string[];
  /** The per-CPU counters of the program, summed. */
  stats(): Record<StatName, number>;
  /** Changes the drop injector at run time. */
  setDropPerMillion(ppm: number): void;
  /** The raw state the program keeps for a stitch (tests, diagnostics). */
  rawState(id: number): StitchStateVal | undefined;
  /** The tracking entry of one flow of the shell (diagnostics). */
  flow(key: FlowKey): FlowVal | undefined;
  /** Stitches taken over from the daemon before (still installed), with their generations. */
  adopted(): AdoptedStitch[];
  /** Entries in the maps flows, legs, stitch_cfg and stitch_state. */
  entries(): Record<'flows' | 'legs' | 'stitch_cfg' | 'stitch_state', number>;
  /** Closes. With stitches still installed and a persistent pin directory, only the fds: the program
   *  stays attached and the pins stay for the next daemon. { detach: true } tears down everything. */
  close(opts?: DatapathCloseOptions): Promise<void>;
}

/** An error whose result code the control server reports (UNTRACKED_LEG). */
export type UntrackedLegError = InstanceType<typeof DatapathError> & {
  reason: 'untracked-leg'; resultCode: 'UNTRACKED_LEG'; legs: Array<'client' | 'core'>;
};

function untrackedLeg(id: number, legs: Array<'client' | 'core'>, detail: string): UntrackedLegError {
  const err = new DatapathError(
    `UNTRACKED_LEG: stitch ${id}: the switch has not seen the handshake of the ${legs.join(' and the ')} leg ` +
    `(${detail}); only connections opened through this switch since it started can be stitched`);
  return Object.assign(err, { reason: 'untracked-leg' as const, resultCode: 'UNTRACKED_LEG' as const, legs });
}

// ---------------------------------------------------------------------------------------------------
// The object: load, pin, open maps. Also used directly by the packet-vector tests (no attach).

export interface StitchObject {
  readonly pinDir: string;
  readonly progPath: string;
  readonly progFd: number;
  readonly maps: Readonly<Record<MapName, number>>;
  /** The pin directory is a stable one (persistentName): it may outlive this process. */
  readonly persistent: boolean;
  /** The program and maps were found pinned there (left by an earlier daemon), not loaded now. */
  readonly adopted: boolean;
  /** Closes the fds and removes the pins (and the bpffs this object mounted); with keepPins (a
   *  persistent directory only) closes the fds and leaves the pins for the next daemon. */
  close(opts?: { keepPins?: boolean }): Promise<void>;
}

export interface OpenStitchObjectOptions {
  /** A mounted bpffs; default: one mounted under /run/tcp-stitch/ for this object. */
  bpffs?: string;
  objectPath?: string;
  /** A stable directory name under `bpffs` (required with it) instead of a private one. When that
   *  directory holds a pinned program and maps (an earlier daemon's), they are adopted: opened as
   *  they are, after checking their layout against layout.ts. */
  persistentName?: string;
}

async function sh(cmd: string, args: string[], timeout = 20_000): Promise<string> {
  try {
    const r = await run(cmd, args, { timeout, maxBuffer: 16 << 20 });
    return r.stdout;
  } catch (e) {
    const x = e as { stderr?: string; message: string };
    throw new DatapathError(`${cmd} ${args.join(' ')} failed: ${(x.stderr || x.message).trim().split('\n').slice(-6).join(' | ')}`, { cause: e });
  }
}

function isBpffs(path: string): boolean {
  try {
    return readFileSync('/proc/self/mounts', 'utf8').split('\n')
      .some((l) => { const f = l.split(' '); return f[1] === path && f[2] === 'bpf'; });
  } catch { return false; }
}

/** Key and value sizes of the pinned maps, as layout.ts encodes them. */
const MAP_LAYOUT: Readonly<Record<MapName, { key: number; value: number }>> = {
  flows: { key: FLOW_KEY_SIZE, value: FLOW_VAL_SIZE },
  legs: { key: FLOW_KEY_SIZE, value: LEG_VAL_SIZE },
  stitch_cfg: { key: 4, value: STITCH_CFG_SIZE },
  stitch_state: { key: 4, value: STITCH_STATE_SIZE },
  config: { key: 4, value: GLOBAL_CFG_SIZE },
  stats: { key: 4, value: STATS_COUNT * 8 },
  events: { key: 0, value: 0 }, // a ring buffer
};

/** A name safe in bpffs, which refuses '.' in names (interface names may hold one: eth0.100). */
export function bpffsName(s: string): string {
  return s.replace(/[^A-Za-z0-9_-]/g, (c) => `%${c.charCodeAt(0).toString(16).padStart(2, '0')}`);
}

/** The stable pin directory name of the datapath of shellIface under a given bpffs. */
export function persistentPinName(shellIface: string): string {
  return `tcp-stitch-${bpffsName(shellIface)}`;
}

// Markers: empty directories in the pin directory (bpffs holds nothing else) recording what the
// pins cannot: the network namespace they belong to, the live daemon using them, where the program
// is attached and which clsact qdiscs it added.
const marker = {
  netns: () => `netns-${statSync('/proc/self/ns/net').ino}`,
  owner: (pid = process.pid) => `owner-${pid}-${procStart(pid) ?? 0}`,
  iface: (name: string) => `iface-${bpffsName(name)}`,
  clsact: (name: string) => `clsact-${bpffsName(name)}`,
};

/** Start time of a process (clock ticks since boot, /proc/PID/stat field 22): tells a pid's reuse. */
function procStart(pid: number): string | undefined {
  try {
    const st = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return st.slice(st.lastIndexOf(')') + 2).split(' ')[19];
  } catch { return undefined; }
}

function markers(dir: string): string[] {
  try { return readdirSync(dir).filter((n) => n !== 'prog' && n !== 'maps'); } catch { return []; }
}
function setMarker(dir: string, name: string): void { mkdirSync(join(dir, name), { recursive: true }); }
function clearMarker(dir: string, name: string): void { try { rmdirSync(join(dir, name)); } catch { /* gone */ } }

/** Refuses a pin directory of another network namespace or of a daemon still running. */
function checkMarkers(pinDir: string): void {
  const mine = marker.netns();
  const ns = markers(pinDir).filter((n) => n.startsWith('netns-'));
  if (ns.length && !ns.includes(mine)) {
    throw new DatapathError(`pin directory ${pinDir} belongs to another network namespace (${ns.join(', ')}, this one is ${mine}): ` +
      'give this switch its own bpffs, or remove the directory (rm -r) if that namespace is gone');
  }
  for (const n of markers(pinDir).filter((x) => x.startsWith('owner-'))) {
    const [, pid, start] = n.split('-');
    if (Number(pid) !== process.pid && procStart(Number(pid)) === start) {
      throw new DatapathError(`pin directory ${pinDir} is in use by a running switch daemon (pid ${pid}): stop it first; two daemons must not share one datapath`);
    }
    if (Number(pid) !== process.pid) clearMarker(pinDir, n); // its daemon is gone
  }
}

/** Opens the program and maps pinned in pinDir, checking the maps against layout.ts. */
function openPinned(pinDir: string, fds: number[], adopting: boolean): { progFd: number; maps: Record<MapName, number> } {
  const refuse = (what: string) => new DatapathError(
    `pin directory ${pinDir} ${what}: its stitches cannot be adopted. Remove it (rm -r ${pinDir}) to start afresh; ` +
    'connections stitched through it will break');
  const open = (path: string, what: string) => {
    try {
      const fd = native.objGet(path);
      fds.push(fd);
      return fd;
    } catch (e) {
      if (!adopting) throw e;
      throw Object.assign(refuse(`holds no pinned ${what} (${(e as { errnoName?: string }).errnoName ?? (e as Error).message}); it is not a complete tcp-stitch pin directory`), { cause: e });
    }
  };
  const progFd = open(join(pinDir, 'prog'), 'program prog');
  const maps = {} as Record<MapName, number>;
  for (const name of MAP_NAMES) {
    maps[name] = open(join(pinDir, 'maps', name), `map maps/${name}`);
    let info: native.MapInfo;
    try { info = native.mapInfo(maps[name]); } catch (e) {
      throw Object.assign(refuse(`has maps/${name} that is not a map`), { cause: e });
    }
    const want = MAP_LAYOUT[name];
    if (info.keySize !== want.key || info.valueSize !== want.value) {
      const msg = `has map ${name} with keys of ${info.keySize} and values of ${info.valueSize} bytes, this code expects ${want.key} and ${want.value}`;
      throw adopting ? refuse(`was left by a daemon with another map layout (it ${msg.slice(4)})`) : new DatapathError(`the loaded object ${msg}: rebuild switch/bpf`);
    }
  }
  return { progFd, maps };
}

const missingObject = (obj: string) =>
  new DatapathError(`eBPF object ${obj} is missing: build it with \`npm run build\` (make -C switch/bpf; needs clang, libbpf-dev)`);

/**
 * Loads the stitch object and pins it (prog + maps) in a private directory under `bpffs` (or a
 * bpffs it mounts), or in the stable directory `persistentName`, where an earlier daemon's pinned
 * program and maps are adopted instead. Nothing is attached.
 */
export async function openStitchObject(opts: OpenStitchObjectOptions = {}): Promise<StitchObject> {
  const obj = opts.objectPath ?? STITCH_OBJECT;
  const tag = `${process.pid}-${randomBytes(3).toString('hex')}`;
  let mounted: string | undefined;
  let base = opts.bpffs;
  const persistent = opts.persistentName !== undefined;
  if (persistent && base === undefined) throw new InvalidArgumentError('a persistent pin directory needs a mounted bpffs (option bpffs)');
  if (persistent && !/^[A-Za-z0-9_%-]+$/.test(opts.persistentName!)) throw new InvalidArgumentError(`persistentName ${opts.persistentName} is not a bpffs name (letters, digits, _ - %)`);
  if (base !== undefined) {
    base = resolve(base);
    if (!isBpffs(base)) throw new InvalidArgumentError(`bpffs ${base} is not a mounted bpf filesystem; mount one (mount -t bpf bpf ${base}) or leave the option out`);
  }
  if (base === undefined) {
    if (!existsSync(obj)) throw missingObject(obj);
    mounted = `/run/tcp-stitch/bpffs-${tag}`;
    mkdirSync(mounted, { recursive: true });
    await sh('mount', ['-t', 'bpf', 'bpf', mounted]);
    base = mounted;
  }
  const pinDir = join(base, persistent ? opts.persistentName! : `stitch-${tag}`);
  // Adopt what an earlier daemon pinned; a directory with markers only is a load that never finished.
  let adopting = false;
  if (persistent && existsSync(pinDir)) {
    checkMarkers(pinDir);
    let mapPins: string[] = [];
    try { mapPins = readdirSync(join(pinDir, 'maps')); } catch { /* none */ }
    adopting = existsSync(join(pinDir, 'prog')) || mapPins.length > 0;
    if (!adopting) rmSync(pinDir, { recursive: true, force: true });
  }
  if (!adopting && !existsSync(obj)) throw missingObject(obj);
  const progPath = join(pinDir, 'prog');
  const fds: number[] = [];
  const owner = marker.owner();
  let closed = false;
  const close = async (o: { keepPins?: boolean } = {}) => {
    if (closed) return;
    closed = true;
    for (const fd of fds.splice(0)) try { native.closeFd(fd); } catch { /* already closed */ }
    if (o.keepPins && persistent) { clearMarker(pinDir, owner); return; }
    rmSync(pinDir, { recursive: true, force: true });
    if (mounted) {
      await sh('umount', [mounted]).catch(() => sh('umount', ['-l', mounted!]).catch(() => undefined));
      try { rmdirSync(mounted); } catch { /* busy or gone */ }
    }
  };
  try {
    if (!adopting) {
      mkdirSync(pinDir, { recursive: true });
      setMarker(pinDir, marker.netns());
      setMarker(pinDir, owner);
      await sh('bpftool', ['prog', 'load', obj, progPath, 'type', 'classifier', 'pinmaps', join(pinDir, 'maps')]);
    }
    const { progFd, maps } = openPinned(pinDir, fds, adopting);
    if (adopting) {
      setMarker(pinDir, marker.netns());
      setMarker(pinDir, owner);
    }
    return { pinDir, progPath, progFd, maps, persistent, adopted: adopting, close };
  } catch (e) {
    // Never remove what an earlier daemon left: the operator decides (the error says how).
    await close({ keepPins: adopting });
    throw e;
  }
}

// ---------------------------------------------------------------------------------------------------
// Translation from the spec and the two legs' tracking entries.

const mod32 = (n: bigint | number) => Number(BigInt.asUintN(32, BigInt(n)));

function scale(f: FlowVal, d: 0 | 1): number {
  return (f.dir[d].flags & FLOW_WS_OK) && (f.dir[d ^ 1]!.flags & FLOW_WS_OK) ? Math.min(14, f.dir[d].wscale) : 0;
}

function legOpts(f: FlowVal): number {
  const both = (bit: number) => (f.dir[0].flags & bit) && (f.dir[1].flags & bit);
  return (both(FLOW_TS_OK) ? SIDE_TS : 0) | (both(FLOW_SACK_OK) ? SIDE_SACK : 0);
}

export function clientLegKey(spec: StitchSpec): FlowKey {
  return { shellAddr: spec.clientLeg.shell.address, peerAddr: spec.clientLeg.client.address, shellPort: spec.clientLeg.shell.port, peerPort: spec.clientLeg.client.port };
}

export function coreLegKey(spec: StitchSpec): FlowKey {
  return { shellAddr: spec.coreLeg.shell.address, peerAddr: spec.coreLeg.core.address, shellPort: spec.coreLeg.shell.port, peerPort: spec.coreLeg.core.port };
}

/**
 * The stitch_cfg entry for a spec, from the tracking entries of its client leg (C<->A) and core leg
 * (A<->B). dir[0] of a flow is the shell's direction, dir[1] the far end's.
 *  - client bytes: seq_core = seq_client + ISN(A,core) - ISN(C) + P - k0
 *  - core bytes:   seq_client = seq_core + ISN(A,client) - ISN(B) - R + j0
 *  - TSval: each sender's TS clock relative to ktime (ts_base) gives the offset between the clock a
 *    far end sees on its leg and the one the other far end sends with.
 */
export function computeStitchCfg(spec: StitchSpec, client: FlowVal, core: FlowVal, gen: number, flags: number, shellIfindex = 0): StitchCfg {
  const side = (leg: FlowVal, other: FlowVal, far: { address: string; port: number }, shell: { address: string; port: number }, seqDelta: number): StitchSide => ({
    farAddr: far.address, shellAddr: shell.address, farPort: far.port, shellPort: shell.port, seqDelta,
    tsDelta: mod32(other.dir[0].tsBase - leg.dir[1].tsBase),
    farIfindex: leg.peerIfindex, wsFar: scale(leg, 1), wsShell: scale(leg, 0), opts: legOpts(leg),
  });
  const dClient = mod32(BigInt(core.dir[0].isn) - BigInt(client.dir[1].isn) + BigInt(spec.corePreambleLength) - spec.clientOffset);
  const dCore = mod32(BigInt(client.dir[0].isn) - BigInt(core.dir[1].isn) - BigInt(spec.coreAnswerLength) + spec.shellOffset);
  return {
    id: spec.id, gen, flags,
    shellIfindex: client.shellIfindex || core.shellIfindex || shellIfindex,
    side: [
      side(client, core, spec.clientLeg.client, spec.clientLeg.shell, dClient),
      side(core, client, spec.coreLeg.core, spec.coreLeg.shell, dCore),
    ],
  };
}

function checkSpec(spec: StitchSpec): void {
  const bad = (what: string) => { throw new InvalidArgumentError(`stitch spec: ${what}`); };
  if (!spec || typeof spec !== 'object') bad('must be an object');
  if (!Number.isInteger(spec.id) || spec.id < 0 || spec.id > 0xffffffff) bad(`id must be a 32-bit unsigned integer (got ${String(spec.id)})`);
  const ep = (e: { address: string; port: number } | undefined, name: string) => {
    if (!e || typeof e.address !== 'string' || !/^\d{1,3}(\.\d{1,3}){3}$/.test(e.address)) bad(`${name}.address must be an IPv4 dotted quad`);
    if (!Number.isInteger(e!.port) || e!.port < 1 || e!.port > 65535) bad(`${name}.port must be 1..65535`);
  };
  ep(spec.clientLeg?.client, 'clientLeg.client'); ep(spec.clientLeg?.shell, 'clientLeg.shell');
  ep(spec.coreLeg?.shell, 'coreLeg.shell'); ep(spec.coreLeg?.core, 'coreLeg.core');
  if (typeof spec.clientOffset !== 'bigint' || spec.clientOffset < 0n) bad('clientOffset must be a non-negative bigint');
  if (typeof spec.shellOffset !== 'bigint' || spec.shellOffset < 0n) bad('shellOffset must be a non-negative bigint');
  if (!Number.isInteger(spec.corePreambleLength) || spec.corePreambleLength < 0) bad('corePreambleLength must be a non-negative integer');
  if (!Number.isInteger(spec.coreAnswerLength) || spec.coreAnswerLength < 0) bad('coreAnswerLength must be a non-negative integer');
}

/** The contract's state and reason, from the entry's phase and termination bits alone. */
function stateOf(phase: number, term: number, cfgFlags: number): { state: StitchState; reason?: string } {
  const both = (bit: number) => (term & (bit << SIDE_CLIENT)) && (term & (bit << SIDE_CORE));
  if (phase === PHASE_FAILED) return { state: 'failed', reason: 'untracked-leg' };
  // Both FINs acknowledged: every byte arrived both ways, the end was clean. A RST after that (a
  // late duplicate reaching a socket already closed) changes nothing for either end.
  if (both(TERM_FIN) && both(TERM_FIN_ACKED)) return { state: 'closed', reason: 'fin' };
  if (term & (TERM_RST << SIDE_CLIENT)) return { state: 'closed', reason: 'client-rst' };
  if (term & (TERM_RST << SIDE_CORE)) return { state: 'closed', reason: 'core-rst' };
  // One FIN while the shell still drains is not the end of its part: 'closing' tells the agent the
  // shell is out of the path, so it waits for the drain.
  if (!(phase === PHASE_STITCHED || (cfgFlags & STITCH_FORCE_STITCHED) ||
    (phase === PHASE_INSTALLED && (cfgFlags & STITCH_START_STITCHED)))) return { state: 'draining' };
  if (term & ((TERM_FIN << SIDE_CLIENT) | (TERM_FIN << SIDE_CORE))) return { state: 'closing', reason: 'fin' };
  return { state: 'stitched' };
}

/** The contract's view of the program's per-stitch state. */
export function statusOf(id: number, st: StitchStateVal, cfgFlags = 0): StitchStatus {
  const { state, reason } = stateOf(st.phase, st.term, cfgFlags);
  const s: StitchStatus = {
    id, state,
    packetsClientToCore: Number(st.side[SIDE_CLIENT].packets), packetsCoreToClient: Number(st.side[SIDE_CORE].packets),
    bytesClientToCore: Number(st.side[SIDE_CLIENT].bytes), bytesCoreToClient: Number(st.side[SIDE_CORE].bytes),
    shellPacketsDropped: Number(st.side[SIDE_CLIENT].shellDropped + st.side[SIDE_CORE].shellDropped),
  };
  if (reason) s.reason = reason;
  return s;
}

// ---------------------------------------------------------------------------------------------------
// Map driver: the install/remove protocol over an opened object (no attach, no timers).

interface InstallOptions { drain: boolean; shellIfindex?: number }

interface Installed {
  spec: StitchSpec; gen: number; cfg: StitchCfg; keys: [Buffer, Buffer]; last?: StitchStatus; drainSeen?: bigint;
  installedAt?: number;
  /** The entry's phase and end bits when it was last decoded. */
  seen?: { phase: number; term: number };
  /** While draining: per stream, what its sender had sent when last seen changed, and when (rule 11). */
  quiet?: { sig: [string, string]; dataAtMs: [number, number] };
  /** 'drain slow' was logged. */
  slowLogged?: boolean;
  /** Taken over from an earlier daemon: spec has the legs only (offsets 0). */
  adopted?: boolean;
  /** Program runs in progress when the commit entry was written, and when the poll set
   *  START_STITCHED (rule 9) and FORCE_STITCHED (rules 8 and 11); cleared once they all ended. */
  commitRuns?: RunMark;
  startRuns?: RunMark;
  forceRuns?: RunMark;
}

/** Per CPU (index), the program runs begun and finished (stats.packets, stats.runsDone). */
export interface RunCounts { begun: bigint[]; done: bigint[] }
/** The runs in progress at some moment: [cpu, runs begun on it then]. */
export type RunMark = Array<[number, bigint]>;

/** A mark whose runs are not read yet (they are read once, after the last write of an install or
 *  a poll); no poll clears it. */
const MARK_UNREAD: RunMark = [];
export const runsInProgress = (r: RunCounts): RunMark =>
  r.begun.flatMap((b, cpu) => (b !== r.done[cpu] ? [[cpu, b] as [number, bigint]] : []));
/** Every run in progress at the mark has ended: runs on a CPU do not nest, so that CPU has finished
 *  as many runs as had begun then. */
const runsEnded = (m: RunMark, r: RunCounts): boolean => m.every(([cpu, b]) => (r.done[cpu] ?? b) >= b);

/**
 * The commit entry's flags as far as the state `st` may say 'stitched'. A flag the poll wrote counts
 * once a poll has found every program run that may have taken the flags before it ended (its mark
 * cleared; the runs are read before the states) and `st` agrees: START_STITCHED if the program still
 * took no packet (one that came between a poll's read and its write took the flags before it and
 * started a drain); FORCE_STITCHED if the shell still holds nothing (a run with the flags before it
 * may have handed it bytes, which the program then lets it relay first).
 */
function reportedFlags(inst: Installed, st: StitchStateVal): number {
  let flags = inst.cfg.flags;
  if (inst.startRuns) flags &= ~STITCH_START_STITCHED;
  if (inst.forceRuns || !drainedOf(inst.cfg, st)) {
    flags &= ~STITCH_FORCE_STITCHED;
  }
  return flags;
}

/** Every field set, in one order: the poll reads 4096 of these per sweep, and objects of one
 *  shape are read about eight times as fast here as the same made by spreading and adding. */
function newInstalled(spec: StitchSpec, gen: number, cfg: StitchCfg, keys: [Buffer, Buffer], adopted: boolean): Installed {
  return {
    spec, gen, cfg, keys, last: undefined, drainSeen: undefined, installedAt: undefined, seen: undefined,
    quiet: undefined, slowLogged: false, adopted, commitRuns: undefined, startRuns: undefined, forceRuns: undefined,
  };
}

const RUNS_BEGUN_AT = STATS.indexOf('packets') * 8, RUNS_DONE_AT = STATS.indexOf('runsDone') * 8;

/** The legs of a commit entry (its side[] entries), as a spec without offsets. */
function specOfCfg(cfg: StitchCfg): StitchSpec {
  const [c, k] = cfg.side;
  return {
    id: cfg.id,
    clientLeg: { client: { address: c.farAddr, port: c.farPort }, shell: { address: c.shellAddr, port: c.shellPort } },
    coreLeg: { shell: { address: k.shellAddr, port: k.shellPort }, core: { address: k.farAddr, port: k.farPort } },
    clientOffset: 0n, corePreambleLength: 0, shellOffset: 0n, coreAnswerLength: 0,
  };
}

export interface AdoptionResult {
  adopted: Installed[];
  /** Entries of stitches that were not complete (an install or removal cut short), deleted. */
  dropped: { stitch_cfg: number; legs: number; stitch_state: number };
}

const seqBefore = (a: number, b: number) => ((a - b) | 0) < 0;

/**
 * Rule 11: a drain gone quiet. A stream whose receiver's window never covers the edge the shell
 * advertised to its sender (rule 8's window half) keeps the stitch draining, and every byte that
 * sender later sends below the boundary is the shell's to relay, for as long as the connection
 * lives. Once the shell holds nothing of either stream, and every stream whose window half fails has
 * had no new data for this long, the daemon ends the drain: such a sender has nothing outstanding
 * and, idle longer than its RTO, restarts from a small congestion window.
 */
export const QUIET_DRAIN_MS = 1000;

/**
 * A stitch with nothing left to drain ('stitched', 'closing', or ended) changes state only when its
 * connection ends, and the program then tells the daemon which one (the events ring buffer), which
 * reads it at once. A change the ring had no room for (stats.eventsLost moved), or every change when
 * the ring cannot be watched (stats.stateChanges moved), makes the daemon read all of them together,
 * at most every SETTLED_POLL_MS; with every stitch settled the daemon polls only that often. Measured here with 4096 settled stitches: 51 % of
 * a core when each was read 100 ms after its own last read (every poll had a tenth of them due and
 * batch-read the whole table), 15-20 % with one read of all every 100 ms (about 13 ms each; 6 ms
 * once the Installed objects had one shape), 4 % with the change count at every 10 ms poll (the
 * wake-ups alone), 1-1.5 % now.
 */
export const SETTLED_POLL_MS = 100;

/** The poll period while a stitch's drain condition holds: its end is a millisecond away, and
 *  the agent waits for the daemon to see it (the 10-ms period made it 0-10 ms late). */
export const HOLD_POLL_MS = 1;

/** From this many stitches due in one poll, their states are read with one batch call. */
export const BATCH_READ_FROM = 200;


/**
 * The first half of the drain condition (translate.h, drain_check): for both streams s, the other
 * far end acknowledged everything the shell was handed of stream s, so the shell holds nothing.
 * handed[s] is in far s's sequence space, ackFar[s] what far s acknowledged (its leg's space).
 */
function shellHoldsNothing(cfg: StitchCfg, handed: [number, number], ackFar: [number, number]): boolean {
  for (const s of [0, 1] as const) {
    if (seqBefore((ackFar[s ^ 1] - cfg.side[s].seqDelta) >>> 0, handed[s])) return false;
  }
  return true;
}

/** shellHoldsNothing on the program's state entry (its snapshot, moved on by the packets since). */
function drainedOf(cfg: StitchCfg, st: StitchStateVal): boolean {
  return shellHoldsNothing(cfg, [st.side[0].handed, st.side[1].handed], [st.side[0].ackFar, st.side[1].ackFar]);
}

/** Rule 8's window half for stream s: the other far end's window covers the shell's edge. */
function windowCovers(cfg: StitchCfg, st: StitchStateVal, s: 0 | 1): boolean {
  const o = s ^ 1;
  const slack = 2 ** Math.max(cfg.side[s].wsShell & 15, cfg.side[o].wsFar & 15); // as drain_check
  return !seqBefore((st.side[o].edgeFar - cfg.side[s].seqDelta + slack) >>> 0, st.side[s].boundary);
}

/**
 * Rule 11's decision for a draining stitch: the streams it waits on (window half failing, each with
 * no new data from its sender since dataAtMs[s]), when the shell holds nothing and every one of them
 * has been quiet for quietMs; otherwise undefined.
 */
export function quietDrainDue(cfg: StitchCfg, st: StitchStateVal, dataAtMs: [number, number], nowMs: number, quietMs: number): Array<0 | 1> | undefined {
  if (st.phase !== PHASE_DRAINING || st.drainOkNs !== 0n || (cfg.flags & STITCH_FORCE_STITCHED)) return undefined;
  if (!drainedOf(cfg, st)) return undefined;
  const waiting = ([0, 1] as const).filter((s) => !windowCovers(cfg, st, s));
  return waiting.length > 0 && waiting.every((s) => nowMs - dataAtMs[s] >= quietMs) ? waiting : undefined;
}

/**
 * shellHoldsNothing on the legs' tracking entries (client leg, core leg): for a stitch no packet has
 * touched since its commit, these are exactly what the program's snapshot would hold. The window
 * half is not asked (docs/handover.md, rule 9).
 */
function idleDrained(inst: Installed, f: Array<FlowVal | undefined>): boolean {
  if (!f[0] || !f[1]) return false;
  return shellHoldsNothing(inst.cfg, [f[0].dir[1].seqHi, f[1].dir[1].seqHi], [f[0].dir[1].ackHi, f[1].dir[1].ackHi]);
}

export class StitchMaps {
  private gen = 0;
  constructor(readonly maps: Readonly<Record<MapName, number>>) {
    // Generations start from a random point so a restarted daemon never matches an old entry.
    this.gen = randomBytes(4).readUInt32LE(0) & 0x7fffffff;
  }

  writeConfig(c: GlobalCfg): void {
    native.mapUpdate(this.maps.config, u32Key(0), encodeGlobalCfg(c));
  }

  flow(key: FlowKey): FlowVal | undefined {
    const v = native.mapLookup(this.maps.flows, encodeFlowKey(key), FLOW_VAL_SIZE);
    return v ? decodeFlowVal(v) : undefined;
  }

  state(id: number): StitchStateVal | undefined {
    const v = this.stateRaw(id);
    return v ? decodeStitchState(v) : undefined;
  }

  /** The state entry's bytes (decodeStitchState reads them), or undefined. */
  stateRaw(id: number): Buffer | undefined {
    return native.mapLookup(this.maps.stitch_state, u32Key(id), STITCH_STATE_SIZE) ?? undefined;
  }

  private stateKeys?: Buffer;
  private stateValues?: Buffer;
  /**
   * Every state entry in one read (BPF_MAP_LOOKUP_BATCH): n entries, entry i's id at keys[4i] and its
   * bytes at values[i * STITCH_STATE_SIZE]. Both buffers are reused by the next call: read them
   * before calling again.
   */
  stateBatch(): { n: number; keys: Buffer; values: Buffer } {
    const keys = this.stateKeys ??= Buffer.alloc(MAX_STITCHES * 4);
    const values = this.stateValues ??= Buffer.alloc(MAX_STITCHES * STITCH_STATE_SIZE);
    return { n: native.mapLookupBatch(this.maps.stitch_state, keys, values), keys, values };
  }

  cfg(id: number): StitchCfg | undefined {
    const v = native.mapLookup(this.maps.stitch_cfg, u32Key(id), STITCH_CFG_SIZE);
    return v ? decodeStitchCfg(v) : undefined;
  }

  /**
   * Installs with the commit-key pattern: state, then both legs, then the commit entry (stitch_cfg)
   * last; the program consults a leg only when the commit entry with the same generation exists.
   * Throws UNTRACKED_LEG when a leg's handshake was not seen.
   */
  install(spec: StitchSpec, opts: InstallOptions): Installed {
    const [r] = this.installMany([spec], opts);
    if (r instanceof Error) throw r;
    return r!;
  }

  /**
   * Installs several stitches with one batched bpf(2) call per map for all of them (states, legs,
   * commit entries, in that order, so the commit-key pattern holds for each): a STITCH_MANY of ten
   * costs three map writes instead of forty. Returns, per spec, its Installed or the error that
   * refused it. A failed batch is retried one stitch at a time, so one bad stitch does not refuse the
   * others.
   */
  installMany(specs: StitchSpec[], opts: InstallOptions): Array<Installed | Error> {
    const out = specs.map((spec) => {
      try { return this.prepare(spec, opts); } catch (e) { return e as Error; }
    });
    const ready = out.filter((r): r is Installed => !(r instanceof Error));
    try {
      if (ready.length) this.write(ready);
      return out;
    } catch (err) {
      if (ready.length === 1) {
        this.unwrite(ready);
        return out.map((r) => r === ready[0] ? err as Error : r);
      }
    }
    // Refused part way: one at a time (each write overwrites what the batch left of its stitch, and
    // a failed one deletes it).
    return out.map((r) => {
      if (r instanceof Error) return r;
      try { this.write([r]); return r; } catch (e) { this.unwrite([r]); return e as Error; }
    });
  }

  /** The flow lookups and the translation of one install; nothing written yet. */
  private prepare(spec: StitchSpec, opts: InstallOptions): Installed {
    checkSpec(spec);
    const ck = clientLegKey(spec), kk = coreLegKey(spec);
    const client = this.flow(ck), core = this.flow(kk);
    const seen = (f: FlowVal | undefined) => !!f && (f.dir[0].flags & FLOW_SYN) !== 0 && (f.dir[1].flags & FLOW_SYN) !== 0;
    const missing: Array<'client' | 'core'> = [];
    if (!seen(client)) missing.push('client');
    if (!seen(core)) missing.push('core');
    if (missing.length) {
      const what = (f: FlowVal | undefined) => !f ? 'no entry' : `SYN ${f.dir[1].flags & FLOW_SYN ? 'seen' : 'not seen'}, SYN-ACK ${f.dir[0].flags & FLOW_SYN ? 'seen' : 'not seen'}`;
      throw untrackedLeg(spec.id, missing, missing.map((l) => `${l} leg: ${what(l === 'client' ? client : core)}`).join('; '));
    }
    this.gen = (this.gen + 1) >>> 0 || 1;
    const gen = this.gen;
    const cfg = computeStitchCfg(spec, client!, core!, gen, opts.drain ? 0 : STITCH_START_STITCHED, opts.shellIfindex ?? 0);
    return newInstalled(spec, gen, cfg, [encodeFlowKey(ck), encodeFlowKey(kk)], false);
  }

  private write(list: Installed[]): void {
    const n = list.length;
    const ids = Buffer.concat(list.map((i) => u32Key(i.spec.id)));
    native.mapUpdateBatch(this.maps.stitch_state, ids, Buffer.concat(list.map((i) => encodeStitchStateInit(i.spec.id, i.gen))), n);
    native.mapUpdateBatch(this.maps.legs, Buffer.concat(list.flatMap((i) => i.keys)), Buffer.concat(list.flatMap((i) => [
      encodeLegVal({ id: i.spec.id, gen: i.gen, side: SIDE_CLIENT }), encodeLegVal({ id: i.spec.id, gen: i.gen, side: SIDE_CORE }),
    ])), 2 * n);
    native.mapUpdateBatch(this.maps.stitch_cfg, ids, Buffer.concat(list.map((i) => encodeStitchCfg(i.cfg))), n);
  }

  /** Deletes whatever a failed write left (the program ignores it already: no commit entry). */
  private unwrite(list: Installed[]): void {
    for (const i of list) {
      const id = u32Key(i.spec.id);
      native.mapDelete(this.maps.stitch_cfg, id);
      for (const k of i.keys) native.mapDelete(this.maps.legs, k);
      native.mapDelete(this.maps.stitch_state, id);
    }
  }

  /** Removes in reverse: the commit entry first, then the legs, then the state (returned). */
  remove(inst: Installed): StitchStateVal | undefined {
    const id = u32Key(inst.spec.id);
    native.mapDelete(this.maps.stitch_cfg, id);
    for (const k of inst.keys) native.mapDelete(this.maps.legs, k);
    const last = this.state(inst.spec.id);
    native.mapDelete(this.maps.stitch_state, id);
    return last;
  }

  /** Rewrites the commit entry with extra flags (same generation). */
  setFlags(inst: Installed, flags: number): void {
    inst.cfg = { ...inst.cfg, flags: inst.cfg.flags | flags };
    native.mapUpdate(this.maps.stitch_cfg, u32Key(inst.spec.id), encodeStitchCfg(inst.cfg), 'exist');
  }

  /** Every key of a hash map (a snapshot: the map may change meanwhile). */
  keys(name: 'flows' | 'legs' | 'stitch_cfg' | 'stitch_state'): Buffer[] {
    const size = MAP_LAYOUT[name].key;
    const out: Buffer[] = [];
    const seen = new Set<string>();
    for (let k = native.mapNextKey(this.maps[name], null, size); k; k = native.mapNextKey(this.maps[name], k, size)) {
      const h = k.toString('hex');
      if (seen.has(h)) break; // the map changed under the walk and it restarted
      seen.add(h);
      out.push(Buffer.from(k));
    }
    return out;
  }

  /**
   * Takes over the stitches an earlier daemon left: every commit entry (stitch_cfg) whose two legs
   * and state carry its generation. Anything else in legs, stitch_cfg or stitch_state is the rest of
   * an install or removal cut short, which the program ignores already, and is deleted.
   */
  adoptAll(): AdoptionResult {
    const adopted: Installed[] = [];
    const dropped = { stitch_cfg: 0, legs: 0, stitch_state: 0 };
    const kept = new Map<number, number>(); // id -> gen
    for (const k of this.keys('stitch_cfg')) {
      const v = native.mapLookup(this.maps.stitch_cfg, k, STITCH_CFG_SIZE);
      if (!v) continue;
      const cfg = decodeStitchCfg(v);
      const spec = specOfCfg(cfg);
      const keys: [Buffer, Buffer] = [encodeFlowKey(clientLegKey(spec)), encodeFlowKey(coreLegKey(spec))];
      const legOk = (key: Buffer, side: number) => {
        const l = native.mapLookup(this.maps.legs, key, LEG_VAL_SIZE);
        const d = l && decodeLegVal(l);
        return !!d && d.id === cfg.id && d.gen === cfg.gen && d.side === side;
      };
      const st = this.state(cfg.id);
      if (cfg.id !== k.readUInt32LE(0) || !legOk(keys[0], SIDE_CLIENT) || !legOk(keys[1], SIDE_CORE) || !st || st.gen !== cfg.gen) {
        if (native.mapDelete(this.maps.stitch_cfg, k)) dropped.stitch_cfg++;
        continue;
      }
      kept.set(cfg.id, cfg.gen);
      adopted.push(newInstalled(spec, cfg.gen, cfg, keys, true));
    }
    for (const k of this.keys('legs')) {
      const l = native.mapLookup(this.maps.legs, k, LEG_VAL_SIZE);
      const d = l && decodeLegVal(l);
      if (!d || kept.get(d.id) !== d.gen) if (native.mapDelete(this.maps.legs, k)) dropped.legs++;
    }
    for (const k of this.keys('stitch_state')) {
      const st = this.state(k.readUInt32LE(0));
      if (!st || kept.get(k.readUInt32LE(0)) !== st.gen) if (native.mapDelete(this.maps.stitch_state, k)) dropped.stitch_state++;
    }
    adopted.sort((a, b) => a.spec.id - b.spec.id);
    return { adopted, dropped };
  }

  private statsSize?: number;
  /** The per-CPU counters, one row of STATS_COUNT per CPU. */
  private statsRaw(): Buffer | null {
    this.statsSize ??= native.mapInfo(this.maps.stats).userValueSize;
    return native.mapLookup(this.maps.stats, u32Key(0), this.statsSize);
  }

  stats(): Record<StatName, number> {
    const v = this.statsRaw();
    const out = Object.fromEntries(STATS.map((n) => [n, 0])) as Record<StatName, number>;
    if (!v) return out;
    const stride = STATS_COUNT * 8;
    for (let cpu = 0; cpu * stride < v.length; cpu++) {
      STATS.forEach((n, i) => { out[n] += Number(v.readBigUInt64LE(cpu * stride + i * 8)); });
    }
    return out;
  }

  /** One counter of stats(), summed over the CPUs: one read, no object (the daemon asks at every
   *  settled sweep). */
  counter(name: StatName): bigint {
    const v = this.statsRaw();
    let n = 0n;
    for (let o = STATS.indexOf(name) * 8; v && o < v.length; o += STATS_COUNT * 8) n += v.readBigUInt64LE(o);
    return n;
  }

  /** The program's runs per CPU, begun and finished (one read). */
  runs(): RunCounts {
    const v = this.statsRaw();
    const r: RunCounts = { begun: [], done: [] };
    for (let o = 0; v && o < v.length; o += STATS_COUNT * 8) {
      r.begun.push(v.readBigUInt64LE(o + RUNS_BEGUN_AT));
      r.done.push(v.readBigUInt64LE(o + RUNS_DONE_AT));
    }
    return r;
  }
}

// ---------------------------------------------------------------------------------------------------
// Interfaces

interface IpAddrInfo { ifname: string; ifindex: number; flags?: string[]; addr_info?: Array<{ family: string; local: string; prefixlen: number }> }

async function ipAddrs(): Promise<IpAddrInfo[]> {
  return JSON.parse(await sh('ip', ['-j', 'addr', 'show'])) as IpAddrInfo[];
}

function parsePrefix(s: string): ShellPrefix {
  const [addr, len] = s.split('/');
  const prefixLength = len === undefined ? 32 : Number(len);
  if (!addr || !/^\d{1,3}(\.\d{1,3}){3}$/.test(addr) || !Number.isInteger(prefixLength) || prefixLength < 0 || prefixLength > 32) {
    throw new InvalidArgumentError(`shellAddresses: '${s}' is not an IPv4 address or prefix (a.b.c.d or a.b.c.d/n)`);
  }
  return { addr, prefixLength };
}

function checkOptions(o: EbpfDatapathOptions): void {
  if (!o || typeof o.shellIface !== 'string' || !o.shellIface) throw new InvalidArgumentError('shellIface is required: the interface of S toward the shell');
  if (o.mssClamp !== undefined && (!Number.isInteger(o.mssClamp) || o.mssClamp < 88 || o.mssClamp > 65535)) throw new InvalidArgumentError(`mssClamp must be an integer 88..65535 (got ${o.mssClamp}); leave it out to turn clamping off`);
  if (o.dropPerMillion !== undefined && (!Number.isInteger(o.dropPerMillion) || o.dropPerMillion < 0 || o.dropPerMillion > 1_000_000)) throw new InvalidArgumentError(`dropPerMillion must be an integer 0..1000000 (got ${o.dropPerMillion})`);
  if (o.shellAddresses !== undefined && (!Array.isArray(o.shellAddresses) || o.shellAddresses.length === 0 || o.shellAddresses.length > 4)) throw new InvalidArgumentError('shellAddresses must list 1 to 4 addresses or prefixes; leave it out to use the prefixes of shellIface');
  if (o.pollIntervalMs !== undefined && (!Number.isFinite(o.pollIntervalMs) || o.pollIntervalMs < 1)) throw new InvalidArgumentError('pollIntervalMs must be >= 1');
  if (o.quietDrainMs !== undefined && (!Number.isFinite(o.quietDrainMs) || o.quietDrainMs < 1)) throw new InvalidArgumentError('quietDrainMs must be >= 1');
  if (o.batchReadFrom !== undefined && (!Number.isInteger(o.batchReadFrom) || o.batchReadFrom < 1)) throw new InvalidArgumentError('batchReadFrom must be an integer >= 1');
}

// ---------------------------------------------------------------------------------------------------

export async function createEbpfDatapath(options: EbpfDatapathOptions): Promise<EbpfDatapath> {
  checkOptions(options);
  const log = componentLogger('datapath', options.logger);
  const links = await ipAddrs();
  const byName = new Map(links.map((l) => [l.ifname, l]));
  const shellLink = byName.get(options.shellIface);
  if (!shellLink) throw new InvalidArgumentError(`shellIface ${options.shellIface} does not exist here (interfaces: ${[...byName.keys()].join(', ')})`);
  const ifaces = options.ifaces ?? links.filter((l) => l.ifname !== 'lo' && !(l.flags ?? []).includes('LOOPBACK')).map((l) => l.ifname);
  for (const i of ifaces) if (!byName.has(i)) throw new InvalidArgumentError(`interface ${i} does not exist here`);
  if (!ifaces.includes(options.shellIface)) throw new InvalidArgumentError(`ifaces must include shellIface ${options.shellIface}: the shell's packets are tracked and silenced there`);
  const ifindexOf = (name: string | undefined) => {
    if (name === undefined) return 0;
    const l = byName.get(name);
    if (!l) throw new InvalidArgumentError(`interface ${name} does not exist here`);
    return l.ifindex;
  };
  let shell: ShellPrefix[];
  if (options.shellAddresses) shell = options.shellAddresses.map(parsePrefix);
  else {
    shell = (shellLink.addr_info ?? []).filter((a) => a.family === 'inet').map((a) => ({ addr: a.local, prefixLength: a.prefixlen }));
    if (shell.length === 0) throw new InvalidArgumentError(`shellIface ${options.shellIface} has no IPv4 address: pass shellAddresses`);
    shell = shell.slice(0, 4);
  }
  // The shell's prefix covers this host's own address on that interface, which is no shell.
  const selfAddr = (shellLink.addr_info ?? []).find((a) => a.family === 'inet')?.local;

  const obj = await openStitchObject({
    bpffs: options.bpffs, objectPath: options.objectPath,
    ...(options.bpffs !== undefined && { persistentName: persistentPinName(options.shellIface) }),
  });
  const maps = new StitchMaps(obj.maps);
  // Ingress of every interface; egress too of the one toward the shell, where in combined mode (the
  // switch on B) the core's own packets of its legs leave.
  const hooksOf = (iface: string) => (iface === options.shellIface ? ['ingress', 'egress'] : ['ingress']);
  const attached: Array<{ iface: string; ownQdisc: boolean }> = [];
  const pinMarkers = new Set(markers(obj.pinDir));
  const cloneMark = options.cloneMark ?? DEFAULT_CLONE_MARK;
  let cfg: GlobalCfg = {
    shell, shellIfindex: shellLink.ifindex, clientIfindex: ifindexOf(options.clientIface), coreIfindex: ifindexOf(options.coreIface),
    dropPerMillion: options.dropPerMillion ?? 0, cloneMark, mssClamp: options.mssClamp ?? 0, flags: 0,
    ...(selfAddr && { selfAddr }),
  };

  const detach = async () => {
    for (const a of attached.splice(0).reverse()) {
      for (const hook of hooksOf(a.iface)) {
        await sh('tc', ['filter', 'del', 'dev', a.iface, hook, 'pref', String(TC_PREF)]).catch((e) => log.warn('tc filter del failed', { iface: a.iface, hook, err: e }));
      }
      if (a.ownQdisc) await sh('tc', ['qdisc', 'del', 'dev', a.iface, 'clsact']).catch((e) => log.warn('tc qdisc del failed', { iface: a.iface, err: e }));
      clearMarker(obj.pinDir, marker.iface(a.iface));
      clearMarker(obj.pinDir, marker.clsact(a.iface));
    }
  };

  // An adopted program stays attached where the daemon before attached it (stitched packets may
  // cross any of those interfaces), besides the interfaces asked for now.
  const attachTo = [...ifaces];
  if (obj.adopted) {
    for (const l of links) {
      if (!attachTo.includes(l.ifname) && pinMarkers.has(marker.iface(l.ifname))) attachTo.push(l.ifname);
    }
    if (attachTo.length > ifaces.length) log.info('the adopted program stays attached to interfaces the earlier daemon used', { ifaces: attachTo.slice(ifaces.length) });
  }

  let adoption: AdoptionResult = { adopted: [], dropped: { stitch_cfg: 0, legs: 0, stitch_state: 0 } };
  try {
    if (obj.adopted) adoption = maps.adoptAll();
    maps.writeConfig(cfg);
    for (const iface of attachTo) {
      const qd = await sh('tc', ['qdisc', 'show', 'dev', iface]);
      // A clsact the daemon before added (marker) is ours to remove at the end too.
      let ownQdisc = pinMarkers.has(marker.clsact(iface));
      if (!/\bclsact\b/.test(qd)) {
        setMarker(obj.pinDir, marker.clsact(iface));
        await sh('tc', ['qdisc', 'add', 'dev', iface, 'clsact']);
        ownQdisc = true;
      }
      setMarker(obj.pinDir, marker.iface(iface));
      attached.push({ iface, ownQdisc });
      // replace: a daemon that died without close() left its filter; the new one takes its place (an
      // adopted program replaces itself)
      for (const hook of hooksOf(iface)) {
        await sh('tc', ['filter', 'replace', 'dev', iface, hook, 'pref', String(TC_PREF), 'handle', '1', 'bpf', 'direct-action', 'object-pinned', obj.progPath]);
      }
    }
  } catch (e) {
    if (obj.adopted) {
      // The program still carries the earlier daemon's stitches: leave it attached and pinned.
      attached.length = 0;
      await obj.close({ keepPins: true });
    } else {
      await detach();
      await obj.close();
    }
    throw e;
  }
  log.info('eBPF datapath attached', {
    ifaces: attachTo, shellIface: options.shellIface, shell: shell.map((p) => `${p.addr}/${p.prefixLength}`), pinDir: obj.pinDir,
    persistent: obj.persistent, mssClamp: cfg.mssClamp || 'off',
  });
  if (obj.adopted) {
    const d = adoption.dropped;
    log.info('eBPF datapath adopted from the daemon before', {
      pinDir: obj.pinDir, stitches: adoption.adopted.map((i) => i.spec.id), trackedFlows: maps.keys('flows').length,
      ...(d.stitch_cfg + d.legs + d.stitch_state > 0 && { incompleteEntriesDeleted: d }),
    });
  }

  const installed = new Map<number, Installed>();
  /** The ids of installed stitches not settled: the polls between sweeps read only these. */
  const unsettled = new Set<number>();
  /** Some stitch has a run mark not yet cleared (polled again at once). Only draining ones matter:
   *  a mark withholds the flag it guards, which keeps its stitch draining, and a stitch the program
   *  itself ends no longer asks. */
  const unconfirmed = () => {
    for (const id of unsettled) {
      const i = installed.get(id);
      if (i && (i.commitRuns || i.startRuns || i.forceRuns)) return true;
    }
    return false;
  };
  /** The ids of draining stitches whose drain condition held at the last read: the program switches
   *  them 1 ms later, on a packet (rule 8), or the daemon does (idle): polled every HOLD_POLL_MS. */
  const holding = new Set<number>();
  // A flag the daemon before wrote may still race a run, as one this daemon writes would.
  const adoptRuns = adoption.adopted.length ? maps.runs() : undefined;
  for (const inst of adoption.adopted) {
    if (inst.cfg.flags & STITCH_START_STITCHED) inst.startRuns = runsInProgress(adoptRuns!);
    if (inst.cfg.flags & STITCH_FORCE_STITCHED) inst.forceRuns = runsInProgress(adoptRuns!);
    const st = maps.state(inst.spec.id);
    if (st) inst.last = statusOf(inst.spec.id, st, reportedFlags(inst, st));
    installed.set(inst.spec.id, inst);
    unsettled.add(inst.spec.id);
  }
  const listeners: Array<(s: StitchStatus) => void> = [];
  const drain = options.drain ?? true;
  const quietMs = options.quietDrainMs ?? QUIET_DRAIN_MS;
  const batchReadFrom = options.batchReadFrom ?? BATCH_READ_FROM;
  let closed = false;
  /** Stitches whose phase or end bits changed, as the program reported them (the events ring). */
  const changed = new Set<number>();
  let events: native.RingbufWatch | undefined;
  let timer: NodeJS.Timeout | undefined;
  let nextSweepMs = 0;
  let lastChanges: bigint | undefined;

  const emit = (s: StitchStatus) => {
    for (const l of listeners) {
      try { l({ ...s }); } catch (e) { log.error('state listener threw', { err: e }); }
    }
  };

  /** Commit entries written (installs) or flags set (a poll): each gets the runs in progress after
   *  the last of these writes (one read for all; until then MARK_UNREAD, which no poll clears). */
  let flagged: Array<[Installed, 'commitRuns' | 'startRuns' | 'forceRuns']> = [];
  const setFlag = (inst: Installed, flag: number) => {
    const field = flag === STITCH_FORCE_STITCHED ? 'forceRuns' : 'startRuns';
    try { maps.setFlags(inst, flag); } catch (e) {
      log.warn(`${field === 'forceRuns' ? 'force' : 'start'}-stitched update failed`, { id: inst.spec.id, err: e });
      return;
    }
    inst[field] = MARK_UNREAD;
    flagged.push([inst, field]);
  };
  const markFlagged = () => {
    if (flagged.length === 0) return;
    let mark: RunMark;
    try { mark = runsInProgress(maps.runs()); } catch (e) { log.warn('stats read failed; flags stay unconfirmed', { err: e }); return; }
    for (const [inst, field] of flagged) if (inst[field] === MARK_UNREAD) inst[field] = mark;
    flagged = [];
    pollSoon();
  };

  /** What a poll does with a stitch whose state entry it decoded (`runs`: read before it, when a
   *  mark was pending as the poll began). */
  const examine = (id: number, inst: Installed, st: StitchStateVal, now: bigint, nowMs: number, runs?: RunCounts) => {
    inst.seen = { phase: st.phase, term: st.term };
    // A mark whose runs have all ended is cleared for good (never in the poll that set it).
    const ended = (m?: RunMark) => m === undefined || (runs !== undefined && m !== MARK_UNREAD && runsEnded(m, runs));
    if (ended(inst.commitRuns)) inst.commitRuns = undefined;
    if (ended(inst.startRuns)) inst.startRuns = undefined;
    if (ended(inst.forceRuns)) inst.forceRuns = undefined;
    // No packet since the commit: the program has not even taken its snapshot. If the legs'
    // tracking (as of the commit: every run that raced it has ended and updated it) says the shell
    // holds nothing, tell the program to start stitched at the first packet (docs/handover.md, rule 9).
    const age = nowMs - (inst.installedAt ?? 0);
    if (st.phase === PHASE_INSTALLED && !(inst.cfg.flags & STITCH_START_STITCHED) && !inst.commitRuns) {
      const flows = [maps.flow(clientLegKey(inst.spec)), maps.flow(coreLegKey(inst.spec))];
      const ok = idleDrained(inst, flows);
      if (!ok && !inst.slowLogged && age > 2000) {
        inst.slowLogged = true;
        const fl = flows.map((f) => f && f.dir.map((x) => ({ seqHi: x.seqHi, ackHi: x.ackHi, edgeHi: x.edgeHi })));
        log.warn('drain slow: no packet since the commit, and the tracking says the shell still holds bytes', { id, seqDelta: inst.cfg.side.map((x) => x.seqDelta), client: fl[0], core: fl[1] });
      }
      if (ok) setFlag(inst, STITCH_START_STITCHED);
    }
    if (st.phase !== PHASE_STITCHED && st.firstNs !== 0n && !inst.slowLogged && now - st.firstNs > 2_000_000_000n) {
      // A drain this long means one of its conditions (docs/handover.md rule 8) does not come true.
      inst.slowLogged = true;
      const side = (x: StitchStateVal['side'][number]) => ({ boundary: x.boundary, handed: x.handed, ackFar: x.ackFar, edgeFar: x.edgeFar, ackSent: x.ackSent, ackToShell: x.ackToShell, edgeToShell: x.edgeToShell, clones: Number(x.clones), shellPassed: Number(x.shellPassed), shellDropped: Number(x.shellDropped) });
      log.warn('drain slow: still draining 2 s after the first packet', { id, drainOkNs: String(st.drainOkNs), seqDelta: inst.cfg.side.map((x) => x.seqDelta), client: side(st.side[SIDE_CLIENT]), core: side(st.side[SIDE_CORE]) });
    }
    if (st.phase === PHASE_DRAINING) {
      // New data from far s: its bytes sent on translated, or handed to the shell.
      const sig = st.side.map((x) => `${x.bytes}/${x.handed}`) as [string, string];
      const q = inst.quiet ??= { sig, dataAtMs: [nowMs, nowMs] };
      for (const x of [0, 1] as const) if (q.sig[x] !== sig[x]) { q.sig[x] = sig[x]; q.dataAtMs[x] = nowMs; }
      const waiting = quietDrainDue(inst.cfg, st, q.dataAtMs, nowMs, quietMs);
      if (waiting) {
        log.info('drain gone quiet: stitched without the window half (docs/handover.md, rule 11)', { id, quietStreams: waiting.map((x) => (x === SIDE_CLIENT ? 'client' : 'core')) });
        setFlag(inst, STITCH_FORCE_STITCHED);
      }
    }
    // Idle connections: the program only acts on packets, so the hold of the drain condition is
    // confirmed here once it has lasted two polls, and the program told to silence the shell.
    if (st.phase !== PHASE_STITCHED && st.phase !== PHASE_FAILED && st.drainOkNs !== 0n &&
        !(inst.cfg.flags & STITCH_FORCE_STITCHED)) {
      if (inst.drainSeen === st.drainOkNs && now - st.drainOkNs >= 2_000_000n) setFlag(inst, STITCH_FORCE_STITCHED);
      inst.drainSeen = st.drainOkNs;
    }
    const s = statusOf(id, st, reportedFlags(inst, st));
    if (s.state === 'draining') unsettled.add(id); else unsettled.delete(id);
    if (s.state === 'draining' && st.drainOkNs !== 0n) holding.add(id); else holding.delete(id);
    if (!inst.last || inst.last.state !== s.state || inst.last.reason !== s.reason) {
      log.info('stitch state', { id, state: s.state, reason: s.reason });
      inst.last = s;
      emit(s);
    } else inst.last = s;
  };

  const poll = () => {
    readDue();
    markFlagged();
  };
  /** Reads and examines the stitches due. */
  const readDue = () => {
    const now = process.hrtime.bigint(); // CLOCK_MONOTONIC, like bpf_ktime_get_ns()
    const nowMs = Date.now();
    // Settled stitches are read when the program reported them changed, and all of them at most
    // every SETTLED_POLL_MS when it counted a change it could not report (read before the states:
    // a change after it makes the next sweep).
    const reported = new Set(changed);
    changed.clear();
    let sweep = nowMs >= nextSweepMs && installed.size > unsettled.size;
    if (sweep) {
      let changes: bigint | undefined;
      try { changes = maps.counter(events ? 'eventsLost' : 'stateChanges'); } catch (e) { log.warn('stats read failed; reading every settled stitch', { err: e }); }
      sweep = changes === undefined || changes !== lastChanges;
      if (sweep) {
        lastChanges = changes;
        // less half a poll period: a timer set for SETTLED_POLL_MS may fire a ms early by Date.now()
        nextSweepMs = nowMs + SETTLED_POLL_MS - (options.pollIntervalMs ?? 10) / 2;
      }
    }
    // The runs in progress at a mark: read before any state, so that a mark found ended here means
    // every run that took the flags before its write has left its trace in the states read below.
    let runs: RunCounts | undefined;
    if (unconfirmed()) {
      try { runs = maps.runs(); } catch (e) { log.warn('stats read failed; flags stay unconfirmed', { err: e }); }
    }
    const visit = (id: number, raw: Buffer, off: number) => {
      const inst = installed.get(id);
      const settled = !unsettled.has(id);
      if (!inst || (settled && !sweep && !reported.has(id))) return;
      const head = peekStitchState(raw, off);
      if (head.gen !== inst.gen) return;
      // A settled stitch whose phase and end bits are what they were: nothing to do, nothing to
      // decode (1-4 us an entry here; a full table has 4096).
      if (settled && head.phase === inst.seen?.phase && head.term === inst.seen.term) return;
      examine(id, inst, decodeStitchState(off === 0 ? raw : raw.subarray(off, off + STITCH_STATE_SIZE)), now, nowMs, runs);
    };
    // Many due: one batch read of the whole table (about 1.2 ms for 4096 entries here) instead of
    // a bpf(2) call each (6-11 us each: 23-47 ms for 4096).
    const due = sweep ? [...installed.keys()] : [...unsettled, ...[...reported].filter((id) => !unsettled.has(id))];
    if (due.length >= batchReadFrom) {
      let batch: ReturnType<StitchMaps['stateBatch']> | undefined;
      try { batch = maps.stateBatch(); } catch (e) { log.warn('state batch read failed; reading one by one', { err: e }); }
      if (batch) {
        for (let i = 0; i < batch.n; i++) visit(batch.keys.readUInt32LE(i * 4), batch.values, i * STITCH_STATE_SIZE);
        return;
      }
    }
    for (const id of due) {
      let raw: Buffer | undefined;
      try { raw = maps.stateRaw(id); } catch (e) { log.warn('state read failed', { id, err: e }); continue; }
      if (raw) visit(id, raw, 0);
    }
  };
  // After installs and flag writes, while a mark is pending: poll again at once, so that an idle
  // stitch (rule 9) is stitched within a few event-loop turns, not at the next poll. A run still in
  // progress (its vCPU descheduled) gets three immediate polls, then 1-ms ones, then the regular.
  let soon: (() => void) | undefined; // cancels the pending one
  let soonTries = 0;
  const pollSoon = () => {
    if (soon || closed) return;
    const run = () => {
      soon = undefined;
      poll();
      schedule();
      if (!unconfirmed()) soonTries = 0;
      else if (soonTries++ < 20) pollSoon();
    };
    if (soonTries < 3) {
      // Not unref'd: libuv's loop does not wake for an unref'd immediate (it ran at the next timer).
      const h = setImmediate(run);
      soon = () => clearImmediate(h);
    } else {
      const h = setTimeout(run, 1).unref();
      soon = () => clearTimeout(h);
    }
  };

  // The next poll: pollIntervalMs on while a stitch drains, SETTLED_POLL_MS once all are settled
  // (every wake-up of this process costs about 0.4 ms of CPU here: 4 % of a core at 10 ms).
  let timerMs = 0;
  const tick = () => { timer = undefined; poll(); schedule(); };
  const schedule = () => {
    if (closed || installed.size === 0) return;
    const ms = holding.size > 0 ? HOLD_POLL_MS : unsettled.size > 0 ? options.pollIntervalMs ?? 10 : SETTLED_POLL_MS;
    if (timer && timerMs <= ms) return;
    if (timer) clearTimeout(timer);
    timerMs = ms;
    timer = setTimeout(tick, ms);
    timer.unref();
  };
  const unschedule = () => {
    if (timer && installed.size === 0) { clearTimeout(timer); timer = undefined; }
  };

  const dp: EbpfDatapath = {
    capabilities: {
      translations: ['addr', 'port', 'seq', 'ack', 'sack', 'timestamps', 'wscale', 'mss-clamp', 'icmp', 'checksum'],
      tableSize: MAX_STITCHES,
    },
    pinDir: obj.pinDir,
    persistent: obj.persistent,
    ifaces: attachTo,
    async install(spec) {
      const [err] = await dp.installMany([spec]);
      if (err) throw err;
    },
    async installMany(specs) {
      if (closed) throw new ClosedError('eBPF datapath is closed');
      let room = MAX_STITCHES - installed.size;
      const ids = new Set<number>();
      const refused = specs.map((spec): Error | undefined => {
        try { checkSpec(spec); } catch (e) { return e as Error; }
        if (installed.has(spec.id) || ids.has(spec.id)) return new DatapathError(`stitch ${spec.id} is already installed`);
        if (room-- <= 0) return new DatapathError(`the datapath table is full (${MAX_STITCHES} stitches)`);
        ids.add(spec.id);
        return undefined;
      });
      const done = maps.installMany(specs.filter((_, i) => !refused[i]), { drain, shellIfindex: shellLink.ifindex });
      let k = 0;
      const now = Date.now();
      const out = specs.map((spec, i) => {
        const r = refused[i] ?? done[k++]!;
        if (r instanceof Error) return r;
        // Known as installed: the STITCH answer says so, so only a change from here is news.
        const last: StitchStatus = { id: spec.id, state: drain ? 'draining' : 'stitched', packetsClientToCore: 0, packetsCoreToClient: 0, bytesClientToCore: 0, bytesCoreToClient: 0, shellPacketsDropped: 0 };
        r.installedAt = now;
        r.last = last;
        installed.set(spec.id, r);
        unsettled.add(spec.id);
        if (drain) {
          // Runs that raced the commit may have handed the shell a packet as a flow not yet
          // stitched: rule 9 reads the legs' tracking once they have ended.
          r.commitRuns = MARK_UNREAD;
          flagged.push([r, 'commitRuns']);
        }
        // The control server logs each install at info; one line per stitch is what a burst of
        // ten thousand a second can afford (winston's JSON costs about a tenth of an install).
        log.debug('stitch installed in the datapath', { id: spec.id, gen: r.gen, drain, seqDelta: r.cfg.side.map((s) => s.seqDelta), wscale: r.cfg.side.map((s) => [s.wsFar, s.wsShell]) });
        return undefined;
      });
      markFlagged();
      schedule();
      return out;
    },
    async remove(id) {
      const inst = installed.get(id);
      if (!inst) return;
      installed.delete(id);
      unsettled.delete(id);
      holding.delete(id);
      const last = maps.remove(inst);
      log.info('stitch removed', { id, state: last ? statusOf(id, last, inst.cfg.flags).state : 'unknown' });
      unschedule();
    },
    status(id) {
      const inst = installed.get(id);
      if (!inst || closed) return undefined;
      const st = maps.state(id);
      return st && st.gen === inst.gen ? statusOf(id, st, reportedFlags(inst, st)) : inst.last && { ...inst.last };
    },
    onStateChange(listener) { listeners.push(listener); },
    stats: () => maps.stats(),
    setDropPerMillion(ppm) {
      checkOptions({ shellIface: options.shellIface, dropPerMillion: ppm });
      cfg = { ...cfg, dropPerMillion: ppm };
      maps.writeConfig(cfg);
    },
    rawState: (id) => maps.state(id),
    flow: (key) => maps.flow(key),
    adopted: () => [...installed.values()].filter((i) => i.adopted).map((i) => ({
      id: i.spec.id, clientLeg: structuredClone(i.spec.clientLeg), coreLeg: structuredClone(i.spec.coreLeg),
      gen: i.gen, flags: i.cfg.flags, seqDelta: [i.cfg.side[0].seqDelta, i.cfg.side[1].seqDelta],
    })),
    entries() {
      if (closed) throw new ClosedError('eBPF datapath is closed');
      return { flows: maps.keys('flows').length, legs: maps.keys('legs').length, stitch_cfg: maps.keys('stitch_cfg').length, stitch_state: maps.keys('stitch_state').length };
    },
    async close(opts: DatapathCloseOptions = {}) {
      if (closed) return;
      let left = 0;
      if (!opts.detach && obj.persistent) {
        try { left = maps.keys('stitch_cfg').length; } catch (e) { log.warn('stitch count failed; tearing down', { err: e }); }
      }
      closed = true;
      const eventsClosed = events?.close();
      if (timer) clearTimeout(timer);
      timer = undefined;
      soon?.();
      soon = undefined;
      installed.clear();
      unsettled.clear();
      await eventsClosed;
      if (left > 0) {
        await obj.close({ keepPins: true });
        log.info(`eBPF datapath left attached: the fast path stays up for ${left} stitch${left === 1 ? '' : 'es'} until the next daemon adopts it`, {
          stitches: left, pinDir: obj.pinDir, ifaces: attachTo,
        });
        return;
      }
      await detach();
      await obj.close();
      log.info('eBPF datapath detached', { ifaces: attachTo });
    },
  };
  try {
    events = native.ringbufWatch(maps.maps.events, (records) => {
      for (let o = 0; o + 8 <= records.length; o += 8) {
        const id = records.readUInt32LE(o);
        if (installed.get(id)?.gen === records.readUInt32LE(o + 4)) changed.add(id);
      }
      if (changed.size > 0) pollSoon();
    });
  } catch (e) { log.warn('events ring not watched; settled stitches are swept for changes every 100 ms', { err: e }); }
  schedule();
  return dp;
}

