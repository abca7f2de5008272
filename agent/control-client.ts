// The agent's side of the control protocol: STITCH / UNSTITCH / QUERY / DISCOVER requests to the
// switch over UDP, and NOTIFY from it. See docs/protocol.md, "Agent behaviour".
//
// Each request gets a fresh nonce and the next value of a per-key, strictly increasing sequence
// number, is authenticated with the shared key, and is retransmitted byte for byte with exponential
// backoff until a reply with its nonce arrives or the bounded wait ends. Every authenticated reply
// carries the switch's boot id: a new one means the switch restarted and lost its table, so the
// client emits 'switch:restarted' and the agent must re-install its stitches.
import { EventEmitter } from 'node:events';
import type * as dgramModule from 'node:dgram';
import { isIPv4 } from 'node:net';
import DgramAsPromised, { type SocketAsPromised } from 'dgram-as-promised';
import { ClosedError, InvalidArgumentError, SwitchError } from '../sdk/errors.ts';
import { componentLogger, type Logger } from '../sdk/log.ts';
import type { StitchStatus } from '../switch/stitch-types.ts';
import {
  CONTROL_RECV_BUFFER, DEFAULT_PORT, checkStitchLegs, MAX_STITCH_MANY, PROTOCOL_VERSION, ZERO_BOOT_ID, decode, encode, isControlProtocolError, newNonce, newReasonCounters, nextSequence,
  type Key, type Message, type Opcode, type ReasonCounters, type RejectReason, type Request, type Response,
  type ResultCode, type StitchLegs, type StitchRecord, type StitchResult, type SwitchInfo, type NotifyRequest,
} from '../switch/protocol.ts';

export interface RetransmitPolicy {
  /** First retransmission after this long. */
  initialMs: number;
  /** Backoff doubles up to this interval. */
  maxMs: number;
  /** The whole call (retries after REPLAYED / STALE_BOOT included) gives up after this long. */
  totalMs: number;
}

export const DEFAULT_CONTROL_RETRANSMIT: RetransmitPolicy = { initialMs: 100, maxMs: 1_000, totalMs: 4_000 };

export interface ControlClientInit {
  switchAddress: string;
  /** Default 7807. */
  port?: number;
  key: Key;
  /** Address to send from: the shell's own address A, since both legs of a stitch must end there. */
  localAddress?: string;
  logger?: Logger;
  retransmit?: Partial<RetransmitPolicy>;
  /** Seam for tests: a dgram module (dgram-as-promised's `dgram` option). */
  dgram?: typeof dgramModule;
  /** Sequence source (default: the process-wide one shared with the discovery probe). */
  sequence?: () => bigint;
}

/** The switch answered with an error, or did not answer. Match on `result`. */
export class SwitchRequestError extends SwitchError {
  readonly result: ResultCode | 'NO_ANSWER';
  readonly opcode: Opcode;
  constructor(opcode: Opcode, result: ResultCode | 'NO_ANSWER', message: string) {
    super(`${opcode}: ${message}`);
    this.name = 'SwitchRequestError';
    this.result = result;
    this.opcode = opcode;
  }
}

export interface SwitchRestartedEvent { previousBootId: string; bootId: string; epoch: number }
export interface NotifyEvent { status: StitchStatus; bootId: string }

export interface ControlClientEvents {
  /** The switch's boot id changed: it restarted and forgot every stitch. Re-install. */
  'switch:restarted': [SwitchRestartedEvent];
  /** A stitch changed state in the datapath (FIN, RST, drained, failed ...). */
  'notify': [NotifyEvent];
}

export interface ControlClientCounters {
  requests: number;
  retransmissions: number;
  replies: number;
  notifies: number;
  /** Datagrams this client ignored or refused, by reason. */
  rejected: ReasonCounters;
}

