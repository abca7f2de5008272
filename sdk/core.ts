// The core side: accept core legs, check each preamble, answer, and hand the runtime one Duplex per
// logical connection: the core leg itself, preamble consumed. Whatever the phase (relayed by the shell
// or stitched at the switch), the runtime reads and writes the same socket; nothing changes for it.
import { EventEmitter, once } from 'node:events';
import net from 'node:net';
import { ClosedError, InvalidArgumentError, PreambleError, type StitchError } from './errors.ts';
import { componentLogger, type Logger } from './log.ts';
import { publish } from './diagnostics.ts';
import { AnswerStatus, checkPreambleHead, decodePreamble, encodeAnswer, PREAMBLE_LENGTH } from './preamble.ts';
import type { CoreConnection, CoreEvents, CoreHooks } from './types.ts';
import { finishedBothWays, resetSocket } from './relay.ts';
import { pendingError } from './splice.ts';

export interface CoreOptions {
  /** Shared secret: when set, only preambles carrying its MAC are accepted. */
  coreKey?: Buffer;
  logger?: Logger;
  hooks?: CoreHooks;
  /** A leg that has not sent a whole preamble by then is closed (default 5000 ms). */
  preambleTimeoutMs?: number;
}

export interface Core extends EventEmitter<CoreEvents> {
  /** Listen for core legs. Resolves with the bound address. */
  listen(port: number, host?: string): Promise<net.AddressInfo>;
  /** Take a core leg accepted elsewhere (e.g. the runtime's own server). */
  handle(socket: net.Socket): void;
  /** Logical connections currently open. */
  connections(): CoreConnection[];
  /** Rejections by reason since start ('bad-magic', 'truncated', 'oversized', 'not-authentic', ...). */
  readonly rejected: Readonly<Record<string, number>>;
  /** Stops accepting; resolves when every logical connection has ended. */
  close(): Promise<void>;
  /** Ends every leg now (reset). */
  destroy(error?: Error): void;
}

const ipv4 = (a: string | undefined) => a?.startsWith('::ffff:') ? a.slice(7) : a ?? '';

class CoreImpl extends EventEmitter<CoreEvents> implements Core {
  readonly #log: Logger;
  readonly #pending = new Set<net.Socket>();
  readonly #conns = new Map<string, CoreConnection>();
  readonly rejected: Record<string, number> = {};
  #server?: net.Server;
  #serverClosed?: Promise<void>;
  #closing = false;
  #idle?: () => void;

  constructor(readonly opts: CoreOptions) {
    super();
    if (opts.coreKey !== undefined && (!Buffer.isBuffer(opts.coreKey) || opts.coreKey.length < 16)) {
      throw new InvalidArgumentError('coreKey must be a Buffer of at least 16 bytes');
    }
    const t = opts.preambleTimeoutMs ?? 5000;
    if (!Number.isFinite(t) || t <= 0) throw new InvalidArgumentError('preambleTimeoutMs must be a positive number of milliseconds');
    this.#log = componentLogger('core', opts.logger);
  }

