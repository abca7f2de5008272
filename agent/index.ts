// The agent's one public door: createAgent() ties the shell (sdk) to the switch. It finds out whether
// stitching is available (DESIGN.md section 6; seed figure 5B), keeps finding out as the host changes,
// installs stitches through the control client when the shell asks (the stitcher), runs the policy
// loop that decides which connections deserve one, and answers the shell's local control socket.
//
// Fail safe (invariant 4): whenever stitching is not available, the shell has no stitcher, so every
// connection stays on the shell path and shell.stitch() rejects; the reason is in status(), in the
// 'discovery:change' event and in the log, once per change.
import { EventEmitter } from 'node:events';
import dns from 'node:dns/promises';
import fs from 'node:fs';
import { isIPv4 } from 'node:net';
import os from 'node:os';
import { performance } from 'node:perf_hooks';
import {
  ClosedError, InvalidArgumentError, SwitchError, componentLogger,
  type DiscoveryChangeMessage, type LogicalConnection, type Logger, type Shell, type StitchDecisionMessage, type Stitcher, type StitchTarget,
  type SwitchRestartMessage,
} from '../sdk/index.ts';
import { publish } from '../sdk/diagnostics.ts';
import { DEFAULT_PORT, type Key, type StitchLegs, type StitchRecord, type StitchState, type StitchStatus } from '../switch/index.ts';
import { countIngressEgress, parseRouteTable } from './interfaces.ts';
import { findNextHop, type ProbeMode } from './next-hop.ts';
import { probeSwitch, whyIncapable, type SwitchCapabilities } from './discovery-probe.ts';
import { createControlClient, type ControlClient, type ControlClientCounters, type SwitchRequestError } from './control-client.ts';
import { createPolicyEngine, defaultPolicy, loadPolicyFile, type PolicyEngine, type PolicyMode } from './policy.ts';
import { openSettings, parseSwitchOption, type SettingsStore, type SwitchMode } from './settings.ts';
import { createLoadMonitor, type LoadMonitor } from './load.ts';

export { defaultPolicy, loadPolicyFile, validatePolicy, type Policy, type PolicyDecision, type PolicyMode, type PolicyRule } from './policy.ts';
export type { SwitchCapabilities } from './discovery-probe.ts';
export type { SwitchMode } from './settings.ts';

// ---------------------------------------------------------------------------------------------
// Types

/** How the agent finds its switch (`--switch auto|off|combined|HOST:PORT`). */
export type SwitchChoice =
  | { mode: 'auto' }
  | { mode: 'off' }
  | { mode: 'combined' }
  | { mode: 'preconfigured'; host: string; port: number };

export interface AgentOptions {
  shell: Shell;
  logger?: Logger;
  /** Where the core accepts core legs: discovery looks for the switch on the way there. */
  core: { host: string; port: number };
  /** Shared with the switch (`--key-file`); the first one signs. Without keys the agent cannot stitch. */
  keys?: Key[];
  /** The shell's control socket path; also names the agent's settings file (several shells per host). */
  controlPath?: string;
  switch: SwitchChoice;
  /** A hand-written policy file (docs/policy.schema.json); default: defaultPolicy(). */
  policyFile?: string;
  /** The interface to use when the host has several ingress/egress points. */
  iface?: string;
  discovery?: {
    /** Bounded wait for the switch's answer (and for a TTL-1 ICMP next-hop probe). Default 3000 ms. */
    waitMs?: number;
    /** Discover again this often; 0 disables. Default 30 000 ms (not in 'off' mode). */
    rediscoverMs?: number;
    /** Look at the interfaces and routes this often, and discover again when they change. Default 3000 ms (auto mode). */
    interfacePollMs?: number;
    /** TTL-1 ICMP next-hop probe: 'when-unclear' (default: only when the routing table cannot tell), 'always', 'never'. */
    nextHopProbe?: ProbeMode;
  };
  /** Directory of the persisted settings. Default: the user config directory, and only when controlPath is given. */
  settingsDir?: string;
  /** How long a stitch may stay 'draining' before the agent warns that the handover is slow. It
   *  keeps waiting: a connection the switch has redirected cannot go back to the shell path. Default 10 000 ms. */
  drainWarnMs?: number;
}

/** A stitch this agent installed: to re-install after a switch restart, and to end at its NOTIFY. */
interface Installed {
  legs: StitchLegs;
  id: number;
  state: StitchState;
  /** The shell's end() for this connection (StitchTarget). */
  end: StitchTarget['end'];
  /** Set while the stitcher waits for the drain to complete. */
  settled?: (err?: Error) => void;
}

/** The last discovery result. `reason` is short and stable; `detail` says more, for humans. */
export interface DiscoveryStatus {
  available: boolean;
  /**
   * Available: 'discovered', 'preconfigured', 'combined'. Not available: 'switch off', 'not yet discovered',
   * an ingress/egress count reason ('several-ingress-egress-points', 'no-ingress-egress-point',
   * 'named-interface-missing', 'named-interface-unusable'), 'no-next-hop', a probe or control failure
   * ('no-answer', 'incapable', 'refused', 'malformed-reply', 'unauthenticated', 'wrong-source',
   * 'wrong-nonce', 'socket-error'), or 'error'.
   */
  reason: string;
  detail?: string;
  mode: SwitchMode;
  /** The switch's control address and port. */
  address?: string;
  port?: number;
  switchId?: string;
  capabilities?: SwitchCapabilities;
  epoch?: number;
  bootId?: string;
  /** DISCOVER round trip (auto mode). */
  rttMs?: number;
  /** The ingress/egress interface, its address, and the next hop discovery used (auto mode). */
  ifname?: string;
  localAddress?: string;
  nextHop?: string;
  nextHopVia?: 'route' | 'icmp' | 'direct';
  /** ISO 8601 time of the result, and how long finding it took. */
  at: string;
  durationMs: number;
}

