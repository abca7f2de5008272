// Fuzzing the control protocol codec: for every message kind and every option, 100,000 random and
// mutated datagrams (bit flips, byte changes, truncations, extensions, length-field and header-field
// changes, inserted and duplicated options; half of the mutated authenticated ones re-signed so the
// fuzz reaches past the MAC). decode() must either return a message that re-encodes and decodes to
// itself, or throw a ProtocolError with a reason from DECODE_REASONS, each counted. Plus a
// property-based round trip (fast-check) over generated messages of every kind.
import assert from 'node:assert/strict';
import fc from 'fast-check';
import {
  AUTH_OPTION_SIZE, DECODE_REASONS, REQUEST_HEADER_SIZE, RESPONSE_HEADER_SIZE, STITCH_STATES, STATUS_REASONS, TRANSLATIONS,
  computeMac, decode, encode, encodeBareResponse, isControlProtocolError, requiresAuth,
  type DecodeReason, type Key, type Message, type ResultCode, type StitchLegs, type StitchRecord, type SwitchInfo,
  RESULT_CODES,
} from '../switch/protocol.ts';
import type { StitchState, StitchStatus } from '../switch/stitch-types.ts';

const KEY: Key = { id: 0x01020304, secret: Buffer.alloc(32, 0xa5) };
const PER_CATEGORY = 100_000;
const BOOT = '0011223344556677';

/** xorshift32: the fuzz is reproducible run to run. */
function rng(seed: number) {
  let x = seed >>> 0 || 1;
  const next = () => { x ^= x << 13; x >>>= 0; x ^= x >>> 17; x ^= x << 5; x >>>= 0; return x; };
  return {
    int: (n: number) => (n <= 0 ? 0 : next() % n),
    bytes(n: number) { const b = Buffer.allocUnsafe(n); for (let i = 0; i < n; i++) b[i] = next() & 0xff; return b; },
  };
}

// ---------------------------------------------------------------------------------------------
// Seeds: valid encodings of every kind
// ---------------------------------------------------------------------------------------------

let nonceCounter = 0;
const nonce = () => (nonceCounter++).toString(16).padStart(24, '0');
const auth = (sequence = 1n) => ({ keyId: KEY.id, sequence });
const legs: StitchLegs = {
  clientLeg: { client: { address: '198.18.0.1', port: 40001 }, shell: { address: '198.18.1.2', port: 443 } },
  coreLeg: { shell: { address: '198.18.1.2', port: 50002 }, core: { address: '198.19.0.3', port: 9000 } },
  clientOffset: 1n << 40n, corePreambleLength: 64, shellOffset: 5000n, coreAnswerLength: 16,
};
const status: StitchStatus = { id: 9, state: 'stitched', packetsClientToCore: 1, packetsCoreToClient: 2, bytesClientToCore: 3, bytesCoreToClient: 4, shellPacketsDropped: 5 };
const info: SwitchInfo = {
  switchId: '0123456789abcdef', controlAddress: '198.18.1.1', controlPort: 7807, versions: { min: 1, max: 1 },
  translations: ['addr', 'port', 'seq', 'ack'], authAlgorithms: ['hmac-sha256'], tableSize: 100, freeSlots: 99,
};
const record = (id: number): StitchRecord => ({ status: { ...status, id }, spec: { id, ...legs } });
const resp = (opcode: Message['opcode'], result: ResultCode = 'SUCCESS') => ({ kind: 'response' as const, opcode, result, nonce: nonce(), bootId: BOOT, epoch: 77 });
const req = (opcode: Message['opcode']) => ({ kind: 'request' as const, opcode, nonce: nonce(), bootId: BOOT });
const enc = (m: Message) => encode(m, m.auth ? KEY : undefined);

/** Appends an option in front of AUTH (or at the end) and re-signs. */
function withOption(b: Buffer, code: number, data: Buffer): Buffer {
  const hasAuth = b.length >= AUTH_OPTION_SIZE && b[b.length - AUTH_OPTION_SIZE] === 1 && b.readUInt16BE(b.length - AUTH_OPTION_SIZE + 2) === 44;
  const cut = hasAuth ? b.length - AUTH_OPTION_SIZE : b.length;
  const opt = Buffer.alloc(4 + ((data.length + 3) & ~3));
  opt[0] = code; opt.writeUInt16BE(data.length, 2); data.copy(opt, 4);
  return resign(Buffer.concat([b.subarray(0, cut), opt, b.subarray(cut)]));
}