  async listen(port: number, host?: string): Promise<net.AddressInfo> {
    if (this.#server) throw new InvalidArgumentError('listen() was already called');
    if (this.#closing) throw new ClosedError('the core is closed');
    const server = net.createServer({ allowHalfOpen: true, pauseOnConnect: true, noDelay: true }, (s) => this.handle(s));
    this.#server = server;
    server.listen(port, host);
    await once(server, 'listening');
    return server.address() as net.AddressInfo;
  }

  handle(socket: net.Socket): void {
    if (this.#closing) { socket.destroy(); return; }
    socket.allowHalfOpen = true;
    this.#pending.add(socket);
    const remote = { address: ipv4(socket.remoteAddress), port: socket.remotePort ?? 0 };
    let head = Buffer.alloc(0);
    const reject = (err: StitchError, answer?: AnswerStatus) => {
      cleanup();
      const reason = err.reason ?? 'refused';
      this.rejected[reason] = (this.rejected[reason] ?? 0) + 1;
      this.#log.warn('core leg rejected', { remote, reason, error: err.message });
      const msg = { remote, reason, error: err };
      this.emit('core-leg:reject', msg);
      publish('coreLegReject', msg);
      // A peer that speaks our protocol learns why; anything else is just closed.
      if (answer !== undefined && !socket.destroyed) socket.end(encodeAnswer(answer));
      else socket.destroy();
      socket.on('error', () => {}); // the peer may reset while we close; that is its business
    };
    // Paused-mode reads ('readable'), so that once the listener is gone the stream is back to its
    // initial state and the runtime's first 'data' listener starts the flow: nothing is dropped.
    const onReadable = () => {
      let chunk: Buffer | null;
      while ((chunk = socket.read() as Buffer | null) !== null) head = Buffer.concat([head, chunk]);
      try {
        checkPreambleHead(head);
        if (head.length < PREAMBLE_LENGTH) return;
        const p = decodePreamble(head.subarray(0, PREAMBLE_LENGTH), this.opts.coreKey);
        cleanup();
        void this.#accept(socket, p, head.subarray(PREAMBLE_LENGTH));
      } catch (err) {
        const e = err as StitchError;
        const answer = e.reason === 'bad-magic' ? undefined
          : e.reason === 'bad-version' ? AnswerStatus.UNSUPPORTED_VERSION
          : e.reason === 'not-authentic' ? AnswerStatus.NOT_AUTHENTIC : AnswerStatus.MALFORMED;
        reject(e, answer);
      }
    };
    const onEnd = () => reject(new PreambleError(`core leg closed after ${head.length} of ${PREAMBLE_LENGTH} preamble bytes`, { reason: 'truncated' }));
    const onError = (err: Error) => reject(new PreambleError(`core leg failed before its preamble: ${err.message}`, { reason: 'socket-error', cause: err }));
    const timer = setTimeout(() => reject(new PreambleError(
      `no complete preamble within ${this.opts.preambleTimeoutMs ?? 5000} ms (${head.length} of ${PREAMBLE_LENGTH} bytes)`, { reason: 'timeout' })),
      this.opts.preambleTimeoutMs ?? 5000);
    const cleanup = () => {
      clearTimeout(timer);
      this.#pending.delete(socket);
      socket.off('readable', onReadable); socket.off('end', onEnd); socket.off('error', onError);
    };
    socket.on('readable', onReadable);
    socket.on('end', onEnd);
    socket.on('error', onError);
  }

  async #accept(socket: net.Socket, p: ReturnType<typeof decodePreamble>, rest: Buffer) {
    const info = { id: p.connectionId, client: p.client, shell: p.shell };
    if (this.#conns.has(p.connectionId)) {
      this.rejected['duplicate-id'] = (this.rejected['duplicate-id'] ?? 0) + 1;
      this.#log.warn('core leg names a connection that already has one; closing it', { connectionId: p.connectionId });
      socket.end(encodeAnswer(AnswerStatus.REFUSED));
      return;
    }
    let ok = true;
    try { ok = (await this.opts.hooks?.accept?.(info)) ?? true; } catch (err) {
      this.#log.error('the accept hook threw; refusing the connection', { connectionId: p.connectionId, error: (err as Error).message });
      ok = false;
    }
    if (!ok || this.#closing || socket.destroyed) {
      if (!socket.destroyed) socket.end(encodeAnswer(AnswerStatus.REFUSED));
      return;
    }
    socket.write(encodeAnswer(AnswerStatus.ACCEPT));
    if (rest.length) socket.unshift(rest);
    const conn: CoreConnection = { ...info, stream: socket };
    this.#conns.set(conn.id, conn);
    let error: Error | undefined;
    socket.on('error', (err) => { error = err; });
    // A RST right behind data reads as EOF in Node (libuv): the kernel still holds the reset. The
    // stream then emits it as 'error' right after 'end' (this listener runs before the runtime's).
    socket.once('end', () => {
      const err = pendingError(socket);
      if (err) socket.destroy(err);
    });
    socket.on('close', () => {
      this.#conns.delete(conn.id);
      // Both FINs exchanged is 'fin'; an error from the peer is 'reset'; anything else the runtime ended.
      const reason = error ? 'reset' : finishedBothWays(socket) ? 'fin' : 'destroyed';
      this.emit('connection:close', { id: conn.id, reason, error });
      if (this.#closing && this.#conns.size === 0) this.#idle?.();
    });
    publish('coreLegOpen', { connectionId: conn.id, client: conn.client, shell: conn.shell, remote: { address: ipv4(socket.remoteAddress), port: socket.remotePort ?? 0 } });
    this.emit('connection', conn);
  }

  connections() { return [...this.#conns.values()]; }

  async close(): Promise<void> {
    this.#closing = true;
    for (const s of this.#pending) s.destroy();
    this.#pending.clear();
    const closed = this.#closeServer();
    const idle = this.#conns.size === 0 ? Promise.resolve() : new Promise<void>((r) => { this.#idle = r; });
    await Promise.all([closed, idle]);
  }

  #closeServer(): Promise<void> {
    this.#serverClosed ??= this.#server ? new Promise<void>((r) => this.#server!.close(() => r())) : Promise.resolve();
    return this.#serverClosed;
  }

  destroy(error?: Error) {
    this.#closing = true;
    void this.#closeServer();
    for (const s of this.#pending) s.destroy(error);
    this.#pending.clear();
    for (const c of this.#conns.values()) resetSocket(c.stream);
  }
}

export function createCore(opts: CoreOptions = {}): Core {
  return new CoreImpl(opts);
}
