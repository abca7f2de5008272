// The relay of sdk/relay.ts, done by the kernel: splice(2) between the two sockets on a native thread
// (sdk/native/splice_addon.c), so the bytes never enter JavaScript. For adapters that only forward,
// such as `tcp-stitch core --forward` in front of an unmodified backend: the stitched path then costs
// B one in-kernel copy per byte instead of a pass through a single-threaded event loop.
//
// Same contract as relay(): half-close and reset propagation, callbacks, the returned stop function.
// Differences: onBytes is called once per direction at the end, with the total. Where the addon is not
// built, relay() does the work instead (spliceAvailable() says which).
import { createRequire } from 'node:module';
import type { Socket } from 'node:net';
import { constants } from 'node:os';
import { relay, type RelayCallbacks } from './relay.ts';

interface Addon {
  init(onDone: (id: number, ab: number, ba: number, failedSide: number, errno: number, aborted: boolean) => void): void;
  start(fdA: number, fdB: number): number;
  abort(id: number): void;
}

type Done = (ab: number, ba: number, failedSide: number, errno: number, aborted: boolean) => void;
const waiting = new Map<number, Done>();
let addon: Addon | null | undefined;

function load(): Addon | null {
  if (addon !== undefined) return addon;
  try {
    addon = createRequire(import.meta.url)('./native/build/Release/tcp_stitch_splice.node') as Addon;
    addon.init((id, ab, ba, side, errno, aborted) => {
      const done = waiting.get(id);
      waiting.delete(id);
      done?.(ab, ba, side, errno, aborted);
    });
  } catch { addon = null; }
  return addon;
}

/** True when spliceRelay() moves bytes in the kernel (the addon is built and loads). */
export function spliceAvailable(): boolean { return load() !== null; }

interface Handle { fd?: number; reading?: boolean; readStop?(): number }
const handleOf = (s: Socket) => (s as unknown as { _handle?: Handle | null })._handle ?? undefined;

function resetSocket(s: Socket) {
  if (s.destroyed) return;
  try { s.resetAndDestroy(); } catch { s.destroy(); }
}

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

/** Relays a<->b in the kernel until both directions ended or one side failed. Both sockets must have
 * allowHalfOpen set. Returns a function that stops and resets both. */
export function spliceRelay(a: Socket, b: Socket, cb: RelayCallbacks = {}): (error?: Error) => void {
  const native = load();
  if (!native) return relay(a, b, cb);
  let id: number | undefined, ended = false;
  const end = () => { const first = !ended; ended = true; return first; };
  const fail = (from: 'a' | 'b', err: Error) => {
    if (!end()) return;
    resetSocket(from === 'a' ? b : a);
    (from === 'a' ? a : b).destroy();
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
    for (const c of takeOver(a)) b.write(c);
    for (const c of takeOver(b)) a.write(c);
    await Promise.all([flushed(a), flushed(b)]);
    const fa = handleOf(a)?.fd ?? -1, fb = handleOf(b)?.fd ?? -1;
    if (ended || fa < 0 || fb < 0) { stop(); return; }
    try { id = native.start(fa, fb); } catch (err) { fail('a', err as Error); return; }
    waiting.set(id, (ab, ba, side, errno, aborted) => {
      cb.onBytes?.('ab', ab); cb.onBytes?.('ba', ba);
      if (aborted) { if (end()) { resetSocket(a); resetSocket(b); } }
      else if (side >= 0) fail(side === 0 ? 'a' : 'b', Object.assign(new Error(`splice: ${errnoName(errno)}`), { code: errnoName(errno) }));
      else if (end()) { cb.onEnd?.('a'); cb.onEnd?.('b'); a.destroy(); b.destroy(); }
    });
  })();
  return stop;
}