export interface ControlClient extends EventEmitter<ControlClientEvents> {
  /** The switch's boot id as last seen in an authenticated message; undefined before the first. */
  readonly bootId: string | undefined;
  /** Authenticated DISCOVER over the control channel: capabilities, and the current boot id. */
  discover(): Promise<SwitchInfo>;
  /** Installs a stitch (idempotent: the same legs again give the same id, existing: true). Calls
   *  made in the same event-loop turn travel together, up to MAX_STITCH_MANY per STITCH_MANY: a
   *  full one leaves at once, the rest at the turn's end. */
  stitch(legs: StitchLegs): Promise<StitchResult>;
  /** Removes a stitch; resolves with its last status. */
  unstitch(id: number): Promise<StitchStatus>;
  /** One stitch of this shell ... */
  query(id: number): Promise<StitchRecord>;
  /** ... or all of them (every page). */
  query(): Promise<StitchRecord[]>;
  counters(): ControlClientCounters;
  /** Rejects pending calls with ClosedError, stops timers, closes the socket. */
  close(): Promise<void>;
}

/** Error replies the switch sends without AUTH (it could not, or must not, authenticate them). */
const UNAUTHENTICATED_RESULTS: ReadonlySet<ResultCode> = new Set<ResultCode>([
  'UNSUPP_VERSION', 'NOT_AUTHORIZED', 'MALFORMED_REQUEST', 'UNSUPP_OPCODE', 'UNSUPP_OPTION', 'MALFORMED_OPTION',
  'UNKNOWN_KEY', 'REPLAYED',
]);

/** NOTIFYs may arrive out of order: accept each sequence once within this window below the highest. */
const NOTIFY_WINDOW = 1024n;

interface Pending {
  opcode: Opcode;
  resolve: (r: Response) => void;
  reject: (e: Error) => void;
  timer?: NodeJS.Timeout;
}

class ControlClientImpl extends EventEmitter<ControlClientEvents> implements ControlClient {
  private readonly switchAddress: string;
  private readonly port: number;
  private readonly key: Key;
  private readonly localAddress?: string;
  private readonly log: Logger;
  private readonly rtx: RetransmitPolicy;
  private readonly dgram?: typeof dgramModule;
  private readonly nextSequence: () => bigint;
  private readonly pending = new Map<string, Pending>();
  private readonly stats: ControlClientCounters = { requests: 0, retransmissions: 0, replies: 0, notifies: 0, rejected: newReasonCounters() };
  private socket?: SocketAsPromised;
  private binding?: Promise<SocketAsPromised>;
  private learning?: Promise<SwitchInfo>;
  private knownBootId?: string;
  private notifyWindow = { bootId: '', highest: 0n, seen: new Set<bigint>(), acked: new Map<string, bigint>() };
  private closed = false;
  /** stitch() calls of this event-loop turn not sent yet (fewer than a full STITCH_MANY). */
  private stitchQueue: Array<{ legs: StitchLegs; resolve: (r: StitchResult) => void; reject: (e: Error) => void }> = [];
  private stitchFlush?: NodeJS.Immediate;
  /** The switch answered STITCH_MANY with UNSUPP_OPCODE (an older switch): one STITCH each. */
  private manyUnsupported = false;

