// Byte relay between two sockets with backpressure, half-close and reset propagation. Used by the
// shell in phase 2 and by `tcp-stitch core --forward`. Both sockets must have allowHalfOpen set:
// one FIN must end one direction only (DATAPATH-FACTS: otherwise one FIN truncates the other way).
//
// Where the native addon is built, the kernel relays (sdk/splice.ts: splice(2) on a native thread),
// and the bytes never enter JavaScript; otherwise, or with { kernel: false }, this file's event-loop
// relay does. Both keep the same contract.
import type { Socket } from 'node:net';
import { kernelFinished, pendingError, resetSocket, spliceAvailable, spliceRelay } from './splice.ts';

export { resetSocket };

/** True when both of s's directions ended with a FIN, whichever relay (or none) moved its bytes. */
export function finishedBothWays(s: Socket): boolean {
  // The kernel relay's FINs pass beneath Node: its stream never sees 'end' or 'finish'.
  return (s.readableEnded && s.writableFinished) || kernelFinished.has(s);
}

export interface RelayCallbacks {
  /** A FIN from a (reached b as FIN) or from b. */
  onEnd?(from: 'a' | 'b'): void;
  /** A reset or socket error on one side; the other side has been reset. */
  onReset?(from: 'a' | 'b', error: Error): void;
  /** Both sockets are closed; called once. */
  onClose?(): void;
}

// Bytes all relays of this process moved in the current event-loop turn. Left flowing, libuv reads
// up to 32 x 64 KiB from each readable socket before the loop moves on: with a hundred busy
// connections one turn took about a second, and new connections, the agent's control datagrams and
// timers all waited for it. Past the budget, a socket that delivers a chunk waits for the next turn.
// One bulk connection stays under it (2 MiB a direction a turn) and is not slowed.
const TURN_BUDGET = 8 << 20;
let turnBytes = 0, turnResetting = false;
function overBudget(n: number): boolean {
  turnBytes += n;
  if (!turnResetting) {
    turnResetting = true;
    setImmediate(() => { turnBytes = 0; turnResetting = false; });
  }
  return turnBytes > TURN_BUDGET;
}

export interface Relay {
  /** Stops and resets both sockets. */
  stop(): void;
  /** Bytes relayed so far from a to b and from b to a (live, also while the kernel relays). */
  moved(): { ab: number; ba: number };
}

/** Relays a<->b until both are closed. `kernel: false` keeps the bytes in this event loop. */
export function relay(a: Socket, b: Socket, cb: RelayCallbacks = {}, opts: { kernel?: boolean } = {}): Relay {
  return opts.kernel !== false && spliceAvailable() ? spliceRelay(a, b, cb) : loopRelay(a, b, cb);
}

function loopRelay(a: Socket, b: Socket, cb: RelayCallbacks): Relay {
  const moved = { ab: 0, ba: 0 };
  let closed = 0;
  let failed = false;
  const pump = (src: Socket, dst: Socket, dir: 'ab' | 'ba', from: 'a' | 'b') => {
    // Paused for dst's backpressure, or until the event loop's next turn (over the budget).
    let blocked = false, yielding = false;
    const resume = () => { if (!blocked && !yielding && !src.destroyed) src.resume(); };
    src.on('data', (chunk: Buffer) => {
      moved[dir] += chunk.length;
      if (!dst.write(chunk)) { blocked = true; src.pause(); }
      if (overBudget(chunk.length) && !yielding) {
        yielding = true;
        src.pause();
        setImmediate(() => { yielding = false; resume(); });
      }
    });
    dst.on('drain', () => { blocked = false; resume(); });
    src.on('end', () => {
      // A reset that came right behind data reads as EOF in Node: it must reach dst as a reset.
      const err = pendingError(src);
      if (err) { src.destroy(err); return; }
      cb.onEnd?.(from);
      if (!dst.destroyed) dst.end();
    });
    src.on('error', (err) => {
      if (failed) return;
      failed = true;
      resetSocket(dst);
      cb.onReset?.(from, err);
    });
    src.on('close', () => {
      // Closed before both its directions ended: somebody destroyed it. The other side must not wait.
      if (!failed && !(src.readableEnded && src.writableFinished)) { failed = true; resetSocket(dst); }
      if (++closed === 2) cb.onClose?.();
    });
  };
  pump(a, b, 'ab', 'a');
  pump(b, a, 'ba', 'b');
  a.resume();
  b.resume();
  return { stop: () => { failed = true; resetSocket(a); resetSocket(b); }, moved: () => ({ ...moved }) };
}
