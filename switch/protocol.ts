// The tcp-stitch control protocol (TSCP) codec: the one module that turns control messages into bytes
// and back, used by both the agent and the switch. docs/protocol.md is the byte-exact specification;
// its hex examples are parsed by test/protocol.test.ts, so the two cannot drift apart.
//
// Modelled on PCP (RFC 6887): a version, an R bit and a 7-bit opcode, result codes, a 96-bit nonce,
// the server's epoch, TLV options (codes 0-127 must be understood, 128-255 may be ignored), 4-byte
// alignment and an 1100-byte size limit. Added for MIDCOM (RFC 3304) "authorised association": an
// AUTH option (key id, per-key sequence, HMAC-SHA-256) and a 64-bit random boot id beside the epoch.
import { createHmac, randomBytes, timingSafeEqual } from 'node:crypto';
import { isIPv4 } from 'node:net';
import { InvalidArgumentError, ProtocolError } from '../sdk/errors.ts';
import type { Datapath, Endpoint, StitchSpec, StitchState, StitchStatus } from './stitch-types.ts';

// ---------------------------------------------------------------------------------------------
// Constants
// ---------------------------------------------------------------------------------------------

/** The version this codec speaks (header byte 0). */
export const PROTOCOL_VERSION = 1;
/** Versions a switch built from this module accepts (advertised in DISCOVER replies). */
export const SUPPORTED_VERSIONS = { min: 1, max: 1 } as const;
/** Largest datagram either side may send or accept, as in PCP. */
export const MAX_MESSAGE_SIZE = 1100;
/** Default UDP port of the switch, for DISCOVER and control alike (one socket, see docs/protocol.md). */
export const DEFAULT_PORT = 7807;
/** Receive buffer both ends ask for on their control sockets (capped by net.core.rmem_max). */
export const CONTROL_RECV_BUFFER = 4 << 20;

export const PREFIX_SIZE = 16;
export const REQUEST_HEADER_SIZE = 24;
export const RESPONSE_HEADER_SIZE = 28;
export const NONCE_SIZE = 12;
export const MAC_SIZE = 32;
/** AUTH option data: key id (4) + sequence (8) + MAC (32). */
export const AUTH_DATA_SIZE = 44;
/** AUTH option on the wire: 4-byte option header + data. */
export const AUTH_OPTION_SIZE = 4 + AUTH_DATA_SIZE;

export const DISCOVER_INFO_SIZE = 40;
export const STITCH_LEGS_SIZE = 96;
export const STITCH_RESULT_SIZE = 8;
/** STITCH_MANY: a count (8 bits, 24 reserved) before its legs or its results. */
export const MANY_HEADER_SIZE = 4;
/** Legs one authenticated STITCH_MANY request carries at most: 10 in 1100 bytes. */
export const MAX_STITCH_MANY = Math.floor((MAX_MESSAGE_SIZE - REQUEST_HEADER_SIZE - MANY_HEADER_SIZE - AUTH_OPTION_SIZE) / STITCH_LEGS_SIZE);
export const STATUS_SIZE = 48;
export const RECORD_SIZE = STATUS_SIZE + STITCH_LEGS_SIZE;
export const QUERY_REQUEST_SIZE = 8;
export const QUERY_RESULT_HEADER_SIZE = 4;
/** Records that fit one authenticated QUERY response within MAX_MESSAGE_SIZE. */
export const MAX_QUERY_RECORDS =
  Math.floor((MAX_MESSAGE_SIZE - RESPONSE_HEADER_SIZE - QUERY_RESULT_HEADER_SIZE - AUTH_OPTION_SIZE) / RECORD_SIZE);
/** Size of the DISCOVER success reply without AUTH: the size an unauthenticated DISCOVER pads to. */
export const DISCOVER_REPLY_SIZE = RESPONSE_HEADER_SIZE + DISCOVER_INFO_SIZE;
/** PADDING option data length that makes an unauthenticated DISCOVER request as large as its reply. */
export const DISCOVER_PADDING = DISCOVER_REPLY_SIZE - REQUEST_HEADER_SIZE - 4;

export const ZERO_BOOT_ID = '0000000000000000';

export const OPCODES = { discover: 1, stitch: 2, unstitch: 3, query: 4, notify: 5, stitchMany: 6 } as const;
export type Opcode = keyof typeof OPCODES;
const OPCODE_NAMES = invert(OPCODES);

/** Result codes. 0-8 keep their PCP (RFC 6887) numbers and meaning; 64 and up are tcp-stitch's. */
export const RESULT_CODES = {
  SUCCESS: 0,
  UNSUPP_VERSION: 1,
  NOT_AUTHORIZED: 2,
  MALFORMED_REQUEST: 3,
  UNSUPP_OPCODE: 4,
  UNSUPP_OPTION: 5,
  MALFORMED_OPTION: 6,
  NO_RESOURCES: 8,
  UNKNOWN_KEY: 64,
  REPLAYED: 65,
  NOT_OWNER: 66,
  UNTRACKED_LEG: 67,
  DATAPATH_ERROR: 68,
  NOT_FOUND: 69,
  BAD_LEGS: 70,
  STALE_BOOT: 71,
  LEG_IN_USE: 72,
} as const;
export type ResultCode = keyof typeof RESULT_CODES;
const RESULT_NAMES = invert(RESULT_CODES);

export const OPTION_CODES = { AUTH: 1, PADDING: 128 } as const;
/** Option codes below this must be understood; a receiver rejects a message carrying one it does not know. */
export const MANDATORY_OPTION_LIMIT = 128;

export type Translation = Datapath['capabilities']['translations'][number];
/** Bit i of the DISCOVER translations field stands for TRANSLATIONS[i]. */
export const TRANSLATIONS: readonly Translation[] =
  ['addr', 'port', 'seq', 'ack', 'sack', 'timestamps', 'wscale', 'mss-clamp', 'icmp', 'checksum'];