  constructor(init: ControlClientInit) {
    super();
    if (!init || typeof init !== 'object') throw new InvalidArgumentError('createControlClient needs options');
    if (!isIPv4(init.switchAddress)) throw new InvalidArgumentError(`switchAddress must be an IPv4 address, got ${String(init.switchAddress)}`);
    this.switchAddress = init.switchAddress;
    this.port = init.port ?? DEFAULT_PORT;
    if (!Number.isInteger(this.port) || this.port < 1 || this.port > 65535) throw new InvalidArgumentError(`port must be 1..65535, got ${this.port}`);
    if (!init.key || !Buffer.isBuffer(init.key.secret) || !Number.isInteger(init.key.id)) {
      throw new InvalidArgumentError("key must be { id, secret } (switch/keys.ts loadKeyFile; 'tcp-stitch keygen' makes one)");
    }
    this.key = init.key;
    if (init.localAddress !== undefined) {
      if (!isIPv4(init.localAddress)) throw new InvalidArgumentError(`localAddress must be an IPv4 address, got ${init.localAddress}`);
      this.localAddress = init.localAddress;
    }
    this.rtx = { ...DEFAULT_CONTROL_RETRANSMIT, ...Object.fromEntries(Object.entries(init.retransmit ?? {}).filter(([, v]) => v !== undefined)) };
    for (const k of ['initialMs', 'maxMs', 'totalMs'] as const) {
      if (!(this.rtx[k] > 0)) throw new InvalidArgumentError(`retransmit.${k} must be a positive number of milliseconds`);
    }
    if (this.rtx.maxMs < this.rtx.initialMs) throw new InvalidArgumentError('retransmit.maxMs must be >= retransmit.initialMs');
    if (init.dgram) this.dgram = init.dgram;
    this.nextSequence = init.sequence ?? nextSequence;
    this.log = componentLogger('control-client', init.logger);
  }

  get bootId() { return this.knownBootId; }

  counters(): ControlClientCounters { return structuredClone(this.stats); }

  // ------------------------------------------------------------------------------------------
  // Public requests
  // ------------------------------------------------------------------------------------------

  async discover(): Promise<SwitchInfo> {
    const r = await this.exchange('discover', (base) => ({ ...base, opcode: 'discover' }), true);
    return (r as Extract<Response, { opcode: 'discover' }>).info!;
  }

  async stitch(legs: StitchLegs): Promise<StitchResult> {
    if (!legs || typeof legs !== 'object') throw new InvalidArgumentError('stitch needs the legs and offsets');
    const { clientLeg, coreLeg, clientOffset, corePreambleLength, shellOffset, coreAnswerLength } = legs;
    const clean: StitchLegs = { clientLeg, coreLeg, clientOffset, corePreambleLength, shellOffset, coreAnswerLength };
    // Validate now so a bad argument fails here, not as a socket-level surprise.
    checkStitchLegs(clean);
    return new Promise<StitchResult>((resolve, reject) => {
      if (this.closed) return reject(new ClosedError('control client closed'));
      this.stitchQueue.push({ legs: clean, resolve, reject });
      // A full datagram goes now: waiting for the turn's end gains nothing, and a loaded shell's
      // turn can last tens of milliseconds (docs/handover.md, Open).
      if (this.stitchQueue.length >= MAX_STITCH_MANY) {
        if (this.stitchFlush) clearImmediate(this.stitchFlush);
        this.flushStitches();
        return;
      }
      this.stitchFlush ??= setImmediate(() => this.flushStitches());
    });
  }

  /** Sends the queued stitches: one STITCH_MANY per MAX_STITCH_MANY, or a STITCH for one alone. */
  private flushStitches(): void {
    this.stitchFlush = undefined;
    const queue = this.stitchQueue.splice(0);
    const oneEach = (chunk: typeof queue) => { for (const q of chunk) this.stitchOne(q.legs).then(q.resolve, q.reject); };
    for (let i = 0; i < queue.length; i += MAX_STITCH_MANY) {
      const chunk = queue.slice(i, i + MAX_STITCH_MANY);
      if (chunk.length === 1 || this.manyUnsupported) {
        oneEach(chunk);
        continue;
      }
      // Legs are explicit, so a STITCH_MANY refused as STALE_BOOT is re-sent to the new boot.
      const legs = chunk.map((q) => q.legs);
      this.exchange('stitchMany', (base) => ({ ...base, opcode: 'stitchMany', legs }), true).then((r) => {
        (r as Extract<Response, { opcode: 'stitchMany' }>).entries!.forEach((e, j) => {
          if (e.result === 'SUCCESS') chunk[j]!.resolve(e.stitch);
          else chunk[j]!.reject(new SwitchRequestError('stitch', e.result, `the switch answered ${e.result}`));
        });
      }, (err: Error) => {
        if (err instanceof SwitchRequestError && err.result === 'UNSUPP_OPCODE') {
          this.manyUnsupported = true;
          this.log.info('the switch does not know STITCH_MANY: one STITCH per stitch');
          oneEach(chunk);
        } else for (const q of chunk) q.reject(err);
      });
    }
  }

