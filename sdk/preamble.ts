// The core-leg preamble: the first bytes the shell writes on every core leg, naming the logical
// connection and the stream offsets at which the leg takes over; and the core's fixed-size answer.
// Both have fixed lengths so the switch can compute the byte mapping (DESIGN.md section 5):
// P = PREAMBLE_LENGTH bytes precede relayed client bytes on A->B, R = ANSWER_LENGTH precede B's bytes.
//
// Preamble, 112 bytes, big-endian (docs/core-leg.md):
//   0  magic "tSCL"          4  version (1)     5  kind (1 = open)     6  length (u16 = 112)
//   8  connection id (16 bytes)
//  24  clientOffset u64: client-stream byte at which this leg starts carrying C->A bytes
//  32  shellOffset  u64: shell->client byte at which this leg starts carrying B's bytes
//  40  client address (16, IPv4-mapped IPv6)   56 client port u16   58 shell port u16
//  60  shell address (16)                       76 flags u16 (bit 0: authenticated)  78 reserved u16
//  80  HMAC-SHA-256 over bytes 0..79 with the shared key, or 32 zero bytes without a key
// Answer, 16 bytes: 0 magic "tSCA"  4 version  5 status  6 length (u16 = 16)  8 reserved (8 zero bytes)
import { createHmac, timingSafeEqual } from 'node:crypto';
import { isIPv4 } from 'node:net';
import { PreambleError } from './errors.ts';

export const PREAMBLE_LENGTH = 112;
export const ANSWER_LENGTH = 16;
export const PREAMBLE_VERSION = 1;
const MAGIC = Buffer.from('tSCL', 'latin1');
const ANSWER_MAGIC = Buffer.from('tSCA', 'latin1');
const MAC_OFFSET = 80;
const FLAG_AUTH = 1;

export interface Endpoint { address: string; port: number }

export interface Preamble {
  connectionId: string;        // 32 hex digits
  clientOffset: bigint;
  shellOffset: bigint;
  client: Endpoint;            // C:p1
  shell: Endpoint;             // A:p2
}

/** Answer status codes; the core closes the leg after any status but ACCEPT. */
export const AnswerStatus = {
  ACCEPT: 0,
  REFUSED: 1,            // the runtime declined the connection
  UNSUPPORTED_VERSION: 2,
  NOT_AUTHENTIC: 3,
  MALFORMED: 4,
} as const;
export type AnswerStatus = typeof AnswerStatus[keyof typeof AnswerStatus];
const statusNames = Object.fromEntries(Object.entries(AnswerStatus).map(([k, v]) => [v, k.toLowerCase()]));
export function answerStatusName(s: number): string { return statusNames[s] ?? `unknown(${s})`; }

function putAddress(buf: Buffer, off: number, address: string, what: string) {
  if (!isIPv4(address)) throw new PreambleError(`${what} address ${JSON.stringify(address)} is not an IPv4 address`);
  buf.fill(0, off, off + 10);
  buf.writeUInt16BE(0xffff, off + 10);
  address.split('.').forEach((o, i) => buf.writeUInt8(Number(o), off + 12 + i));
}

function getAddress(buf: Buffer, off: number): string {
  return `${buf[off + 12]}.${buf[off + 13]}.${buf[off + 14]}.${buf[off + 15]}`;
}

function mac(key: Buffer, body: Buffer): Buffer {
  return createHmac('sha256', key).update(body).digest();
}

export function encodePreamble(p: Preamble, key?: Buffer): Buffer {
  const buf = Buffer.alloc(PREAMBLE_LENGTH);
  MAGIC.copy(buf, 0);
  buf.writeUInt8(PREAMBLE_VERSION, 4);
  buf.writeUInt8(1, 5);
  buf.writeUInt16BE(PREAMBLE_LENGTH, 6);
  if (!/^[0-9a-f]{32}$/.test(p.connectionId)) throw new PreambleError('connectionId must be 32 lowercase hex digits');
  Buffer.from(p.connectionId, 'hex').copy(buf, 8);
  for (const [v, off, name] of [[p.clientOffset, 24, 'clientOffset'], [p.shellOffset, 32, 'shellOffset']] as const) {
    if (typeof v !== 'bigint' || v < 0n || v >= 1n << 64n) throw new PreambleError(`${name} must be a bigint in [0, 2^64)`);
    buf.writeBigUInt64BE(v, off);
  }
  putAddress(buf, 40, p.client.address, 'client');
  buf.writeUInt16BE(p.client.port, 56);
  buf.writeUInt16BE(p.shell.port, 58);
  putAddress(buf, 60, p.shell.address, 'shell');
  buf.writeUInt16BE(key ? FLAG_AUTH : 0, 76);
  if (key) mac(key, buf.subarray(0, MAC_OFFSET)).copy(buf, MAC_OFFSET);
  return buf;
}