export type AuthAlgorithm = 'hmac-sha256';
/** Bit i of the DISCOVER auth-algorithms field stands for AUTH_ALGORITHMS[i]. */
export const AUTH_ALGORITHMS: readonly AuthAlgorithm[] = ['hmac-sha256'];

export const STITCH_STATES: Readonly<Record<StitchState, number>> =
  { draining: 1, stitched: 2, closing: 3, closed: 4, failed: 5 };
const STATE_NAMES = invert(STITCH_STATES);

/** Status reasons with a wire code; any other reason string is carried as 'other' (255). */
export const STATUS_REASONS: Readonly<Record<string, number>> = {
  fin: 1, rst: 2, 'untracked-leg': 3, unstitched: 4, drained: 5, 'idle-timeout': 6, 'datapath-error': 7,
  'client-rst': 8, 'core-rst': 9, other: 255,
};
const STATUS_REASON_NAMES = invert(STATUS_REASONS);

// ---------------------------------------------------------------------------------------------
// Rejection reasons: one fixed set for the decoder, the switch and the agent, so every rejection
// can be counted under a stable name (switch-status, tests).
// ---------------------------------------------------------------------------------------------

/** Why decode() threw, in the order the checks run (see docs/protocol.md, "Receiving"). */
export const DECODE_REASONS = [
  'truncated', 'oversized', 'misaligned', 'bad-version', 'bad-opcode', 'bad-result',
  'bad-option-length', 'duplicate-option', 'auth-not-last', 'unknown-key', 'bad-mac',
  'unknown-mandatory-option', 'missing-auth', 'bad-field', 'bad-address',
] as const;
export type DecodeReason = typeof DECODE_REASONS[number];

/** Everything a switch or agent rejects or drops, decode reasons first. */
export const REJECT_REASONS = [
  ...DECODE_REASONS,
  // stateful checks of authenticated messages
  'replayed', 'stale-boot', 'cache-exhausted',
  // admission
  'rate-limited', 'amplification', 'not-neighbour', 'unexpected-response',
  // request semantics
  'bad-legs', 'not-owner', 'not-found', 'leg-in-use', 'quota', 'table-full', 'untracked-leg', 'datapath-error',
  // agent side
  'wrong-nonce', 'wrong-source', 'unauthenticated-reply',
] as const;
export type RejectReason = typeof REJECT_REASONS[number];
export type ReasonCounters = Record<RejectReason, number>;

export function newReasonCounters(): ReasonCounters {
  return Object.fromEntries(REJECT_REASONS.map((r) => [r, 0])) as ReasonCounters;
}

/** The result code a switch answers a request with when decode() failed for `reason`. */
export const RESULT_FOR_DECODE_REASON: Readonly<Record<DecodeReason, ResultCode>> = {
  truncated: 'MALFORMED_REQUEST',
  oversized: 'MALFORMED_REQUEST',
  misaligned: 'MALFORMED_REQUEST',
  'bad-version': 'UNSUPP_VERSION',
  'bad-opcode': 'UNSUPP_OPCODE',
  'bad-result': 'MALFORMED_REQUEST',
  'bad-option-length': 'MALFORMED_OPTION',
  'duplicate-option': 'MALFORMED_OPTION',
  'auth-not-last': 'MALFORMED_OPTION',
  'unknown-key': 'UNKNOWN_KEY',
  'bad-mac': 'NOT_AUTHORIZED',
  'unknown-mandatory-option': 'UNSUPP_OPTION',
  'missing-auth': 'NOT_AUTHORIZED',
  'bad-field': 'MALFORMED_REQUEST',
  'bad-address': 'MALFORMED_REQUEST',
};

// ---------------------------------------------------------------------------------------------
// Types
// ---------------------------------------------------------------------------------------------

/** A shared key: the shell and the switch both hold it (switch/keys.ts reads and writes key files). */
export interface Key { id: number; secret: Buffer }
/** Where decode() finds the secret for a key id: one key, a list, or a lookup function. */
export type KeyRing = Key | readonly Key[] | ((keyId: number) => Buffer | undefined);

/** What the AUTH option says, once its MAC has been verified. */
export interface AuthInfo { keyId: number; sequence: bigint }

interface MessageBase {
  /** 96-bit nonce, 24 lowercase hex digits. A response carries its request's nonce. */
  nonce: string;
  /**
   * 64-bit boot id, 16 lowercase hex digits. In a response or NOTIFY: the switch's current boot id.
   * In an agent's request: the boot id of the switch it addresses (ZERO_BOOT_ID when unknown).
   */
  bootId: string;
  /** Present iff the message carries an AUTH option (decode: and its MAC was verified). */
  auth?: AuthInfo;
  /** Data length of the PADDING option, when the message carries one. */
  padding?: number;
}

export interface RequestBase extends MessageBase { kind: 'request' }
export interface DiscoverRequest extends RequestBase { opcode: 'discover' }
/** A stitch's content minus the id, which the switch assigns. */
export type StitchLegs = Omit<StitchSpec, 'id'>;
export interface StitchRequest extends RequestBase { opcode: 'stitch'; legs: StitchLegs }
export interface UnstitchRequest extends RequestBase { opcode: 'unstitch'; id: number }
/** id 0: list the requester's stitches with id > cursor, a page at a time. */
export interface QueryRequest extends RequestBase { opcode: 'query'; id: number; cursor: number }
/** Sent by the switch to a stitch's owner when the datapath reports a state change. */
export interface NotifyRequest extends RequestBase { opcode: 'notify'; status: StitchStatus }
/** Several STITCHes in one datagram (1..MAX_STITCH_MANY), each answered on its own. */
export interface StitchManyRequest extends RequestBase { opcode: 'stitchMany'; legs: StitchLegs[] }
export type Request = DiscoverRequest | StitchRequest | UnstitchRequest | QueryRequest | NotifyRequest | StitchManyRequest;