/** If the datagram ends in something shaped like AUTH, recompute its MAC with the test key. */
function resign(b: Buffer): Buffer {
  const a = b.length - AUTH_OPTION_SIZE;
  if (a >= 0 && b[a] === 1 && b.readUInt16BE(a + 2) === 44 && b.readUInt32BE(a + 4) === KEY.id) {
    computeMac(KEY.secret, b.subarray(0, b.length - 32)).copy(b, b.length - 32);
  }
  return b;
}

interface Category { name: string; seeds: Buffer[]; /** region mutations focus on, per seed: [start, end) from the end if negative */ focus?: (b: Buffer) => [number, number] }

const authRegion = (b: Buffer): [number, number] => [b.length - AUTH_OPTION_SIZE, b.length];
const categories: Category[] = [
  { name: 'DISCOVER request', seeds: [enc({ ...req('discover'), padding: 40 } as Message), enc({ ...req('discover'), auth: auth() } as Message), enc(req('discover') as Message)] },
  { name: 'STITCH request', seeds: [enc({ ...req('stitch'), legs, auth: auth() } as Message)] },
  { name: 'UNSTITCH request', seeds: [enc({ ...req('unstitch'), id: 9, auth: auth() } as Message)] },
  { name: 'QUERY request', seeds: [enc({ ...req('query'), id: 0, cursor: 3, auth: auth() } as Message), enc({ ...req('query'), id: 4, cursor: 0, auth: auth() } as Message)] },
  { name: 'STITCH_MANY request', seeds: [enc({ ...req('stitchMany'), legs: [legs, { ...legs, clientOffset: 99n }, legs], auth: auth() } as Message)] },
  { name: 'NOTIFY request', seeds: [enc({ ...req('notify'), status: { ...status, state: 'closed', reason: 'fin' }, auth: auth() } as Message)] },
  { name: 'DISCOVER response', seeds: [enc({ ...resp('discover'), info } as Message), enc({ ...resp('discover'), info, auth: auth() } as Message)] },
  { name: 'STITCH response', seeds: [enc({ ...resp('stitch'), stitch: { id: 9, state: 'draining', existing: true }, auth: auth() } as Message)] },
  { name: 'STITCH_MANY response', seeds: [enc({ ...resp('stitchMany'), entries: [{ result: 'SUCCESS', stitch: { id: 9, state: 'draining', existing: false } }, { result: 'UNTRACKED_LEG' }, { result: 'SUCCESS', stitch: { id: 9, state: 'stitched', existing: true } }], auth: auth() } as Message)] },
  { name: 'UNSTITCH response', seeds: [enc({ ...resp('unstitch'), status, auth: auth() } as Message)] },
  { name: 'QUERY response', seeds: [enc({ ...resp('query'), query: { stitches: [record(1), record(2), record(3)], more: true }, auth: auth() } as Message), enc({ ...resp('query'), query: { stitches: [], more: false }, auth: auth() } as Message)] },
  { name: 'NOTIFY response', seeds: [enc({ ...resp('notify'), epoch: 0, auth: auth() } as Message)] },
  { name: 'error responses', seeds: [
    encodeBareResponse({ opcode: 2, nonce: nonce(), result: 'REPLAYED', bootId: BOOT, epoch: 1 }),
    encodeBareResponse({ opcode: 99, nonce: nonce(), result: 'UNSUPP_OPCODE', bootId: BOOT, epoch: 1 }),
    enc({ ...resp('stitch', 'NOT_OWNER'), auth: auth() } as Message),
  ] },
  { name: 'option AUTH', seeds: [enc({ ...req('stitch'), legs, auth: auth() } as Message), enc({ ...resp('unstitch'), status, auth: auth() } as Message)], focus: authRegion },
  { name: 'option PADDING', seeds: [enc({ ...req('discover'), padding: 40 } as Message), enc({ ...req('unstitch'), id: 1, padding: 5, auth: auth() } as Message), enc({ ...resp('query', 'NOT_FOUND'), padding: 0 } as Message)],
    focus: (b) => [RESPONSE_HEADER_SIZE - 4, Math.min(b.length, REQUEST_HEADER_SIZE + 52)] },
  { name: 'unknown options', seeds: [
    withOption(enc({ ...req('query'), id: 0, cursor: 0, auth: auth() } as Message), 200, Buffer.from('optional')),
    withOption(enc({ ...req('query'), id: 0, cursor: 0, auth: auth() } as Message), 17, Buffer.from('mandatory')),
    withOption(enc({ ...resp('stitch', 'BAD_LEGS') } as Message), 128 + 77, Buffer.alloc(3)),
  ], focus: (b) => [REQUEST_HEADER_SIZE + 8, b.length] },
];

