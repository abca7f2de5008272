// The switch's control daemon: one UDP socket on the shell-facing interface serving DISCOVER (through
// the discovery responder) and the authenticated STITCH / UNSTITCH / QUERY requests, and sending
// NOTIFY to a stitch's owner when the datapath reports a state change. docs/protocol.md, "Switch
// behaviour", is the specification of what happens here, in the order it happens.
import { EventEmitter } from 'node:events';
import type * as dgramModule from 'node:dgram';
import DgramAsPromised, { type SocketAsPromised } from 'dgram-as-promised';
import { InvalidArgumentError, StitchError } from '../sdk/errors.ts';
import { componentLogger, type Logger } from '../sdk/log.ts';
import type { Datapath, StitchSpec, StitchState, StitchStatus } from './stitch-types.ts';
import {
  CONTROL_RECV_BUFFER, DEFAULT_PORT, MAX_QUERY_RECORDS, OPCODES, RESULT_FOR_DECODE_REASON, encode, encodeBareResponse, decode,
  isControlProtocolError, newNonce, newBootId, newReasonCounters, readPrefix,
  type Key, type Message, type Opcode, type ReasonCounters, type RejectReason, type Request, type Response,
  type ResultCode, type StitchLegs, type StitchManyEntry, type StitchManyResponse, type StitchRecord, type StitchResponse,
} from './protocol.ts';
import { UNKNOWN_KEY_ID, createStitchTable, type StitchOwner, type StitchTable, type TableEntry } from './stitch-table.ts';
import {
  createDiscoveryResponder, resolveShellInterface, type DiscoveryResponder, type NetworkInterfacesFn,
} from './discovery-responder.ts';

export interface RetransmitPolicy { initialMs: number; maxMs: number; totalMs: number }

export interface SwitchControlInit {
  /** The shell-facing interface, by name (as `tcp-stitch switch --shell-iface`) ... */
  shellIface?: string;
  /** ... or by its IPv4 address. The socket binds to this address. */
  shellAddress?: string;
  /** Keys shells may authenticate with (switch/keys.ts loadKeyFile). At least one. */
  keys: readonly Key[];
  datapath: Datapath;
  /** UDP port for DISCOVER and control (default 7807; 0 picks a free port, for tests). */
  port?: number;
  logger?: Logger;
  /** Most stitches one shell address may hold (default: the datapath's table size). */
  quotaPerShell?: number;
  /** Token bucket per source address; over-limit datagrams are dropped and counted. */
  rateLimit?: { perSecond: number; burst: number };
  /** Replies kept for retransmitted requests (per key id). */
  responseCache?: { ttlMs: number; perKey: number; maxHits: number };
  /** NOTIFY retransmission until the owner acknowledges. */
  notifyRetransmit?: RetransmitPolicy;
  switchId?: string;
  /** 16 hex digits; default random (a new one every start of the process). */
  bootId?: string;
  /** Seams for tests. */
  networkInterfaces?: NetworkInterfacesFn;
  dgram?: typeof dgramModule;
  now?: () => number;
}

export const DEFAULT_RATE_LIMIT: Readonly<{ perSecond: number; burst: number }> = { perSecond: 200, burst: 400 };
// perKey: far above the agent's 256 requests in flight, so that a reply lost among them is still cached
// when its retransmission comes (else the retry is REPLAYED, and an UNSTITCH sent again finds nothing).
export const DEFAULT_RESPONSE_CACHE: Readonly<{ ttlMs: number; perKey: number; maxHits: number }> = { ttlMs: 30_000, perKey: 4096, maxHits: 8 };
export const DEFAULT_NOTIFY_RETRANSMIT: RetransmitPolicy = { initialMs: 250, maxMs: 2_000, totalMs: 10_000 };
const RATE_BUCKETS_MAX = 4096;

export interface SwitchCounters {
  received: number;
  answered: number;
  answeredFromCache: number;
  /** Every datagram refused or dropped, by reason. */
  rejected: ReasonCounters;
  installs: number;
  removals: number;
  notifies: { sent: number; retransmitted: number; acked: number; expired: number };
}

export interface SwitchTableRow {
  spec: StitchSpec; owner: StitchOwner; status?: StitchStatus;
  /** Adopted from the daemon before and not claimed by its owner yet (owner.keyId -1, offsets 0). */
  adopted?: boolean;
}

export interface SwitchSnapshot {
  switchId: string; bootId: string; epoch: number;
  address: string; port: number; shellIface: string;
  tableSize: number; freeSlots: number;
  stitches: SwitchTableRow[];
  counters: SwitchCounters;
}

export interface SwitchControlEvents {
  'request:rejected': [{ reason: RejectReason; address: string; port: number }];
  'request:answered': [{ opcode: Opcode | number; result: ResultCode; address: string; port: number; fromCache: boolean }];
  'notify:acked': [{ id: number; state: StitchState }];
  'notify:expired': [{ id: number; state: StitchState }];
}