export interface ResponseBase extends MessageBase {
  kind: 'response';
  result: ResultCode;
  /** Seconds since the switch started (PCP's epoch). 0 in an agent's NOTIFY acknowledgement. */
  epoch: number;
}
/** What a switch advertises in its DISCOVER reply. */
export interface SwitchInfo {
  switchId: string;           // 16 hex digits, stable for a switch
  controlAddress: string;     // where to send STITCH / UNSTITCH / QUERY
  controlPort: number;
  versions: { min: number; max: number };
  translations: Translation[]; // in TRANSLATIONS order
  authAlgorithms: AuthAlgorithm[];
  tableSize: number;
  freeSlots: number;
}
export interface StitchResult { id: number; state: StitchState; /** the legs were already stitched */ existing: boolean }
export interface StitchRecord { status: StitchStatus; spec: StitchSpec }
export interface QueryResult { stitches: StitchRecord[]; /** more records after the last one */ more: boolean }

// Bodies are present exactly when result is SUCCESS.
export interface DiscoverResponse extends ResponseBase { opcode: 'discover'; info?: SwitchInfo }
export interface StitchResponse extends ResponseBase { opcode: 'stitch'; stitch?: StitchResult }
export interface UnstitchResponse extends ResponseBase { opcode: 'unstitch'; status?: StitchStatus }
export interface QueryResponse extends ResponseBase { opcode: 'query'; query?: QueryResult }
export interface NotifyResponse extends ResponseBase { opcode: 'notify' }
/** One answer per requested stitch, in request order: SUCCESS with its result, or the error alone. */
export type StitchManyEntry = { result: 'SUCCESS'; stitch: StitchResult } | { result: Exclude<ResultCode, 'SUCCESS'> };
export interface StitchManyResponse extends ResponseBase { opcode: 'stitchMany'; entries?: StitchManyEntry[] }
export type Response = DiscoverResponse | StitchResponse | UnstitchResponse | QueryResponse | NotifyResponse | StitchManyResponse;

export type Message = Request | Response;

/** The version-independent first 16 bytes, readable from anything that long. */
export interface MessagePrefix {
  version: number;
  response: boolean;
  opcode: number;   // raw 7-bit opcode, maybe unknown
  resultCode: number; // byte 3 (0 in requests)
  nonce: string;
}

/** decode() failed. `reason` is stable (count on it); `prefix` is set when 16 bytes were readable. */
export class ControlProtocolError extends ProtocolError {
  declare readonly reason: DecodeReason;
  declare readonly prefix?: MessagePrefix;
  constructor(reason: DecodeReason, message: string, prefix?: MessagePrefix) {
    super(`${reason}: ${message}`);
    (this as { reason: DecodeReason }).reason = reason;
    if (prefix) (this as { prefix?: MessagePrefix }).prefix = prefix;
  }
}

const DECODE_REASON_SET: ReadonlySet<string> = new Set(DECODE_REASONS);

export function isControlProtocolError(err: unknown): err is ControlProtocolError {
  return err instanceof ProtocolError && DECODE_REASON_SET.has((err as { reason?: unknown }).reason as string);
}

// ---------------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------------

function invert<K extends string>(o: Readonly<Record<K, number>>): Record<number, K> {
  const r: Record<number, K> = {};
  for (const [k, v] of Object.entries(o) as Array<[K, number]>) r[v] = k;
  return r;
}

/** A fresh random 96-bit nonce. */
export function newNonce(): string { return randomBytes(NONCE_SIZE).toString('hex'); }

/** A fresh random, non-zero 64-bit boot id. */
export function newBootId(): string {
  for (;;) {
    const id = randomBytes(8).toString('hex');
    if (id !== ZERO_BOOT_ID) return id;
  }
}

const HEX24 = /^[0-9a-f]{24}$/;
const HEX16 = /^[0-9a-f]{16}$/;

function bad(what: string): never { throw new InvalidArgumentError(`cannot encode: ${what}`); }

function checkUint(v: unknown, bits: 8 | 16 | 32, what: string): number {
  const max = 2 ** bits - 1;
  if (typeof v !== 'number' || !Number.isInteger(v) || v < 0 || v > max) bad(`${what} must be an integer 0..${max}, got ${String(v)}`);
  return v;
}
/** Counters are exact below 2^53; larger ones (decoded from the wire) travel as the nearest double, saturating at 2^64-1. */
function counter(v: unknown, what: string): bigint {
  if (typeof v !== 'number' || !Number.isInteger(v) || v < 0 || v > 2 ** 64) bad(`${what} must be a non-negative integer up to 2^64-1, got ${String(v)}`);
  return v >= 2 ** 64 ? 0xffff_ffff_ffff_ffffn : BigInt(v);
}
function checkU64(v: unknown, what: string): bigint {
  if (typeof v !== 'bigint' || v < 0n || v > 0xffff_ffff_ffff_ffffn) bad(`${what} must be a bigint 0..2^64-1, got ${String(v)}`);
  return v;
}

function writeAddress(b: Buffer, off: number, address: string, what: string): void {
  if (typeof address !== 'string' || !isIPv4(address)) bad(`${what} must be an IPv4 dotted quad, got ${String(address)}`);
  b.fill(0, off, off + 10);
  b[off + 10] = 0xff; b[off + 11] = 0xff;
  const parts = address.split('.');
  for (let i = 0; i < 4; i++) b[off + 12 + i] = Number(parts[i]);
}

/** Reads a 16-byte IPv4-mapped IPv6 address; undefined when it is not IPv4-mapped. */
function readAddress(b: Buffer, off: number): string | undefined {
  for (let i = 0; i < 10; i++) if (b[off + i] !== 0) return undefined;
  if (b[off + 10] !== 0xff || b[off + 11] !== 0xff) return undefined;
  return `${b[off + 12]}.${b[off + 13]}.${b[off + 14]}.${b[off + 15]}`;
}

export function computeMac(secret: Buffer, covered: Buffer): Buffer {
  return createHmac('sha256', secret).update(covered).digest();
}