/** A connection as status() shows it: the shell's view plus the agent's. JSON-safe. */
export interface ConnectionStatus extends LogicalConnection {
  /** The last policy decision. */
  decision?: { stitch: boolean; reason: string };
  /** The switch's id for this connection's stitch, once installed. */
  stitchId?: number;
}

export interface AgentStatus {
  discovery: DiscoveryStatus;
  /** Can the shell stitch right now, and if not, why. */
  stitching: { available: boolean; reason?: string };
  policy: { file?: string; mode: PolicyMode; evaluationIntervalMs: number };
  /** The control client's counters, while there is one. */
  control?: ControlClientCounters;
  connections: ConnectionStatus[];
}

export type AgentDiscoveryChange = DiscoveryChangeMessage & { discovery: DiscoveryStatus };

/** Typed events (`noun:verb`); each also goes to the matching tcp-stitch:* diagnostics channel. */
export interface AgentEvents {
  'discovery:change': [AgentDiscoveryChange];
  'switch:restarted': [SwitchRestartMessage];
  'stitch:decision': [StitchDecisionMessage];
}

export interface StitchOutcome { id: string; ok: boolean; error?: string }

export interface Agent extends EventEmitter<AgentEvents> {
  /** Discovers once (bounded wait), then watches interfaces and routes, re-discovers periodically, and runs the policy loop. */
  start(): Promise<void>;
  /** Stops timers, the policy loop and the control client; waits for a discovery in flight. Idempotent. */
  close(): Promise<void>;
  /** Stops now (a discovery in flight finishes on its own within its bounded wait). */
  destroy(): void;
  status(): AgentStatus;
  /** Runs discovery now (shares one already running). */
  discover(): Promise<DiscoveryStatus>;
  /**
   * The shell's control socket: {op:'status'}; {op:'stitch', id} or {op:'stitch', all:true} →
   * StitchOutcome[]; {op:'discover'}; {op:'query'} (this shell's stitches as the switch holds them).
   */
  control(request: Record<string, unknown>): Promise<unknown>;
}

const CONTROL_OPS = "status, stitch (with id or all: true), discover, query";
const DEFAULT_WAIT_MS = 3_000;
const DEFAULT_REDISCOVER_MS = 30_000;
const DEFAULT_POLL_MS = 3_000;
const MAX_RETRY_MS = 60_000;
const MANUAL_CONCURRENCY = 256;

// ---------------------------------------------------------------------------------------------
// --switch

/** Parses `--switch auto|off|combined|HOST:PORT`; throws InvalidArgumentError with a one-line reason. */
export function parseSwitchMode(value: string): SwitchChoice {
  if (typeof value !== 'string') throw new InvalidArgumentError(`--switch must be auto, off, combined or HOST:PORT, got ${String(value)}`);
  const s = parseSwitchOption(value);
  if (s.switchMode !== 'preconfigured') return { mode: s.switchMode };
  const at = s.switchAddress!.lastIndexOf(':');
  const host = s.switchAddress!.slice(0, at);
  const port = Number(s.switchAddress!.slice(at + 1));
  if (!isIPv4(host)) {
    throw new InvalidArgumentError(`--switch HOST:PORT needs an IPv4 address as HOST (the control protocol carries IPv4 only), got ${JSON.stringify(value)}`);
  }
  return { mode: 'preconfigured', host, port };
}

// ---------------------------------------------------------------------------------------------
// Helpers

const toJsonSafe = <T>(v: T): T => JSON.parse(JSON.stringify(v, (_k, x) => (typeof x === 'bigint' ? x.toString() : x)));

function connectionView(c: LogicalConnection): LogicalConnection {
  const { id, client, shell, coreLeg, createdAt, state, phase, clientEnded, coreEnded, bytesFromClient, bytesFromCore, reason } = c;
  return {
    id, client: { ...client }, shell: { ...shell }, ...(coreLeg && { coreLeg: { local: { ...coreLeg.local }, core: { ...coreLeg.core } } }),
    createdAt, state, phase, clientEnded, coreEnded, bytesFromClient, bytesFromCore, ...(reason !== undefined && { reason }),
  };
}

const eligible = (c: LogicalConnection) => c.state === 'relaying' && !c.clientEnded && !c.coreEnded;

