import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { encodePreamble, decodePreamble, checkPreambleHead, encodeAnswer, decodeAnswer, AnswerStatus, PREAMBLE_LENGTH, type Preamble } from '../sdk/preamble.ts';
import { PreambleError } from '../sdk/errors.ts';

const sample: Preamble = {
  connectionId: '00112233445566778899aabbccddeeff',
  clientOffset: 5n, shellOffset: 1n << 40n,
  client: { address: '198.18.1.2', port: 40000 }, shell: { address: '198.18.2.2', port: 8080 },
};
const key = Buffer.alloc(32, 7);

function reason(fn: () => unknown): string | undefined {
  try { fn(); } catch (e) { assert.ok(e instanceof PreambleError, `expected PreambleError, got ${e}`); return (e as PreambleError).reason; }
  return 'no error';
}

describe('preamble', () => {
  it('preamble - round-trips without and with a key', () => {
    const plain = encodePreamble(sample);
    assert.equal(plain.length, PREAMBLE_LENGTH);
    assert.deepEqual(decodePreamble(plain), sample);
    assert.deepEqual(decodePreamble(encodePreamble(sample, key), key), sample);
  });

  it('preamble - has the documented layout', () => {
    const b = encodePreamble(sample);
    assert.equal(b.subarray(0, 8).toString('hex'), '7453434c01010070');
    assert.equal(b.subarray(24, 40).toString('hex'), '00000000000000050000010000000000');
    assert.equal(b.subarray(40, 56).toString('hex'), '00000000000000000000ffffc6120102');
    assert.equal(b.readUInt16BE(56), 40000);
    assert.equal(b.readUInt16BE(58), 8080);
    assert.ok(b.subarray(80).equals(Buffer.alloc(32)), 'no key: zero MAC');
  });

  it('preamble - rejects a wrong or missing MAC when the core holds a key', () => {
    assert.equal(reason(() => decodePreamble(encodePreamble(sample), key)), 'not-authentic');
    assert.equal(reason(() => decodePreamble(encodePreamble(sample, Buffer.alloc(32, 8)), key)), 'not-authentic');
    const b = encodePreamble(sample, key); b[30] ^= 1;
    assert.equal(reason(() => decodePreamble(b, key)), 'not-authentic');
  });

  it('preamble - head check rejects garbage, bad version, kind and length after 8 bytes', () => {
    assert.equal(reason(() => checkPreambleHead(Buffer.from('GET / HTTP/1.1\r\n'))), 'bad-magic');
    const b = encodePreamble(sample);
    const v = Buffer.from(b); v[4] = 9;
    assert.equal(reason(() => checkPreambleHead(v)), 'bad-version');
    const k = Buffer.from(b); k[5] = 2;
    assert.equal(reason(() => checkPreambleHead(k)), 'bad-kind');
    const o = Buffer.from(b); o.writeUInt16BE(5000, 6);
    assert.equal(reason(() => checkPreambleHead(o)), 'oversized');
    assert.doesNotThrow(() => checkPreambleHead(b.subarray(0, 7)), 'undecided before 8 bytes');
  });

  it('preamble - truncated and unmapped addresses are rejected', () => {
    assert.equal(reason(() => decodePreamble(encodePreamble(sample).subarray(0, 100))), 'truncated');
    const b = encodePreamble(sample); b[50] = 0;
    assert.equal(reason(() => decodePreamble(b)), 'malformed');
  });

  it('preamble - encode validates its input', () => {
    assert.throws(() => encodePreamble({ ...sample, connectionId: 'xyz' }), /connectionId/);
    assert.throws(() => encodePreamble({ ...sample, clientOffset: -1n }), /clientOffset/);
    assert.throws(() => encodePreamble({ ...sample, client: { address: '::1', port: 1 } }), /client address/);
  });

  it('preamble - random bytes never crash the decoder', () => {
    for (let i = 0; i < 20000; i++) {
      const b = randomBytes(1 + (i % 130));
      if (i % 3 === 0) encodePreamble(sample).copy(b, 0, 0, Math.min(b.length, 8 + (i % 100)));
      try { checkPreambleHead(b); decodePreamble(b); } catch (e) { assert.ok(e instanceof PreambleError); }
    }
  });

  it('answer - round-trips and rejects foreign bytes', () => {
    for (const s of Object.values(AnswerStatus)) assert.equal(decodeAnswer(encodeAnswer(s)), s);
    assert.throws(() => decodeAnswer(Buffer.from('HTTP/1.1 200 OK\r\n')), PreambleError);
    assert.throws(() => decodeAnswer(encodeAnswer(0).subarray(0, 10)), /truncated/);
  });
});