// ---------------------------------------------------------------------------------------------
// Mutations
// ---------------------------------------------------------------------------------------------

type R = ReturnType<typeof rng>;

function mutate(r: R, seed: Buffer, focus?: [number, number]): Buffer {
  let b = Buffer.from(seed);
  const pos = () => (focus && r.int(4) !== 0 ? focus[0] + r.int(Math.max(1, focus[1] - focus[0])) : r.int(b.length));
  const rounds = 1 + r.int(3);
  for (let k = 0; k < rounds; k++) {
    if (b.length === 0) b = r.bytes(4);
    switch (r.int(11)) {
      case 0: { const p = pos(); if (p < b.length) b[p]! ^= 1 << r.int(8); break; }           // bit flip
      case 1: { const p = pos(); if (p < b.length) b[p] = r.int(256); break; }                // byte change
      case 2: b = b.subarray(0, r.int(b.length + 1)); break;                                   // truncate anywhere
      case 3: b = b.subarray(0, b.length - 4 * (1 + r.int(Math.max(1, b.length >> 2)))); break; // truncate, aligned
      case 4: b = Buffer.concat([b, r.bytes(r.int(3) === 0 ? 1 + r.int(3) : 4 * (1 + r.int(30)))]); break; // extend
      case 5: {                                                                                 // a 16-bit length/count field
        const p = (pos() & ~3) + 2;
        if (p + 2 <= b.length) b.writeUInt16BE([0, 1, 3, 4, 43, 44, 45, 0xffff, r.int(0x10000)][r.int(9)]!, p);
        break;
      }
      case 6: {                                                                                 // header fields
        const f = r.int(4);
        if (f === 0) b[0] = r.int(4);
        else if (f === 1) b[1] = r.int(256);
        else if (f === 2) b[1]! ^= 0x80;
        else if (b.length > 3) b[3] = [0, 1, 5, 7, 64, 71, 72, 73, 200][r.int(9)]!;
        break;
      }
      case 7: {                                                                                 // insert an option
        const o = Buffer.alloc(4 + 4 * r.int(4));
        o[0] = [1, 128, 0, 127, 255, r.int(256)][r.int(6)]!;
        o.writeUInt16BE(r.int(3) === 0 ? r.int(0x10000) : r.int(o.length - 3), 2);
        const at = Math.min(b.length, (pos() & ~3));
        b = Buffer.concat([b.subarray(0, at), o, b.subarray(at)]);
        break;
      }
      case 8: {                                                                                 // duplicate a word-aligned region
        const s = pos() & ~3, len = 4 * (1 + r.int(12));
        b = Buffer.concat([b.subarray(0, s + len), b.subarray(s, s + len), b.subarray(s + len)]);
        break;
      }
      case 9: { const s = pos() & ~3; b = Buffer.concat([b.subarray(0, s), b.subarray(s + 4 * (1 + r.int(4)))]); break; } // delete words
      default: { const p = pos(); const n = Math.min(b.length - p, 1 + r.int(16)); if (n > 0) r.bytes(n).copy(b, p); break; } // splat
    }
  }
  if (b.length > 1200) b = b.subarray(0, 1200);
  return r.int(2) === 0 ? resign(Buffer.from(b)) : b;
}

function randomDatagram(r: R, like: Buffer): Buffer {
  const n = r.int(3) === 0 ? r.int(64) : r.int(1200);
  const b = r.bytes(n);
  // Half keep the seed's version and R|opcode, so random bytes reach past the first checks.
  if (r.int(2) === 0 && n >= 2) { b[0] = like[0]!; b[1] = like[1]!; }
  return b;
}

// ---------------------------------------------------------------------------------------------

type Tally = Record<DecodeReason | 'accepted', number>;
const report: Array<{ category: string; total: number; tally: Tally }> = [];