export interface SwitchControl extends EventEmitter<SwitchControlEvents> {
  readonly bootId: string;
  readonly switchId: string;
  /** Binds the socket; resolves with where it listens. */
  start(): Promise<{ address: string; port: number }>;
  /** Stops: closes the socket, cancels NOTIFY retransmissions. The datapath stays the caller's. */
  close(): Promise<void>;
  address(): { address: string; port: number };
  /** Seconds since start(). */
  epoch(): number;
  counters(): SwitchCounters;
  snapshot(): SwitchSnapshot;
}

interface CacheEntry {
  nonce: string; address: string; port: number;
  /** undefined while the request is still being served */
  reply?: Buffer;
  result?: ResultCode;
  at: number; hits: number;
}
interface KeyState { highest: bigint; cache: Map<bigint, CacheEntry>; outSequence: bigint }
interface PendingNotify {
  id: number; state: StitchState; keyId: number; address: string; port: number; timer?: NodeJS.Timeout;
  /** A final state: free the stitch when acknowledged or expired. */
  release: boolean;
}
interface Source { address: string; port: number }

function mergeDefined<T extends object>(defaults: T, given: Partial<T> | undefined): T {
  return { ...defaults, ...Object.fromEntries(Object.entries(given ?? {}).filter(([, v]) => v !== undefined)) };
}

function positive(n: unknown, what: string, allowZero = false): void {
  if (typeof n !== 'number' || !Number.isFinite(n) || n < 0 || (!allowZero && n === 0)) {
    throw new InvalidArgumentError(`${what} must be a ${allowZero ? 'non-negative' : 'positive'} number, got ${String(n)}`);
  }
}

class SwitchControlImpl extends EventEmitter<SwitchControlEvents> implements SwitchControl {
  readonly bootId: string;
  readonly switchId: string;
  private readonly log: Logger;
  private readonly datapath: Datapath;
  private readonly keys = new Map<number, Key>();
  private readonly keyState = new Map<number, KeyState>();
  private readonly table: StitchTable;
  private readonly discovery: DiscoveryResponder;
  private readonly rate: { perSecond: number; burst: number };
  private readonly cacheCfg: { ttlMs: number; perKey: number; maxHits: number };
  private readonly notifyCfg: RetransmitPolicy;
  private readonly buckets = new Map<string, { tokens: number; last: number }>();
  private readonly pendingNotifies = new Map<string, PendingNotify>();
  /** Adopted stitches that ended before their owner claimed them: the final status, and the timer
   *  that frees them if the owner never does. */
  private readonly lingering = new Map<number, { status: StitchStatus; timer: NodeJS.Timeout }>();
  private readonly immediates = new Set<NodeJS.Immediate>();
  private readonly now: () => number;
  private readonly port: number;
  private readonly dgram?: typeof dgramModule;
  private readonly stats: SwitchCounters = {
    received: 0, answered: 0, answeredFromCache: 0, rejected: newReasonCounters(),
    installs: 0, removals: 0, notifies: { sent: 0, retransmitted: 0, acked: 0, expired: 0 },
  };
  private socket?: SocketAsPromised;
  private bound?: { address: string; port: number };
  private startedAt = 0;
  private closed = false;

  constructor(init: SwitchControlInit) {
    super();
    if (!init || typeof init !== 'object') throw new InvalidArgumentError('createSwitchControl needs options');
    if (!Array.isArray(init.keys) || init.keys.length === 0) {
      throw new InvalidArgumentError("the switch needs at least one key: run 'tcp-stitch keygen > FILE' and pass --key-file FILE");
    }
    for (const k of init.keys) {
      if (this.keys.has(k.id)) throw new InvalidArgumentError(`key id ${k.id} given twice`);
      this.keys.set(k.id, k);
    }
    if (!init.datapath) throw new InvalidArgumentError('createSwitchControl needs a datapath (createTableDatapath() to run without eBPF)');
    this.datapath = init.datapath;
    this.port = init.port ?? DEFAULT_PORT;
    if (!Number.isInteger(this.port) || this.port < 0 || this.port > 65535) throw new InvalidArgumentError(`port must be 0..65535, got ${this.port}`);
    this.rate = mergeDefined({ ...DEFAULT_RATE_LIMIT }, init.rateLimit);
    positive(this.rate.perSecond, 'rateLimit.perSecond', true); positive(this.rate.burst, 'rateLimit.burst');
    this.cacheCfg = mergeDefined({ ...DEFAULT_RESPONSE_CACHE }, init.responseCache);
    positive(this.cacheCfg.ttlMs, 'responseCache.ttlMs'); positive(this.cacheCfg.perKey, 'responseCache.perKey');
    positive(this.cacheCfg.maxHits, 'responseCache.maxHits', true);
    this.notifyCfg = mergeDefined({ ...DEFAULT_NOTIFY_RETRANSMIT }, init.notifyRetransmit);
    positive(this.notifyCfg.initialMs, 'notifyRetransmit.initialMs'); positive(this.notifyCfg.maxMs, 'notifyRetransmit.maxMs');
    positive(this.notifyCfg.totalMs, 'notifyRetransmit.totalMs', true);
    if (init.bootId !== undefined && !/^[0-9a-f]{16}$/.test(init.bootId)) throw new InvalidArgumentError('bootId must be 16 lowercase hex digits');
    this.bootId = init.bootId ?? newBootId();
    this.now = init.now ?? Date.now;
    if (init.dgram) this.dgram = init.dgram;
    const tableSize = this.datapath.capabilities.tableSize;
    if (init.quotaPerShell !== undefined) positive(init.quotaPerShell, 'quotaPerShell');
    this.table = createStitchTable({ capacity: tableSize, quotaPerShell: init.quotaPerShell ?? tableSize });
    const shell = resolveShellInterface({
      ...(init.shellIface !== undefined && { shellIface: init.shellIface }),
      ...(init.shellAddress !== undefined && { shellAddress: init.shellAddress }),
      ...(init.networkInterfaces && { networkInterfaces: init.networkInterfaces }),
    });
    this.discovery = createDiscoveryResponder({
      shell, datapath: this.datapath, freeSlots: () => this.table.free,
      controlPort: () => this.bound?.port ?? this.port, ...(init.switchId !== undefined && { switchId: init.switchId }),
    });
    this.switchId = this.discovery.switchId;
    this.log = componentLogger('switch-control', init.logger);
    this.datapath.onStateChange((s) => this.onStateChange(s));
  }

