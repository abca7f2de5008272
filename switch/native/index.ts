// A direct, synchronous path from the switch daemon to its pinned eBPF maps and programs, through a
// small Node-API addon over libbpf (switch/native/bpf_addon.c, built by `npm run build`).
//
// Every call is one (occasionally two) bpf(2) syscalls on the calling thread: microseconds, so
// nothing here is async but ringbufWatch, whose callback the event loop calls. Nothing is loaded or
// attached here either: that is done with bpftool/tc.
//
// File descriptors are explicit and owned by the caller: every fd from objGet() must be closed with
// closeFd() — not fs.closeSync(), because the addon caches each map fd's key/value sizes to check
// buffers against them, and closeFd() is what drops that cache entry.
//
// Every failure throws a DatapathError (code 'TCP_STITCH_DATAPATH') carrying `errnoName` ('ENOENT'),
// `errno` (2), `syscall` (the libbpf call, or 'argument'), `argument` (for a bad argument: which
// one) and, from mapUpdateBatch, `applied` (how many leading elements were written).

import { createRequire } from 'node:module';
import { DatapathError } from '../../sdk/errors.ts';

/** BPF_ANY: create or replace; BPF_NOEXIST: create only; BPF_EXIST: replace only. */
export type UpdateFlag = 'any' | 'noexist' | 'exist';

export interface MapInfo {
  /** enum bpf_map_type, e.g. 1 = BPF_MAP_TYPE_HASH. */
  type: number;
  /** libbpf's name for the type, e.g. 'hash', 'array', 'lru_hash'. */
  typeName: string;
  keySize: number;
  /** value_size as declared in the map definition. */
  valueSize: number;
  /** Bytes a lookup/update value buffer must hold: valueSize, or round_up(valueSize, 8) × possible
   * CPUs for per-CPU maps. */
  userValueSize: number;
  maxEntries: number;
  /** map_flags (BPF_F_NO_PREALLOC, ...). */
  flags: number;
  /** The map's name (at most 15 characters, as the kernel keeps it). */
  name: string;
  /** Kernel-wide map id. */
  id: number;
}

export interface ProgTestRunOptions {
  /** A struct __sk_buff (192 bytes on this kernel, fields not settable by tests must be 0); its
   * post-run state comes back as ctxOut. */
  ctxIn?: Buffer;
  /** Room for the packet the program leaves; default dataIn.length + 256. Too small → ENOSPC. */
  dataSizeOut?: number;
  /** Run the program this many times (default 1) — on the same packet, so each run sees the
   * previous run's writes; durationNs is then the mean per run. */
  repeat?: number;
}

export interface ProgTestRunResult {
  /** The program's return value (for tc: TC_ACT_OK = 0, TC_ACT_SHOT = 2, TC_ACT_REDIRECT = 7...). */
  retval: number;
  /** The packet as the program left it. */
  dataOut: Buffer;
  /** The __sk_buff after the run, when ctxIn was given. */
  ctxOut?: Buffer;
  /** Mean nanoseconds per run, as the kernel measured it. */
  durationNs: number;
}

/** The fields a DatapathError thrown by this module carries besides message and code. */
export interface NativeErrorDetails {
  /** errno name: 'ENOENT', 'EEXIST', 'E2BIG', 'EINVAL', 'EPERM', 'ENOTSUPP', ... */
  errnoName: string;
  /** Positive errno value. */
  errno: number;
  /** The failing call (e.g. 'bpf_map_update_elem'), or 'argument' for a rejected argument. */
  syscall: string;
  /** For a rejected argument: its name ('key', 'value', 'valueSize', 'fd', ...). */
  argument?: string;
  /** mapUpdateBatch only: how many leading elements were written before the failure. */
  applied?: number;
}

export type NativeDatapathError = InstanceType<typeof DatapathError> & NativeErrorDetails;

