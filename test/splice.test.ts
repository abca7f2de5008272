// The kernel relay (sdk/splice.ts over sdk/native/splice_addon.c) on loopback, real kernel TCP:
// bytes exact both ways at full speed, bytes Node read before the handover, half-close, resets from
// either side, stop(), a socket destroyed under the thread, many pairs at once, and nothing left open
// (sockets, the thread's descriptor dups and pipes).
import assert from 'node:assert/strict';
import net from 'node:net';
import { once } from 'node:events';
import { spliceRelay, spliceAvailable } from '../sdk/index.ts';
import { activeResources, connect, drain, listen, payloadSha, sendPayload, closed } from './helpers.ts';

import { readdirSync, readlinkSync } from 'node:fs';
/** The process's open sockets and pipes (the thread's dups and pipes among them). */
const openFds = () => readdirSync('/proc/self/fd').map((f) => { try { return readlinkSync('/proc/self/fd/' + f); } catch { return ''; } })
  .filter((l) => /^(socket|pipe):/.test(l)).sort().join(',');

interface Fwd {
  port: number;
  /** Per accepted connection: what the relay reported. */
  seen: { bytes: Record<'ab' | 'ba', number>; ends: string[]; resets: { from: string; code?: string }[]; closes: number; stop: () => void; a: net.Socket; b: net.Socket }[];
  close(): Promise<void>;
}

/** client -> forwarder (spliceRelay) -> backend. `head` bytes are read by Node first, like a preamble. */
async function forwarder(backendPort: number, head = 0): Promise<Fwd> {
  const seen: Fwd['seen'] = [];
  const server = net.createServer({ allowHalfOpen: true, pauseOnConnect: true }, (a) => {
    const go = (rest?: Buffer) => {
      const b = net.connect({ port: backendPort, host: '127.0.0.1', allowHalfOpen: true });
      if (rest?.length) a.unshift(rest);
      const s: Fwd['seen'][number] = { bytes: { ab: 0, ba: 0 }, ends: [], resets: [], closes: 0, stop: () => {}, a, b };
      seen.push(s);
      s.stop = spliceRelay(a, b, {
        onBytes: (d, n) => { s.bytes[d] += n; },
        onEnd: (from) => s.ends.push(from),
        onReset: (from, err) => s.resets.push({ from, code: (err as NodeJS.ErrnoException).code }),
        onClose: () => { s.closes++; },
      });
    };
    if (!head) { go(); return; }
    let got = Buffer.alloc(0);
    const onReadable = () => {
      let c: Buffer | null;
      while ((c = a.read() as Buffer | null) !== null) got = Buffer.concat([got, c]);
      if (got.length < head) return;
      a.off('readable', onReadable);
      go(got.subarray(head));
    };
    a.on('readable', onReadable);
  });
  const port = await listen(server);
  return { port, seen, close: () => new Promise((r) => server.close(() => r())) };
}

/** A backend that echoes nothing: it sends `n` bytes of seed 2 and reads everything. */
async function backend(onConn: (s: net.Socket) => void): Promise<{ port: number; close(): Promise<void> }> {
  const server = net.createServer({ allowHalfOpen: true }, onConn);
  const port = await listen(server);
  return { port, close: () => new Promise((r) => server.close(() => r())) };
}

const ended = (s: net.Socket) => new Promise<string>((resolve) => {
  s.on('error', (e: NodeJS.ErrnoException) => resolve(e.code ?? 'error'));
  s.on('close', () => resolve('close'));
  s.resume();
});