/**
 * How many bytes the reader must hold before decodePreamble can decide. Lets the core reject
 * garbage after 8 bytes instead of waiting for 112 from a stranger.
 */
export function checkPreambleHead(head: Buffer): void {
  if (head.length < 8) return;
  if (!head.subarray(0, 4).equals(MAGIC)) throw new PreambleError('not a core-leg preamble (bad magic)', { reason: 'bad-magic' });
  if (head[4] !== PREAMBLE_VERSION) {
    throw new PreambleError(`unsupported preamble version ${head[4]}; this core speaks version ${PREAMBLE_VERSION}`, { reason: 'bad-version' });
  }
  if (head[5] !== 1) throw new PreambleError(`unknown preamble kind ${head[5]}`, { reason: 'bad-kind' });
  const len = head.readUInt16BE(6);
  if (len !== PREAMBLE_LENGTH) {
    throw new PreambleError(`preamble length ${len} is not ${PREAMBLE_LENGTH}`, { reason: len > PREAMBLE_LENGTH ? 'oversized' : 'bad-length' });
  }
}

export function decodePreamble(buf: Buffer, key?: Buffer): Preamble {
  if (buf.length < PREAMBLE_LENGTH) throw new PreambleError(`preamble truncated: ${buf.length} of ${PREAMBLE_LENGTH} bytes`, { reason: 'truncated' });
  checkPreambleHead(buf);
  const authed = (buf.readUInt16BE(76) & FLAG_AUTH) !== 0;
  if (key) {
    if (!authed) throw new PreambleError('preamble is not authenticated but this core requires a key', { reason: 'not-authentic' });
    if (!timingSafeEqual(mac(key, buf.subarray(0, MAC_OFFSET)), buf.subarray(MAC_OFFSET, PREAMBLE_LENGTH))) {
      throw new PreambleError('preamble MAC does not match the shared key', { reason: 'not-authentic' });
    }
  }
  if (buf.readUInt16BE(50) !== 0xffff || buf.readUInt16BE(70) !== 0xffff) {
    throw new PreambleError('preamble addresses are not IPv4-mapped', { reason: 'malformed' });
  }
  return {
    connectionId: buf.subarray(8, 24).toString('hex'),
    clientOffset: buf.readBigUInt64BE(24),
    shellOffset: buf.readBigUInt64BE(32),
    client: { address: getAddress(buf, 40), port: buf.readUInt16BE(56) },
    shell: { address: getAddress(buf, 60), port: buf.readUInt16BE(58) },
  };
}

export function encodeAnswer(status: AnswerStatus): Buffer {
  const buf = Buffer.alloc(ANSWER_LENGTH);
  ANSWER_MAGIC.copy(buf, 0);
  buf.writeUInt8(PREAMBLE_VERSION, 4);
  buf.writeUInt8(status, 5);
  buf.writeUInt16BE(ANSWER_LENGTH, 6);
  return buf;
}

export function decodeAnswer(buf: Buffer): AnswerStatus {
  if (buf.length < ANSWER_LENGTH) throw new PreambleError(`core answer truncated: ${buf.length} of ${ANSWER_LENGTH} bytes`);
  if (!buf.subarray(0, 4).equals(ANSWER_MAGIC) || buf.readUInt16BE(6) !== ANSWER_LENGTH) {
    throw new PreambleError('the core answered with something that is not a core-leg answer');
  }
  if (buf[4] !== PREAMBLE_VERSION) throw new PreambleError(`core answered with version ${buf[4]}, expected ${PREAMBLE_VERSION}`);
  return buf[5] as AnswerStatus;
}