  private async stitchOne(legs: StitchLegs): Promise<StitchResult> {
    // Legs are explicit, so a STITCH refused as STALE_BOOT is re-sent to the new boot.
    const r = await this.exchange('stitch', (base) => ({ ...base, opcode: 'stitch', legs }), true);
    return (r as Extract<Response, { opcode: 'stitch' }>).stitch!;
  }

  async unstitch(id: number): Promise<StitchStatus> {
    checkId(id);
    // Ids belong to one boot: never re-send an UNSTITCH to a new boot.
    const r = await this.exchange('unstitch', (base) => ({ ...base, opcode: 'unstitch', id }), false);
    return (r as Extract<Response, { opcode: 'unstitch' }>).status!;
  }

  query(id: number): Promise<StitchRecord>;
  query(): Promise<StitchRecord[]>;
  async query(id?: number): Promise<StitchRecord | StitchRecord[]> {
    if (id !== undefined) {
      checkId(id);
      const r = await this.exchange('query', (base) => ({ ...base, opcode: 'query', id, cursor: 0 }), false);
      return (r as Extract<Response, { opcode: 'query' }>).query!.stitches[0]!;
    }
    const all: StitchRecord[] = [];
    let cursor = 0;
    let bootId: string | undefined;
    for (;;) {
      const r = await this.exchange('query', (base) => ({ ...base, opcode: 'query', id: 0, cursor }), cursor === 0);
      if (bootId !== undefined && r.bootId !== bootId) {
        throw new SwitchRequestError('query', 'STALE_BOOT', 'the switch restarted while its table was being listed');
      }
      bootId = r.bootId;
      const q = (r as Extract<Response, { opcode: 'query' }>).query!;
      all.push(...q.stitches);
      const last = q.stitches.at(-1);
      if (!q.more || !last) return all;
      cursor = last.status.id;
    }
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    for (const p of this.pending.values()) {
      if (p.timer) clearTimeout(p.timer);
      p.reject(new ClosedError('control client closed'));
    }
    this.pending.clear();
    if (this.stitchFlush) clearImmediate(this.stitchFlush);
    this.stitchFlush = undefined;
    for (const q of this.stitchQueue.splice(0)) q.reject(new ClosedError('control client closed'));
    const s = this.socket ?? (await this.binding?.catch(() => undefined));
    this.socket = undefined;
    if (s) {
      await s.close().catch(() => undefined);
      s.destroy();
    }
  }

  // ------------------------------------------------------------------------------------------
  // Exchange: nonce, sequence, retransmission, REPLAYED and STALE_BOOT handling
  // ------------------------------------------------------------------------------------------

  private async ensureSocket(): Promise<SocketAsPromised> {
    if (this.closed) throw new ClosedError('control client closed');
    if (this.socket) return this.socket;
    this.binding ??= (async () => {
      // Room for the replies to all requests in flight at once (see the switch's control socket).
      const s = DgramAsPromised.createSocket({ type: 'udp4', recvBufferSize: CONTROL_RECV_BUFFER, ...(this.dgram && { dgram: this.dgram }) });
      s.socket.on('error', (err) => this.log.warn('control socket error', { err }));
      s.socket.on('message', (msg: Buffer, rinfo: dgramModule.RemoteInfo) => this.onDatagram(msg, rinfo));
      await s.bind(0, this.localAddress);
      return s;
    })();
    const s = await this.binding;
    if (this.closed) {
      await s.close().catch(() => undefined);
      throw new ClosedError('control client closed');
    }
    this.socket = s;
    return s;
  }