interface Addon {
  objGet(path: string): number;
  closeFd(fd: number): void;
  mapUpdate(fd: number, key: Uint8Array, value: Uint8Array, flags: number): void;
  mapLookup(fd: number, key: Uint8Array, out: Uint8Array): boolean;
  mapDelete(fd: number, key: Uint8Array): boolean;
  mapNextKey(fd: number, key: Uint8Array | null, out: Uint8Array): boolean;
  mapUpdateBatch(fd: number, keys: Uint8Array, values: Uint8Array, count: number, flags: number): number;
  mapLookupBatch(fd: number, keys: Uint8Array, values: Uint8Array): number;
  mapInfo(fd: number): MapInfo;
  progTestRun(fd: number, dataIn: Uint8Array, dataSizeOut: number, ctxIn: Uint8Array | null,
    repeat: number): ProgTestRunResult;
  ringbufWatch(fd: number, callback: (records: Buffer) => void): object;
  ringbufClose(watch: object, onClosed: () => void): void;
}

const ADDON_PATH = './build/Release/tcp_stitch_bpf.node';
let addon: Addon | undefined;

function native(): Addon {
  if (addon) return addon;
  try {
    addon = createRequire(import.meta.url)(ADDON_PATH) as Addon;
    return addon;
  } catch (cause) {
    throw datapathError(
      `the eBPF map addon (switch/native/${ADDON_PATH.slice(2)}) could not be loaded: ` +
      `${(cause as Error).message}; build it with \`npm run build\` (needs libbpf-dev)`,
      { errnoName: 'ENOENT', errno: 2, syscall: 'dlopen' }, cause);
  }
}

function datapathError(message: string, details: NativeErrorDetails, cause?: unknown): NativeDatapathError {
  const err = new DatapathError(message, cause === undefined ? undefined : { cause });
  return Object.assign(err, details);
}

/** Converts what the addon threw (Error with code/errno/syscall/argument/applied) to a DatapathError. */
function wrap(e: unknown): NativeDatapathError {
  if (e instanceof DatapathError) return e as NativeDatapathError;
  const x = e as { message?: string; code?: unknown; errno?: unknown; syscall?: unknown; argument?: unknown; applied?: unknown };
  const details: NativeErrorDetails = {
    errnoName: typeof x?.code === 'string' ? x.code : 'EUNKNOWN',
    errno: typeof x?.errno === 'number' ? x.errno : 0,
    syscall: typeof x?.syscall === 'string' ? x.syscall : 'unknown',
  };
  if (typeof x?.argument === 'string') { details.argument = x.argument; details.syscall = 'argument'; }
  if (typeof x?.applied === 'number') details.applied = x.applied;
  return datapathError(String(x?.message ?? e), details, e);
}

function badArg(op: string, argument: string, what: string): NativeDatapathError {
  return datapathError(`${op}: ${argument} ${what}`, { errnoName: 'EINVAL', errno: 22, syscall: 'argument', argument });
}

function checkFd(op: string, fd: number): void {
  if (!Number.isInteger(fd) || fd < 0 || fd > 0x7fffffff) throw badArg(op, 'fd', `must be a non-negative integer (got ${String(fd)})`);
}

function checkBytes(op: string, name: string, b: unknown): void {
  if (!(b instanceof Uint8Array)) throw badArg(op, name, 'must be a Buffer');
}

function checkCount(op: string, name: string, n: unknown, min = 0, max = 0x7fffffff): void {
  if (typeof n !== 'number' || !Number.isInteger(n) || n < min || n > max) {
    throw badArg(op, name, `must be an integer from ${min} to ${max} (got ${String(n)})`);
  }
}

/** Bound on sizes we allocate before the addon checks them against the map (no map is bigger). */
const MAX_ALLOC = 1 << 26;

const FLAGS: Record<UpdateFlag, number> = { any: 0, noexist: 1, exist: 2 };

