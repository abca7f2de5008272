// Next hop towards an address (normally the core's): the router the shell's packets reach first,
// where a switch one hop away must sit.
//
// The routing table answers most cases: a gateway route names the router; an on-link destination
// is its own next hop (switch combined with the core, or direct). Where the table cannot tell — a
// device route to an address outside the interface's subnet, or equal routes that disagree — an
// ICMP echo with IP TTL 1 (net-ping) makes the first router on the path name itself in its Time
// Exceeded answer. That probe needs a raw socket (CAP_NET_RAW); without it the probe is skipped,
// the reason is logged once per process, and the table's answer (if any) stands.
import fs from 'node:fs';
import { createRequire } from 'node:module';
import { DiscoveryError, InvalidArgumentError } from '../sdk/errors.ts';
import { componentLogger, type Logger } from '../sdk/log.ts';
import {
  inPrefix, ipv4ToInt, lookupRoute, parseRouteTable,
  type IngressEgressPoint, type Route,
} from './interfaces.ts';

/** The part of a net-ping session this module uses; tests pass a fake. */
export interface PingSession {
  pingHost(target: string, callback: (error: Error | null, target: string, sent?: Date, received?: Date) => void): unknown;
  close(): unknown;
  on?(event: 'error', listener: (error: Error) => void): unknown;
}

export interface PingSessionOptions {
  ttl: number;
  timeout: number;
  retries: number;
}

/** Opens a ping session; may throw (EPERM without CAP_NET_RAW). */
export type PingSessionFactory = (options: PingSessionOptions) => PingSession;

export type ProbeMode = 'when-unclear' | 'always' | 'never';

export interface FindNextHopOptions {
  /** The address to route to, e.g. the core's. IPv4. */
  towards: string;
  /** The ingress/egress point packets leave by (from countIngressEgress). */
  point: IngressEgressPoint;
  logger?: Logger;
  /** Opens the TTL-1 ping session; defaults to net-ping's createSession. */
  pingSession?: PingSessionFactory;
  /**
   * 'when-unclear' (default): probe only when the routing table cannot name the next hop.
   * 'always': also probe to confirm the table's answer (the probe's answer wins if they differ).
   * 'never': the table only.
   */
  probe?: ProbeMode;
  /** Per-attempt wait for the probe's answer. Default 1000 ms. */
  probeTimeoutMs?: number;
  /** Extra attempts after a timeout. Default 1. */
  probeRetries?: number;
  /** Routes to use instead of /proc/net/route. */
  routes?: readonly Route[];
}

export type ProbeOutcome =
  | { status: 'answered'; address: string; kind: 'time-exceeded' | 'echo-reply' }
  | { status: 'skipped'; reason: string }
  | { status: 'failed'; reason: string; error?: InstanceType<typeof DiscoveryError> };

export type NextHopResult =
  | { address: string; via: 'route' | 'icmp' | 'direct'; ifname: string; probe?: ProbeOutcome }
  | { address: undefined; reason: string; ifname?: string; probe?: ProbeOutcome };

const require = createRequire(import.meta.url);

interface NetPingModule {
  createSession(options: PingSessionOptions): PingSession;
}

/** net-ping is loaded on first use: its native raw-socket binding is only needed for the probe. */
export const netPingSessionFactory: PingSessionFactory = (options) => {
  const netPing = require('net-ping') as NetPingModule;
  return netPing.createSession(options);
};

// Factories whose sessions cannot be opened for lack of privilege. Keyed by factory so the real
// one (module-level) is remembered, and logged about, once per process.
const deniedFactories = new WeakSet<PingSessionFactory>();

function isPermissionError(err: unknown): boolean {
  if (!err || typeof err !== 'object') return false;
  const e = err as { code?: unknown; message?: unknown };
  return e.code === 'EPERM' || e.code === 'EACCES' ||
    (typeof e.message === 'string' && /operation not permitted|permission denied|EPERM|EACCES/i.test(e.message));
}

const NO_PRIVILEGE =
  'ICMP next-hop probe skipped: opening a raw socket was refused (needs CAP_NET_RAW or root); ' +
  'the next hop comes from the routing table only';

export async function findNextHop(opts: FindNextHopOptions): Promise<NextHopResult> {
  const { towards, point } = opts;
  if (typeof towards !== 'string' || ipv4ToInt(towards) === undefined)
    throw new InvalidArgumentError(`towards must be an IPv4 address such as "198.18.3.2", got ${JSON.stringify(towards)}`);
  if (!point || typeof point.ifname !== 'string' || ipv4ToInt(point.address) === undefined)
    throw new InvalidArgumentError('point must be an ingress/egress point from countIngressEgress() (ifname, address, prefixLen)');
  const mode: ProbeMode = opts.probe ?? 'when-unclear';
  if (!['when-unclear', 'always', 'never'].includes(mode))
    throw new InvalidArgumentError(`probe must be "when-unclear", "always" or "never", got ${JSON.stringify(mode)}`);
  const logger = opts.logger ?? componentLogger('next-hop');
  const factory = opts.pingSession ?? netPingSessionFactory;
  const routes = opts.routes ?? parseRouteTable(readRouteTable());

  const table = fromTable(routes, towards, point);
  if ('mismatch' in table) return { address: undefined, reason: table.mismatch, ifname: point.ifname };

  if (table.answer && mode !== 'always') return table.answer;
  if (mode === 'never') return { address: undefined, reason: table.unclear ?? 'routing table gives no next hop', ifname: point.ifname };

  const probe = await probeFirstHop(towards, factory, logger, opts.probeTimeoutMs ?? 1000, opts.probeRetries ?? 1);
  if (probe.status === 'answered') {
    if (table.answer && table.answer.address !== probe.address) {
      logger.warn('next hop: the TTL-1 probe and the routing table disagree; using the probe\'s answer', {
        towards, route: table.answer.address, probe: probe.address,
      });
    }
    if (table.answer && table.answer.address === probe.address) return { ...table.answer, probe };
    return { address: probe.address, via: 'icmp', ifname: point.ifname, probe };
  }
  if (table.answer) return { ...table.answer, probe };
  return {
    address: undefined,
    reason: `${table.unclear}; TTL-1 probe ${probe.status}: ${probe.reason}`,
    ifname: point.ifname,
    probe,
  };
}