describe('protocol fuzz', function () {
  this.timeout(120_000);

  after(() => {
    if (process.env.TCP_STITCH_FUZZ_REPORT) {
      for (const { category, total, tally } of report) {
        const nz = Object.entries(tally).filter(([, v]) => v > 0).map(([k, v]) => `${k}=${v}`).join(' ');
        console.log(`    ${category}: ${total} datagrams: ${nz}`);
      }
    }
  });

  categories.forEach((cat, ci) => {
    it(`protocol fuzz - ${cat.name}: ${PER_CATEGORY.toLocaleString('en')} random and mutated datagrams, only counted ProtocolErrors`, () => {
      // Seeds are well-formed for their category; some are meant to be refused (unknown opcode, unknown mandatory option).
      assert.ok(cat.seeds.some((s) => { try { decode(s, KEY); return true; } catch { return false; } }), `${cat.name}: a seed must decode`);
      const r = rng(0x5eed + ci);
      const tally = Object.fromEntries([...DECODE_REASONS, 'accepted'].map((k) => [k, 0])) as Tally;
      for (let i = 0; i < PER_CATEGORY; i++) {
        const seed = cat.seeds[r.int(cat.seeds.length)]!;
        const d = r.int(10) === 0 ? randomDatagram(r, seed) : mutate(r, seed, cat.focus?.(seed));
        let m: Message;
        try {
          m = decode(d, KEY);
        } catch (err) {
          if (!isControlProtocolError(err) || !DECODE_REASONS.includes(err.reason)) {
            assert.fail(`decode threw ${String(err)} for ${d.toString('hex')}`);
          }
          tally[err.reason]++;
          continue;
        }
        tally.accepted++;
        // What decodes must be representable: encode it again, and get the same message back.
        let again: Buffer;
        try { again = encode(m, m.auth ? KEY : undefined); } catch (err) {
          assert.fail(`decoded message does not re-encode (${String(err)}): ${d.toString('hex')}`);
        }
        assert.deepStrictEqual(decode(again, KEY), m, `not canonical: ${d.toString('hex')}`);
      }
      const counted = Object.values(tally).reduce((a, b) => a + b, 0);
      assert.equal(counted, PER_CATEGORY, 'every datagram is accepted or counted under one reason');
      const rejected = PER_CATEGORY - tally.accepted;
      assert.ok(rejected > PER_CATEGORY / 2, `${cat.name}: most mutations must be rejected (${rejected})`);
      assert.ok(tally.accepted > 0, `${cat.name}: some mutations must still decode (the fuzz reaches the end of the parser)`);
      report.push({ category: cat.name, total: PER_CATEGORY, tally });
    });
  });

  it('protocol fuzz - the mutations together reach every decode reason', () => {
    const seen = new Set<string>();
    for (const { tally } of report) for (const [k, v] of Object.entries(tally)) if (v > 0) seen.add(k);
    const missing = DECODE_REASONS.filter((x) => !seen.has(x));
    assert.deepStrictEqual(missing, [], `reasons never produced: ${missing.join(', ')}`);
  });

  it('protocol fuzz - arbitrary bytes never make decode throw anything but a counted ProtocolError', () => {
    fc.assert(fc.property(fc.uint8Array({ maxLength: 1200 }), (bytes) => {
      try { decode(Buffer.from(bytes), KEY); } catch (err) {
        return isControlProtocolError(err) && DECODE_REASONS.includes(err.reason);
      }
      return true;
    }), { numRuns: 20_000 });
  });

  // -------------------------------------------------------------------------------------------
  // Round trip over generated messages of every kind
  // -------------------------------------------------------------------------------------------

  const hex = (n: number) => fc.uint8Array({ minLength: n, maxLength: n }).map((a) => Buffer.from(a).toString('hex'));
  const ipv4 = fc.tuple(fc.nat(255), fc.nat(255), fc.nat(255), fc.nat(255)).map((p) => p.join('.'));
  const endpoint = fc.record({ address: ipv4, port: fc.nat(65535) });
  const u64 = fc.bigInt({ min: 0n, max: (1n << 64n) - 1n });
  const u32 = fc.nat({ max: 0xffff_ffff });
  const id = fc.integer({ min: 1, max: 0xffff_ffff });
  const arbLegs: fc.Arbitrary<StitchLegs> = fc.record({
    clientLeg: fc.record({ client: endpoint, shell: endpoint }),
    coreLeg: fc.record({ shell: endpoint, core: endpoint }),
    clientOffset: u64, corePreambleLength: u32, shellOffset: u64, coreAnswerLength: u32,
  });
  const state = fc.constantFrom(...(Object.keys(STITCH_STATES) as StitchState[]));
  const arbStatus: fc.Arbitrary<StitchStatus> = fc.record({
    id, state,
    packetsClientToCore: fc.maxSafeNat(), packetsCoreToClient: fc.maxSafeNat(), bytesClientToCore: fc.maxSafeNat(),
    bytesCoreToClient: fc.maxSafeNat(), shellPacketsDropped: fc.maxSafeNat(),
    reason: fc.constantFrom(...Object.keys(STATUS_REASONS)),
  }, { requiredKeys: ['id', 'state', 'packetsClientToCore', 'packetsCoreToClient', 'bytesClientToCore', 'bytesCoreToClient', 'shellPacketsDropped'] });
  const arbRecord: fc.Arbitrary<StitchRecord> = fc.tuple(arbStatus, arbLegs).map(([s, l]) => ({ status: s, spec: { id: s.id, ...l } }));
  const arbInfo: fc.Arbitrary<SwitchInfo> = fc.record({
    switchId: hex(8), controlAddress: ipv4, controlPort: fc.nat(65535),
    versions: fc.tuple(fc.integer({ min: 1, max: 255 }), fc.integer({ min: 1, max: 255 })).map(([a, b]) => ({ min: Math.min(a, b), max: Math.max(a, b) })),
    translations: fc.subarray([...TRANSLATIONS]), authAlgorithms: fc.subarray(['hmac-sha256' as const]),
    tableSize: u32, freeSlots: u32,
  });
  const results = Object.keys(RESULT_CODES) as ResultCode[];
  // Sizes stay under 1100 bytes: at most 5 QUERY records, 8 STITCH_MANY legs and 200 bytes of padding.
  const common = fc.record({ nonce: hex(12), bootId: hex(8), padding: fc.option(fc.nat(200), { nil: undefined }), signed: fc.boolean(), sequence: u64 });

  const arbMessage: fc.Arbitrary<Message> = fc.tuple(
    common,
    fc.oneof(
      fc.constant({ kind: 'request', opcode: 'discover' }),
      arbLegs.map((l) => ({ kind: 'request', opcode: 'stitch', legs: l })),
      id.map((i) => ({ kind: 'request', opcode: 'unstitch', id: i })),
      fc.oneof(id.map((i) => ({ id: i, cursor: 0 })), u32.map((c) => ({ id: 0, cursor: c }))).map((q) => ({ kind: 'request', opcode: 'query', ...q })),
      arbStatus.map((s) => ({ kind: 'request', opcode: 'notify', status: s })),
      fc.array(arbLegs, { minLength: 1, maxLength: 8 }).map((ls) => ({ kind: 'request', opcode: 'stitchMany', legs: ls })),
      fc.tuple(fc.constantFrom(...results), arbInfo).map(([res, i]) => ({ kind: 'response', opcode: 'discover', result: res, ...(res === 'SUCCESS' && { info: i }) })),
      fc.tuple(fc.constantFrom(...results), id, state, fc.boolean()).map(([res, i, st, ex]) => ({ kind: 'response', opcode: 'stitch', result: res, ...(res === 'SUCCESS' && { stitch: { id: i, state: st, existing: ex } }) })),
      fc.tuple(fc.constantFrom(...results), arbStatus).map(([res, s]) => ({ kind: 'response', opcode: 'unstitch', result: res, ...(res === 'SUCCESS' && { status: s }) })),
      fc.tuple(fc.constantFrom(...results), fc.array(arbRecord, { maxLength: 5 }), fc.boolean()).map(([res, recs, more]) => ({ kind: 'response', opcode: 'query', result: res, ...(res === 'SUCCESS' && { query: { stitches: recs, more } }) })),
      fc.constantFrom(...results).map((res) => ({ kind: 'response', opcode: 'notify', result: res })),
      fc.tuple(fc.constantFrom(...results), fc.array(fc.tuple(fc.constantFrom(...results), id, state, fc.boolean()), { minLength: 1, maxLength: 10 })).map(([res, es]) => ({
        kind: 'response', opcode: 'stitchMany', result: res,
        ...(res === 'SUCCESS' && { entries: es.map(([r, i, st, ex]) => (r === 'SUCCESS' ? { result: r, stitch: { id: i, state: st, existing: ex } } : { result: r })) }),
      })),
    ),
    u32,
  ).map(([c, body, epoch]) => {
    const b = body as Record<string, unknown> & { kind: 'request' | 'response'; opcode: Message['opcode']; result?: ResultCode };
    const m: Record<string, unknown> = { ...b, nonce: c.nonce, bootId: c.bootId };
    if (b.kind === 'response') m.epoch = epoch;
    if (c.padding !== undefined) m.padding = c.padding;
    if (c.signed || requiresAuth(b.opcode, b.kind === 'response', b.result)) m.auth = { keyId: KEY.id, sequence: c.sequence };
    return structuredClone(m) as unknown as Message; // plain objects (fast-check builds null-prototype records)
  });

  it('protocol fuzz - round trip: decode(encode(m)) deep-equals m for generated messages of every kind', () => {
    fc.assert(fc.property(arbMessage, (m) => {
      const b = encode(m, m.auth ? KEY : undefined);
      assert.ok(b.length % 4 === 0 && b.length <= 1100);
      assert.deepStrictEqual(decode(b, KEY), m);
    }), { numRuns: 30_000 });
  });
});
