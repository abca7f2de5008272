// Byte relay between two sockets with backpressure, half-close and reset propagation. Used by the
// shell in phase 2 and by `tcp-stitch core --forward`. Both sockets must have allowHalfOpen set:
// one FIN must end one direction only (DATAPATH-FACTS: otherwise one FIN truncates the other way).
import type { Socket } from 'node:net';

export interface RelayCallbacks {
  /** Bytes moved from a to b / from b to a. */
  onBytes?(direction: 'ab' | 'ba', n: number): void;
  /** A FIN from a (reached b as FIN) or from b. */
  onEnd?(from: 'a' | 'b'): void;
  /** A reset or socket error on one side; the other side has been reset. */
  onReset?(from: 'a' | 'b', error: Error): void;
  /** Both sockets are closed; called once. */
  onClose?(): void;
}

function resetSocket(s: Socket) {
  if (s.destroyed) return;
  // resetAndDestroy sends RST; it throws if the socket never connected (no handle yet).
  try { s.resetAndDestroy(); } catch { s.destroy(); }
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

/** Relays a<->b until both are closed. Returns a function that stops and resets both. */
export function relay(a: Socket, b: Socket, cb: RelayCallbacks = {}): (error?: Error) => void {
  let closed = 0;
  let failed = false;
  const pump = (src: Socket, dst: Socket, dir: 'ab' | 'ba', from: 'a' | 'b') => {
    // Paused for dst's backpressure, or until the event loop's next turn (over the budget).
    let blocked = false, yielding = false;
    const resume = () => { if (!blocked && !yielding && !src.destroyed) src.resume(); };
    src.on('data', (chunk: Buffer) => {
      cb.onBytes?.(dir, chunk.length);
      if (!dst.write(chunk)) { blocked = true; src.pause(); }
      if (overBudget(chunk.length) && !yielding) {
        yielding = true;
        src.pause();
        setImmediate(() => { yielding = false; resume(); });
      }
    });
    dst.on('drain', () => { blocked = false; resume(); });
    src.on('end', () => {
      cb.onEnd?.(from);
      if (!dst.destroyed) dst.end();
    });
    src.on('error', (err) => {
      if (failed) return;
      failed = true;
      resetSocket(dst);
      cb.onReset?.(from, err);
    });
    src.on('close', () => { if (++closed === 2) cb.onClose?.(); });
  };
  pump(a, b, 'ab', 'a');
  pump(b, a, 'ba', 'b');
  a.resume();
  b.resume();
  return () => { failed = true; resetSocket(a); resetSocket(b); };
}
