// One-hop discovery, the agent's side (seed figure 5B, steps 546-552): send a DISCOVER with IP TTL 1
// to the next hop, retransmit with backoff within a bounded wait, and check the reply (nonce, version,
// authentication, capabilities). The result is always definite: available with what the switch
// offers, or not available with one reason.
import type * as dgramModule from 'node:dgram';
import { isIPv4 } from 'node:net';
import DgramAsPromised, { type SocketAsPromised } from 'dgram-as-promised';
import { InvalidArgumentError } from '../sdk/errors.ts';
import { componentLogger, type Logger } from '../sdk/log.ts';
import {
  AUTH_ALGORITHMS, DEFAULT_PORT, DISCOVER_PADDING, PROTOCOL_VERSION, ZERO_BOOT_ID, decode, encode,
  isControlProtocolError, newNonce, nextSequence, type AuthAlgorithm, type DiscoverRequest, type Key, type ResultCode,
  type SwitchInfo, type Translation,
} from '../switch/protocol.ts';
import type { RetransmitPolicy } from './control-client.ts';

export const DEFAULT_DISCOVERY_RETRANSMIT: RetransmitPolicy = { initialMs: 200, maxMs: 1_000, totalMs: 3_000 };

/** What a stitch needs from the datapath with Linux's default TCP options (timestamps, SACK). */
export const DEFAULT_REQUIRED_TRANSLATIONS: readonly Translation[] = ['addr', 'port', 'seq', 'ack', 'sack', 'timestamps', 'checksum'];

export interface DiscoveryProbeInit {
  /** The next hop's address: the only switch that may stitch for this shell. */
  nextHop: string;
  /** Default 7807. */
  port?: number;
  /** Authenticate the DISCOVER (then the reply must be authenticated too). Without: padded request. */
  key?: Key;
  /** Address to send from (the shell's single ingress/egress address). */
  localAddress?: string;
  retransmit?: Partial<RetransmitPolicy>;
  requiredTranslations?: readonly Translation[];
  logger?: Logger;
  /** Seam for tests: a dgram module (dgram-as-promised's `dgram` option). */
  dgram?: typeof dgramModule;
}

export interface SwitchCapabilities {
  translations: Translation[];
  tableSize: number;
  freeSlots: number;
  versions: { min: number; max: number };
  authAlgorithms: AuthAlgorithm[];
}

export type DiscoveryFailure =
  | 'no-answer'        // nothing came back within the bounded wait
  | 'malformed-reply'  // something came back that does not decode
  | 'wrong-nonce'      // a reply to some other request
  | 'wrong-source'     // a reply from an address or port other than the one asked
  | 'unauthenticated'  // an authenticated DISCOVER got an unauthenticated or unverifiable reply
  | 'refused'          // the switch answered with an error result
  | 'incapable'        // the switch answered, but cannot stitch for this agent
  | 'socket-error';    // the datagram could not be sent at all

export type DiscoveryResult =
  | {
    available: true;
    switchId: string;
    /** Where to send control requests (the switch's shell-facing address and port). */
    address: string;
    port: number;
    capabilities: SwitchCapabilities;
    epoch: number;
    bootId: string;
    /** From the most recent transmission to the reply. */
    rttMs: number;
    authenticated: boolean;
  }
  | { available: false; reason: DiscoveryFailure; detail: string; result?: ResultCode; capabilities?: SwitchCapabilities };

/**
 * Why a switch that answered cannot stitch for this agent, or undefined when it can. Shared by the
 * TTL-1 probe and the agent's control-channel DISCOVER (preconfigured and combined switches).
 */
export function whyIncapable(info: SwitchInfo, required: readonly Translation[] = DEFAULT_REQUIRED_TRANSLATIONS): string | undefined {
  const missing = required.filter((t) => !info.translations.includes(t));
  return missing.length > 0 ? `the datapath lacks translations: ${missing.join(', ')}`
    : (PROTOCOL_VERSION < info.versions.min || PROTOCOL_VERSION > info.versions.max) ? `the switch speaks versions ${info.versions.min}..${info.versions.max}`
      : !AUTH_ALGORITHMS.some((a) => info.authAlgorithms.includes(a)) ? 'no common authentication algorithm'
        : info.tableSize === 0 ? 'the switch has no stitch table' : undefined;
}