function readRouteTable(): string {
  try {
    return fs.readFileSync('/proc/net/route', 'utf8');
  } catch {
    return '';
  }
}

type TableAnswer =
  | { mismatch: string }
  | { answer: { address: string; via: 'route' | 'direct'; ifname: string }; unclear?: undefined }
  | { answer?: undefined; unclear: string };

function fromTable(routes: readonly Route[], towards: string, point: IngressEgressPoint): TableAnswer {
  const { route, ties } = lookupRoute(routes, towards);
  if (!route) return { unclear: `no route to ${towards} in the main routing table` };
  if (route.ifname !== point.ifname)
    return { mismatch: `the route to ${towards} leaves by ${route.ifname}, not by the ingress/egress point ${point.ifname}` };
  if (ties.length > 0) {
    const alternatives = [route, ...ties].map((r) => r.gateway ? `via ${r.gateway} dev ${r.ifname}` : `dev ${r.ifname}`).join(', ');
    return { unclear: `several equal routes to ${towards} (${alternatives})` };
  }
  if (route.gateway) return { answer: { address: route.gateway, via: 'route', ifname: route.ifname } };
  const onLink = inPrefix(towards, point.address, point.prefixLen) ||
    (route.prefixLen === 32 && route.destination === towards);
  if (onLink) return { answer: { address: towards, via: 'direct', ifname: route.ifname } };
  return {
    unclear: `the route to ${towards} is a device route (dev ${route.ifname}) outside ${point.address}/${point.prefixLen}, ` +
      'so the table does not say which router answers',
  };
}

async function probeFirstHop(
  towards: string, factory: PingSessionFactory, logger: Logger, timeout: number, retries: number,
): Promise<ProbeOutcome> {
  if (deniedFactories.has(factory)) return { status: 'skipped', reason: 'no raw-socket privilege (CAP_NET_RAW)' };
  let session: PingSession;
  try {
    session = factory({ ttl: 1, timeout, retries });
  } catch (err) {
    if (isPermissionError(err)) {
      deniedFactories.add(factory);
      logger.warn(NO_PRIVILEGE, { reason: 'no-raw-socket-privilege', error: (err as Error).message });
      return { status: 'skipped', reason: 'no raw-socket privilege (CAP_NET_RAW)' };
    }
    const error = new DiscoveryError(`cannot open the ICMP probe session: ${(err as Error)?.message ?? err}`, { cause: err });
    logger.warn('ICMP next-hop probe failed to start', { error: error.message });
    return { status: 'failed', reason: error.message, error };
  }
  try {
    const answer = await new Promise<{ error: Error | null }>((resolve) => {
      let settled = false;
      // net-ping times out on its own; this guard only stops a session that never calls back.
      const guard = setTimeout(() => settle(Object.assign(new Error('no callback from the ping session'), { name: 'RequestTimedOutError' })),
        timeout * (retries + 1) + 1000);
      guard.unref();
      const settle = (error: Error | null) => {
        if (!settled) { settled = true; clearTimeout(guard); resolve({ error }); }
      };
      session.on?.('error', (error) => settle(error));
      try {
        session.pingHost(towards, (error) => settle(error));
      } catch (error) {
        settle(error as Error);
      }
    });
    const err = answer.error as (Error & { source?: unknown }) | null;
    if (!err) return { status: 'answered', address: towards, kind: 'echo-reply' };
    if (err.name === 'TimeExceededError' && typeof err.source === 'string' && ipv4ToInt(err.source) !== undefined)
      return { status: 'answered', address: err.source, kind: 'time-exceeded' };
    if (isPermissionError(err)) {
      deniedFactories.add(factory);
      logger.warn(NO_PRIVILEGE, { reason: 'no-raw-socket-privilege', error: err.message });
      return { status: 'skipped', reason: 'no raw-socket privilege (CAP_NET_RAW)' };
    }
    const error = new DiscoveryError(`TTL-1 echo to ${towards} got no usable answer: ${err.name}: ${err.message}`, { cause: err });
    return { status: 'failed', reason: error.message, error };
  } finally {
    try {
      session.close();
    } catch (err) {
      logger.debug('closing the ICMP probe session failed', { error: (err as Error)?.message });
    }
  }
}
