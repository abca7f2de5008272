// The control protocol codec against its specification: the hex examples are read out of
// docs/protocol.md, so the document and the code cannot drift apart; then one test per rule.
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { InvalidArgumentError, ProtocolError } from '../sdk/errors.ts';
import {
  AUTH_OPTION_SIZE, DECODE_REASONS, DISCOVER_REPLY_SIZE, MAX_MESSAGE_SIZE, MAX_QUERY_RECORDS, MAX_STITCH_MANY, OPCODES, PROTOCOL_VERSION,
  REQUEST_HEADER_SIZE, computeMac, decode, encode, encodeBareResponse, isControlProtocolError, messageFromJson, newNonce,
  readPrefix, type DecodeReason, type Key, type Message, type StitchLegs,
} from '../switch/protocol.ts';
import { formatKeyFile, generateKey, generateKeyFile, parseKeyFile } from '../switch/keys.ts';

const DOC = fileURLToPath(new URL('../docs/protocol.md', import.meta.url));
const doc = readFileSync(DOC, 'utf8');

/** The fixed test key the document gives. */
const DOC_KEY: Key = parseKeyFile(/```\n(key 42 hmac-sha256 [0-9a-f]{64})\n```/.exec(doc)![1]!, 'docs/protocol.md')[0]!;