function checkOptions(opts: AgentOptions): void {
  if (!opts || typeof opts !== 'object') throw new InvalidArgumentError('createAgent({ shell, core, switch }) needs options');
  const sh = opts.shell as Partial<Shell> | undefined;
  if (!sh || typeof sh.setStitcher !== 'function' || typeof sh.connections !== 'function' || typeof sh.stitch !== 'function') {
    throw new InvalidArgumentError('shell must be a Shell from createShell() (sdk)');
  }
  const { host, port } = opts.core ?? {};
  if (typeof host !== 'string' || host === '' || !Number.isInteger(port) || port < 1 || port > 65535) {
    throw new InvalidArgumentError('core must be { host, port } with a port in 1..65535');
  }
  const sw = opts.switch as SwitchChoice | undefined;
  if (!sw || !['auto', 'off', 'combined', 'preconfigured'].includes(sw.mode)) {
    throw new InvalidArgumentError("switch must be { mode: 'auto' | 'off' | 'combined' } or { mode: 'preconfigured', host, port } (parseSwitchMode('HOST:PORT'))");
  }
  if (sw.mode === 'preconfigured' && (!isIPv4(sw.host) || !Number.isInteger(sw.port) || sw.port < 1 || sw.port > 65535)) {
    throw new InvalidArgumentError('a preconfigured switch needs an IPv4 host and a port in 1..65535');
  }
  if (opts.keys !== undefined && (!Array.isArray(opts.keys) || opts.keys.some((k) => !k || !Number.isInteger(k.id) || !Buffer.isBuffer(k.secret)))) {
    throw new InvalidArgumentError("keys must be an array of { id, secret } (switch/keys.ts loadKeyFile; 'tcp-stitch keygen' makes a key file)");
  }
  const d = opts.discovery ?? {};
  const ms = (v: unknown, what: string, min: number) => {
    if (v !== undefined && (typeof v !== 'number' || !Number.isFinite(v) || v < min || v > 3_600_000)) {
      throw new InvalidArgumentError(`discovery.${what} must be a number of milliseconds from ${min} to 3600000, got ${String(v)}`);
    }
  };
  ms(d.waitMs, 'waitMs', 1);
  ms(d.rediscoverMs, 'rediscoverMs', 0);
  ms(d.interfacePollMs, 'interfacePollMs', 0);
  if (opts.drainWarnMs !== undefined && (typeof opts.drainWarnMs !== 'number' || !(opts.drainWarnMs >= 1 && opts.drainWarnMs <= 3_600_000))) {
    throw new InvalidArgumentError(`drainWarnMs must be a number of milliseconds from 1 to 3600000, got ${String(opts.drainWarnMs)}`);
  }
  if (d.nextHopProbe !== undefined && !['when-unclear', 'always', 'never'].includes(d.nextHopProbe)) {
    throw new InvalidArgumentError(`discovery.nextHopProbe must be "when-unclear", "always" or "never", got ${JSON.stringify(d.nextHopProbe)}`);
  }
  if (opts.iface !== undefined && (typeof opts.iface !== 'string' || opts.iface === '')) {
    throw new InvalidArgumentError('iface must be an interface name such as "eth0"');
  }
}

type Found = Omit<DiscoveryStatus, 'mode' | 'at' | 'durationMs'>;

// ---------------------------------------------------------------------------------------------
// The agent

class AgentImpl extends EventEmitter<AgentEvents> implements Agent {
  readonly #opts: AgentOptions;
  readonly #shell: Shell;
  readonly #log: Logger;
  readonly #key?: Key;
  readonly #policy: PolicyEngine;
  readonly #mode: SwitchMode;
  readonly #waitMs: number;
  #discovery: DiscoveryStatus;
  #discovering?: Promise<DiscoveryStatus>;
  /** Something changed while a discovery was running: run one more after it. */
  #again = false;
  #client?: ControlClient;
  /** `address:port` of the switch the control client talks to. */
  #clientFor?: string;
  /** The address the control client sends from (auto mode: the ingress/egress point's). */
  #clientLocal?: string;
  /** The last boot id seen of the switch at `where`, from discovery or the control client. */
  #boot?: { where: string; bootId: string };
  /** Stitches this agent installed, by connection id, to re-install after a switch restart. */
  readonly #installed = new Map<string, Installed>();
  /** Connection ids by stitch id, so a NOTIFY finds its stitch without a scan; kept by #track/#untrack. */
  readonly #byStitchId = new Map<number, string>();
  readonly #decisions = new Map<string, { key: string; stitch: boolean; reason: string }>();
  readonly #backoff = new Map<string, { until: number; failures: number }>();
  readonly #inFlight = new Set<string>();
  readonly #timers: NodeJS.Timeout[] = [];
  #load?: LoadMonitor;
  #settings?: SettingsStore;
  #fingerprint = '';
  #started = false;
  #closed = false;
  readonly #drainWarnMs: number;
  #closing?: Promise<void>;

  constructor(opts: AgentOptions) {
    super();
    checkOptions(opts);
    this.#opts = opts;
    this.#shell = opts.shell;
    this.#log = componentLogger('agent', opts.logger);
    if (opts.keys?.length) this.#key = opts.keys[0];
    this.#mode = opts.switch.mode;
    this.#waitMs = opts.discovery?.waitMs ?? DEFAULT_WAIT_MS;
    this.#drainWarnMs = opts.drainWarnMs ?? 10_000;
    // Sync and up front, so a bad policy file stops the shell at start with the offending field.
    const policy = opts.policyFile !== undefined ? loadPolicyFile(opts.policyFile) : defaultPolicy();
    this.#policy = createPolicyEngine({ policy, ...(opts.policyFile !== undefined && { file: opts.policyFile }), logger: this.#log });
    this.#discovery = { available: false, reason: 'not yet discovered', mode: this.#mode, at: new Date().toISOString(), durationMs: 0 };
  }