  private async exchange(
    opcode: Opcode,
    build: (base: Omit<Request, 'opcode'>) => Request,
    resendToNewBoot: boolean,
  ): Promise<Response> {
    const socket = await this.ensureSocket();
    const deadline = Date.now() + this.rtx.totalMs;
    if (this.knownBootId === undefined && opcode !== 'discover') {
      // Learn the boot id first: requests name the boot they are meant for.
      this.learning ??= this.discover().finally(() => { this.learning = undefined; });
      await this.learning;
    }
    let retries = 2;
    for (;;) {
      const sentTo = this.knownBootId ?? ZERO_BOOT_ID;
      const nonce = newNonce();
      const msg = build({ kind: 'request', nonce, bootId: sentTo, auth: { keyId: this.key.id, sequence: this.nextSequence() } } as Omit<Request, 'opcode'>);
      const bytes = encode(msg, this.key);
      const r = await this.transmit(socket, opcode, nonce, bytes, deadline);
      if (r.result === 'SUCCESS') return r;
      if (r.result === 'REPLAYED' && retries-- > 0) {
        // Our sequence was at or below one the switch already accepted (reordering, or another
        // process using this key). nextSequence() is past everything sent: retry once with it.
        this.log.debug('request refused as replayed; retrying with a new sequence', { opcode });
        continue;
      }
      if (r.result === 'STALE_BOOT' && resendToNewBoot && retries-- > 0 && this.knownBootId !== sentTo) continue;
      throw new SwitchRequestError(opcode, r.result, describeResult(r));
    }
  }

  private transmit(socket: SocketAsPromised, opcode: Opcode, nonce: string, bytes: Buffer, deadline: number): Promise<Response> {
    return new Promise<Response>((resolve, reject) => {
      let interval = this.rtx.initialMs;
      const p: Pending = {
        opcode,
        resolve: (r) => { if (p.timer) clearTimeout(p.timer); this.pending.delete(nonce); resolve(r); },
        reject: (e) => { if (p.timer) clearTimeout(p.timer); this.pending.delete(nonce); reject(e); },
      };
      this.pending.set(nonce, p);
      this.stats.requests++;
      const send = (first: boolean) => {
        if (!this.pending.has(nonce)) return;
        if (!first) this.stats.retransmissions++;
        socket.send(bytes, this.port, this.switchAddress).catch((err: unknown) => {
          this.log.debug('control request not sent', { opcode, err });
        });
        const left = deadline - Date.now();
        if (left <= 0) return p.reject(noAnswer(opcode, this.rtx.totalMs));
        if (left <= interval) {
          p.timer = setTimeout(() => p.reject(noAnswer(opcode, this.rtx.totalMs)), left);
          return;
        }
        p.timer = setTimeout(() => send(false), interval);
        interval = Math.min(interval * 2, this.rtx.maxMs);
      };
      send(true);
    });
  }

  // ------------------------------------------------------------------------------------------
  // Receiving
  // ------------------------------------------------------------------------------------------

  private reject(reason: RejectReason, detail?: Record<string, unknown>): void {
    this.stats.rejected[reason]++;
    this.log.debug('control datagram ignored', { reason, ...detail });
  }

  private onDatagram(msg: Buffer, rinfo: dgramModule.RemoteInfo): void {
    if (this.closed) return;
    if (rinfo.address !== this.switchAddress || rinfo.port !== this.port) {
      return this.reject('wrong-source', { address: rinfo.address, port: rinfo.port });
    }
    let m: Message;
    try {
      m = decode(msg, this.key);
    } catch (err) {
      if (!isControlProtocolError(err)) throw err;
      this.reject(err.reason, { error: err.message });
      const p = err.prefix;
      // A switch of another version answers UNSUPP_VERSION in its own version: still final.
      if (err.reason === 'bad-version' && p?.response && p.resultCode === 1) {
        const pending = this.pending.get(p.nonce);
        pending?.reject(new SwitchRequestError(pending.opcode, 'UNSUPP_VERSION',
          `the switch speaks protocol version ${p.version}, this agent speaks ${PROTOCOL_VERSION}`));
      }
      return;
    }
    if (m.kind === 'request') {
      if (m.opcode === 'notify') return this.onNotify(m);
      return this.reject('unexpected-response');
    }
    this.stats.replies++;
    const p = this.pending.get(m.nonce);
    if (!p) return this.reject('wrong-nonce');
    if (!m.auth && !UNAUTHENTICATED_RESULTS.has(m.result)) {
      // We authenticate every request, so the switch authenticates every reply it can.
      return this.reject('unauthenticated-reply', { result: m.result });
    }
    if (m.auth) this.observeBoot(m.bootId, m.epoch);
    p.resolve(m);
  }