interface Example { id: string; json?: string; hex?: string }
function examples(): Example[] {
  const byId = new Map<string, Example>();
  for (const m of doc.matchAll(/```(json|hex) example=([a-z0-9-]+)\n([\s\S]*?)```/g)) {
    const [, kind, id, body] = m as unknown as [string, 'json' | 'hex', string, string];
    const e = byId.get(id) ?? { id };
    assert.equal(e[kind], undefined, `example ${id} has two ${kind} blocks`);
    e[kind] = kind === 'hex' ? body.split('\n').map((l) => l.replace(/#.*$/, '').replace(/\s+/g, '')).join('') : body;
    byId.set(id, e);
  }
  return [...byId.values()];
}

function reasonOf(fn: () => unknown): DecodeReason | 'no error' {
  try { fn(); } catch (err) {
    assert.ok(err instanceof ProtocolError, `expected a ProtocolError, got ${String(err)}`);
    assert.ok(isControlProtocolError(err));
    return err.reason;
  }
  return 'no error';
}

const KEY: Key = { id: 7, secret: Buffer.alloc(32, 0x5a) };
const legs: StitchLegs = {
  clientLeg: { client: { address: '198.18.0.1', port: 40001 }, shell: { address: '198.18.1.2', port: 443 } },
  coreLeg: { shell: { address: '198.18.1.2', port: 50002 }, core: { address: '198.19.0.3', port: 9000 } },
  clientOffset: 10n, corePreambleLength: 64, shellOffset: 20n, coreAnswerLength: 16,
};
const stitchReq = (seq = 1n): Message =>
  ({ kind: 'request', opcode: 'stitch', nonce: newNonce(), bootId: '0102030405060708', legs, auth: { keyId: KEY.id, sequence: seq } });

/** Puts an option in front of AUTH and re-signs, as a sender that knows the option would. */
function withOption(signed: Buffer, code: number, data: Buffer, key: Key = KEY): Buffer {
  const body = signed.subarray(0, signed.length - AUTH_OPTION_SIZE);
  const auth = Buffer.from(signed.subarray(signed.length - AUTH_OPTION_SIZE));
  const opt = Buffer.alloc(4 + ((data.length + 3) & ~3));
  opt[0] = code; opt.writeUInt16BE(data.length, 2); data.copy(opt, 4);
  const out = Buffer.concat([body, opt, auth]);
  computeMac(key.secret, out.subarray(0, out.length - 32)).copy(out, out.length - 32);
  return out;
}

describe('protocol', () => {
  describe('docs/protocol.md examples', () => {
    const all = examples();

    it('protocol.md - has examples of every opcode in both directions, and the bare replies', () => {
      const ids = new Set(all.map((e) => e.id));
      for (const name of Object.keys(OPCODES)) {
        const op = name.replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`); // stitchMany: stitch-many
        assert.ok([...ids].some((id) => id.startsWith(`${op}-request`)), `no ${op} request example`);
        assert.ok([...ids].some((id) => id.startsWith(`${op}-response`) || id === `${op}-ack`), `no ${op} response example`);
      }
      for (const id of ['replayed-response', 'unsupp-version-response', 'stale-boot-response']) assert.ok(ids.has(id), id);
      for (const e of all) {
        assert.ok(e.json && e.hex, `example ${e.id} needs a json and a hex block`);
      }
    });

    for (const e of all) {
      it(`protocol.md - ${e.id}: encode gives the hex, decode gives the JSON`, () => {
        const msg = messageFromJson(e.json!);
        const bytes = Buffer.from(e.hex!, 'hex');
        assert.equal(bytes.toString('hex'), e.hex!.toLowerCase(), 'hex block is valid hex');
        assert.equal(encode(msg, msg.auth ? DOC_KEY : undefined).toString('hex'), e.hex!.toLowerCase());
        assert.deepStrictEqual(decode(bytes, DOC_KEY), msg);
      });
    }

    it('protocol.md - the unauthenticated DISCOVER request is exactly as large as its reply', () => {
      const req = all.find((e) => e.id === 'discover-request')!;
      const res = all.find((e) => e.id === 'discover-response')!;
      assert.equal(req.hex!.length / 2, DISCOVER_REPLY_SIZE);
      assert.equal(res.hex!.length / 2, DISCOVER_REPLY_SIZE);
    });
  });

  describe('codec', () => {
    it('codec - round-trips a STITCH request', () => {
      const m = stitchReq();
      assert.deepStrictEqual(decode(encode(m, KEY), KEY), m);
    });

    it('codec - truncated messages are rejected as truncated', () => {
      const b = encode(stitchReq(), KEY);
      assert.equal(reasonOf(() => decode(Buffer.alloc(0))), 'truncated');
      assert.equal(reasonOf(() => decode(b.subarray(0, 12))), 'truncated');
      // Header present, body cut (AUTH gone too, but the body is checked first).
      assert.equal(reasonOf(() => decode(b.subarray(0, REQUEST_HEADER_SIZE + 40), KEY)), 'truncated');
      const resp = encodeBareResponse({ opcode: 1, nonce: newNonce(), result: 'REPLAYED', bootId: '0102030405060708', epoch: 1 });
      assert.equal(reasonOf(() => decode(resp.subarray(0, 24))), 'truncated');
    });

    it('codec - an oversized message is rejected as oversized, and encode refuses to make one', () => {
      const b = Buffer.concat([encode(stitchReq(), KEY), Buffer.alloc(MAX_MESSAGE_SIZE)]).subarray(0, MAX_MESSAGE_SIZE + 4);
      assert.equal(reasonOf(() => decode(b, KEY)), 'oversized');
      const m: Message = { kind: 'request', opcode: 'discover', nonce: newNonce(), bootId: '0000000000000000', padding: MAX_MESSAGE_SIZE };
      assert.throws(() => encode(m), InvalidArgumentError);
      const q = Array.from({ length: MAX_QUERY_RECORDS + 1 }, (_, i) => ({
        status: { id: i + 1, state: 'stitched' as const, packetsClientToCore: 0, packetsCoreToClient: 0, bytesClientToCore: 0, bytesCoreToClient: 0, shellPacketsDropped: 0 },
        spec: { id: i + 1, ...legs },
      }));
      const big: Message = { kind: 'response', opcode: 'query', result: 'SUCCESS', nonce: newNonce(), bootId: '0102030405060708', epoch: 0, query: { stitches: q, more: false }, auth: { keyId: KEY.id, sequence: 1n } };
      assert.throws(() => encode(big, KEY), InvalidArgumentError);
      assert.doesNotThrow(() => encode({ ...big, query: { stitches: q.slice(1), more: true } } as Message, KEY));
    });

    it('codec - a misaligned message is rejected as misaligned', () => {
      const b = encode(stitchReq(), KEY);
      for (const extra of [1, 2, 3]) {
        assert.equal(reasonOf(() => decode(Buffer.concat([b, Buffer.alloc(extra)]), KEY)), 'misaligned');
      }
      assert.equal(reasonOf(() => decode(b.subarray(0, 17))), 'misaligned');
    });

    it('codec - wrong key: the MAC does not verify (bad-mac)', () => {
      const b = encode(stitchReq(), KEY);
      assert.equal(reasonOf(() => decode(b, { id: KEY.id, secret: Buffer.alloc(32, 0x5b) })), 'bad-mac');
      const flipped = Buffer.from(b); flipped[30]! ^= 0x01;
      assert.equal(reasonOf(() => decode(flipped, KEY)), 'bad-mac');
    });

    it('codec - unknown key id (unknown-key), also when no key is held at all', () => {
      const b = encode(stitchReq(), KEY);
      assert.equal(reasonOf(() => decode(b, { id: 8, secret: KEY.secret })), 'unknown-key');
      assert.equal(reasonOf(() => decode(b)), 'unknown-key');
      assert.equal(reasonOf(() => decode(b, [{ id: 1, secret: KEY.secret }, KEY])), 'no error');
      assert.equal(reasonOf(() => decode(b, (id) => (id === 7 ? KEY.secret : undefined))), 'no error');
    });

    it('codec - an unknown must-understand option is rejected, an unknown optional option is ignored', () => {
      const m = stitchReq();
      const b = encode(m, KEY);
      assert.equal(reasonOf(() => decode(withOption(b, 77, Buffer.from('abcde')), KEY)), 'unknown-mandatory-option');
      assert.equal(reasonOf(() => decode(withOption(b, 0, Buffer.alloc(0)), KEY)), 'unknown-mandatory-option');
      assert.deepStrictEqual(decode(withOption(b, 200, Buffer.from('abcde')), KEY), m);
      assert.deepStrictEqual(decode(withOption(b, 255, Buffer.alloc(0)), KEY), m);
    });

    it('codec - an unsupported version is rejected (bad-version) with the prefix still readable', () => {
      const b = encode(stitchReq(), KEY);
      b[0] = 2;
      let err: unknown;
      try { decode(b, KEY); } catch (e) { err = e; }
      assert.ok(isControlProtocolError(err));
      assert.equal(err.reason, 'bad-version');
      assert.deepStrictEqual(err.prefix, readPrefix(b));
      assert.equal(err.prefix!.version, 2);
    });

    it('codec - unknown opcode and unknown result code are rejected', () => {
      const b = encode(stitchReq(), KEY);
      b[1] = 0x33;
      assert.equal(reasonOf(() => decode(b, KEY)), 'bad-opcode');
      const r = encodeBareResponse({ opcode: 2, nonce: newNonce(), result: 'NOT_FOUND', bootId: '0102030405060708', epoch: 1 });
      r[3] = 99;
      assert.equal(reasonOf(() => decode(r)), 'bad-result');
    });

    it('codec - a request that needs AUTH and has none is rejected (missing-auth)', () => {
      // Build an unauthenticated STITCH by hand: encode refuses to.
      const signed = encode(stitchReq(), KEY);
      const bare = signed.subarray(0, signed.length - AUTH_OPTION_SIZE);
      assert.equal(reasonOf(() => decode(bare, KEY)), 'missing-auth');
      assert.throws(() => encode({ ...stitchReq(), auth: undefined } as unknown as Message), InvalidArgumentError);
    });

    it('codec - option framing: bad length, duplicates, AUTH not last', () => {
      const b = encode(stitchReq(), KEY);
      const longer = Buffer.from(b); longer.writeUInt16BE(300, b.length - AUTH_OPTION_SIZE + 2);
      assert.equal(reasonOf(() => decode(longer, KEY)), 'bad-option-length');
      const shorter = Buffer.from(b); shorter.writeUInt16BE(40, b.length - AUTH_OPTION_SIZE + 2);
      assert.equal(reasonOf(() => decode(shorter, KEY)), 'bad-option-length');
      const pad = withOption(withOption(b, 128, Buffer.alloc(4)), 128, Buffer.alloc(4));
      assert.equal(reasonOf(() => decode(pad, KEY)), 'duplicate-option');
      const authFirst = Buffer.concat([b, Buffer.from([200, 0, 0, 0])]);
      assert.equal(reasonOf(() => decode(authFirst, KEY)), 'auth-not-last');
    });

    it('codec - STITCH_MANY: 1 to 10 legs; a count out of range is judged after the MAC (bad-field), one past the datagram is truncated', () => {
      const many = (n: number): Message => ({ kind: 'request', opcode: 'stitchMany', nonce: newNonce(), bootId: '0102030405060708', legs: Array.from({ length: n }, () => legs), auth: { keyId: KEY.id, sequence: 1n } });
      assert.equal(MAX_STITCH_MANY, 10);
      assert.ok(encode(many(10), KEY).length <= MAX_MESSAGE_SIZE);
      assert.throws(() => encode(many(0), KEY), /STITCH_MANY carries 1 to 10 legs, got 0/);
      assert.throws(() => encode(many(11), KEY), /STITCH_MANY carries 1 to 10 legs, got 11/);
      const b = encode(many(2), KEY);
      b[REQUEST_HEADER_SIZE] = 0; // count 0, now 96 bytes of legs read as options
      assert.equal(reasonOf(() => decode(b, KEY)), 'bad-option-length', 'the bytes after a 4-byte body are no options');
      const two = encode(many(2), KEY);
      two[REQUEST_HEADER_SIZE] = 3;
      assert.equal(reasonOf(() => decode(two, KEY)), 'truncated');
      const one = encode(many(1), KEY);
      const zero = Buffer.concat([one.subarray(0, REQUEST_HEADER_SIZE + 4), one.subarray(one.length - AUTH_OPTION_SIZE)]);
      zero[REQUEST_HEADER_SIZE] = 0;
      assert.equal(reasonOf(() => decode(zero, KEY)), 'bad-mac', 'the MAC is checked first');
      computeMac(KEY.secret, zero.subarray(0, zero.length - 32)).copy(zero, zero.length - 32);
      assert.equal(reasonOf(() => decode(zero, KEY)), 'bad-field');
    });

    it('codec - body fields: non-mapped address, zero id, unknown state', () => {
      const b = encode(stitchReq(), KEY);
      const resign = (x: Buffer) => { computeMac(KEY.secret, x.subarray(0, x.length - 32)).copy(x, x.length - 32); return x; };
      const v6 = Buffer.from(b); v6[REQUEST_HEADER_SIZE + 10] = 0xfe;
      assert.equal(reasonOf(() => decode(resign(v6), KEY)), 'bad-address');
      const un: Message = { kind: 'request', opcode: 'unstitch', nonce: newNonce(), bootId: '0102030405060708', id: 5, auth: { keyId: 7, sequence: 3n } };
      const u = encode(un, KEY); u.writeUInt32BE(0, REQUEST_HEADER_SIZE);
      assert.equal(reasonOf(() => decode(resign(u), KEY)), 'bad-field');
      const status = { id: 5, state: 'closed' as const, packetsClientToCore: 1, packetsCoreToClient: 2, bytesClientToCore: 3, bytesCoreToClient: 4, shellPacketsDropped: 5, reason: 'rst' };
      const n = encode({ kind: 'request', opcode: 'notify', nonce: newNonce(), bootId: '0102030405060708', status, auth: { keyId: 7, sequence: 9n } }, KEY);
      assert.deepStrictEqual((decode(n, KEY) as { status: unknown }).status, status);
      n[REQUEST_HEADER_SIZE + 4] = 9;
      assert.equal(reasonOf(() => decode(resign(n), KEY)), 'bad-field');
    });

    it('codec - every decode failure is a ProtocolError with a reason from the fixed set', () => {
      assert.ok(DECODE_REASONS.includes('truncated'));
      for (const len of [0, 4, 15, 16, 20, 24, 28, 100]) {
        const r = reasonOf(() => decode(Buffer.alloc(len, 0xff), KEY));
        assert.ok(r === 'no error' || DECODE_REASONS.includes(r), r);
      }
    });

    it('codec - encode refuses what it cannot represent', () => {
      const base = stitchReq();
      const bad = (patch: Record<string, unknown>) => () => encode({ ...base, ...patch } as Message, KEY);
      assert.throws(bad({ nonce: 'xyz' }), InvalidArgumentError);
      assert.throws(bad({ bootId: '01' }), InvalidArgumentError);
      assert.throws(bad({ legs: { ...legs, clientOffset: -1n } }), InvalidArgumentError);
      assert.throws(bad({ legs: { ...legs, clientLeg: { ...legs.clientLeg, client: { address: '::1', port: 1 } } } }), InvalidArgumentError);
      assert.throws(bad({ legs: { ...legs, corePreambleLength: 2 ** 32 } }), InvalidArgumentError);
      assert.throws(() => encode(base, { id: 8, secret: KEY.secret }), InvalidArgumentError);
      assert.throws(() => encode(base), InvalidArgumentError);
    });

    it('codec - version and sizes are as documented', () => {
      assert.equal(PROTOCOL_VERSION, 1);
      assert.equal(MAX_MESSAGE_SIZE, 1100);
      assert.equal(MAX_QUERY_RECORDS, 7);
    });
  });

  describe('keys', () => {
    it('keys - a generated key file parses back to the same key', () => {
      const k = generateKey();
      assert.deepStrictEqual(parseKeyFile(formatKeyFile([k])), [k]);
      const parsed = parseKeyFile(generateKeyFile());
      assert.equal(parsed.length, 1);
      assert.equal(parsed[0]!.secret.length, 32);
    });

    it('keys - bad key files are refused naming the line', () => {
      assert.throws(() => parseKeyFile(''), /no key/);
      assert.throws(() => parseKeyFile('# c\nkey 0 hmac-sha256 ' + '00'.repeat(32)), /line 2: key id/);
      assert.throws(() => parseKeyFile('key 1 hmac-md5 ' + '00'.repeat(32)), /unsupported algorithm/);
      assert.throws(() => parseKeyFile('key 1 hmac-sha256 abcd'), /64 hex digits/);
      assert.throws(() => parseKeyFile(`key 1 hmac-sha256 ${'00'.repeat(32)}\nkey 1 hmac-sha256 ${'11'.repeat(32)}`), /appears twice/);
      assert.throws(() => parseKeyFile('secret'), InvalidArgumentError);
    });
  });
});