function flagValue(op: string, flags: UpdateFlag | undefined): number {
  if (flags === undefined) return 0;
  if (typeof flags !== 'string' || !Object.hasOwn(FLAGS, flags)) throw badArg(op, 'flags', `must be 'any', 'noexist' or 'exist' (got ${String(flags)})`);
  return FLAGS[flags];
}

/** Opens a pinned map or program (bpffs path) and returns a new fd. Close it with closeFd(). */
export function objGet(path: string): number {
  if (typeof path !== 'string' || path.length === 0) throw badArg('objGet', 'path', 'must be a non-empty string');
  try { return native().objGet(path); } catch (e) { throw wrap(e); }
}

/** Closes an fd from objGet() and forgets its cached map sizes. */
export function closeFd(fd: number): void {
  checkFd('closeFd', fd);
  try { native().closeFd(fd); } catch (e) { throw wrap(e); }
}

/**
 * Writes one element. key and value must be exactly the map's key and value size.
 * flags: 'any' (default) creates or replaces, 'noexist' throws EEXIST if present, 'exist' throws
 * ENOENT if absent. A full hash map throws E2BIG.
 */
export function mapUpdate(fd: number, key: Buffer, value: Buffer, flags?: UpdateFlag): void {
  checkFd('mapUpdate', fd);
  checkBytes('mapUpdate', 'key', key);
  checkBytes('mapUpdate', 'value', value);
  const f = flagValue('mapUpdate', flags);
  try { native().mapUpdate(fd, key, value, f); } catch (e) { throw wrap(e); }
}

/**
 * Reads one element into a new Buffer of valueSize bytes (must equal the map's userValueSize), or
 * null if absent. Like Buffer.allocUnsafe's, small results are slices of Node's shared buffer pool.
 */
export function mapLookup(fd: number, key: Buffer, valueSize: number): Buffer | null {
  checkFd('mapLookup', fd);
  checkBytes('mapLookup', 'key', key);
  checkCount('mapLookup', 'valueSize', valueSize, 0, MAX_ALLOC);
  const out = Buffer.allocUnsafe(valueSize).fill(0); // pooled: far cheaper than a buffer made in C
  try { return native().mapLookup(fd, key, out) ? out : null; } catch (e) { throw wrap(e); }
}

/** Deletes one element; false if it was absent. */
export function mapDelete(fd: number, key: Buffer): boolean {
  checkFd('mapDelete', fd);
  checkBytes('mapDelete', 'key', key);
  try { return native().mapDelete(fd, key); } catch (e) { throw wrap(e); }
}

/**
 * The key after `key` (the first key when key is null, or when key is not in a hash map), or null
 * after the last one. keySize must equal the map's key size. Iteration of a map that changes under
 * it may repeat or skip keys (hash maps restart from the first key when the current one vanished).
 */
export function mapNextKey(fd: number, key: Buffer | null, keySize: number): Buffer | null {
  checkFd('mapNextKey', fd);
  if (key !== null && key !== undefined) checkBytes('mapNextKey', 'key', key);
  checkCount('mapNextKey', 'keySize', keySize, 1, MAX_ALLOC);
  const out = Buffer.allocUnsafe(keySize).fill(0);
  try { return native().mapNextKey(fd, key ?? null, out) ? out : null; } catch (e) { throw wrap(e); }
}

/**
 * Writes `count` elements in one call (BPF_MAP_UPDATE_BATCH; for map types without it, an
 * element-by-element loop in C). keys: count × keySize bytes back to back; values: count ×
 * valueSize. Elements are applied in order and not atomically: on failure the error's `applied`
 * says how many leading elements were written. Returns count.
 */
export function mapUpdateBatch(fd: number, keys: Buffer, values: Buffer, count: number, flags?: UpdateFlag): number {
  checkFd('mapUpdateBatch', fd);
  checkBytes('mapUpdateBatch', 'keys', keys);
  checkBytes('mapUpdateBatch', 'values', values);
  checkCount('mapUpdateBatch', 'count', count);
  if (count > 0 && keys.length % count !== 0) throw badArg('mapUpdateBatch', 'keys', `length ${keys.length} is not a multiple of count ${count}`);
  if (count > 0 && values.length % count !== 0) throw badArg('mapUpdateBatch', 'values', `length ${values.length} is not a multiple of count ${count}`);
  const f = flagValue('mapUpdateBatch', flags);
  try { return native().mapUpdateBatch(fd, keys, values, count, f); } catch (e) { throw wrap(e); }
}

