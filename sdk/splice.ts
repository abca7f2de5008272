// The kernel half of sdk/relay.ts: splice(2) between the two sockets on a native thread
// (sdk/native/splice_addon.c), so the bytes never enter JavaScript. Same contract as the event-loop
// relay: half-close and reset propagation, the callbacks, stop() and live byte counts.
import { createRequire } from 'node:module';
import type { Socket } from 'node:net';
import { constants } from 'node:os';
import type { Relay, RelayCallbacks } from './relay.ts';

interface Addon {
  init(onEvent: (id: number, endedDir: number, failedSide: number, errno: number, aborted: boolean) => void): void;
  start(fdA: number, fdB: number, counters: BigUint64Array): number;
  abort(id: number): void;
  socketError(fd: number): number;
  setBuffers(fd: number, bytes: number): void;
}

type OnEvent = (endedDir: number, failedSide: number, errno: number, aborted: boolean) => void;
const pairs = new Map<number, OnEvent>();
/** Sockets whose pair the thread ended with both FINs passed on (read by relay.ts finishedBothWays). */
export const kernelFinished = new WeakSet<Socket>();
let addon: Addon | null | undefined;

function load(): Addon | null {
  if (addon !== undefined) return addon;
  try {
    addon = createRequire(import.meta.url)('./native/build/Release/tcp_stitch_splice.node') as Addon;
    addon.init((id, endedDir, side, errno, aborted) => {
      const on = pairs.get(id);
      if (endedDir < 0) pairs.delete(id);
      on?.(endedDir, side, errno, aborted);
    });
  } catch { addon = null; }
  return addon;
}

/** True when relay() moves bytes in the kernel (the addon is built and loads). */
export function spliceAvailable(): boolean { return load() !== null; }

export function resetSocket(s: Socket) {
  if (s.destroyed) return;
  // resetAndDestroy sends RST; it throws if the socket never connected (no handle yet).
  try { s.resetAndDestroy(); } catch { s.destroy(); }
}

interface Handle { fd?: number; reading?: boolean; readStop?(): number }
const handleOf = (s: Socket) => (s as unknown as { _handle?: Handle | null })._handle ?? undefined;

/** Stops Node reading `s` and returns what its stream had already read, so nothing is read twice. */
function takeOver(s: Socket): Buffer[] {
  s.pause();
  // Node restarts reads through _read when its buffer runs low: from now on the thread reads.
  s._read = () => {};
  const h = handleOf(s);
  if (h?.readStop) { h.reading = false; h.readStop(); }
  const out: Buffer[] = [];
  let c: Buffer | null;
  while ((c = s.read() as Buffer | null) !== null) out.push(c);
  return out;
}

// Resolves once Node has handed every byte written to s to the kernel, or s is gone.
const flushed = (s: Socket) => new Promise<void>((resolve) => {
  if (s.writableLength === 0 || s.destroyed) { resolve(); return; }
  s.once('drain', resolve); s.once('close', resolve);
});
const connected = (s: Socket) => new Promise<boolean>((resolve) => {
  if (!s.connecting) { resolve(!s.destroyed); return; }
  s.once('connect', () => resolve(true)); s.once('close', () => resolve(false));
});
const errnoName = (n: number) => Object.entries(constants.errno).find(([, v]) => v === n)?.[0] ?? `errno ${n}`;
/** An Error shaped like Node's own socket errors (code, negative errno) for a kernel errno. */
const errnoError = (what: string, n: number) => Object.assign(new Error(`${what} ${errnoName(n)}`), { code: errnoName(n), errno: -n });

/** Errors pendingError found: reading SO_ERROR clears it, and more than one owner may ask. */
const foundErrors = new WeakMap<Socket, Error>();

/**
 * The reset or error s holds that Node has not reported, or null (also without the addon). libuv
 * reports a reset that arrives right behind data as EOF (its POLLHUP shortcut after a partial read);
 * the kernel still holds ECONNRESET for the socket. Once found, the same error on every later call.
 */
export function pendingError(s: Socket): Error | null {
  const known = foundErrors.get(s);
  if (known) return known;
  const fd = handleOf(s)?.fd ?? -1;
  const errno = fd >= 0 ? load()?.socketError(fd) ?? 0 : 0;
  if (!errno) return null;
  const err = errnoError('read', errno);
  foundErrors.set(s, err);
  return err;
}

/** Sets s's SO_RCVBUF and SO_SNDBUF to `bytes` (the kernel doubles them and stops autotuning them). */
export function capBuffers(s: Socket, bytes: number): void {
  const native = load();
  if (!native) throw new Error('capping socket buffers needs the native addon (npm run build)');
  const fd = handleOf(s)?.fd ?? -1;
  if (fd < 0) throw new Error('the socket has no file descriptor (not connected, or closed)');
  native.setBuffers(fd, bytes);
}

export function spliceRelay(a: Socket, b: Socket, cb: RelayCallbacks): Relay {
  const native = load()!;
  let id: number | undefined, ended = false;
  // Bytes Node moved itself (read before the handover), then the thread's live counts.
  const before = { ab: 0, ba: 0 };
  const counters = new BigUint64Array(2);
  const end = () => { const first = !ended; ended = true; return first; };
  const fail = (from: 'a' | 'b', err: Error) => {
    if (!end()) return;
    resetSocket(from === 'a' ? b : a);
    (from === 'a' ? a : b).destroy(err); // its owner sees the error, as with the event-loop relay
    cb.onReset?.(from, err);
  };
  const stop = () => {
    if (id !== undefined && !ended) native.abort(id); // both are reset once the thread lets go of them
    else if (end()) { resetSocket(a); resetSocket(b); }
  };
  // Until the thread has them, errors are Node's to report; after, Node neither reads nor writes them.
  a.on('error', (err) => { if (id === undefined) fail('a', err); });
  b.on('error', (err) => { if (id === undefined) fail('b', err); });
  let closed = 0;
  for (const s of [a, b]) s.once('close', () => {
    if (!ended) stop(); // somebody destroyed a socket the thread holds: the pair cannot go on
    if (++closed === 2) cb.onClose?.();
  });
  void (async () => {
    const [okA, okB] = await Promise.all([connected(a), connected(b)]);
    if (!okA || !okB || ended) { stop(); return; }
    // Bytes Node had already read go first, and must be in the kernel before the thread's.
    for (const c of takeOver(a)) { before.ab += c.length; b.write(c); }
    for (const c of takeOver(b)) { before.ba += c.length; a.write(c); }
    await Promise.all([flushed(a), flushed(b)]);
    const fa = handleOf(a)?.fd ?? -1, fb = handleOf(b)?.fd ?? -1;
    if (ended || fa < 0 || fb < 0) { stop(); return; }
    try { id = native.start(fa, fb, counters); } catch (err) { fail('a', err as Error); return; }
    pairs.set(id, (dir, side, errno, aborted) => {
      if (dir >= 0) { if (!ended) cb.onEnd?.(dir === 0 ? 'a' : 'b'); return; }
      if (aborted) { if (end()) { resetSocket(a); resetSocket(b); } }
      else if (side >= 0) fail(side === 0 ? 'a' : 'b', errnoError('splice:', errno));
      else if (end()) { // both FINs passed on, each already reported
        kernelFinished.add(a); kernelFinished.add(b);
        a.destroy(); b.destroy();
      }
    });
  })();
  return { stop, moved: () => ({ ab: before.ab + Number(counters[0]), ba: before.ba + Number(counters[1]) }) };
}