  // ------------------------------------------------------------------------------------------
  // Lifecycle

  async start(): Promise<void> {
    if (this.#closed) throw new ClosedError('the agent was closed; create a new one');
    if (this.#started) return;
    this.#started = true;
    this.#openSettings();
    this.#load = createLoadMonitor({ intervalMs: this.#policy.evaluationIntervalMs });
    this.#shell.on('connection:close', this.#onConnectionClose);
    this.#log.info('agent starting', {
      switchMode: this.#mode, core: this.#opts.core, policy: this.#policy.file ?? 'default', policyMode: this.#policy.mode,
      keyed: this.#key !== undefined,
    });
    if (this.#mode === 'auto') this.#fingerprint = this.#hostFingerprint();
    await this.discover();
    if (this.#closed) return;

    const every = (ms: number, fn: () => void) => {
      const t = setInterval(fn, ms);
      t.unref();
      this.#timers.push(t);
    };
    every(this.#policy.evaluationIntervalMs, () => this.#evaluate());
    const d = this.#opts.discovery ?? {};
    const rediscover = d.rediscoverMs ?? DEFAULT_REDISCOVER_MS;
    if (this.#mode !== 'off' && rediscover > 0) every(rediscover, () => this.#rediscover());
    const poll = d.interfacePollMs ?? DEFAULT_POLL_MS;
    if (this.#mode === 'auto' && poll > 0) {
      every(poll, () => {
        const now = this.#hostFingerprint();
        if (now === this.#fingerprint) return;
        this.#fingerprint = now;
        this.#log.info('interfaces or routes changed; discovering again');
        this.#rediscover();
      });
    }
  }

  close(): Promise<void> {
    this.#closing ??= (async () => {
      this.#stop();
      await this.#discovering?.catch(() => undefined);
      const client = this.#client;
      this.#client = undefined;
      this.#clientFor = undefined;
      await client?.close();
    })();
    return this.#closing;
  }

  destroy(): void {
    this.#stop();
    const client = this.#client;
    this.#client = undefined;
    this.#clientFor = undefined;
    void client?.close();
  }

  #stop(): void {
    if (this.#closed) return;
    this.#closed = true;
    for (const t of this.#timers) clearInterval(t);
    this.#timers.length = 0;
    this.#load?.close();
    this.#shell.off('connection:close', this.#onConnectionClose);
    this.#shell.setStitcher(undefined);
    for (const s of this.#installed.values()) s.settled?.(new ClosedError('the agent was closed during the handover'));
  }

  readonly #onConnectionClose = ({ connection }: { connection: LogicalConnection }) => {
    this.#installed.get(connection.id)?.settled?.(new ClosedError('the connection closed during the handover'));
    this.#untrack(connection.id);
    this.#decisions.delete(connection.id);
    this.#backoff.delete(connection.id);
  };

  #openSettings(): void {
    const { controlPath, settingsDir } = this.#opts;
    if (controlPath === undefined && settingsDir === undefined) return;
    try {
      this.#settings = openSettings({
        ...(controlPath !== undefined && { controlPath }), ...(settingsDir !== undefined && { cwd: settingsDir }), logger: this.#log,
      });
      const choice = this.#opts.switch;
      this.#settings.update({ switchMode: choice.mode, switchAddress: choice.mode === 'preconfigured' ? `${choice.host}:${choice.port}` : null });
    } catch (err) {
      this.#log.warn('agent settings cannot be opened; the discovery result is not persisted', { error: (err as Error).message });
    }
  }

  #hostFingerprint(): string {
    const ifs = os.networkInterfaces();
    const addrs = Object.keys(ifs).sort().map((n) => `${n}=${(ifs[n] ?? []).filter((a) => a.family === 'IPv4').map((a) => a.cidr).join(',')}`);
    let routes = '';
    try {
      routes = JSON.stringify(parseRouteTable(fs.readFileSync('/proc/net/route', 'utf8')));
    } catch { /* no procfs: addresses only */ }
    return `${addrs.join(';')}\n${routes}`;
  }

  // ------------------------------------------------------------------------------------------
  // Discovery

