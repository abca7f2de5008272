// Byte-exact mirrors of the map structs in stitch_structs.h and the constants in stitch_consts.h.
// Addresses and ports are in network order (as on the wire); every other field is little-endian
// host order (x86-64, arm64). Offsets are the ones written next to each C field; docs/datapath.md
// has the same tables.

import { isIPv4 } from 'node:net';

export const FLOW_KEY_SIZE = 12;
export const FLOW_DIR_SIZE = 48;
export const FLOW_VAL_SIZE = 112;
export const GLOBAL_CFG_SIZE = 64;
export const LEG_VAL_SIZE = 12;
export const STITCH_SIDE_SIZE = 32;
export const STITCH_CFG_SIZE = 80;
export const STITCH_STATE_SIDE_SIZE = 80;
export const STITCH_STATE_SIZE = 224;
export const STATS_COUNT = 32;
export const MAX_SHELL_ADDRS = 4;
export const MAX_STITCHES = 4096;
export const MAX_FLOWS = 65536;

export const FLOW_SYN = 0x01;
export const FLOW_SACK_OK = 0x02;
export const FLOW_TS_OK = 0x04;
export const FLOW_WS_OK = 0x08;
export const FLOW_FIN = 0x10;
export const FLOW_RST = 0x20;
export const FLOW_ACKED = 0x40;
export const FLOW_TSVAL = 0x80;

export const CFG_NO_CLONE = 0x0001;

export const STITCH_START_STITCHED = 0x0001;
export const STITCH_FORCE_STITCHED = 0x0002;

export const SIDE_TS = 0x01;
export const SIDE_SACK = 0x02;
export const SIDE_CLIENT = 0;
export const SIDE_CORE = 1;

export const PHASE_INSTALLED = 0;
export const PHASE_DRAINING = 1;
export const PHASE_STITCHED = 2;
export const PHASE_FAILED = 3;

export const TERM_FIN = 0x01;
export const TERM_FIN_ACKED = 0x04;
export const TERM_RST = 0x10;

export const DRAIN_HOLD_NS = 1_000_000n;

/** Indexes of the per-CPU `stats` counters (ST_* in stitch_consts.h). */
export const STATS = [
  'packets', 'notTcp', 'malformed', 'tracked', 'syn', 'mssClamped', 'translated', 'shellDropped',
  'shellPassed', 'clones', 'cloneFailed', 'injectedDrops', 'staleGeneration', 'errors', 'icmpTranslated', 'shellAnswered',
  'stateChanges', 'runsDone', 'eventsLost',
] as const;
export type StatName = typeof STATS[number];

/** The names the maps are pinned under (bpftool ... pinmaps DIR). */
export const MAP_NAMES = ['flows', 'legs', 'stitch_cfg', 'stitch_state', 'config', 'stats', 'events'] as const;
export type MapName = typeof MAP_NAMES[number];

// ---------------------------------------------------------------------------------------------------

/** Writes a dotted IPv4 address at off, in network order (in place: installs encode several per stitch). */
export function writeAddr(b: Buffer, off: number, addr: string): void {
  if (!isIPv4(addr)) throw new TypeError(`not an IPv4 address: ${addr}`);
  let part = 0;
  for (let i = 0; i < addr.length; i++) {
    const c = addr.charCodeAt(i);
    if (c === 46) { b[off++] = part; part = 0; } else part = part * 10 + c - 48;
  }
  b[off] = part;
}

export function addrString(b: Buffer, off: number): string {
  return `${b[off]}.${b[off + 1]}.${b[off + 2]}.${b[off + 3]}`;
}

export interface FlowKey { shellAddr: string; peerAddr: string; shellPort: number; peerPort: number }

export function encodeFlowKey(k: FlowKey): Buffer {
  const b = Buffer.alloc(FLOW_KEY_SIZE);
  writeAddr(b, 0, k.shellAddr);
  writeAddr(b, 4, k.peerAddr);
  b.writeUInt16BE(k.shellPort, 8);
  b.writeUInt16BE(k.peerPort, 10);
  return b;
}

export function decodeFlowKey(b: Buffer): FlowKey {
  return { shellAddr: addrString(b, 0), peerAddr: addrString(b, 4), shellPort: b.readUInt16BE(8), peerPort: b.readUInt16BE(10) };
}