function lookupSecret(keys: KeyRing | undefined, keyId: number): Buffer | undefined {
  if (!keys) return undefined;
  if (typeof keys === 'function') return keys(keyId);
  if (Array.isArray(keys)) return (keys as readonly Key[]).find((k) => k.id === keyId)?.secret;
  const k = keys as Key;
  return k.id === keyId ? k.secret : undefined;
}

/** The first 16 bytes, or undefined if the datagram is shorter. Never throws. */
export function readPrefix(b: Buffer): MessagePrefix | undefined {
  if (b.length < PREFIX_SIZE) return undefined;
  return {
    version: b[0]!,
    response: (b[1]! & 0x80) !== 0,
    opcode: b[1]! & 0x7f,
    resultCode: b[3]!,
    nonce: b.toString('hex', 4, 16),
  };
}

// ---------------------------------------------------------------------------------------------
// Bodies
// ---------------------------------------------------------------------------------------------

function checkEndpoint(e: Endpoint | undefined, what: string): Endpoint {
  if (!e || typeof e !== 'object') bad(`${what} is missing`);
  checkUint(e.port, 16, `${what}.port`);
  return e;
}

function writeLegs(b: Buffer, off: number, s: StitchLegs): void {
  if (!s || !s.clientLeg || !s.coreLeg) bad('legs need clientLeg and coreLeg');
  const c = checkEndpoint(s.clientLeg.client, 'clientLeg.client');
  const a = checkEndpoint(s.clientLeg.shell, 'clientLeg.shell');
  const v = checkEndpoint(s.coreLeg.shell, 'coreLeg.shell');
  const r = checkEndpoint(s.coreLeg.core, 'coreLeg.core');
  writeAddress(b, off, c.address, 'clientLeg.client.address');
  writeAddress(b, off + 16, a.address, 'clientLeg.shell.address');
  writeAddress(b, off + 32, v.address, 'coreLeg.shell.address');
  writeAddress(b, off + 48, r.address, 'coreLeg.core.address');
  b.writeUInt16BE(c.port, off + 64); b.writeUInt16BE(a.port, off + 66);
  b.writeUInt16BE(v.port, off + 68); b.writeUInt16BE(r.port, off + 70);
  b.writeBigUInt64BE(checkU64(s.clientOffset, 'clientOffset'), off + 72);
  b.writeBigUInt64BE(checkU64(s.shellOffset, 'shellOffset'), off + 80);
  b.writeUInt32BE(checkUint(s.corePreambleLength, 32, 'corePreambleLength'), off + 88);
  b.writeUInt32BE(checkUint(s.coreAnswerLength, 32, 'coreAnswerLength'), off + 92);
}

/** Throws InvalidArgumentError naming the field when `legs` cannot be encoded (as encode would). */
export function checkStitchLegs(legs: StitchLegs): void {
  writeLegs(Buffer.allocUnsafe(STITCH_LEGS_SIZE), 0, legs);
}

type Fail = (reason: DecodeReason, message: string) => never;

function readLegs(b: Buffer, off: number, fail: Fail): StitchLegs {
  const addr = (o: number, what: string) => readAddress(b, off + o) ?? fail('bad-address', `${what} is not IPv4-mapped`);
  return {
    clientLeg: {
      client: { address: addr(0, 'clientLeg.client'), port: b.readUInt16BE(off + 64) },
      shell: { address: addr(16, 'clientLeg.shell'), port: b.readUInt16BE(off + 66) },
    },
    coreLeg: {
      shell: { address: addr(32, 'coreLeg.shell'), port: b.readUInt16BE(off + 68) },
      core: { address: addr(48, 'coreLeg.core'), port: b.readUInt16BE(off + 70) },
    },
    clientOffset: b.readBigUInt64BE(off + 72),
    corePreambleLength: b.readUInt32BE(off + 88),
    shellOffset: b.readBigUInt64BE(off + 80),
    coreAnswerLength: b.readUInt32BE(off + 92),
  };
}

function writeStatus(b: Buffer, off: number, s: StitchStatus): void {
  if (!s || typeof s !== 'object') bad('status is missing');
  const id = checkUint(s.id, 32, 'status.id');
  if (id === 0) bad('status.id must not be 0');
  const state = STITCH_STATES[s.state];
  if (state === undefined) bad(`unknown state ${String(s.state)}`);
  b.writeUInt32BE(id, off);
  b[off + 4] = state;
  b[off + 5] = s.reason === undefined ? 0 : (STATUS_REASONS[s.reason] ?? STATUS_REASONS.other!);
  b.writeUInt16BE(0, off + 6);
  b.writeBigUInt64BE(counter(s.packetsClientToCore, 'packetsClientToCore'), off + 8);
  b.writeBigUInt64BE(counter(s.packetsCoreToClient, 'packetsCoreToClient'), off + 16);
  b.writeBigUInt64BE(counter(s.bytesClientToCore, 'bytesClientToCore'), off + 24);
  b.writeBigUInt64BE(counter(s.bytesCoreToClient, 'bytesCoreToClient'), off + 32);
  b.writeBigUInt64BE(counter(s.shellPacketsDropped, 'shellPacketsDropped'), off + 40);
}

function readStatus(b: Buffer, off: number, fail: Fail): StitchStatus {
  const id = b.readUInt32BE(off);
  if (id === 0) fail('bad-field', 'stitch id 0');
  const state = STATE_NAMES[b[off + 4]!] ?? fail('bad-field', `unknown stitch state ${b[off + 4]}`);
  const reasonCode = b[off + 5]!;
  const status: StitchStatus = {
    id, state,
    packetsClientToCore: Number(b.readBigUInt64BE(off + 8)),
    packetsCoreToClient: Number(b.readBigUInt64BE(off + 16)),
    bytesClientToCore: Number(b.readBigUInt64BE(off + 24)),
    bytesCoreToClient: Number(b.readBigUInt64BE(off + 32)),
    shellPacketsDropped: Number(b.readBigUInt64BE(off + 40)),
  };
  if (reasonCode !== 0) status.reason = STATUS_REASON_NAMES[reasonCode] ?? 'other';
  return status;
}