  async start(): Promise<{ address: string; port: number }> {
    if (this.closed) throw new StitchError('switch control was closed; create a new one', 'TCP_STITCH_CLOSED');
    if (this.bound) return this.bound;
    this.adoptStitches();
    // A burst of requests (an agent keeps 256 in flight) must not overflow the default 208 KiB of
    // receive buffer: each lost one costs its sender a retransmission timeout. The kernel caps this
    // at net.core.rmem_max.
    const socket = DgramAsPromised.createSocket({ type: 'udp4', recvBufferSize: CONTROL_RECV_BUFFER, ...(this.dgram && { dgram: this.dgram }) });
    socket.socket.on('error', (err) => this.log.warn('control socket error', { err }));
    const addr = await socket.bind(this.port, this.discovery.shell.address);
    this.socket = socket;
    this.bound = { address: addr.address, port: addr.port };
    this.startedAt = this.now();
    socket.socket.on('message', (msg: Buffer, rinfo: dgramModule.RemoteInfo) => {
      void this.onDatagram(msg, { address: rinfo.address, port: rinfo.port }).catch((err) => {
        this.log.error('control request handling failed', { err });
      });
    });
    this.log.info('switch control listening', {
      address: addr.address, port: addr.port, shellIface: this.discovery.shell.name,
      prefixLength: this.discovery.shell.prefixLength, bootId: this.bootId, switchId: this.switchId,
    });
    return this.bound;
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    for (const p of this.pendingNotifies.values()) if (p.timer) clearTimeout(p.timer);
    this.pendingNotifies.clear();
    for (const l of this.lingering.values()) clearTimeout(l.timer);
    this.lingering.clear();
    for (const t of this.immediates) clearImmediate(t);
    this.immediates.clear();
    const s = this.socket;
    this.socket = undefined;
    if (s) {
      await s.close().catch(() => undefined);
      s.destroy();
    }
    this.log.info('switch control closed', { bootId: this.bootId });
  }

  address() {
    if (!this.bound) throw new StitchError('switch control is not started', 'TCP_STITCH_NOT_STARTED');
    return { ...this.bound };
  }

  epoch(): number {
    return this.startedAt === 0 ? 0 : Math.max(0, Math.floor((this.now() - this.startedAt) / 1000)) >>> 0;
  }

  counters(): SwitchCounters {
    return structuredClone(this.stats);
  }

  snapshot(): SwitchSnapshot {
    const b = this.bound ?? { address: this.discovery.shell.address, port: this.port };
    return {
      switchId: this.switchId, bootId: this.bootId, epoch: this.epoch(),
      address: b.address, port: b.port, shellIface: this.discovery.shell.name,
      tableSize: this.table.capacity, freeSlots: this.table.free,
      stitches: this.table.list().map((e) => {
        const status = this.datapath.status(e.spec.id);
        return { spec: structuredClone(e.spec), owner: { ...e.owner }, ...(status && { status }), ...(e.adopted && { adopted: true }) };
      }),
      counters: this.counters(),
    };
  }

  // ------------------------------------------------------------------------------------------
  // Receiving
  // ------------------------------------------------------------------------------------------

  private reject(reason: RejectReason, src: Source, detail?: Record<string, unknown>): void {
    this.stats.rejected[reason]++;
    this.log.debug('control datagram rejected', { reason, ...src, ...detail });
    if (this.listenerCount('request:rejected') > 0) this.emit('request:rejected', { reason, ...src });
  }