export interface FlowDir {
  isn: number; seqHi: number; ackHi: number; edgeHi: number; tsvalHi: number; tsecrLast: number;
  tsBase: number; finSeq: number; lastNs: bigint; mss: number; winLast: number; wscale: number; flags: number;
}

export interface FlowVal { dir: [FlowDir, FlowDir]; peerIfindex: number; shellIfindex: number; createdNs: bigint }

function decodeFlowDir(b: Buffer, o: number): FlowDir {
  return {
    isn: b.readUInt32LE(o), seqHi: b.readUInt32LE(o + 4), ackHi: b.readUInt32LE(o + 8), edgeHi: b.readUInt32LE(o + 12),
    tsvalHi: b.readUInt32LE(o + 16), tsecrLast: b.readUInt32LE(o + 20), tsBase: b.readUInt32LE(o + 24),
    finSeq: b.readUInt32LE(o + 28), lastNs: b.readBigUInt64LE(o + 32), mss: b.readUInt16LE(o + 40),
    winLast: b.readUInt16LE(o + 42), wscale: b.readUInt8(o + 44), flags: b.readUInt8(o + 45),
  };
}

export function decodeFlowVal(b: Buffer): FlowVal {
  return {
    dir: [decodeFlowDir(b, 0), decodeFlowDir(b, FLOW_DIR_SIZE)],
    peerIfindex: b.readUInt32LE(96), shellIfindex: b.readUInt32LE(100), createdNs: b.readBigUInt64LE(104),
  };
}

export interface ShellPrefix { addr: string; prefixLength: number }

export interface GlobalCfg {
  shell: ShellPrefix[];
  shellIfindex: number; clientIfindex: number; coreIfindex: number;
  dropPerMillion: number; cloneMark: number; mssClamp: number; flags: number;
  /** This host's own address on the shell's interface, which the shell's prefix may cover. */
  selfAddr?: string;
}

export function encodeGlobalCfg(c: GlobalCfg): Buffer {
  if (c.shell.length > MAX_SHELL_ADDRS) throw new RangeError(`at most ${MAX_SHELL_ADDRS} shell addresses/prefixes`);
  const b = Buffer.alloc(GLOBAL_CFG_SIZE);
  c.shell.forEach((p, i) => {
    const mask = p.prefixLength === 0 ? 0 : (0xffffffff << (32 - p.prefixLength)) >>> 0;
    writeAddr(b, i * 4, p.addr);
    b.writeUInt32BE((b.readUInt32BE(i * 4) & mask) >>> 0, i * 4);
    b.writeUInt32BE(mask, 16 + i * 4);
  });
  b.writeUInt32LE(c.shellIfindex, 32);
  b.writeUInt32LE(c.clientIfindex, 36);
  b.writeUInt32LE(c.coreIfindex, 40);
  b.writeUInt32LE(c.dropPerMillion, 44);
  b.writeUInt32LE(c.cloneMark >>> 0, 48);
  b.writeUInt16LE(c.mssClamp, 52);
  b.writeUInt16LE(c.flags, 54);
  if (c.selfAddr) writeAddr(b, 56, c.selfAddr);
  return b;
}

export interface LegVal { id: number; gen: number; side: number }

export function encodeLegVal(v: LegVal): Buffer {
  const b = Buffer.alloc(LEG_VAL_SIZE);
  b.writeUInt32LE(v.id, 0);
  b.writeUInt32LE(v.gen, 4);
  b.writeUInt8(v.side, 8);
  return b;
}

export function decodeLegVal(b: Buffer): LegVal {
  return { id: b.readUInt32LE(0), gen: b.readUInt32LE(4), side: b.readUInt8(8) };
}

export interface StitchSide {
  farAddr: string; shellAddr: string; farPort: number; shellPort: number;
  seqDelta: number; tsDelta: number; farIfindex: number; wsFar: number; wsShell: number; opts: number;
}

export interface StitchCfg { id: number; gen: number; shellIfindex: number; flags: number; side: [StitchSide, StitchSide] }