const manyCountOk = (n: number) => n >= 1 && n <= MAX_STITCH_MANY;

function manyCount(n: number, what: string): number {
  if (!manyCountOk(n)) bad(`STITCH_MANY carries 1 to ${MAX_STITCH_MANY} ${what}, got ${n}`);
  return n;
}

function checkManyCount(count: number, fail: Fail): void {
  if (!manyCountOk(count)) fail('bad-field', `STITCH_MANY count ${count}, expected 1..${MAX_STITCH_MANY}`);
}

function writeStitchResult(b: Buffer, off: number, s: StitchResult): void {
  if (checkUint(s.id, 32, 'stitch.id') === 0) bad('stitch.id must not be 0');
  const state = STITCH_STATES[s.state];
  if (state === undefined) bad(`unknown state ${String(s.state)}`);
  b.writeUInt32BE(s.id, off); b[off + 4] = state; b[off + 5] = s.existing ? 1 : 0;
}

function readStitchResult(b: Buffer, off: number, fail: Fail): StitchResult {
  const id = b.readUInt32BE(off);
  if (id === 0) fail('bad-field', 'STITCH result with id 0');
  const state = STATE_NAMES[b[off + 4]!] ?? fail('bad-field', `unknown stitch state ${b[off + 4]}`);
  return { id, state, existing: (b[off + 5]! & 1) === 1 };
}

function bitmap<T>(names: readonly T[], set: readonly T[], what: string): number {
  let bits = 0;
  for (const n of set) {
    const i = names.indexOf(n);
    if (i < 0) bad(`unknown ${what} ${String(n)}`);
    bits |= 1 << i;
  }
  return bits;
}
function unbitmap<T>(names: readonly T[], bits: number): T[] {
  return names.filter((_, i) => (bits & (1 << i)) !== 0); // unknown bits: ignored (newer switch)
}

function writeInfo(b: Buffer, off: number, i: SwitchInfo): void {
  if (!i || typeof i !== 'object') bad('discover info is missing');
  if (typeof i.switchId !== 'string' || !HEX16.test(i.switchId)) bad('switchId must be 16 lowercase hex digits');
  b.write(i.switchId, off, 'hex');
  writeAddress(b, off + 8, i.controlAddress, 'controlAddress');
  b.writeUInt16BE(checkUint(i.controlPort, 16, 'controlPort'), off + 24);
  const min = checkUint(i.versions?.min, 8, 'versions.min');
  const max = checkUint(i.versions?.max, 8, 'versions.max');
  if (min > max) bad('versions.min > versions.max');
  b[off + 26] = min; b[off + 27] = max;
  b.writeUInt16BE(bitmap(TRANSLATIONS, i.translations ?? [], 'translation'), off + 28);
  b[off + 30] = bitmap(AUTH_ALGORITHMS, i.authAlgorithms ?? [], 'auth algorithm');
  b[off + 31] = 0;
  b.writeUInt32BE(checkUint(i.tableSize, 32, 'tableSize'), off + 32);
  b.writeUInt32BE(checkUint(i.freeSlots, 32, 'freeSlots'), off + 36);
}

function readInfo(b: Buffer, off: number, fail: Fail): SwitchInfo {
  const min = b[off + 26]!, max = b[off + 27]!;
  if (min > max || min === 0) fail('bad-field', `bad version range ${min}..${max}`);
  return {
    switchId: b.toString('hex', off, off + 8),
    controlAddress: readAddress(b, off + 8) ?? fail('bad-address', 'controlAddress is not IPv4-mapped'),
    controlPort: b.readUInt16BE(off + 24),
    versions: { min, max },
    translations: unbitmap(TRANSLATIONS, b.readUInt16BE(off + 28)),
    authAlgorithms: unbitmap(AUTH_ALGORITHMS, b[off + 30]!),
    tableSize: b.readUInt32BE(off + 32),
    freeSlots: b.readUInt32BE(off + 36),
  };
}

/** Body bytes a message of this shape carries (QUERY responses: needs the count field). */
function bodySize(opcode: Opcode, response: boolean, success: boolean, count = 0): number {
  if (response && !success) return 0;
  switch (opcode) {
    case 'discover': return response ? DISCOVER_INFO_SIZE : 0;
    case 'stitch': return response ? STITCH_RESULT_SIZE : STITCH_LEGS_SIZE;
    case 'unstitch': return response ? STATUS_SIZE : 4;
    case 'query': return response ? QUERY_RESULT_HEADER_SIZE + count * RECORD_SIZE : QUERY_REQUEST_SIZE;
    case 'notify': return response ? 0 : STATUS_SIZE;
    case 'stitchMany': return MANY_HEADER_SIZE + count * (response ? STITCH_RESULT_SIZE : STITCH_LEGS_SIZE);
  }
}

/** Does a message of this shape have to carry AUTH? (Unauthenticated DISCOVER and error replies are allowed.) */
export function requiresAuth(opcode: Opcode, response: boolean, result?: ResultCode): boolean {
  if (opcode === 'discover') return false;
  return !response || result === 'SUCCESS';
}

// ---------------------------------------------------------------------------------------------
// encode
// ---------------------------------------------------------------------------------------------

/**
 * Encodes a message. `key` must be given exactly when `msg.auth` is (and with the same key id);
 * the MAC is then computed over every byte before it. Throws InvalidArgumentError for a message
 * that cannot be represented (bad field, missing body, larger than MAX_MESSAGE_SIZE).
 */