  private takeToken(address: string): boolean {
    const now = this.now();
    let b = this.buckets.get(address);
    if (!b) {
      if (this.buckets.size >= RATE_BUCKETS_MAX) this.pruneBuckets(now);
      b = { tokens: this.rate.burst, last: now };
      this.buckets.set(address, b);
    } else {
      b.tokens = Math.min(this.rate.burst, b.tokens + ((now - b.last) * this.rate.perSecond) / 1000);
      b.last = now;
    }
    if (b.tokens < 1) return false;
    b.tokens -= 1;
    return true;
  }

  private pruneBuckets(now: number): void {
    for (const [a, b] of this.buckets) {
      if (b.tokens + ((now - b.last) * this.rate.perSecond) / 1000 >= this.rate.burst) this.buckets.delete(a);
    }
    // Still full: forget the oldest (a forgotten source starts with a full bucket again).
    while (this.buckets.size >= RATE_BUCKETS_MAX) this.buckets.delete(this.buckets.keys().next().value!);
  }

  /** Runs synchronously up to the first datapath call, so unauthenticated traffic is answered in the same tick. */
  private async onDatagram(msg: Buffer, src: Source): Promise<void> {
    if (this.closed) return;
    this.stats.received++;
    if (!this.takeToken(src.address)) return this.reject('rate-limited', src);

    let m: Message;
    try {
      m = decode(msg, (id) => this.keys.get(id)?.secret);
    } catch (err) {
      if (!isControlProtocolError(err)) throw err;
      this.reject(err.reason, src, { error: err.message });
      const p = readPrefix(msg);
      if (!p || p.response) return; // never answer a response; too short to echo a nonce
      const reply = encodeBareResponse({
        opcode: p.opcode, nonce: p.nonce, result: RESULT_FOR_DECODE_REASON[err.reason], bootId: this.bootId, epoch: this.epoch(),
      });
      this.sendUnauthenticated(reply, msg, src, RESULT_FOR_DECODE_REASON[err.reason], OPCODE_NAMES_BY_NUMBER[p.opcode] ?? p.opcode);
      return;
    }

    if (m.kind === 'response') {
      if (m.opcode === 'notify') return this.onNotifyAck(m, src);
      return this.reject('unexpected-response', src);
    }
    if (m.opcode === 'discover' && !this.discovery.isNeighbour(src.address)) {
      return this.reject('not-neighbour', src);
    }
    if (!m.auth) {
      // Only DISCOVER decodes without AUTH (the codec enforces it).
      const reply = encode(this.discoverResponse(m));
      this.sendUnauthenticated(reply, msg, src, 'SUCCESS', m.opcode);
      return;
    }

    // Authenticated: freshness by per-key sequence, retransmissions from the response cache.
    const ks = this.keyStateFor(m.auth.keyId);
    const seq = m.auth.sequence;
    const cached = ks.cache.get(seq);
    if (cached && this.now() - cached.at <= this.cacheCfg.ttlMs) {
      if (cached.nonce !== m.nonce || cached.address !== src.address || cached.port !== src.port) {
        this.reject('replayed', src, { keyId: m.auth.keyId, sequence: String(seq) });
        return this.sendBareError(m, 'REPLAYED', msg, src);
      }
      if (!cached.reply) return; // still being served: the reply is on its way
      if (cached.hits >= this.cacheCfg.maxHits) return this.reject('cache-exhausted', src);
      cached.hits++;
      this.stats.answeredFromCache++;
      return this.send(cached.reply, src, { opcode: m.opcode, result: cached.result!, fromCache: true });
    }
    if (seq <= ks.highest) {
      this.reject('replayed', src, { keyId: m.auth.keyId, sequence: String(seq), highest: String(ks.highest) });
      return this.sendBareError(m, 'REPLAYED', msg, src);
    }
    ks.highest = seq;
    const entry: CacheEntry = { nonce: m.nonce, address: src.address, port: src.port, at: this.now(), hits: 0 };
    this.cachePut(ks, seq, entry);

    let response: Response;
    if (m.opcode !== 'discover' && m.bootId !== this.bootId) {
      this.reject('stale-boot', src, { requestBootId: m.bootId });
      response = this.errorResponse(m, 'STALE_BOOT');
    } else {
      response = await this.serve(m, src);
    }
    if (this.closed) return;
    const reply = this.sign(response, m.auth.keyId);
    entry.reply = reply;
    entry.result = response.result;
    this.send(reply, src, { opcode: m.opcode, result: response.result, fromCache: false });
  }

  private keyStateFor(keyId: number): KeyState {
    let ks = this.keyState.get(keyId);
    if (!ks) {
      ks = { highest: 0n, cache: new Map(), outSequence: 0n };
      this.keyState.set(keyId, ks);
    }
    return ks;
  }

  private cachePut(ks: KeyState, seq: bigint, entry: CacheEntry): void {
    const now = this.now();
    // Sequences only grow, so Map order is age order: drop expired and surplus entries from the front.
    for (const [s, e] of ks.cache) {
      if (ks.cache.size >= this.cacheCfg.perKey || now - e.at > this.cacheCfg.ttlMs) ks.cache.delete(s);
      else break;
    }
    ks.cache.set(seq, entry);
  }