describe('splice relay (loopback)', function () {
  this.timeout(60_000);
  let baseline: Record<string, number>, fds: string;
  before(function () {
    // CI builds the addon; a machine without it gets relay() and this file has nothing to test.
    if (!spliceAvailable()) {
      if (process.env.CI) throw new Error('the splice addon is not built (npm run build)');
      this.skip();
    }
  });
  beforeEach(() => { baseline = activeResources(); fds = openFds(); });
  afterEach(async () => {
    await new Promise((r) => setImmediate(r));
    const now = activeResources();
    for (const k of ['TCPSocketWrap', 'TCPServerWrap']) assert.equal(now[k] ?? 0, baseline[k] ?? 0, `leaked ${k}`);
    // The thread's dups and pipes are closed before it reports a pair's end.
    assert.equal(openFds(), fds, 'descriptors left open');
  });

  it('splice - 64 MiB each way at once, byte-exact, counted by the thread, both FINs passed', async () => {
    const N = 64 << 20;
    let back!: Promise<{ sha: string; bytes: number }>;
    const be = await backend((s) => { back = drain(s); void sendPayload(s, N, 2); });
    const fwd = await forwarder(be.port);
    const c = await connect(fwd.port);
    const [fromB] = await Promise.all([drain(c), sendPayload(c, N, 1)]);
    const fromC = await back;
    assert.equal(fromB.sha, payloadSha(N, 2));
    assert.equal(fromC.sha, payloadSha(N, 1));
    await closed(c);
    const s = fwd.seen[0]!;
    await Promise.all([closed(s.a), closed(s.b)]);
    assert.deepEqual(s.bytes, { ab: N, ba: N }, 'every byte went through the thread');
    assert.deepEqual(s.ends.sort(), ['a', 'b']);
    assert.deepEqual(s.resets, []);
    assert.equal(s.closes, 1);
    await Promise.all([fwd.close(), be.close()]);
  });

  it('splice - bytes Node read before the handover go first, nothing read twice', async () => {
    const N = 8 << 20, HEAD = 100;
    let back!: Promise<{ sha: string; bytes: number }>;
    const be = await backend((s) => { back = drain(s); s.end(); });
    const fwd = await forwarder(be.port, HEAD);
    const c = await connect(fwd.port);
    // The head and the first megabytes arrive together: Node's buffer holds more than the head.
    c.write(Buffer.alloc(HEAD, 7));
    await Promise.all([sendPayload(c, N, 3), drain(c)]);
    const fromC = await back;
    assert.equal(fromC.bytes, N);
    assert.equal(fromC.sha, payloadSha(N, 3));
    await Promise.all([closed(c), closed(fwd.seen[0]!.a), closed(fwd.seen[0]!.b)]);
    assert.ok(fwd.seen[0]!.bytes.ab < N, 'the test did hand Node-read bytes over (else it proves nothing)');
    await Promise.all([fwd.close(), be.close()]);
  });

  it('splice - half-close: the backend answers 4 MiB after the client finished', async () => {
    const N = 4 << 20;
    const be = await backend((s) => { s.on('end', () => void sendPayload(s, N, 4)); s.resume(); });
    const fwd = await forwarder(be.port);
    const c = await connect(fwd.port);
    c.end('request');
    const got = await drain(c);
    assert.equal(got.sha, payloadSha(N, 4));
    await Promise.all([closed(c), closed(fwd.seen[0]!.a), closed(fwd.seen[0]!.b)]);
    assert.deepEqual(fwd.seen[0]!.resets, []);
    await Promise.all([fwd.close(), be.close()]);
  });

  it('splice - RST from the client resets the backend; reported from a', async () => {
    let backEnd!: Promise<string>;
    const be = await backend((s) => { backEnd = ended(s); s.write('hello'); });
    const fwd = await forwarder(be.port);
    const c = await connect(fwd.port);
    await once(c, 'data'); // the pair is live: bytes came back through it
    c.resetAndDestroy();
    assert.equal(await backEnd, 'ECONNRESET');
    const s = fwd.seen[0]!;
    await Promise.all([closed(s.a), closed(s.b)]);
    assert.equal(s.resets.length, 1);
    assert.equal(s.resets[0]!.from, 'a');
    await Promise.all([fwd.close(), be.close()]);
  });

  it('splice - RST from the backend resets the client; reported from b', async () => {
    const be = await backend((s) => { s.on('data', () => s.resetAndDestroy()); });
    const fwd = await forwarder(be.port);
    const c = await connect(fwd.port);
    const clientEnd = ended(c);
    c.write('x');
    assert.equal(await clientEnd, 'ECONNRESET');
    const s = fwd.seen[0]!;
    await Promise.all([closed(s.a), closed(s.b)]);
    assert.equal(s.resets[0]?.from, 'b');
    await Promise.all([fwd.close(), be.close()]);
  });

  it('splice - stop() and a socket destroyed under the thread both reset the other ends', async () => {
    const backEnds: Promise<string>[] = [];
    const be = await backend((s) => { backEnds.push(ended(s)); s.write('hello'); });
    const fwd = await forwarder(be.port);
    const c1 = await connect(fwd.port), c2 = await connect(fwd.port);
    await Promise.all([once(c1, 'data'), once(c2, 'data')]);
    const e1 = ended(c1), e2 = ended(c2);
    fwd.seen[0]!.stop();
    fwd.seen[1]!.a.destroy();
    assert.deepEqual(await Promise.all([e1, ...backEnds]), ['ECONNRESET', 'ECONNRESET', 'ECONNRESET']);
    assert.equal(await e2, 'ECONNRESET');
    await Promise.all(fwd.seen.flatMap((s) => [closed(s.a), closed(s.b)]));
    await Promise.all([fwd.close(), be.close()]);
  });

  it('splice - 100 pairs at once, 1 MiB each way each, byte-exact', async () => {
    const N = 1 << 20, K = 100;
    const backs: Promise<{ sha: string; bytes: number }>[] = [];
    const be = await backend((s) => { backs.push(drain(s)); void sendPayload(s, N, 6); });
    const fwd = await forwarder(be.port);
    const results = await Promise.all(Array.from({ length: K }, async (_, i) => {
      const c = await connect(fwd.port);
      const [got] = await Promise.all([drain(c), sendPayload(c, N, 100 + i)]);
      await closed(c);
      return got.sha;
    }));
    for (const sha of results) assert.equal(sha, payloadSha(N, 6));
    const shas = new Set((await Promise.all(backs)).map((r) => r.sha));
    assert.equal(shas.size, K);
    for (let i = 0; i < K; i++) assert.ok(shas.has(payloadSha(N, 100 + i)), `client ${i}'s bytes reached the backend`);
    await Promise.all(fwd.seen.flatMap((s) => [closed(s.a), closed(s.b)]));
    await Promise.all([fwd.close(), be.close()]);
  });
});