export function encode(msg: Message, key?: Key): Buffer {
  if (!msg || typeof msg !== 'object') bad('message must be an object');
  const opcode = OPCODES[msg.opcode];
  if (opcode === undefined) bad(`unknown opcode ${String(msg.opcode)}`);
  const response = msg.kind === 'response';
  if (!response && msg.kind !== 'request') bad(`kind must be 'request' or 'response'`);
  if (typeof msg.nonce !== 'string' || !HEX24.test(msg.nonce)) bad('nonce must be 24 lowercase hex digits');
  if (typeof msg.bootId !== 'string' || !HEX16.test(msg.bootId)) bad('bootId must be 16 lowercase hex digits');
  if (!!msg.auth !== !!key) bad(msg.auth ? 'message has auth but no key was given' : 'a key was given but the message has no auth');
  if (msg.auth && key && msg.auth.keyId !== key.id) bad(`auth.keyId ${msg.auth.keyId} does not match the key's id ${key.id}`);

  let result: ResultCode | undefined;
  let count = 0;
  if (response) {
    const r = msg as Response;
    result = r.result;
    if (RESULT_CODES[r.result] === undefined) bad(`unknown result ${String(r.result)}`);
    checkUint(r.epoch, 32, 'epoch');
    if (r.opcode === 'query' && r.result === 'SUCCESS') {
      if (!r.query || !Array.isArray(r.query.stitches)) bad('a successful QUERY response needs query.stitches');
      count = r.query.stitches.length;
      if (count > 0xffff) bad('too many query records');
    }
    if (r.opcode === 'stitchMany' && r.result === 'SUCCESS') {
      if (!Array.isArray(r.entries)) bad('a successful STITCH_MANY response needs entries');
      count = manyCount(r.entries.length, 'entries');
    }
  } else if (msg.opcode === 'stitchMany') {
    if (!Array.isArray(msg.legs)) bad('a STITCH_MANY request needs legs (an array)');
    count = manyCount(msg.legs.length, 'legs');
  }
  const success = result === 'SUCCESS';
  if (requiresAuth(msg.opcode, response, result) && !msg.auth) bad(`${msg.kind} ${msg.opcode}${response ? ' ' + result : ''} must be authenticated`);

  const headerSize = response ? RESPONSE_HEADER_SIZE : REQUEST_HEADER_SIZE;
  const body = bodySize(msg.opcode, response, success, count);
  const padding = msg.padding;
  if (padding !== undefined) checkUint(padding, 16, 'padding');
  const paddingSize = padding === undefined ? 0 : 4 + ((padding + 3) & ~3);
  const size = headerSize + body + paddingSize + (msg.auth ? AUTH_OPTION_SIZE : 0);
  if (size > MAX_MESSAGE_SIZE) bad(`message of ${size} bytes exceeds ${MAX_MESSAGE_SIZE}`);

  const b = Buffer.alloc(size);
  b[0] = PROTOCOL_VERSION;
  b[1] = (response ? 0x80 : 0) | opcode;
  b[2] = 0;
  b[3] = response ? RESULT_CODES[result!] : 0;
  b.write(msg.nonce, 4, 'hex');
  b.write(msg.bootId, 16, 'hex');
  if (response) b.writeUInt32BE((msg as Response).epoch, 24);

  const off = headerSize;
  if (!response) {
    const m = msg as Request;
    switch (m.opcode) {
      case 'discover': break;
      case 'stitch': writeLegs(b, off, m.legs); break;
      case 'unstitch':
        if (checkUint(m.id, 32, 'id') === 0) bad('id must not be 0');
        b.writeUInt32BE(m.id, off); break;
      case 'query':
        b.writeUInt32BE(checkUint(m.id, 32, 'id'), off);
        b.writeUInt32BE(checkUint(m.cursor, 32, 'cursor'), off + 4);
        if (m.id !== 0 && m.cursor !== 0) bad('cursor must be 0 when id is given');
        break;
      case 'notify': writeStatus(b, off, m.status); break;
      case 'stitchMany':
        b[off] = count;
        m.legs.forEach((l, i) => writeLegs(b, off + MANY_HEADER_SIZE + i * STITCH_LEGS_SIZE, l));
        break;
    }
  } else if (success) {
    const m = msg as Response;
    switch (m.opcode) {
      case 'discover': writeInfo(b, off, m.info!); break;
      case 'stitch':
        if (!m.stitch) bad('a successful STITCH response needs stitch');
        writeStitchResult(b, off, m.stitch);
        break;
      case 'stitchMany':
        b[off] = count;
        m.entries!.forEach((e, i) => {
          const o = off + MANY_HEADER_SIZE + i * STITCH_RESULT_SIZE;
          if (!e || RESULT_CODES[e.result] === undefined) bad(`entry ${i} needs a known result`);
          if (e.result === 'SUCCESS') {
            if (!e.stitch) bad(`entry ${i}: SUCCESS needs stitch`);
            writeStitchResult(b, o, e.stitch);
          } else if ((e as { stitch?: unknown }).stitch !== undefined) bad(`entry ${i}: an error carries no stitch`);
          b[o + 6] = RESULT_CODES[e.result];
        });
        break;
      case 'unstitch': writeStatus(b, off, m.status!); break;
      case 'query': {
        const q = m.query!;
        b.writeUInt16BE(count, off); b[off + 2] = q.more ? 1 : 0;
        q.stitches.forEach((rec, i) => {
          const o = off + QUERY_RESULT_HEADER_SIZE + i * RECORD_SIZE;
          if (!rec || !rec.spec) bad(`query record ${i} needs status and spec`);
          writeStatus(b, o, rec.status);
          if (rec.spec.id !== rec.status.id) bad(`query record ${i}: spec.id differs from status.id`);
          writeLegs(b, o + STATUS_SIZE, rec.spec);
        });
        break;
      }
      case 'notify': break;
    }
  } else {
    // Error responses carry no body. Reject stray bodies so encode(decode(x)) stays exact.
    const m = msg as unknown as Record<string, unknown>;
    for (const f of ['info', 'stitch', 'status', 'query', 'entries']) if (m[f] !== undefined) bad(`an error response carries no ${f}`);
  }

  let o = headerSize + body;
  if (padding !== undefined) {
    b[o] = OPTION_CODES.PADDING; b[o + 1] = 0; b.writeUInt16BE(padding, o + 2);
    o += paddingSize; // data stays zero
  }
  if (msg.auth && key) {
    b[o] = OPTION_CODES.AUTH; b[o + 1] = 0; b.writeUInt16BE(AUTH_DATA_SIZE, o + 2);
    b.writeUInt32BE(checkUint(msg.auth.keyId, 32, 'auth.keyId'), o + 4);
    b.writeBigUInt64BE(checkU64(msg.auth.sequence, 'auth.sequence'), o + 8);
    if (!Buffer.isBuffer(key.secret) || key.secret.length === 0) bad('key.secret must be a non-empty Buffer');
    computeMac(key.secret, b.subarray(0, o + 16)).copy(b, o + 16);
  }
  return b;
}