  discover(): Promise<DiscoveryStatus> {
    if (this.#closed) return Promise.reject(new ClosedError('the agent was closed'));
    this.#discovering ??= this.#runDiscovery().finally(() => {
      this.#discovering = undefined;
      if (this.#again && !this.#closed) {
        this.#again = false;
        this.#rediscover();
      }
    });
    return this.#discovering;
  }

  /** Discover again; if a discovery is running, once more after it (it may have seen the host as it was). */
  #rediscover(): void {
    if (this.#closed) return;
    if (this.#discovering) { this.#again = true; return; }
    this.discover().catch(() => undefined);
  }

  async #runDiscovery(): Promise<DiscoveryStatus> {
    const started = performance.now();
    let found: Found;
    try {
      found = await this.#find();
    } catch (err) {
      found = { available: false, reason: 'error', detail: (err as Error).message };
    }
    const status: DiscoveryStatus = {
      ...found, mode: this.#mode, at: new Date().toISOString(), durationMs: Math.round((performance.now() - started) * 100) / 100,
    };
    if (!this.#closed) this.#apply(status);
    return status;
  }

  async #coreAddress(): Promise<string> {
    const { host } = this.#opts.core;
    if (isIPv4(host)) return host;
    return (await dns.lookup(host, { family: 4 })).address;
  }

  async #find(): Promise<Found> {
    const choice = this.#opts.switch;
    switch (choice.mode) {
      case 'off':
        return { available: false, reason: 'switch off', detail: 'the shell runs with --switch off' };
      case 'preconfigured':
        return this.#known(choice.host, choice.port, 'preconfigured');
      case 'combined':
        return this.#known(await this.#coreAddress(), DEFAULT_PORT, 'combined');
      case 'auto':
        return this.#probe();
    }
  }

  /** Auto: count the ways in and out (nothing is sent unless there is exactly one), find the next hop, probe it with TTL 1. */
  async #probe(): Promise<Found> {
    const count = countIngressEgress(this.#opts.iface !== undefined ? { iface: this.#opts.iface } : {});
    if (!count.verdict.usable) return { available: false, reason: count.verdict.reason, detail: count.verdict.detail };
    const point = count.verdict.point;
    const where = { ifname: point.ifname, localAddress: point.address };
    const hop = await findNextHop({
      towards: await this.#coreAddress(), point, logger: this.#log,
      probe: this.#opts.discovery?.nextHopProbe ?? 'when-unclear', probeTimeoutMs: Math.min(1000, this.#waitMs), probeRetries: 0,
    });
    if (hop.address === undefined) return { available: false, reason: 'no-next-hop', detail: hop.reason, ...where };
    const via = { ...where, nextHop: hop.address, nextHopVia: hop.via };
    const r = await probeSwitch({
      nextHop: hop.address, localAddress: point.address, logger: this.#log,
      ...(this.#key && { key: this.#key }),
      retransmit: { initialMs: Math.min(200, this.#waitMs), totalMs: this.#waitMs },
    });
    if (!r.available) return { available: false, reason: r.reason, detail: r.detail, ...(r.capabilities && { capabilities: r.capabilities }), ...via };
    return {
      available: true, reason: 'discovered', address: r.address, port: r.port, switchId: r.switchId, capabilities: r.capabilities,
      epoch: r.epoch, bootId: r.bootId, rttMs: r.rttMs, ...via,
    };
  }

  /**
   * Preconfigured or combined: the address is known, so no discovery datagram. With a key, an
   * authenticated DISCOVER over the control channel learns the capabilities and the boot id.
   */
  async #known(address: string, port: number, reason: 'preconfigured' | 'combined'): Promise<Found> {
    const base = { address, port };
    if (!this.#key) return { available: true, reason, detail: 'no key: capabilities unknown, and stitching needs --key-file', ...base };
    const client = this.#ensureClient(address, port);
    let timer: NodeJS.Timeout | undefined;
    try {
      const asked = client.discover();
      asked.catch(() => undefined);
      const info = await Promise.race([asked, new Promise<never>((_, reject) => {
        timer = setTimeout(() => reject(Object.assign(new SwitchError(`no answer from ${address}:${port} within ${this.#waitMs} ms`), { result: 'NO_ANSWER' })), this.#waitMs);
      })]);
      const capabilities: SwitchCapabilities = {
        translations: info.translations, tableSize: info.tableSize, freeSlots: info.freeSlots, versions: info.versions, authAlgorithms: info.authAlgorithms,
      };
      const why = whyIncapable(info);
      if (why) return { available: false, reason: 'incapable', detail: why, capabilities, ...base, switchId: info.switchId };
      return { available: true, reason, ...base, switchId: info.switchId, capabilities, ...(client.bootId && { bootId: client.bootId }) };
    } catch (err) {
      const result = (err as Partial<SwitchRequestError>).result;
      return { available: false, reason: result === 'NO_ANSWER' ? 'no-answer' : 'refused', detail: (err as Error).message, ...base };
    } finally {
      clearTimeout(timer);
    }
  }

  #apply(status: DiscoveryStatus): void {
    const previous = this.#discovery;
    this.#discovery = status;
    if (status.available && status.address !== undefined && status.bootId !== undefined) {
      this.#observeBoot(`${status.address}:${status.port}`, status.bootId);
    }
    if (this.#key && status.available && status.address !== undefined && status.port !== undefined) {
      this.#ensureClient(status.address, status.port, status.localAddress);
      this.#shell.setStitcher(this.#stitcher);
    } else {
      this.#shell.setStitcher(undefined);
      // Keep the control socket while the switch may still NOTIFY about stitches we own.
      if (this.#installed.size === 0) this.#dropClient();
    }
    this.#persist(status);

    const key = (d: DiscoveryStatus) => JSON.stringify([d.available, d.reason, d.address, d.port, d.switchId]);
    if (key(previous) === key(status)) return;
    const sw = status.address !== undefined && status.port !== undefined
      ? { switch: { address: status.address, port: status.port, ...(status.switchId && { id: status.switchId }) } } : {};
    if (status.available) {
      this.#log.info('stitching available', {
        mode: this.#mode, reason: status.reason, switch: `${status.address}:${status.port}`, switchId: status.switchId,
        rttMs: status.rttMs, keyed: this.#key !== undefined, ...(status.detail && { detail: status.detail }),
      });
    } else {
      this.#log.info('stitching not available; connections stay on the shell path', { mode: this.#mode, reason: status.reason, detail: status.detail });
    }
    const msg: AgentDiscoveryChange = { available: status.available, reason: status.reason, ...sw, discovery: status };
    this.emit('discovery:change', msg);
    publish('discoveryChange', msg);
  }

  #persist(s: DiscoveryStatus): void {
    if (!this.#settings) return;
    try {
      this.#settings.recordDiscovery({
        at: s.at, available: s.available, reason: s.detail ? `${s.reason}: ${s.detail}` : s.reason, mode: s.mode,
        ...(s.address !== undefined && { switchAddress: `${s.address}:${s.port}` }),
        ...(s.ifname !== undefined && { ifname: s.ifname }),
        ...(s.nextHop !== undefined && { nextHop: s.nextHop }),
        ...(s.nextHopVia !== undefined && { nextHopVia: s.nextHopVia }),
        ...(s.epoch !== undefined && { epoch: s.epoch }),
        ...(s.capabilities && { capabilities: [...s.capabilities.translations] }),
      });
    } catch (err) {
      this.#log.warn('discovery result not persisted', { error: (err as Error).message });
    }
  }

  // ------------------------------------------------------------------------------------------
  // Switch: control client, restarts, NOTIFY

  #ensureClient(address: string, port: number, localAddress?: string): ControlClient {
    if (this.#closed) throw new ClosedError('the agent was closed');
    const where = `${address}:${port}`;
    if (this.#client && this.#clientFor === where && (localAddress === undefined || localAddress === this.#clientLocal)) return this.#client;
    if (this.#client && this.#clientFor === where) {
      // Same switch, but the shell's address changed: stitches must come from the new one.
      this.#log.info('the shell address changed; new control socket', { previous: this.#clientLocal, localAddress });
      this.#dropClient();
    } else if (this.#client) {
      this.#log.warn('the switch changed; stitches installed on the previous one are forgotten', { previous: this.#clientFor, switch: where, stitches: this.#installed.size });
      this.#installed.clear();
      this.#byStitchId.clear();
      this.#dropClient();
    }
    const client = createControlClient({
      switchAddress: address, port, key: this.#key!, logger: this.#log, ...(localAddress !== undefined && { localAddress }),
    });
    client.on('switch:restarted', (e) => this.#observeBoot(where, e.bootId));
    client.on('notify', ({ status }) => this.#onNotify(status));
    this.#client = client;
    this.#clientFor = where;
    this.#clientLocal = localAddress;
    return client;
  }

  #dropClient(): void {
    const c = this.#client;
    this.#client = undefined;
    this.#clientFor = undefined;
    void c?.close();
  }

  /** After each control exchange: the client may have learnt a boot id without a restart event (its first). */
  #afterExchange(client: ControlClient): void {
    if (client === this.#client && this.#clientFor && client.bootId) this.#observeBoot(this.#clientFor, client.bootId);
  }

  #observeBoot(where: string, bootId: string): void {
    const known = this.#boot;
    this.#boot = { where, bootId };
    if (!known || known.where !== where || known.bootId === bootId) return;
    if (this.#discovery.available && `${this.#discovery.address}:${this.#discovery.port}` === where) {
      this.#discovery = { ...this.#discovery, bootId };
    }
    this.#log.warn('switch restarted: claiming our stitches again (a switch that kept its datapath adopted them; one that did not refuses them as UNTRACKED_LEG)', {
      switch: where, previousBootId: known.bootId, bootId, stitches: this.#installed.size,
    });
    const msg: SwitchRestartMessage = { address: where, previousBootId: known.bootId, bootId };
    this.emit('switch:restarted', msg);
    publish('switchRestart', msg);
    void this.#reinstall();
  }

  async #reinstall(): Promise<void> {
    const client = this.#client;
    if (!client) return;
    await Promise.all([...this.#installed].map(async ([connectionId, s]) => {
      if (!this.#shell.get(connectionId)) { this.#untrack(connectionId); return; }
      try {
        const r = await client.stitch(s.legs);
        if (this.#installed.get(connectionId) !== s) return; // closed meanwhile
        this.#untrack(connectionId); // under the old id
        s.id = r.id;
        this.#track(connectionId, s);
        this.#log.info('stitch re-installed after the switch restart', { connectionId, stitchId: r.id, state: r.state });
      } catch (err) {
        if (this.#closed) return;
        this.#log.error('stitch not re-installed after the switch restart', {
          connectionId, error: (err as Error).message, result: (err as Partial<SwitchRequestError>).result,
        });
      }
    }));
  }

  /**
   * A state change of one of our stitches. 'stitched' completes the handover; 'closed' (FIN/RST seen
   * by the switch) ends the connection at the shell, synchronously, before the control client acks
   * the NOTIFY, since the ack lets the switch stop silencing the shell's legs.
   */
  #onNotify(status: StitchStatus): void {
    const connectionId = this.#byStitchId.get(status.id);
    const s = connectionId !== undefined ? this.#installed.get(connectionId) : undefined;
    if (!s || s.id !== status.id) return;
    s.state = status.state;
    if (status.state === 'stitched' || status.state === 'closing') s.settled?.();
    if (status.state !== 'closed' && status.state !== 'failed') return;
    this.#untrack(connectionId!);
    this.#log.info('stitch ended at the switch', { connectionId, stitchId: status.id, state: status.state, reason: status.reason });
    if (status.state === 'failed') return s.settled?.(new SwitchError(`the switch failed the stitch: ${status.reason ?? 'no reason given'}`));
    s.settled?.();
    s.end(status.reason === 'client-rst' ? 'client-reset' : status.reason === 'core-rst' || status.reason === 'rst' ? 'core-reset' : 'fin');
  }

  #track(connectionId: string, s: Installed): void {
    this.#untrack(connectionId);
    this.#installed.set(connectionId, s);
    this.#byStitchId.set(s.id, connectionId);
  }

  #untrack(connectionId: string): void {
    const s = this.#installed.get(connectionId);
    if (!s) return;
    this.#installed.delete(connectionId);
    if (this.#byStitchId.get(s.id) === connectionId) this.#byStitchId.delete(s.id);
  }

  /**
   * The shell calls this to move a connection to phase 3. Resolves once the switch reports the
   * drain complete ('stitched'); rejects when it refuses or fails the stitch, or stops answering
   * mid-handover (the shell keeps relaying what reaches it). A slow drain is waited for, with a
   * warning after drainWarnMs: it lasts as long as the shell needs to relay its backlog (a client
   * that stops reading stops it), and the switch has already sent the far ends' new bytes past
   * the shell, so the shell path cannot carry the connection any more.
   */
  readonly #stitcher: Stitcher = async ({ connection, mapping, end }) => {
    const why = this.#unavailable();
    const client = this.#client;
    if (why || !client) throw new SwitchError(`stitching is not available: ${why ?? 'no switch'}`);
    if (!connection.coreLeg) throw new InvalidArgumentError(`connection ${connection.id} has no core leg yet`);
    const legs: StitchLegs = {
      clientLeg: { client: { ...connection.client }, shell: { ...connection.shell } },
      coreLeg: { shell: { ...connection.coreLeg.local }, core: { ...connection.coreLeg.core } },
      clientOffset: mapping.clientOffset, corePreambleLength: mapping.corePreambleLength,
      shellOffset: mapping.shellOffset, coreAnswerLength: mapping.coreAnswerLength,
    };
    const r = await client.stitch(legs);
    this.#afterExchange(client);
    if (!this.#shell.get(connection.id)) return;
    const s: Installed = { legs, id: r.id, state: r.state, end };
    this.#track(connection.id, s);
    this.#log.info('stitch installed', { connectionId: connection.id, stitchId: r.id, state: r.state, existing: r.existing });
    if (r.state !== 'draining') return;
    await new Promise<void>((resolve, reject) => {
      // The NOTIFY normally ends the wait; a QUERY each second covers one that was lost, and tells a
      // switch that is gone (three unanswered) from a drain that is slow.
      let unanswered = 0;
      const slow = setTimeout(() => this.#log.warn('handover slow: the switch still drains the stitch; waiting for it', {
        connectionId: connection.id, stitchId: r.id, afterMs: this.#drainWarnMs, bytesFromClient: connection.bytesFromClient, bytesFromCore: connection.bytesFromCore,
      }), this.#drainWarnMs);
      const check = setInterval(() => {
        client.query(r.id).then((rec) => {
          unanswered = 0;
          if (rec.status.state !== 'draining' && s.settled) this.#onNotify(rec.status);
        }, (err: Error) => {
          if (++unanswered >= 3) s.settled?.(new SwitchError(`the switch stopped answering during the handover of stitch ${r.id}: ${err.message}`));
        });
      }, 1000);
      s.settled = (err) => { clearInterval(check); clearTimeout(slow); delete s.settled; if (err) reject(err); else resolve(); };
    });
  };

  /** Why the shell cannot stitch right now; undefined when it can. */
  #unavailable(): string | undefined {
    if (this.#closed) return 'the agent is closed';
    const d = this.#discovery;
    if (!d.available) return d.detail ? `${d.reason}: ${d.detail}` : d.reason;
    if (!this.#key) return 'no key: run the shell with --key-file (the same file as the switch)';
    if (!this.#client) return 'no control client';
    return undefined;
  }

  // ------------------------------------------------------------------------------------------
  // Policy loop

  #evaluate(): void {
    if (this.#closed || !this.#load) return;
    const load = this.#load.current();
    const now = Date.now();
    const why = this.#unavailable();
    for (const c of this.#shell.connections()) {
      if (!eligible(c) || this.#inFlight.has(c.id)) continue;
      let d;
      try {
        d = this.#policy.evaluate({
          id: c.id, localPort: c.shell.port, remoteAddress: c.client.address, remotePort: c.client.port,
          ageMs: Math.max(0, now - c.createdAt), bytesIn: c.bytesFromClient, bytesOut: c.bytesFromCore, phase: c.phase,
        }, load);
      } catch (err) {
        this.#log.error('policy evaluation failed', { connectionId: c.id, error: (err as Error).message });
        continue;
      }
      let stitch = d.stitch;
      let reason = d.reason;
      let key = `${d.stitch}|${d.rule ?? ''}`;
      const retry = this.#backoff.get(c.id);
      if (stitch && why) {
        stitch = false;
        reason = `${d.reason}; not stitched: stitching is not available (${why})`;
        key += '|unavailable';
      } else if (stitch && retry && retry.until > now) {
        stitch = false;
        reason = `${d.reason}; waiting to retry after ${retry.failures} failed attempt${retry.failures === 1 ? '' : 's'}`;
        key += `|backoff${retry.failures}`;
      }
      this.#decide(c.id, stitch, reason, key);
      if (stitch) this.#stitchByPolicy(c.id, d.reason);
    }
  }

  #decide(connectionId: string, stitch: boolean, reason: string, key = `${stitch}|${reason}`): void {
    const last = this.#decisions.get(connectionId);
    this.#decisions.set(connectionId, { key, stitch, reason });
    if (last?.key !== key) this.#log.info(stitch ? 'stitch decided' : 'not stitched', { connectionId, reason });
    const msg: StitchDecisionMessage = { connectionId, stitch, reason };
    this.emit('stitch:decision', msg);
    publish('stitchDecision', msg);
  }

  #stitchByPolicy(id: string, reason: string): void {
    this.#inFlight.add(id);
    this.#shell.stitch(id, reason).then(() => {
      this.#backoff.delete(id);
    }, (err: Error & { code?: string; result?: string }) => {
      if (this.#closed || !this.#shell.get(id)) return;
      const failures = (this.#backoff.get(id)?.failures ?? 0) + 1;
      const retryInMs = Math.min(this.#policy.evaluationIntervalMs * 2 ** failures, MAX_RETRY_MS);
      this.#backoff.set(id, { until: Date.now() + retryInMs, failures });
      this.#log.warn('stitch failed; the connection stays on the shell path', {
        connectionId: id, error: err.message, code: err.code, result: err.result, failures, retryInMs,
      });
    }).finally(() => this.#inFlight.delete(id));
  }

  // ------------------------------------------------------------------------------------------
  // Status and the control socket

  status(): AgentStatus {
    const why = this.#unavailable();
    const ids = new Map([...this.#installed].map(([cid, s]) => [cid, s.id]));
    return toJsonSafe({
      discovery: this.#discovery,
      stitching: why ? { available: false, reason: why } : { available: true },
      policy: { ...(this.#policy.file !== undefined && { file: this.#policy.file }), mode: this.#policy.mode, evaluationIntervalMs: this.#policy.evaluationIntervalMs },
      ...(this.#client && { control: this.#client.counters() }),
      connections: this.#shell.connections().map((c): ConnectionStatus => {
        const d = this.#decisions.get(c.id);
        const stitchId = ids.get(c.id);
        return { ...connectionView(c), ...(d && { decision: { stitch: d.stitch, reason: d.reason } }), ...(stitchId !== undefined && { stitchId }) };
      }),
    });
  }

  async control(request: Record<string, unknown>): Promise<unknown> {
    if (!request || typeof request !== 'object') throw new InvalidArgumentError(`a control request is an object with an op: ${CONTROL_OPS}`);
    switch (request.op) {
      case 'status': return this.status();
      case 'discover': return toJsonSafe(await this.discover());
      case 'query': return this.#query();
      case 'stitch': return this.#manualStitch(request);
      default: throw new InvalidArgumentError(`unknown op ${JSON.stringify(request.op)}; valid ops: ${CONTROL_OPS}`);
    }
  }

  async #query(): Promise<{ switch: string; bootId?: string; stitches: StitchRecord[] }> {
    const client = this.#client;
    if (!client || !this.#clientFor) throw new SwitchError(`no switch to ask: ${this.#unavailable() ?? 'no control client'}`);
    const where = this.#clientFor;
    const stitches = await client.query();
    this.#afterExchange(client);
    return toJsonSafe({ switch: where, ...(client.bootId && { bootId: client.bootId }), stitches });
  }

  async #manualStitch(request: Record<string, unknown>): Promise<StitchOutcome[]> {
    let ids: string[];
    if (request.all === true && request.id === undefined) ids = this.#shell.connections().filter(eligible).map((c) => c.id);
    else if (typeof request.id === 'string' && request.id !== '' && request.all === undefined) ids = [request.id];
    else throw new InvalidArgumentError('stitch takes either id (a connection id from status) or all: true');
    const why = this.#unavailable();
    const one = async (id: string): Promise<StitchOutcome> => {
      if (!this.#shell.get(id)) return { id, ok: false, error: `no connection with id ${id}` };
      if (why) return { id, ok: false, error: `stitching is not available: ${why}` };
      this.#decide(id, true, 'manual stitch');
      try {
        await this.#shell.stitch(id, 'manual stitch');
        return { id, ok: true };
      } catch (err) {
        this.#log.warn('manual stitch failed; the connection stays on the shell path', { connectionId: id, error: (err as Error).message });
        return { id, ok: false, error: (err as Error).message };
      }
    };
    const out: StitchOutcome[] = new Array(ids.length);
    let next = 0;
    const worker = async () => { while (next < ids.length) { const i = next++; out[i] = await one(ids[i]!); } };
    await Promise.all(Array.from({ length: Math.min(MANUAL_CONCURRENCY, ids.length) }, worker));
    return out;
  }
}

/** The shell's agent. Call start(); close() (or destroy()) leaves no timer, socket or client behind. */
export function createAgent(opts: AgentOptions): Agent {
  return new AgentImpl(opts);
}
