// The shell side: attach an external TCP socket as a logical connection, open its core leg (preamble
// written right after net.connect, DATAPATH-FACTS), wait for the core's answer, then relay (phase 2).
// A plain core (an unmodified TCP server) gets neither preamble nor answer: the relay starts at connect.
// The stitch (phase 3) is driven by the agent through `setStitcher`.
import { EventEmitter } from 'node:events';
import net from 'node:net';
import { randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { ClosedError, InvalidArgumentError, PreambleError } from './errors.ts';
import { componentLogger, type Logger } from './log.ts';
import { publish } from './diagnostics.ts';
import { ANSWER_LENGTH, AnswerStatus, answerStatusName, decodeAnswer, encodePreamble, PREAMBLE_LENGTH, type Endpoint } from './preamble.ts';
import { initialState, phaseOf, transition, type ConnectionEvent, type StateSnapshot } from './connection-state.ts';
import { relay, resetSocket, type Relay } from './relay.ts';
import { capBuffers, spliceAvailable } from './splice.ts';
import type { CloseReason, LogicalConnection, ShellEvents, ShellHooks } from './types.ts';

export interface ShellOptions {
  /** Where the core accepts core legs. */
  core: { host: string; port: number };
  /** Shared secret authenticating core-leg preambles; the core must hold the same one. */
  coreKey?: Buffer;
  /**
   * The core is an unmodified TCP server, not an SDK core: the core leg carries the client's stream
   * from its first byte, with no preamble and no answer (docs/core-leg.md). The server sees the
   * shell's address as its peer and learns nothing about the client; there is no coreKey.
   */
  plainCore?: boolean;
  logger?: Logger;
  hooks?: ShellHooks;
  /** Give up opening a core leg after this long (default 5000 ms). */
  coreConnectTimeoutMs?: number;
  /**
   * SO_RCVBUF and SO_SNDBUF, in bytes, of both sockets of every connection (the client's and the core
   * leg), instead of the kernel's autotuning. What the shell holds of a connection is what a loaded
   * handover must drain through it (docs/handover.md, Open); a client whose bandwidth-delay product
   * exceeds it is slowed in phase 2. 4096 up to net.core.rmem_max and wmem_max; needs the addon.
   */
  socketBuffer?: number;
}

/** Why `bytes` cannot be the shell's socketBuffer here; undefined when it can. */
function socketBufferProblem(bytes: unknown): string | undefined {
  if (typeof bytes !== 'number' || !Number.isInteger(bytes) || bytes < 4096) return `socketBuffer (--socket-buffer) must be a whole number of bytes, at least 4096 (got ${String(bytes)})`;
  if (!spliceAvailable()) return 'socketBuffer (--socket-buffer) needs the native addon (npm run build)';
  for (const name of ['rmem_max', 'wmem_max']) {
    const max = Number(readFileSync(`/proc/sys/net/core/${name}`, 'utf8'));
    // Above it the kernel silently caps the value: say so instead.
    if (bytes > max) return `socketBuffer (--socket-buffer) ${bytes} exceeds net.core.${name} (${max}), which the kernel would cap it at: raise the sysctl or give at most ${max}`;
  }
  return undefined;
}

/** What the stitcher (the agent) gets to move a connection to phase 3. */
export interface StitchTarget {
  connection: LogicalConnection;
  /** The fixed byte mapping of DESIGN.md section 5 for this connection. */
  mapping: { clientOffset: bigint; corePreambleLength: number; shellOffset: bigint; coreAnswerLength: number };
  /**
   * For the stitcher to call once the switch reports the stitched connection over (both FINs
   * acknowledged, or a reset): the shell then drops its idle sockets and reports the close.
   * The switch must still be silencing the shell's legs, so their RSTs never reach C or B.
   */
  end(reason: 'fin' | 'client-reset' | 'core-reset'): void;
}
export type Stitcher = (target: StitchTarget) => Promise<void>;

export interface Shell extends EventEmitter<ShellEvents> {
  attach(socket: net.Socket): LogicalConnection;
  get(id: string): LogicalConnection | undefined;
  connections(): LogicalConnection[];
  /** Move one connection to phase 3 through the stitcher; resolves when stitched, rejects (and the connection stays in phase 2) otherwise. */
  stitch(id: string, reason?: string): Promise<void>;
  setStitcher(stitcher: Stitcher | undefined): void;
  /** Stops attaching; resolves when every connection has ended by itself. */
  close(): Promise<void>;
  /** Ends every connection now (reset), and the shell. */
  destroy(error?: Error): void;
}

const ipv4 = (a: string | undefined) => a?.startsWith('::ffff:') ? a.slice(7) : a;

class Connection implements LogicalConnection {
  readonly id = randomBytes(16).toString('hex');
  readonly createdAt = Date.now();
  coreLeg?: { local: Endpoint; core: Endpoint };
  snap: StateSnapshot = initialState;
  /** Bytes the shell wrote itself (core bytes read with the answer), then the relay's live counts. */
  written = { ab: 0, ba: 0 };
  reason?: string;
  relay?: Relay;
  constructor(readonly client: Endpoint, readonly shell: Endpoint, readonly socket: net.Socket, public leg?: net.Socket) {}
  get state() { return this.snap.state; }
  get phase() { return phaseOf(this.snap.state); }
  get clientEnded() { return this.snap.clientEnded; }
  get coreEnded() { return this.snap.coreEnded; }
  get bytesFromClient() { return this.written.ab + (this.relay?.moved().ab ?? 0); }
  get bytesFromCore() { return this.written.ba + (this.relay?.moved().ba ?? 0); }
  toJSON(): LogicalConnection {
    const { id, client, shell, coreLeg, createdAt, state, phase, clientEnded, coreEnded, bytesFromClient, bytesFromCore, reason } = this;
    return { id, client, shell, coreLeg, createdAt, state, phase, clientEnded, coreEnded, bytesFromClient, bytesFromCore, reason };
  }
}

class ShellImpl extends EventEmitter<ShellEvents> implements Shell {
  readonly #conns = new Map<string, Connection>();
  readonly #log: Logger;
  #stitcher?: Stitcher;
  #closing = false;
  #idle?: () => void;

  constructor(readonly opts: ShellOptions) {
    super();
    const { host, port } = opts.core ?? {};
    if (typeof host !== 'string' || !host || !Number.isInteger(port) || port < 1 || port > 65535) {
      throw new InvalidArgumentError('core must be { host, port } with a port in 1..65535');
    }
    if (opts.coreKey !== undefined && (!Buffer.isBuffer(opts.coreKey) || opts.coreKey.length < 16)) {
      throw new InvalidArgumentError('coreKey must be a Buffer of at least 16 bytes');
    }
    if (opts.plainCore && opts.coreKey !== undefined) {
      throw new InvalidArgumentError('coreKey authenticates the core-leg preamble, which a plainCore does not get: give one or the other');
    }
    const bufferProblem = opts.socketBuffer === undefined ? undefined : socketBufferProblem(opts.socketBuffer);
    if (bufferProblem) throw new InvalidArgumentError(bufferProblem);
    this.#log = componentLogger('shell', opts.logger);
  }

  attach(socket: net.Socket): LogicalConnection {
    if (this.#closing) throw new ClosedError('the shell is closing; attach no more connections');
    if (!(socket instanceof net.Socket) || socket.destroyed) throw new InvalidArgumentError('attach() takes a connected net.Socket');
    const client = { address: ipv4(socket.remoteAddress)!, port: socket.remotePort! };
    const shell = { address: ipv4(socket.localAddress)!, port: socket.localPort! };
    if (!net.isIPv4(client.address ?? '') || !net.isIPv4(shell.address ?? '')) {
      throw new InvalidArgumentError(`attach() needs a connected IPv4 socket (got ${socket.remoteAddress}:${socket.remotePort})`);
    }
    if (this.opts.socketBuffer !== undefined) capBuffers(socket, this.opts.socketBuffer);
    // One FIN must close one direction only; hold the client's bytes until the core accepts.
    socket.allowHalfOpen = true;
    socket.pause();
    const conn = new Connection(client, shell, socket);
    this.#conns.set(conn.id, conn);
    this.#log.debug('connection attached', { connectionId: conn.id, client });
    this.emit('connection:open', { connection: conn });
    publish('connectionOpen', { connection: conn });
    this.#openCoreLeg(conn);
    return conn;
  }

  #openCoreLeg(conn: Connection) {
    const { host, port } = this.opts.core;
    const plain = this.opts.plainCore === true;
    const timeoutMs = this.opts.coreConnectTimeoutMs ?? 5000;
    const leg = net.connect({ host, port, allowHalfOpen: true, noDelay: true });
    conn.leg = leg;
    // Written before 'connect' so it precedes anything else on the leg.
    if (!plain) leg.write(encodePreamble({ connectionId: conn.id, clientOffset: 0n, shellOffset: 0n, client: conn.client, shell: conn.shell }, this.opts.coreKey));
    leg.setTimeout(timeoutMs, () => leg.destroy(new Error(`${plain ? 'no connection to' : 'no answer from'} the core at ${host}:${port} within ${timeoutMs} ms`)));
    const endOpening = () => {
      leg.off('connect', onConnect); leg.off('data', onData); leg.off('error', onEarly); leg.off('end', onEarlyEnd); conn.socket.off('error', onClientEarly);
      leg.setTimeout(0);
      leg.pause();
    };
    /** The core took the leg; `rest` is what it sent right behind its answer. */
    const accepted = (rest: Buffer, reason: string) => {
      conn.coreLeg = { local: { address: ipv4(leg.localAddress)!, port: leg.localPort! }, core: { address: ipv4(leg.remoteAddress)!, port: leg.remotePort! } };
      if (rest.length) { conn.written.ba += rest.length; conn.socket.write(rest); }
      this.#event(conn, 'core-accepted', reason);
      this.#startRelay(conn, leg);
    };
    const onConnect = () => {
      if (leg.destroyed) return; // its buffers could not be set: onEarly reports why
      endOpening(); accepted(Buffer.alloc(0), 'the plain core accepted the TCP connection');
    };
    let head = Buffer.alloc(0);
    const onData = (chunk: Buffer) => {
      head = Buffer.concat([head, chunk]);
      if (head.length < ANSWER_LENGTH) return;
      endOpening();
      let status: number;
      try { status = decodeAnswer(head); } catch (err) { return this.#fail(conn, 'core-protocol', err as Error); }
      if (status !== AnswerStatus.ACCEPT) {
        return this.#fail(conn, 'core-refused', new PreambleError(`the core refused the connection: ${answerStatusName(status)}`));
      }
      accepted(head.subarray(ANSWER_LENGTH), 'the core accepted the core leg');
    };
    const onEarly = (err: Error) => this.#fail(conn, 'core-unreachable', err);
    const onEarlyEnd = () => this.#fail(conn, 'core-protocol', new PreambleError('the core closed the core leg before answering'));
    const onClientEarly = (err: Error) => this.#finish(conn, 'client-reset', err);
    const cap = this.opts.socketBuffer;
    if (cap !== undefined) leg.once('connect', () => { try { capBuffers(leg, cap); } catch (err) { leg.destroy(err as Error); } });
    if (plain) leg.on('connect', onConnect); else leg.on('data', onData);
    leg.on('error', onEarly);
    leg.on('end', onEarlyEnd);
    conn.socket.on('error', onClientEarly);
  }

  #startRelay(conn: Connection, leg: net.Socket) {
    // Once stitched, the shell's own sockets are silenced by the switch and say nothing about the
    // connection (invariant 3): only the stitcher's end() or destroy() closes it.
    // The event-loop relay, not the kernel's: with the kernel relaying at the shell, a loaded handover
    // had three times the backlog to drain through the shell (1112-1189 MiB of 6400 against 324-382
    // in the 100-connection test) and 2-3 times the RTOs; capping the shell's buffers at 256 KiB did
    // not help (docs/handover.md, Open).
    const live = () => conn.state !== 'stitched';
    conn.relay = relay(conn.socket, leg, {
      onEnd: (from) => { if (live()) this.#event(conn, from === 'a' ? 'client-fin' : 'core-fin', from === 'a' ? 'FIN from the client' : 'FIN from the core'); },
      onReset: (from, err) => {
        if (!live()) return this.#log.debug('silenced socket failed in phase 3', { connectionId: conn.id, side: from === 'a' ? 'client' : 'core', error: err.message });
        conn.reason = `${from === 'a' ? 'client' : 'core'} leg failed: ${err.message}`;
        this.#finish(conn, from === 'a' ? 'client-reset' : 'core-reset', err);
      },
      onClose: () => { if (live()) this.#finish(conn, 'fin'); },
    }, { kernel: false });
  }

  #event(conn: Connection, ev: ConnectionEvent, reason: string) {
    const from = conn.snap.state;
    conn.snap = transition(conn.snap, ev);
    if (conn.snap.state !== from) {
      conn.reason = reason;
      const msg = { connection: conn, from, to: conn.snap.state, reason };
      this.#log.info('connection phase', { connectionId: conn.id, from, to: msg.to, reason, bytesFromClient: conn.bytesFromClient, bytesFromCore: conn.bytesFromCore });
      this.emit('connection:phase', msg);
      publish('connectionPhase', msg);
    }
  }

  #fail(conn: Connection, reason: CloseReason, err: Error) {
    this.#log.warn('core leg failed; resetting the client', { connectionId: conn.id, reason, error: err.message });
    this.#finish(conn, reason, err);
  }

  #finish(conn: Connection, reason: CloseReason, error?: Error) {
    if (!this.#conns.has(conn.id)) return;
    this.#conns.delete(conn.id);
    const phase = conn.phase;
    conn.snap = transition(conn.snap, reason === 'fin' ? 'finished' : 'destroy');
    conn.reason ??= reason;
    // Whatever is still open after an abnormal end gets a reset, so neither end waits on us. In
    // phase 3 the switch drops these resets: the shell's idle sockets just go away.
    if (conn.relay) conn.relay.stop();
    else for (const s of [conn.socket, conn.leg]) if (s) resetSocket(s);
    const msg = { connection: conn, reason, error };
    this.#log.info('connection closed', { connectionId: conn.id, reason, bytesFromClient: conn.bytesFromClient, bytesFromCore: conn.bytesFromCore, phase });
    this.emit('connection:close', msg);
    publish('connectionClose', msg);
    if (this.#conns.size === 0) this.#idle?.();
  }

  get(id: string) { return this.#conns.get(id); }
  connections() { return [...this.#conns.values()]; }

  setStitcher(stitcher: Stitcher | undefined) { this.#stitcher = stitcher; }

  async stitch(id: string, reason = 'manual stitch'): Promise<void> {
    const conn = this.#conns.get(id);
    if (!conn) throw new InvalidArgumentError(`no connection with id ${id}`);
    if (!this.#stitcher) throw new InvalidArgumentError('stitching is not available: no switch (run the shell with --switch)');
    const veto = await this.opts.hooks?.shouldStitch?.(conn, reason);
    if (veto === false) throw new InvalidArgumentError(`the runtime's shouldStitch hook vetoed stitching ${id}`);
    this.#event(conn, 'stitch-start', reason);
    const end = (how: 'fin' | 'client-reset' | 'core-reset') => {
      if (!this.#conns.has(id)) return;
      if (how === 'fin') {
        this.#event(conn, 'client-fin', 'FIN from the client (seen by the switch)');
        this.#event(conn, 'core-fin', 'FIN from the core (seen by the switch)');
      }
      conn.reason = how === 'fin' ? 'both ends finished, seen by the switch' : `${how === 'client-reset' ? 'the client' : 'the core'} reset the connection, seen by the switch`;
      this.#finish(conn, how);
    };
    try {
      await this.#stitcher({
        connection: conn,
        mapping: this.opts.plainCore
          ? { clientOffset: 0n, corePreambleLength: 0, shellOffset: 0n, coreAnswerLength: 0 }
          : { clientOffset: 0n, corePreambleLength: PREAMBLE_LENGTH, shellOffset: 0n, coreAnswerLength: ANSWER_LENGTH },
        end,
      });
    } catch (err) {
      if (this.#conns.has(id)) this.#event(conn, 'stitch-failed', `stitch failed, staying on the shell path: ${(err as Error).message}`);
      throw err;
    }
    if (this.#conns.has(id)) this.#event(conn, 'stitch-done', reason);
  }

  close(): Promise<void> {
    this.#closing = true;
    if (this.#conns.size === 0) return Promise.resolve();
    return new Promise((resolve) => { this.#idle = resolve; });
  }

  destroy(error?: Error) {
    this.#closing = true;
    for (const conn of [...this.#conns.values()]) this.#finish(conn, 'destroyed', error);
  }
}

export function createShell(opts: ShellOptions): Shell {
  return new ShellImpl(opts);
}