/**
 * An error response for a request that could not be decoded: header only, no body, no AUTH.
 * Takes the raw opcode so UNSUPP_OPCODE can echo an opcode this codec does not know.
 */
export function encodeBareResponse(p: { opcode: number; nonce: string; result: ResultCode; bootId: string; epoch: number }): Buffer {
  checkUint(p.opcode, 8, 'opcode');
  if (p.opcode > 0x7f) bad('opcode must be 0..127');
  if (!HEX24.test(p.nonce)) bad('nonce must be 24 lowercase hex digits');
  if (!HEX16.test(p.bootId)) bad('bootId must be 16 lowercase hex digits');
  if (RESULT_CODES[p.result] === undefined || p.result === 'SUCCESS') bad('a bare response carries an error result');
  const b = Buffer.alloc(RESPONSE_HEADER_SIZE);
  b[0] = PROTOCOL_VERSION; b[1] = 0x80 | p.opcode; b[3] = RESULT_CODES[p.result];
  b.write(p.nonce, 4, 'hex'); b.write(p.bootId, 16, 'hex');
  b.writeUInt32BE(checkUint(p.epoch, 32, 'epoch'), 24);
  return b;
}

// ---------------------------------------------------------------------------------------------
// decode
// ---------------------------------------------------------------------------------------------

interface RawOption { code: number; dataOffset: number; length: number }

/**
 * Decodes and authenticates one datagram. Throws ControlProtocolError (a ProtocolError) with a
 * `reason` from DECODE_REASONS and never anything else. Checks run in this order: size, alignment,
 * version, opcode, result code, header and body length, option framing (lengths, duplicates, AUTH
 * last), authentication (unknown key, MAC), option semantics (unknown must-understand options),
 * the need for AUTH, body fields. Unknown optional options (128-255) are skipped. Reserved bits
 * and option padding are ignored, as in PCP. Stateful checks (sequence, nonce, boot id) belong to
 * the caller.
 */