  // ------------------------------------------------------------------------------------------
  // Serving fresh authenticated requests
  // ------------------------------------------------------------------------------------------

  private responseBase(m: Request, result: ResultCode) {
    return { kind: 'response' as const, result, nonce: m.nonce, bootId: this.bootId, epoch: this.epoch() };
  }

  private errorResponse(m: Request, result: ResultCode): Response {
    return { ...this.responseBase(m, result), opcode: m.opcode } as Response;
  }

  private discoverResponse(m: Request): Response {
    return { ...this.responseBase(m, 'SUCCESS'), opcode: 'discover', info: this.discovery.info() };
  }

  private async serve(m: Request, src: Source): Promise<Response> {
    const keyId = m.auth!.keyId;
    switch (m.opcode) {
      case 'discover': return this.discoverResponse(m);
      case 'stitch': return this.serveStitch(m, m.legs, { address: src.address, keyId }, src);
      case 'stitchMany': {
        const rs = await this.serveStitches(m, m.legs, { address: src.address, keyId }, src) as Array<StitchResponse | StitchManyResponse>;
        const entries = rs.map((r): StitchManyEntry => r.result === 'SUCCESS' ? { result: 'SUCCESS', stitch: (r as StitchResponse).stitch! } : { result: r.result });
        return { ...this.responseBase(m, 'SUCCESS'), opcode: 'stitchMany', entries };
      }
      case 'unstitch': return this.serveUnstitch(m, m.id, { address: src.address, keyId }, src);
      case 'query': return this.serveQuery(m, m.id, m.cursor, { address: src.address, keyId }, src);
      case 'notify':
        // Only the switch sends NOTIFY requests.
        this.reject('bad-opcode', src);
        return this.errorResponse(m, 'UNSUPP_OPCODE');
    }
  }

  /** Both legs must be real, distinct TCP connections that end at the requester's own address. */
  private checkLegs(legs: StitchLegs, src: Source): string | undefined {
    const { client, shell } = legs.clientLeg;
    const { shell: shell2, core } = legs.coreLeg;
    if (shell.address !== src.address || shell2.address !== src.address) return 'legs must end at the requester\'s own address';
    if (!client.port || !shell.port || !shell2.port || !core.port) return 'port 0';
    if (client.address === src.address || core.address === src.address) return 'client or core at the shell\'s own address';
    if (client.address === core.address && client.port === core.port && shell.port === shell2.port) return 'client leg and core leg are the same connection';
    return undefined;
  }

  private async serveStitch(m: Request, legs: StitchLegs, owner: StitchOwner, src: Source): Promise<Response> {
    return (await this.serveStitches(m, [legs], owner, src))[0]!;
  }

  /**
   * STITCH and STITCH_MANY: the legs are admitted in order, as separate STITCHes would be (the same
   * legs twice give one stitch), and the new stitches go to the datapath in one call, so a
   * STITCH_MANY pays for its map writes once per datagram, not once per stitch.
   */
  private async serveStitches(m: Request, all: StitchLegs[], owner: StitchOwner, src: Source): Promise<Response[]> {
    const out: Response[] = [];
    const fresh: Array<{ i: number; entry: TableEntry }> = [];
    const waiting: Array<{ i: number; installing: Promise<void> }> = []; // legs of a stitch being installed: served again after
    let installed!: () => void;
    const installing = new Promise<void>((resolve) => { installed = resolve; });
    all.forEach((legs, i) => {
      const why = this.checkLegs(legs, src);
      if (why) {
        this.reject('bad-legs', src, { why });
        out[i] = this.errorResponse(m, 'BAD_LEGS');
        return;
      }
      const a = this.table.admit(legs, owner);
      if (a.kind === 'existing') {
        if (a.entry.installing) waiting.push({ i, installing: a.entry.installing });
        else out[i] = this.existingStitch(m, a.entry, legs, owner, src);
        return;
      }
      if (a.kind === 'refused') {
        this.reject(a.reason, src);
        this.log.info('stitch refused', { reason: a.reason, owner });
        out[i] = this.errorResponse(m, a.reason === 'not-owner' ? 'NOT_OWNER' : a.reason === 'leg-in-use' ? 'LEG_IN_USE' : 'NO_RESOURCES');
        return;
      }
      const entry: TableEntry = {
        spec: { id: a.id, ...legs }, // legs were decoded for this request alone: no copy
        owner, notifyPort: src.port, createdAt: this.now(), installing,
      };
      this.table.add(entry);
      fresh.push({ i, entry });
    });
    if (fresh.length > 0) {
      const errors = await this.install(fresh.map((f) => f.entry.spec));
      installed();
      const done: Array<{ id: number; state: string }> = [];
      fresh.forEach(({ i, entry }, k) => {
        out[i] = this.installedStitch(m, entry, errors[k], src);
        const st = (out[i] as StitchResponse).stitch;
        if (st) done.push({ id: st.id, state: st.state });
      });
      // One line per request, not per stitch: a burst of STITCH_MANYs installs thousands a second.
      if (done.length === 1) this.log.info('stitch installed', { ...done[0], owner });
      else if (done.length > 1) this.log.info('stitches installed', { owner, stitches: done });
    }
    for (const w of waiting) {
      await w.installing;
      out[w.i] = await this.serveStitch(m, all[w.i]!, owner, src);
    }
    return out;
  }

