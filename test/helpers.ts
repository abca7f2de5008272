// Small test helpers shared by the in-process tests: event waits (never sleeps) and handle counting.
import { once } from 'node:events';
import net from 'node:net';
import { createCipheriv, createHash } from 'node:crypto';
import { Writable } from 'node:stream';
import winston from 'winston';

/** Counts of active libuv resources by kind (TCPSocketWrap, TCPServerWrap, Timeout, ...). */
export function activeResources(): Record<string, number> {
  const out: Record<string, number> = {};
  for (const r of process.getActiveResourcesInfo()) out[r] = (out[r] ?? 0) + 1;
  return out;
}

/** Resolves once `n` events named `name` have fired on `emitter`. */
export function events<T = unknown>(emitter: NodeJS.EventEmitter, name: string, n = 1): Promise<T[]> {
  return new Promise((resolve) => {
    const got: T[] = [];
    const on = (v: T) => { got.push(v); if (got.length === n) { emitter.off(name, on); resolve(got); } };
    emitter.on(name, on);
  });
}

/** Reads a socket to its end; resolves with sha256 and byte count. Rejects on socket error. */
export function drain(s: net.Socket): Promise<{ sha: string; bytes: number }> {
  const h = createHash('sha256');
  let bytes = 0;
  return new Promise((resolve, reject) => {
    s.on('data', (c: Buffer) => { h.update(c); bytes += c.length; });
    s.on('end', () => resolve({ sha: h.digest('hex'), bytes }));
    s.on('error', reject);
  });
}

/**
 * Deterministic pseudo-random payload of `n` bytes (AES-128-CTR keystream keyed by the seed), so
 * both ends can compute its sha. payloadChunk() gives any 16-byte-aligned piece of it, so load tests
 * can stream gigabytes without holding them (fresh memory is slow to touch on these VMs, and a test
 * end busy allocating does not read its sockets).
 */
export function payload(n: number, seed = 1): Buffer {
  return payloadChunk(seed, 0, n);
}

export function payloadChunk(seed: number, offset: number, n: number): Buffer {
  if (offset % 16) throw new Error('payloadChunk: offset must be a multiple of 16');
  const key = Buffer.alloc(16);
  key.writeUInt32LE(seed >>> 0, 0);
  const iv = Buffer.alloc(16);
  iv.writeUInt32BE(Math.floor(offset / 16 / 2 ** 32), 8);
  iv.writeUInt32BE((offset / 16) >>> 0, 12);
  return createCipheriv('aes-128-ctr', key, iv).update(Buffer.alloc(n));
}

const CHUNK = 1 << 16;

/**
 * Streams bytes [from, n) of payload(n, seed) into `s` with backpressure, stopping before `to`
 * (default n); ends it once byte n - 1 is written unless keepOpen. `from` must be 16-byte aligned.
 */
export async function sendPayload(s: net.Socket, n: number, seed: number, { keepOpen = false, from = 0, to = n } = {}): Promise<void> {
  for (let off = from; off < to; off += CHUNK) {
    if (!s.write(payloadChunk(seed, off, Math.min(CHUNK, to - off)))) await once(s, 'drain');
  }
  if (!keepOpen && to >= n) s.end();
}

/** sha256 of payload(n, seed), computed piecewise. */
export function payloadSha(n: number, seed: number): string {
  const h = createHash('sha256');
  for (let off = 0; off < n; off += CHUNK) h.update(payloadChunk(seed, off, Math.min(CHUNK, n - off)));
  return h.digest('hex');
}

export const sha256 = (b: Buffer) => createHash('sha256').update(b).digest('hex');

/** Writes `data` in chunks respecting backpressure, then ends unless keepOpen. */
export async function send(s: net.Socket, data: Buffer, keepOpen = false): Promise<void> {
  for (let off = 0; off < data.length; off += 65536) {
    if (!s.write(data.subarray(off, off + 65536))) await once(s, 'drain');
  }
  if (!keepOpen) s.end();
}

export async function listen(server: net.Server, host = '127.0.0.1'): Promise<number> {
  server.listen(0, host);
  await once(server, 'listening');
  return (server.address() as net.AddressInfo).port;
}

export function connect(port: number, host = '127.0.0.1'): Promise<net.Socket> {
  const s = net.connect({ port, host, allowHalfOpen: true });
  return once(s, 'connect').then(() => s);
}

/** Resolves when the socket is closed (now, or when its 'close' fires). */
export function closed(s: net.Socket): Promise<void> {
  // Not events.once: it would reject on an 'error' that comes before the close.
  return s.closed ? Promise.resolve() : new Promise((resolve) => s.once('close', () => resolve()));
}

import { createHook } from 'node:async_hooks';
const liveTimers = new Map<number, string>();
let timerHook: ReturnType<typeof createHook> | undefined;
/**
 * Timers created by the project's own code (sdk/, agent/, switch/) that are still pending.
 * Mocha's own timers are not ours and are left out.
 */
export function projectTimers(): string[] {
  timerHook ??= createHook({
    init(id, type) {
      if (type !== 'Timeout') return;
      const stack = new Error().stack ?? '';
      const ours = stack.split('\n').find((l) => /\/(sdk|agent|switch)\/[^/]+\.ts/.test(l));
      if (ours) liveTimers.set(id, ours.trim());
    },
    destroy(id) { liveTimers.delete(id); },
  }).enable();
  return [...liveTimers.values()];
}

/** A winston logger whose JSON lines the test can read back. */
export function captureLogger(): { logger: winston.Logger; lines: Record<string, unknown>[] } {
  const lines: Record<string, unknown>[] = [];
  const stream = new Writable({
    write(chunk, _enc, cb) { lines.push(JSON.parse(String(chunk))); cb(); },
  });
  const logger = winston.createLogger({ format: winston.format.json(), transports: [new winston.transports.Stream({ stream })] });
  return { logger, lines };
}