export function decode(input: Uint8Array, keys?: KeyRing): Message {
  const b = Buffer.isBuffer(input) ? input : Buffer.from(input.buffer, input.byteOffset, input.byteLength);
  const prefix = readPrefix(b);
  const fail: Fail = (reason, message) => { throw new ControlProtocolError(reason, message, prefix); };
  if (!prefix) fail('truncated', `${b.length} bytes is shorter than the ${PREFIX_SIZE}-byte prefix`);
  const p = prefix!;
  if (b.length > MAX_MESSAGE_SIZE) fail('oversized', `${b.length} bytes exceeds ${MAX_MESSAGE_SIZE}`);
  if (b.length % 4 !== 0) fail('misaligned', `${b.length} bytes is not a multiple of 4`);
  if (p.version !== PROTOCOL_VERSION) fail('bad-version', `version ${p.version}, this side speaks ${PROTOCOL_VERSION}`);
  const opcode = OPCODE_NAMES[p.opcode] ?? fail('bad-opcode', `unknown opcode ${p.opcode}`);
  const response = p.response;
  let result: ResultCode | undefined;
  if (response) result = RESULT_NAMES[p.resultCode] ?? fail('bad-result', `unknown result code ${p.resultCode}`);
  const headerSize = response ? RESPONSE_HEADER_SIZE : REQUEST_HEADER_SIZE;
  if (b.length < headerSize) fail('truncated', `${b.length} bytes is shorter than the ${headerSize}-byte header`);
  const success = result === 'SUCCESS';
  let count = 0;
  if (response && success && opcode === 'query') {
    if (b.length < headerSize + QUERY_RESULT_HEADER_SIZE) fail('truncated', 'QUERY result header cut short');
    count = b.readUInt16BE(headerSize);
  }
  if (opcode === 'stitchMany' && (!response || success)) {
    if (b.length < headerSize + MANY_HEADER_SIZE) fail('truncated', 'STITCH_MANY count cut short');
    count = b[headerSize]!; // its range is content, checked after authentication
  }
  const body = bodySize(opcode, response, success, count);
  const optionsStart = headerSize + body;
  if (optionsStart > b.length) fail('truncated', `${opcode} ${response ? 'response' : 'request'} body needs ${body} bytes`);

  // Option framing.
  const options: RawOption[] = [];
  let authIndex = -1;
  for (let o = optionsStart; o < b.length;) {
    const code = b[o]!, length = b.readUInt16BE(o + 2);
    const padded = (length + 3) & ~3;
    if (o + 4 + padded > b.length) fail('bad-option-length', `option ${code} of ${length} bytes runs past the end`);
    if (code === OPTION_CODES.AUTH || code === OPTION_CODES.PADDING) {
      if (options.some((x) => x.code === code)) fail('duplicate-option', `option ${code} appears twice`);
    }
    if (code === OPTION_CODES.AUTH) authIndex = options.length;
    options.push({ code, dataOffset: o + 4, length });
    o += 4 + padded;
  }
  let auth: AuthInfo | undefined;
  if (authIndex >= 0) {
    const a = options[authIndex]!;
    if (a.length !== AUTH_DATA_SIZE) fail('bad-option-length', `AUTH option of ${a.length} bytes, expected ${AUTH_DATA_SIZE}`);
    if (authIndex !== options.length - 1) fail('auth-not-last', 'AUTH must be the last option');
    const keyId = b.readUInt32BE(a.dataOffset);
    const sequence = b.readBigUInt64BE(a.dataOffset + 4);
    const secret = lookupSecret(keys, keyId);
    if (!secret) fail('unknown-key', `key id ${keyId} is not known here`);
    const macAt = a.dataOffset + 12;
    const expected = computeMac(secret!, b.subarray(0, macAt));
    if (!timingSafeEqual(expected, b.subarray(macAt, macAt + MAC_SIZE))) fail('bad-mac', `MAC does not verify with key ${keyId}`);
    auth = { keyId, sequence };
  }
  let padding: number | undefined;
  for (const o of options) {
    if (o.code === OPTION_CODES.PADDING) padding = o.length;
    else if (o.code !== OPTION_CODES.AUTH && o.code < MANDATORY_OPTION_LIMIT) {
      fail('unknown-mandatory-option', `option ${o.code} must be understood and is not`);
    }
  }
  if (!auth && requiresAuth(opcode, response, result)) fail('missing-auth', `${opcode} ${response ? 'response' : 'request'} must be authenticated`);

  const base: MessageBase = { nonce: p.nonce, bootId: b.toString('hex', 16, 24) };
  if (auth) base.auth = auth;
  if (padding !== undefined) base.padding = padding;
  const off = headerSize;
  if (!response) {
    switch (opcode) {
      case 'discover': return { kind: 'request', opcode, ...base };
      case 'stitch': return { kind: 'request', opcode, ...base, legs: readLegs(b, off, fail) };
      case 'unstitch': {
        const id = b.readUInt32BE(off);
        if (id === 0) fail('bad-field', 'UNSTITCH of id 0');
        return { kind: 'request', opcode, ...base, id };
      }
      case 'query': {
        const id = b.readUInt32BE(off), cursor = b.readUInt32BE(off + 4);
        if (id !== 0 && cursor !== 0) fail('bad-field', 'QUERY with both id and cursor');
        return { kind: 'request', opcode, ...base, id, cursor };
      }
      case 'notify': return { kind: 'request', opcode, ...base, status: readStatus(b, off, fail) };
      case 'stitchMany': {
        checkManyCount(count, fail);
        const legs: StitchLegs[] = [];
        for (let i = 0; i < count; i++) legs.push(readLegs(b, off + MANY_HEADER_SIZE + i * STITCH_LEGS_SIZE, fail));
        return { kind: 'request', opcode, ...base, legs };
      }
    }
  }
  const rb = { kind: 'response' as const, result: result!, epoch: b.readUInt32BE(24) };
  if (!success) return { ...rb, opcode, ...base } as Response;
  switch (opcode) {
    case 'discover': return { ...rb, opcode, ...base, info: readInfo(b, off, fail) };
    case 'stitch': return { ...rb, opcode, ...base, stitch: readStitchResult(b, off, fail) };
    case 'stitchMany': {
      checkManyCount(count, fail);
      const entries: StitchManyEntry[] = [];
      for (let i = 0; i < count; i++) {
        const o = off + MANY_HEADER_SIZE + i * STITCH_RESULT_SIZE;
        const r = RESULT_NAMES[b[o + 6]!] ?? fail('bad-result', `entry ${i}: unknown result code ${b[o + 6]}`);
        entries.push(r === 'SUCCESS' ? { result: r, stitch: readStitchResult(b, o, fail) } : { result: r });
      }
      return { ...rb, opcode, ...base, entries };
    }
    case 'unstitch': return { ...rb, opcode, ...base, status: readStatus(b, off, fail) };
    case 'query': {
      const stitches: StitchRecord[] = [];
      for (let i = 0; i < count; i++) {
        const o = off + QUERY_RESULT_HEADER_SIZE + i * RECORD_SIZE;
        const status = readStatus(b, o, fail);
        stitches.push({ status, spec: { id: status.id, ...readLegs(b, o + STATUS_SIZE, fail) } });
      }
      return { ...rb, opcode, ...base, query: { stitches, more: (b[off + 2]! & 1) === 1 } };
    }
    case 'notify': return { ...rb, opcode, ...base };
  }
}

/** Same as decode but returns the reason instead of throwing (for counting loops). */
export function tryDecode(input: Uint8Array, keys?: KeyRing): { message: Message } | { reason: DecodeReason; error: ControlProtocolError } {
  try { return { message: decode(input, keys) }; } catch (err) {
    if (isControlProtocolError(err)) return { reason: err.reason, error: err };
    throw err;
  }
}

// ---------------------------------------------------------------------------------------------
// Helpers both sides use
// ---------------------------------------------------------------------------------------------

/** A stable string key for a leg (4-tuple), e.g. for idempotence and conflict checks. */
export function legKey(a: Endpoint, b: Endpoint): string {
  return `${a.address}:${a.port}-${b.address}:${b.port}`;
}

/** JSON reviver/replacer pair for messages (bigint fields as decimal strings): docs and tooling. */
const BIGINT_FIELDS = new Set(['sequence', 'clientOffset', 'shellOffset']);
export function messageToJson(msg: Message): string {
  return JSON.stringify(msg, (k, v) => (typeof v === 'bigint' && BIGINT_FIELDS.has(k) ? v.toString() : v), 2);
}
export function messageFromJson(text: string): Message {
  return JSON.parse(text, (k, v) => (BIGINT_FIELDS.has(k) && typeof v === 'string' ? BigInt(v) : v)) as Message;
}

/**
 * A strictly increasing sequence source: max(previous + 1, now in microseconds). Seeding from the
 * clock keeps sequences increasing across restarts of the sender, as long as its clock does not step
 * back by more than the time it was down. One source per process serves every key.
 */
export function createSequenceSource(nowMicros: () => bigint = () => BigInt(Date.now()) * 1000n): () => bigint {
  let last = 0n;
  return () => {
    const floor = nowMicros();
    last = floor > last ? floor : last + 1n;
    return last;
  };
}

/** The process-wide sequence source the agent's control client and discovery probe share. */
export const nextSequence: () => bigint = createSequenceSource();