  private observeBoot(bootId: string, epoch: number): void {
    const previous = this.knownBootId;
    if (previous === bootId) return;
    this.knownBootId = bootId;
    if (previous === undefined) return;
    this.log.warn('switch restarted: its stitches are gone', { previousBootId: previous, bootId, epoch });
    this.emit('switch:restarted', { previousBootId: previous, bootId, epoch });
  }

  private onNotify(m: NotifyRequest): void {
    // decode() verified the MAC with our key: the switch sent this.
    const seq = m.auth!.sequence;
    this.observeBoot(m.bootId, 0);
    const w = this.notifyWindow;
    if (w.bootId !== m.bootId) {
      w.bootId = m.bootId; w.highest = 0n; w.seen.clear(); w.acked.clear();
    }
    const duplicate = w.seen.has(seq) || (w.highest >= NOTIFY_WINDOW && seq <= w.highest - NOTIFY_WINDOW);
    if (duplicate) {
      // A retransmission whose ack was lost: ack again, do not report twice.
      if (w.acked.get(m.nonce) === seq) return this.ackNotify(m);
      return this.reject('replayed', { sequence: String(seq) });
    }
    w.seen.add(seq);
    if (seq > w.highest) w.highest = seq;
    for (const s of w.seen) if (w.highest >= NOTIFY_WINDOW && s <= w.highest - NOTIFY_WINDOW) w.seen.delete(s);
    w.acked.set(m.nonce, seq);
    if (w.acked.size > Number(NOTIFY_WINDOW)) w.acked.delete(w.acked.keys().next().value!);
    this.stats.notifies++;
    // Acked after the listeners ran: for a final state the switch frees the stitch (and stops
    // silencing the shell's legs) on this ack, so the shell must have dropped its sockets first.
    this.emit('notify', { status: m.status, bootId: m.bootId });
    this.ackNotify(m);
  }

  private ackNotify(m: NotifyRequest): void {
    const ack = encode({
      kind: 'response', opcode: 'notify', result: 'SUCCESS', nonce: m.nonce, bootId: m.bootId, epoch: 0,
      auth: { keyId: this.key.id, sequence: this.nextSequence() },
    }, this.key);
    this.socket?.send(ack, this.port, this.switchAddress).catch((err: unknown) => this.log.debug('NOTIFY ack not sent', { err }));
  }
}

function checkId(id: unknown): void {
  if (typeof id !== 'number' || !Number.isInteger(id) || id < 1 || id > 0xffff_ffff) {
    throw new InvalidArgumentError(`stitch id must be an integer 1..4294967295, got ${String(id)}`);
  }
}

function noAnswer(opcode: Opcode, totalMs: number): SwitchRequestError {
  return new SwitchRequestError(opcode, 'NO_ANSWER', `no answer from the switch within ${totalMs} ms`);
}

function describeResult(r: Response): string {
  switch (r.result) {
    case 'STALE_BOOT': return `the switch restarted (boot ${r.bootId}); stitch ids from before are void`;
    case 'UNSUPP_VERSION': return `the switch does not speak version ${PROTOCOL_VERSION}`;
    default: return `the switch answered ${r.result}`;
  }
}

/** A control client for one switch. The socket is bound lazily on the first request. */
export function createControlClient(init: ControlClientInit): ControlClient {
  return new ControlClientImpl(init);
}