  /** The datapath's installs, one call for all when it can; per spec undefined or what refused it. */
  private async install(specs: StitchSpec[]): Promise<Array<unknown>> {
    const failed = (err: unknown) => err ?? new Error('install failed');
    if (this.datapath.installMany) return this.datapath.installMany(specs).catch((err: unknown) => specs.map(() => failed(err)));
    const errors: unknown[] = [];
    for (const spec of specs) errors.push(await this.datapath.install(spec).then(() => undefined, failed));
    return errors;
  }

  /** The answer to a STITCH of legs already stitched (or adopted, or on their way out). */
  private existingStitch(m: Request, e: TableEntry, legs: StitchLegs, owner: StitchOwner, src: Source): Response {
    if (e.adopted) return this.claim(m, e, legs, owner, src);
    if (e.removing || e.ended) { this.reject('leg-in-use', src); return this.errorResponse(m, 'LEG_IN_USE'); }
    e.notifyPort = src.port;
    const state = this.datapath.status(e.spec.id)?.state ?? 'stitched';
    return { ...this.responseBase(m, 'SUCCESS'), opcode: 'stitch', stitch: { id: e.spec.id, state, existing: true } };
  }

  /** The answer to a STITCH whose install has finished, with installError when it failed. */
  private installedStitch(m: Request, entry: TableEntry, installError: unknown, src: Source): Response {
    const { spec } = entry;
    delete entry.installing;
    if (installError !== undefined) {
      this.table.delete(spec.id);
      const untracked = (installError as { reason?: unknown }).reason === 'untracked-leg';
      this.reject(untracked ? 'untracked-leg' : 'datapath-error', src);
      this.log.info('stitch refused', { reason: untracked ? 'untracked-leg' : 'datapath-error', id: spec.id, err: installError });
      return this.errorResponse(m, untracked ? 'UNTRACKED_LEG' : 'DATAPATH_ERROR');
    }
    if (this.closed) return this.errorResponse(m, 'DATAPATH_ERROR');
    this.stats.installs++;
    const deferred = entry.deferredStatus;
    if (deferred) {
      // The datapath reported a change while installing: tell the owner after this reply.
      delete entry.deferredStatus;
      const t = setImmediate(() => { this.immediates.delete(t); this.onStateChange(deferred); });
      this.immediates.add(t);
    }
    const state = this.datapath.status(spec.id)?.state ?? 'stitched';
    return { ...this.responseBase(m, 'SUCCESS'), opcode: 'stitch', stitch: { id: spec.id, state, existing: false } };
  }

  // ------------------------------------------------------------------------------------------
  // Stitches adopted from the daemon before (docs/datapath.md, "Daemon restart")
  // ------------------------------------------------------------------------------------------

  /** Takes the datapath's adopted stitches into the table, owned by their shell address, unclaimed. */
  private adoptStitches(): void {
    const list = this.datapath.adopted?.() ?? [];
    if (list.length === 0) return;
    for (const a of list) {
      if (this.table.get(a.id)) continue;
      const spec: StitchSpec = {
        id: a.id, clientLeg: structuredClone(a.clientLeg), coreLeg: structuredClone(a.coreLeg),
        clientOffset: 0n, corePreambleLength: 0, shellOffset: 0n, coreAnswerLength: 0,
      };
      this.table.add({ spec, owner: { address: a.clientLeg.shell.address, keyId: UNKNOWN_KEY_ID }, notifyPort: 0, adopted: true, createdAt: this.now() });
      // A change before now went nowhere (no entry yet): an end already reached is taken from here.
      const st = this.datapath.status(a.id);
      if (st && (st.state === 'closed' || st.state === 'failed')) this.onStateChange(st);
    }
    this.log.info('stitches adopted from the daemon before; each owner claims its own by sending STITCH again', {
      ids: list.map((a) => a.id), owners: [...new Set(list.map((a) => a.clientLeg.shell.address))],
    });
  }

  /** An adopted stitch claimed by a STITCH of its legs from its address: the entry takes the key id,
   *  the notify port and the offsets of the request; the datapath keeps the entry as installed. */
  private claim(m: Request, e: TableEntry, legs: StitchLegs, owner: StitchOwner, src: Source): Response {
    const id = e.spec.id;
    e.owner = { ...owner };
    e.notifyPort = src.port;
    e.spec = { ...e.spec, clientOffset: legs.clientOffset, corePreambleLength: legs.corePreambleLength, shellOffset: legs.shellOffset, coreAnswerLength: legs.coreAnswerLength };
    delete e.adopted;
    let state = this.datapath.status(id)?.state ?? 'stitched';
    const l = this.lingering.get(id);
    if (l) {
      // It ended while unclaimed: the owner hears it now (after this reply) and frees it by acknowledging.
      clearTimeout(l.timer);
      this.lingering.delete(id);
      state = l.status.state;
      const t = setImmediate(() => {
        this.immediates.delete(t);
        if (this.table.get(id) === e) this.sendNotify(e, l.status, true);
      });
      this.immediates.add(t);
    }
    this.log.info('adopted stitch claimed by its owner', { id, owner, state });
    return { ...this.responseBase(m, 'SUCCESS'), opcode: 'stitch', stitch: { id, state, existing: true } };
  }