export function encodeStitchCfg(c: StitchCfg): Buffer {
  const b = Buffer.alloc(STITCH_CFG_SIZE);
  b.writeUInt32LE(c.id, 0);
  b.writeUInt32LE(c.gen, 4);
  b.writeUInt32LE(c.shellIfindex, 8);
  b.writeUInt32LE(c.flags, 12);
  c.side.forEach((s, i) => {
    const o = 16 + i * STITCH_SIDE_SIZE;
    writeAddr(b, o, s.farAddr);
    writeAddr(b, o + 4, s.shellAddr);
    b.writeUInt16BE(s.farPort, o + 8);
    b.writeUInt16BE(s.shellPort, o + 10);
    b.writeUInt32LE(s.seqDelta >>> 0, o + 12);
    b.writeUInt32LE(s.tsDelta >>> 0, o + 16);
    b.writeUInt32LE(s.farIfindex, o + 20);
    b.writeUInt8(s.wsFar, o + 24);
    b.writeUInt8(s.wsShell, o + 25);
    b.writeUInt8(s.opts, o + 26);
  });
  return b;
}

export function decodeStitchCfg(b: Buffer): StitchCfg {
  const side = (i: number): StitchSide => {
    const o = 16 + i * STITCH_SIDE_SIZE;
    return {
      farAddr: addrString(b, o), shellAddr: addrString(b, o + 4), farPort: b.readUInt16BE(o + 8),
      shellPort: b.readUInt16BE(o + 10), seqDelta: b.readUInt32LE(o + 12), tsDelta: b.readUInt32LE(o + 16),
      farIfindex: b.readUInt32LE(o + 20), wsFar: b.readUInt8(o + 24), wsShell: b.readUInt8(o + 25), opts: b.readUInt8(o + 26),
    };
  };
  return { id: b.readUInt32LE(0), gen: b.readUInt32LE(4), shellIfindex: b.readUInt32LE(8), flags: b.readUInt32LE(12), side: [side(0), side(1)] };
}

export interface StitchStateSide {
  boundary: number; handed: number; ackFar: number; edgeFar: number; ackSent: number; tsSeen: number;
  ackToShell: number; edgeToShell: number; finSeq: number; seqSent: number;
  packets: bigint; bytes: bigint; clones: bigint; shellDropped: bigint; shellPassed: bigint;
}

export interface StitchStateVal {
  id: number; gen: number; phase: number; term: number;
  firstNs: bigint; drainOkNs: bigint; stitchedNs: bigint; injectedDrops: bigint;
  side: [StitchStateSide, StitchStateSide];
}

/** The zeroed state the daemon creates before the commit: only id and generation. */
export function encodeStitchStateInit(id: number, gen: number): Buffer {
  const b = Buffer.alloc(STITCH_STATE_SIZE);
  b.writeUInt32LE(id, 0);
  b.writeUInt32LE(gen, 4);
  return b;
}

/** The head of the state entry at offset off of b: enough to tell whether its state changed
 *  (decodeStitchState reads all). */
export function peekStitchState(b: Buffer, off = 0): { gen: number; phase: number; term: number } {
  return { gen: b.readUInt32LE(off + 4), phase: b.readUInt32LE(off + 8), term: b.readUInt32LE(off + 12) };
}

export function decodeStitchState(b: Buffer): StitchStateVal {
  const side = (i: number): StitchStateSide => {
    const o = 64 + i * STITCH_STATE_SIDE_SIZE;
    return {
      boundary: b.readUInt32LE(o), handed: b.readUInt32LE(o + 4), ackFar: b.readUInt32LE(o + 8),
      edgeFar: b.readUInt32LE(o + 12), ackSent: b.readUInt32LE(o + 16), tsSeen: b.readUInt32LE(o + 20),
      ackToShell: b.readUInt32LE(o + 24), edgeToShell: b.readUInt32LE(o + 28), finSeq: b.readUInt32LE(o + 32), seqSent: b.readUInt32LE(o + 36),
      packets: b.readBigUInt64LE(o + 40), bytes: b.readBigUInt64LE(o + 48), clones: b.readBigUInt64LE(o + 56),
      shellDropped: b.readBigUInt64LE(o + 64), shellPassed: b.readBigUInt64LE(o + 72),
    };
  };
  return {
    id: b.readUInt32LE(0), gen: b.readUInt32LE(4), phase: b.readUInt32LE(8), term: b.readUInt32LE(12),
    firstNs: b.readBigUInt64LE(16), drainOkNs: b.readBigUInt64LE(24), stitchedNs: b.readBigUInt64LE(32),
    injectedDrops: b.readBigUInt64LE(48), side: [side(0), side(1)],
  };
}

export function u32Key(n: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32LE(n >>> 0, 0);
  return b;
}