/** Sends one DISCOVER (and its retransmissions) with TTL 1 and waits for a valid reply. Never throws for network outcomes. */
export async function probeSwitch(init: DiscoveryProbeInit): Promise<DiscoveryResult> {
  if (!init || !isIPv4(init.nextHop)) throw new InvalidArgumentError(`nextHop must be an IPv4 address, got ${String(init?.nextHop)}`);
  const port = init.port ?? DEFAULT_PORT;
  if (!Number.isInteger(port) || port < 1 || port > 65535) throw new InvalidArgumentError(`port must be 1..65535, got ${port}`);
  if (init.localAddress !== undefined && !isIPv4(init.localAddress)) throw new InvalidArgumentError(`localAddress must be an IPv4 address, got ${init.localAddress}`);
  const rtx: RetransmitPolicy = { ...DEFAULT_DISCOVERY_RETRANSMIT, ...Object.fromEntries(Object.entries(init.retransmit ?? {}).filter(([, v]) => v !== undefined)) };
  for (const k of ['initialMs', 'maxMs', 'totalMs'] as const) {
    if (!(rtx[k] > 0)) throw new InvalidArgumentError(`retransmit.${k} must be a positive number of milliseconds`);
  }
  const required = init.requiredTranslations ?? DEFAULT_REQUIRED_TRANSLATIONS;
  const log = componentLogger('discovery', init.logger);

  const nonce = newNonce();
  const request: DiscoverRequest = init.key
    ? { kind: 'request', opcode: 'discover', nonce, bootId: ZERO_BOOT_ID, auth: { keyId: init.key.id, sequence: nextSequence() } }
    // No key: pad the request to the reply's size, since a switch never answers an unauthenticated
    // request with more bytes than it received (no amplification).
    : { kind: 'request', opcode: 'discover', nonce, bootId: ZERO_BOOT_ID, padding: DISCOVER_PADDING };
  const bytes = encode(request, init.key);

  let socket: SocketAsPromised | undefined;
  try {
    socket = DgramAsPromised.createSocket({ type: 'udp4', ...(init.dgram && { dgram: init.dgram }) });
    socket.socket.on('error', (err) => log.debug('discovery socket error', { err }));
    await socket.bind(0, init.localAddress);
    socket.setTTL(1); // dies after one hop: only a switch directly next to the shell hears it
  } catch (err) {
    await socket?.close().catch(() => undefined);
    socket?.destroy();
    return done({ available: false, reason: 'socket-error', detail: `cannot open the discovery socket: ${(err as Error).message}` });
  }
  const s = socket;

  // debug, not info: the agent re-discovers periodically and logs the outcome itself, once per change.
  function done(r: DiscoveryResult): DiscoveryResult {
    if (r.available) log.debug('switch discovered', { switchId: r.switchId, address: r.address, port: r.port, rttMs: r.rttMs });
    else log.debug('stitching not available', { reason: r.reason, detail: r.detail, nextHop: init.nextHop });
    return r;
  }

  const result = await new Promise<DiscoveryResult>((resolve) => {
    let lastSent = 0;
    let interval = rtx.initialMs;
    let timer: NodeJS.Timeout | undefined;
    let soft: Exclude<DiscoveryResult, { available: true }> | undefined; // the last non-final failure seen
    let sendError: Error | undefined;
    let sentOk = false;
    const started = Date.now();
    const deadline = started + rtx.totalMs;

    const finish = (r: DiscoveryResult) => {
      if (timer) clearTimeout(timer);
      timer = undefined;
      s.socket.removeListener('message', onMessage);
      resolve(r);
    };

    const onMessage = (msg: Buffer, rinfo: dgramModule.RemoteInfo) => {
      if (rinfo.address !== init.nextHop || rinfo.port !== port) {
        soft = { available: false, reason: 'wrong-source', detail: `reply from ${rinfo.address}:${rinfo.port}, expected ${init.nextHop}:${port}` };
        return;
      }
      let m;
      try {
        m = decode(msg, init.key);
      } catch (err) {
        if (!isControlProtocolError(err)) throw err;
        if (err.prefix?.nonce === nonce && err.prefix.response && err.reason === 'bad-version') {
          return finish({ available: false, reason: 'incapable', result: 'UNSUPP_VERSION', detail: `the switch speaks version ${err.prefix.version}, this agent ${PROTOCOL_VERSION}` });
        }
        if (err.reason === 'bad-mac' || err.reason === 'unknown-key') {
          soft = { available: false, reason: 'unauthenticated', detail: `reply does not verify: ${err.message}` };
        } else {
          soft = { available: false, reason: 'malformed-reply', detail: err.message };
        }
        return;
      }
      if (m.kind !== 'response' || m.opcode !== 'discover') {
        soft = { available: false, reason: 'malformed-reply', detail: `expected a DISCOVER reply, got ${m.kind} ${m.opcode}` };
        return;
      }
      if (m.nonce !== nonce) {
        soft = { available: false, reason: 'wrong-nonce', detail: 'reply carries another request\'s nonce' };
        return;
      }
      if (init.key && !m.auth && m.result === 'SUCCESS') {
        soft = { available: false, reason: 'unauthenticated', detail: 'authenticated DISCOVER got an unauthenticated reply' };
        return;
      }
      if (m.result !== 'SUCCESS' || !m.info) {
        return finish({ available: false, reason: 'refused', result: m.result, detail: `the switch answered ${m.result}` });
      }
      const info = m.info;
      const capabilities: SwitchCapabilities = {
        translations: info.translations, tableSize: info.tableSize, freeSlots: info.freeSlots,
        versions: info.versions, authAlgorithms: info.authAlgorithms,
      };
      const why = whyIncapable(info, required);
      if (why) return finish({ available: false, reason: 'incapable', detail: why, capabilities });
      finish({
        available: true, switchId: info.switchId, address: info.controlAddress, port: info.controlPort, capabilities,
        epoch: m.epoch, bootId: m.bootId, rttMs: Date.now() - lastSent, authenticated: !!m.auth,
      });
    };
    s.socket.on('message', onMessage);

    const giveUp = () => {
      if (soft) return finish(soft);
      if (!sentOk && sendError) return finish({ available: false, reason: 'socket-error', detail: `DISCOVER not sent: ${sendError.message}` });
      finish({ available: false, reason: 'no-answer', detail: `no reply from ${init.nextHop}:${port} within ${rtx.totalMs} ms` });
    };
    const transmit = () => {
      lastSent = Date.now();
      s.send(bytes, port, init.nextHop).then(() => { sentOk = true; }, (err: Error) => { sendError = err; });
      const left = deadline - Date.now();
      if (left <= interval) { timer = setTimeout(giveUp, Math.max(0, left)); return; }
      timer = setTimeout(transmit, interval);
      interval = Math.min(interval * 2, rtx.maxMs);
    };
    transmit();
  });

  await s.close().catch(() => undefined);
  s.destroy();
  return done(result);
}