  private ownedEntry(m: Request, id: number, owner: StitchOwner, src: Source): TableEntry | Response {
    const e = this.table.get(id);
    if (!e || e.removing) { this.reject('not-found', src); return this.errorResponse(m, 'NOT_FOUND'); }
    // An unclaimed adopted stitch belongs to its address, whatever key that shell holds.
    if (e.owner.address !== owner.address || (!e.adopted && e.owner.keyId !== owner.keyId)) {
      this.reject('not-owner', src, { id });
      return this.errorResponse(m, 'NOT_OWNER');
    }
    return e;
  }

  private async serveUnstitch(m: Request, id: number, owner: StitchOwner, src: Source): Promise<Response> {
    let e = this.ownedEntry(m, id, owner, src);
    if ('kind' in e) return e;
    if (e.installing) {
      await e.installing;
      e = this.ownedEntry(m, id, owner, src);
      if ('kind' in e) return e;
    }
    e.removing = true;
    const last = this.datapath.status(id) ?? zeroStatus(id, 'stitched');
    try {
      await this.datapath.remove(id);
    } catch (err) {
      delete e.removing;
      this.reject('datapath-error', src);
      this.log.warn('unstitch failed in the datapath', { id, err });
      return this.errorResponse(m, 'DATAPATH_ERROR');
    }
    this.table.delete(id);
    const l = this.lingering.get(id);
    if (l) { clearTimeout(l.timer); this.lingering.delete(id); }
    this.stats.removals++;
    this.log.info('stitch removed', { id, owner, reason: 'unstitched' });
    return { ...this.responseBase(m, 'SUCCESS'), opcode: 'unstitch', status: { ...last, state: 'closed', reason: 'unstitched' } };
  }

  private record(e: TableEntry): StitchRecord {
    return { status: this.datapath.status(e.spec.id) ?? zeroStatus(e.spec.id, 'draining'), spec: structuredClone(e.spec) };
  }

  private async serveQuery(m: Request, id: number, cursor: number, owner: StitchOwner, src: Source): Promise<Response> {
    if (id !== 0) {
      const e = this.ownedEntry(m, id, owner, src);
      if ('kind' in e) return e;
      return { ...this.responseBase(m, 'SUCCESS'), opcode: 'query', query: { stitches: [this.record(e)], more: false } };
    }
    const mine = this.table.byOwner(owner.address).filter((e) => (e.adopted || e.owner.keyId === owner.keyId) && e.spec.id > cursor && !e.removing);
    const page = mine.slice(0, MAX_QUERY_RECORDS);
    return { ...this.responseBase(m, 'SUCCESS'), opcode: 'query', query: { stitches: page.map((e) => this.record(e)), more: mine.length > page.length } };
  }

  // ------------------------------------------------------------------------------------------
  // Sending
  // ------------------------------------------------------------------------------------------

  private sign(r: Message, keyId: number): Buffer {
    const ks = this.keyStateFor(keyId);
    ks.outSequence += 1n;
    return encode({ ...r, auth: { keyId, sequence: ks.outSequence } }, this.keys.get(keyId)!);
  }

  /** An unauthenticated reply is never larger than the datagram it answers (no amplification). */
  private sendUnauthenticated(reply: Buffer, request: Buffer, src: Source, result: ResultCode, opcode: Opcode | number): void {
    if (reply.length > request.length) {
      // A refused request was counted under its own reason already; count only suppressed answers.
      if (result === 'SUCCESS') this.reject('amplification', src, { reply: reply.length, request: request.length });
      return;
    }
    this.send(reply, src, { opcode, result, fromCache: false });
  }

  private sendBareError(m: Request, result: ResultCode, request: Buffer, src: Source): void {
    const reply = encodeBareResponse({ opcode: OPCODES[m.opcode], nonce: m.nonce, result, bootId: this.bootId, epoch: this.epoch() });
    this.sendUnauthenticated(reply, request, src, result, m.opcode);
  }

  private send(reply: Buffer, dst: Source, what: { opcode: Opcode | number; result: ResultCode; fromCache: boolean }): void {
    const s = this.socket;
    if (!s || this.closed) return;
    this.stats.answered++;
    if (this.listenerCount('request:answered') > 0) this.emit('request:answered', { ...what, address: dst.address, port: dst.port });
    s.send(reply, dst.port, dst.address).catch((err: unknown) => this.log.warn('control reply not sent', { err, ...dst }));
  }

  // ------------------------------------------------------------------------------------------
  // NOTIFY
  // ------------------------------------------------------------------------------------------