/**
 * Reads elements from the start of the map into keys and values (n × key size and n × value size
 * bytes, the same n) in as few calls as the kernel allows (BPF_MAP_LOOKUP_BATCH; a walk with
 * get_next_key for map types without it). Returns how many it read: all of them when n is at least
 * the map's size (a hash map's bucket is read whole or not at all, so fewer may fit). Not a snapshot: an element added or deleted meanwhile may or may not be read.
 */
export function mapLookupBatch(fd: number, keys: Buffer, values: Buffer): number {
  checkFd('mapLookupBatch', fd);
  checkBytes('mapLookupBatch', 'keys', keys);
  checkBytes('mapLookupBatch', 'values', values);
  try { return native().mapLookupBatch(fd, keys, values); } catch (e) { throw wrap(e); }
}

/** The map's type and sizes (BPF_OBJ_GET_INFO_BY_FD): check them against the structs you encode. */
export function mapInfo(fd: number): MapInfo {
  checkFd('mapInfo', fd);
  try { return native().mapInfo(fd); } catch (e) { throw wrap(e); }
}

/**
 * Runs a loaded program once (or `repeat` times) on a packet (BPF_PROG_TEST_RUN), e.g. a tc
 * (SCHED_CLS) program on an Ethernet frame. Side effects on maps are real. dataIn must be at least
 * an Ethernet header (14 bytes) for tc programs.
 */
export function progTestRun(progFd: number, dataIn: Buffer, opts: ProgTestRunOptions = {}): ProgTestRunResult {
  checkFd('progTestRun', progFd);
  checkBytes('progTestRun', 'dataIn', dataIn);
  if (dataIn.length === 0) throw badArg('progTestRun', 'dataIn', 'must not be empty');
  if (opts.ctxIn !== undefined) checkBytes('progTestRun', 'ctxIn', opts.ctxIn);
  const sizeOut = opts.dataSizeOut ?? dataIn.length + 256;
  checkCount('progTestRun', 'dataSizeOut', sizeOut);
  const repeat = opts.repeat ?? 1;
  checkCount('progTestRun', 'repeat', repeat, 1);
  try {
    return native().progTestRun(progFd, dataIn, sizeOut, opts.ctxIn ?? null, repeat);
  } catch (e) { throw wrap(e); }
}

/** A ring buffer map being read as its records come (ringbufWatch). */
export interface RingbufWatch {
  /** Stops reading; resolves once the ring is unmapped and its fds closed. Idempotent. The map fd
   *  stays the caller's. */
  close(): Promise<void>;
}

/**
 * Reads a BPF_MAP_TYPE_RINGBUF map as the program writes it: the event loop wakes when records are
 * ready and `onRecords` gets all that were there, back to back in one Buffer (possibly empty).
 * The watch does not keep the process alive. An exception thrown by onRecords is uncaught.
 */
export function ringbufWatch(fd: number, onRecords: (records: Buffer) => void): RingbufWatch {
  checkFd('ringbufWatch', fd);
  if (typeof onRecords !== 'function') throw badArg('ringbufWatch', 'onRecords', 'must be a function');
  let w: object | undefined;
  try { w = native().ringbufWatch(fd, onRecords); } catch (e) { throw wrap(e); }
  let closed: Promise<void> | undefined;
  return {
    close() {
      if (closed) return closed;
      const x = w!;
      w = undefined; // the addon frees it: never pass it twice
      closed = new Promise<void>((resolve) => native().ringbufClose(x, resolve));
      return closed;
    },
  };
}