  private onStateChange(status: StitchStatus): void {
    if (this.closed) return;
    const e = this.table.get(status.id);
    if (!e || e.removing || e.ended) return;
    if (e.installing) { e.deferredStatus = { ...status }; return; } // delivered once the STITCH is answered
    const final = status.state === 'closed' || status.state === 'failed';
    if (e.adopted) {
      // Nobody to tell before the owner claims it. An end is kept for the owner's claim (it then
      // gets the NOTIFY), or freed after the NOTIFY's retransmission time if it never comes.
      if (!final) return;
      e.ended = true;
      const timer = setTimeout(() => {
        this.lingering.delete(status.id);
        this.log.warn('adopted stitch ended and its owner never claimed it: freed', { id: status.id, state: status.state, owner: e.owner.address });
        this.free(status.id);
      }, this.notifyCfg.totalMs);
      this.lingering.set(status.id, { status: { ...status }, timer });
      this.log.info('adopted stitch ended before its owner claimed it', { id: status.id, state: status.state, reason: status.reason });
      return;
    }
    if (final) {
      // The connection ended (FIN/RST) or failed. The entry is freed (DESIGN.md invariant 6) once
      // the owner acknowledges this NOTIFY, i.e. has dropped its sockets for the legs, or when the
      // owner never answers (it died): until then the datapath keeps dropping the shell's packets,
      // so the RSTs of those sockets never reach C or B.
      e.ended = true;
      this.log.info('stitch ended', { id: status.id, state: status.state, reason: status.reason });
    }
    this.sendNotify(e, status, final);
  }

  /** Frees an ended stitch: table entry and datapath maps. */
  private free(id: number): void {
    const e = this.table.get(id);
    if (!e?.ended) return;
    const l = this.lingering.get(id);
    if (l) { clearTimeout(l.timer); this.lingering.delete(id); }
    this.table.delete(id);
    this.stats.removals++;
    this.datapath.remove(id).catch((err: unknown) => this.log.warn('datapath remove after close failed', { id, err }));
  }

  private sendNotify(e: TableEntry, status: StitchStatus, release = false): void {
    if (!this.socket || e.notifyPort === 0 || e.owner.keyId === UNKNOWN_KEY_ID) return;
    const nonce = newNonce();
    const msg = { kind: 'request' as const, opcode: 'notify' as const, nonce, bootId: this.bootId, status: { ...status } };
    const bytes = this.sign(msg, e.owner.keyId);
    const p: PendingNotify = { id: status.id, state: status.state, keyId: e.owner.keyId, address: e.owner.address, port: e.notifyPort, release };
    this.pendingNotifies.set(nonce, p);
    const started = this.now();
    let wait = this.notifyCfg.initialMs;
    const transmit = (first: boolean) => {
      if (this.closed || !this.pendingNotifies.has(nonce)) return;
      if (first) this.stats.notifies.sent++; else this.stats.notifies.retransmitted++;
      this.socket?.send(bytes, p.port, p.address).catch((err: unknown) => this.log.warn('NOTIFY not sent', { err, id: p.id }));
      const elapsed = this.now() - started;
      if (elapsed + wait > this.notifyCfg.totalMs) {
        p.timer = setTimeout(() => {
          if (!this.pendingNotifies.delete(nonce)) return;
          this.stats.notifies.expired++;
          this.log.warn('NOTIFY not acknowledged by the owner', { id: p.id, state: p.state, owner: p.address });
          if (p.release) this.free(p.id);
          this.emit('notify:expired', { id: p.id, state: p.state });
        }, Math.max(0, this.notifyCfg.totalMs - elapsed));
        return;
      }
      p.timer = setTimeout(() => transmit(false), wait);
      wait = Math.min(wait * 2, this.notifyCfg.maxMs);
    };
    transmit(true);
  }

  private onNotifyAck(m: Response, src: Source): void {
    const p = this.pendingNotifies.get(m.nonce);
    if (!p || p.address !== src.address) return this.reject('wrong-nonce', src);
    if (m.auth && m.auth.keyId !== p.keyId) return this.reject('not-owner', src);
    if (!m.auth && m.result === 'SUCCESS') return this.reject('missing-auth', src);
    if (p.timer) clearTimeout(p.timer);
    this.pendingNotifies.delete(m.nonce);
    this.stats.notifies.acked++;
    if (p.release) this.free(p.id);
    this.emit('notify:acked', { id: p.id, state: p.state });
  }
}

const OPCODE_NAMES_BY_NUMBER: Record<number, Opcode> = Object.fromEntries(Object.entries(OPCODES).map(([k, v]) => [v, k as Opcode]));

function zeroStatus(id: number, state: StitchState): StitchStatus {
  return { id, state, packetsClientToCore: 0, packetsCoreToClient: 0, bytesClientToCore: 0, bytesCoreToClient: 0, shellPacketsDropped: 0 };
}

/** The switch's control daemon. Call start() to bind; close() leaves no socket or timer behind. */
export function createSwitchControl(init: SwitchControlInit): SwitchControl {
  return new SwitchControlImpl(init);
}
