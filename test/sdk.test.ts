// The SDK's two doors end to end over loopback (real kernel TCP, one namespace): termination in
// phase 2, bad input on the core-leg port, concurrency, and no leaked socket or timer.
import assert from 'node:assert/strict';
import net from 'node:net';
import { once } from 'node:events';
import { execFile } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { promisify } from 'node:util';
import { createShell, createCore, relay, InvalidArgumentError, type Shell, type Core, type CoreConnection, type ConnectionCloseMessage, type StitchTarget } from '../sdk/index.ts';
import { encodePreamble } from '../sdk/preamble.ts';
import { activeResources, projectTimers, closed as socketClosed, connect, drain, events, listen, payload, send, sha256 } from './helpers.ts';
import winston from 'winston';

const quiet = winston.createLogger({ silent: !process.env.DEBUG_TEST, transports: [new winston.transports.Console()] });

interface Bed { shell: Shell; core: Core; server: net.Server; port: number; corePort: number; legs: CoreConnection[]; close(): Promise<void> }

async function bed(opts: { coreKey?: Buffer; shellKey?: Buffer; preambleTimeoutMs?: number } = {}): Promise<Bed> {
  const core = createCore({ logger: quiet, coreKey: opts.coreKey, preambleTimeoutMs: opts.preambleTimeoutMs });
  const { port: corePort } = await core.listen(0, '127.0.0.1');
  const shell = createShell({ core: { host: '127.0.0.1', port: corePort }, logger: quiet, coreKey: opts.shellKey ?? opts.coreKey });
  const server = net.createServer({ allowHalfOpen: true, pauseOnConnect: true }, (s) => shell.attach(s));
  const port = await listen(server);
  const legs: CoreConnection[] = [];
  core.on('connection', (c) => legs.push(c));
  return {
    shell, core, server, port, corePort, legs,
    async close() { const done = new Promise((r) => server.close(r)); shell.destroy(); core.destroy(); await Promise.all([done, core.close()]); },
  };
}

/** A client and the core-side stream of its logical connection, once the shell relays (phase 2). */
async function pair(b: Bed): Promise<{ c: net.Socket; bside: net.Socket; id: string }> {
  const accepted = events<CoreConnection>(b.core, 'connection');
  const relaying = events(b.shell, 'connection:phase');
  const c = await connect(b.port);
  const [[conn]] = await Promise.all([accepted, relaying]);
  return { c, bside: conn.stream, id: conn.id };
}

/** Every socket, server and timer a test opened is gone once all close events fired. */
async function assertNothingLeft(baseline: Record<string, number>) {
  // 'close' events fire before libuv's close callbacks run; one loop turn lets those finish.
  await new Promise((r) => setImmediate(r));
  const now = activeResources();
  assert.deepEqual(projectTimers(), [], 'timers left pending by the SDK');
  for (const k of ['TCPSocketWrap', 'TCPServerWrap']) {
    assert.equal(now[k] ?? 0, baseline[k] ?? 0, `leaked ${k}: ${JSON.stringify(now)} vs ${JSON.stringify(baseline)}`);
  }
}

describe('sdk (loopback)', function () {
  let b: Bed;
  let baseline: Record<string, number>;
  beforeEach(async () => { projectTimers(); baseline = activeResources(); b = await bed(); });
  afterEach(async function () {
    await b.close();
    await assertNothingLeft(baseline);
  });

  it('sdk - bytes flow both ways, byte-exact, through a core leg', async () => {
    const { c, bside } = await pair(b);
    const up = payload(3 << 20, 1), down = payload(2 << 20, 2);
    const [atB, atC] = await Promise.all([drain(bside), drain(c), send(c, up), send(bside, down)]);
    assert.equal(atB.sha, sha256(up));
    assert.equal(atC.sha, sha256(down));
    await socketClosed(c);
  });

  it('sdk - FIN from the client: the core sees EOF, can still answer, both sides told', async () => {
    const closed = events<ConnectionCloseMessage>(b.shell, 'connection:close');
    const coreClosed = events<{ reason: string }>(b.core, 'connection:close');
    const { c, bside } = await pair(b);
    const atB = drain(bside);
    c.end(Buffer.from('request'));
    assert.equal((await atB).bytes, 7);
    const atC = drain(c);
    await send(bside, Buffer.from('answer after the client finished'));
    assert.equal((await atC).bytes, 32);
    assert.equal((await closed)[0].reason, 'fin');
    assert.equal((await coreClosed)[0].reason, 'fin');
    await socketClosed(c);
  });

  it('sdk - FIN from the core: the client sees EOF, can still send, both sides told', async () => {
    const closed = events<ConnectionCloseMessage>(b.shell, 'connection:close');
    const { c, bside } = await pair(b);
    const atC = drain(c);
    bside.end(Buffer.from('bye'));
    assert.equal((await atC).bytes, 3);
    const atB = drain(bside);
    await send(c, payload(1 << 20));
    assert.equal((await atB).sha, sha256(payload(1 << 20)));
    const [msg] = await closed;
    assert.equal(msg.reason, 'fin');
    assert.equal(msg.connection.coreEnded && msg.connection.clientEnded, true);
    await socketClosed(c);
  });

  it('sdk - RST from the client reaches the core as a reset; both sides told', async () => {
    const closed = events<ConnectionCloseMessage>(b.shell, 'connection:close');
    const coreClosed = events<{ reason: string }>(b.core, 'connection:close');
    const { c, bside } = await pair(b);
    const err = once(bside, 'error');
    c.resetAndDestroy();
    assert.equal(((await err)[0] as NodeJS.ErrnoException).code, 'ECONNRESET');
    assert.equal((await closed)[0].reason, 'client-reset');
    assert.equal((await coreClosed)[0].reason, 'reset');
    await Promise.all([socketClosed(c), socketClosed(bside)]);
  });

  it('sdk - RST right behind data from the client: the core\'s stream gets the data, then the reset as an error, and reports a reset', async () => {
    // Node alone reads data followed by a RST as data then EOF (libuv's POLLHUP shortcut): the core
    // asks the kernel. Rounds, since the two must reach the core leg before its reader wakes.
    for (let i = 0; i < 20; i++) {
      const coreClosed = events<{ reason: string }>(b.core, 'connection:close');
      const { c, bside } = await pair(b);
      const got: Buffer[] = [];
      bside.on('data', (d: Buffer) => got.push(d));
      // the reset is emitted right after 'end' (next tick), so one loop turn later it has come or never will
      const ended = new Promise<string>((res) => {
        bside.once('error', (e: NodeJS.ErrnoException) => res(e.code ?? 'error'));
        bside.once('end', () => setImmediate(() => res('EOF and no error')));
      });
      c.write('request');
      c.resetAndDestroy();
      assert.equal(await ended, 'ECONNRESET', `round ${i}`);
      assert.equal((await coreClosed)[0].reason, 'reset', `round ${i}`);
      assert.ok(Buffer.concat(got).toString() === 'request' || got.length === 0, `round ${i}: the data, or nothing if the reset overtook it`);
      await Promise.all([socketClosed(c), socketClosed(bside)]);
    }
  });

  it('sdk - RST from the core reaches the client as a reset; both sides told', async () => {
    const closed = events<ConnectionCloseMessage>(b.shell, 'connection:close');
    const coreClosed = events<{ reason: string }>(b.core, 'connection:close');
    const { c, bside } = await pair(b);
    const err = once(c, 'error');
    bside.resetAndDestroy();
    assert.equal(((await err)[0] as NodeJS.ErrnoException).code, 'ECONNRESET');
    assert.equal((await closed)[0].reason, 'core-reset');
    assert.equal((await coreClosed)[0].reason, 'destroyed'); // the runtime reset it itself
    await Promise.all([socketClosed(c), socketClosed(bside)]);
  });

  it('sdk - half-close each way: 1 MiB after the other side finished', async () => {
    for (const first of ['client', 'core'] as const) {
      const closed = events<ConnectionCloseMessage>(b.shell, 'connection:close');
      const { c, bside } = await pair(b);
      const [quitter, talker] = first === 'client' ? [c, bside] : [bside, c];
      const heard = drain(talker);
      quitter.end();
      await heard;                                   // the talker saw EOF ...
      const atQuitter = drain(quitter);
      await send(talker, payload(1 << 20, 9));       // ... and still sends a full MiB
      assert.equal((await atQuitter).sha, sha256(payload(1 << 20, 9)));
      assert.equal((await closed)[0].reason, 'fin');
      await socketClosed(c);
    }
  });

  it('sdk - the core reports fin and reset also when its runtime relays the stream (in the kernel where built)', async () => {
    // What `tcp-stitch core --forward` does: the stream goes to a backend through relay().
    const backend = net.createServer({ allowHalfOpen: true }, (s) => { s.on('end', () => s.end('answer')); s.on('error', () => {}); s.resume(); });
    const bePort = await listen(backend);
    const toBackend = (stream: net.Socket) => relay(stream, net.connect({ port: bePort, host: '127.0.0.1', allowHalfOpen: true }));
    for (const [end, reason] of [['fin', 'fin'], ['rst', 'reset']] as const) {
      const coreClosed = events<{ reason: string }>(b.core, 'connection:close');
      const { c, bside } = await pair(b);
      toBackend(bside);
      if (end === 'fin') {
        const atC = drain(c);
        c.end('request');
        assert.equal((await atC).bytes, 6);
      } else {
        await send(c, Buffer.from('request'), true);
        c.resetAndDestroy();
      }
      assert.equal((await coreClosed)[0].reason, reason, `${end} from the client`);
      await socketClosed(c);
    }
    await new Promise((r) => backend.close(r));
  });

  it('sdk - 200 concurrent connections, 1 MiB both ways each, byte-exact', async function () {
    this.timeout(120000);
    const n = 200, size = 1 << 20; // the 4 MiB acceptance run is end to end in namespaces (test/e2e-phase2)
    const accepted = events<CoreConnection>(b.core, 'connection', n);
    // Client, shell, core and backend share this one event loop here; start the load only once every
    // connection is relaying, or the load's own callbacks delay the last core answers past their timeout.
    const relaying = events(b.shell, 'connection:phase', n);
    const clients = await Promise.all(Array.from({ length: n }, () => connect(b.port)));
    const [legs] = await Promise.all([accepted, relaying]);
    // Map each core-side stream to its client by the client's port the preamble carried.
    const byPort = new Map(legs.map((l) => [l.client.port, l.stream]));
    await Promise.all(clients.map(async (c, i) => {
      const bside = byPort.get(c.localPort!)!;
      const up = payload(size, 2 * i + 1), down = payload(size, 2 * i + 2);
      const [atB, atC] = await Promise.all([drain(bside), drain(c), send(c, up), send(bside, down)]);
      assert.equal(atB.sha, sha256(up), `connection ${i} C->B`);
      assert.equal(atC.sha, sha256(down), `connection ${i} B->C`);
      await socketClosed(c);
    }));
  });

  describe('bad input on the core-leg port', () => {
    async function raw(bytes: Buffer | null, end = true) {
      const rejected = events<{ reason: string }>(b.core, 'core-leg:reject');
      const s = await connect(b.corePort);
      s.on('error', () => {});
      const got = drain(s).catch(() => ({ sha: '', bytes: -1 }));
      if (bytes) s.write(bytes);
      if (end) s.end();
      const [r] = await rejected;
      await got;
      s.destroy();
      return r.reason;
    }

    it('core leg - garbage, truncated, oversized, wrong version, unauthenticated: rejected and closed, a live connection unaffected', async () => {
      const { c, bside } = await pair(b);       // a live connection mid-transfer all along
      const up = payload(8 << 20, 5);
      const atB = drain(bside);
      const sending = send(c, up);
      const good = encodePreamble({ connectionId: 'ab'.repeat(16), clientOffset: 0n, shellOffset: 0n, client: { address: '127.0.0.1', port: 1 }, shell: { address: '127.0.0.1', port: 2 } });
      assert.equal(await raw(Buffer.from('GET / HTTP/1.1\r\nHost: x\r\n\r\n')), 'bad-magic');
      assert.equal(await raw(good.subarray(0, 60)), 'truncated');
      const big = Buffer.from(good); big.writeUInt16BE(60000, 6);
      assert.equal(await raw(Buffer.concat([big, Buffer.alloc(4096)])), 'oversized');
      const v2 = Buffer.from(good); v2[4] = 2;
      assert.equal(await raw(v2), 'bad-version');
      assert.deepEqual(Object.keys(b.core.rejected).sort(), ['bad-magic', 'bad-version', 'oversized', 'truncated']);
      await sending;
      assert.equal((await atB).sha, sha256(up));
      bside.end();
      await socketClosed(c);
    });

    it('core leg - a stranger that connects and says nothing is closed after the preamble timeout', async () => {
      await b.close();
      b = await bed({ preambleTimeoutMs: 150 });
      const rejected = events<{ reason: string }>(b.core, 'core-leg:reject');
      const s = await connect(b.corePort);
      const heard = drain(s);               // the core closes its side ...
      assert.equal((await rejected)[0].reason, 'timeout');
      await heard;
      s.end();                              // ... and we close ours
      await socketClosed(s);
    });

    it('core leg - a shell without the core key is refused; the client is reset', async () => {
      await b.close();
      b = await bed({ coreKey: Buffer.alloc(32, 1), shellKey: Buffer.alloc(32, 2) });
      const closed = events<ConnectionCloseMessage>(b.shell, 'connection:close');
      const rejected = events<{ reason: string }>(b.core, 'core-leg:reject');
      const c = await connect(b.port);
      const err = once(c, 'error');
      assert.equal((await rejected)[0].reason, 'not-authentic');
      assert.equal((await closed)[0].reason, 'core-refused');
      assert.equal(((await err)[0] as NodeJS.ErrnoException).code, 'ECONNRESET');
      assert.equal(b.legs.length, 0);
      await socketClosed(c);
    });
  });

  it('sdk - destroy() resets every connection and leaves nothing open', async () => {
    const { c, bside } = await pair(b);
    const errs = [once(c, 'error'), once(bside, 'error')];
    b.shell.destroy();
    for (const e of errs) assert.equal(((await e)[0] as NodeJS.ErrnoException).code, 'ECONNRESET');
    await Promise.all([socketClosed(c), socketClosed(bside)]);
  });
});

// A plain core: the shell's core leg goes straight to an unmodified TCP server (no preamble, no
// answer), which is what lets a stitched connection end in the backend itself.
describe('sdk - plain core (loopback)', function () {
  let baseline: Record<string, number>;
  let shell: Shell, server: net.Server, backend: net.Server;
  let port: number, backendPort: number;
  const accepted: net.Socket[] = [];
  beforeEach(async () => {
    projectTimers(); baseline = activeResources();
    accepted.length = 0;
    // The backend greets first, as SMTP or SSH servers do: its greeting must reach the client.
    backend = net.createServer({ allowHalfOpen: true }, (s) => { accepted.push(s); s.write('hello\n'); backend.emit('leg', s); });
    backendPort = await listen(backend);
    shell = createShell({ core: { host: '127.0.0.1', port: backendPort }, plainCore: true, logger: quiet });
    server = net.createServer({ allowHalfOpen: true, pauseOnConnect: true }, (s) => shell.attach(s));
    port = await listen(server);
  });
  afterEach(async () => {
    const done = Promise.all([new Promise((r) => server.close(r)), new Promise((r) => backend.close(r))]);
    shell.destroy();
    for (const s of accepted) s.destroy();
    await done;
    await assertNothingLeft(baseline);
  });

  it('plain core - the server gets the client\'s bytes from the first one, its greeting and replies reach the client, byte-exact', async () => {
    const leg = events<net.Socket>(backend, 'leg');
    const relaying = events(shell, 'connection:phase');
    const c = await connect(port);
    const [[bside]] = await Promise.all([leg, relaying]);
    // The server's peer is the shell's side of the core leg, as for any TCP client.
    assert.equal(shell.connections()[0]?.coreLeg?.local.port, bside!.remotePort);
    const up = payload(3 << 20, 3), down = payload(2 << 20, 4);
    const [atB, atC] = await Promise.all([drain(bside!), drain(c), send(c, up), send(bside!, down)]);
    assert.equal(atB.sha, sha256(up), 'the server read exactly the client\'s bytes: no preamble before them');
    assert.equal(atC.sha, sha256(Buffer.concat([Buffer.from('hello\n'), down])));
    await socketClosed(c);
  });

  it('plain core - a stitch is asked with no preamble and no answer in the byte mapping', async () => {
    const targets: StitchTarget[] = [];
    shell.setStitcher(async (t) => { targets.push(t); throw new Error('no switch in this test'); });
    const relaying = events(shell, 'connection:phase');
    const c = await connect(port);
    await relaying;
    const [conn] = shell.connections();
    await assert.rejects(shell.stitch(conn!.id), /no switch in this test/);
    assert.deepEqual(targets[0]?.mapping, { clientOffset: 0n, corePreambleLength: 0, shellOffset: 0n, coreAnswerLength: 0 });
    assert.equal(shell.get(conn!.id)?.state, 'relaying', 'a failed stitch leaves the connection relaying');
    c.destroy();
  });

  it('plain core - nothing listening: the client is reset and the close says core-unreachable', async () => {
    const gone = createShell({ core: { host: '127.0.0.1', port: backendPort }, plainCore: true, logger: quiet });
    await new Promise((r) => backend.close(r));
    backend = net.createServer();
    await listen(backend); // afterEach closes this one
    const front = net.createServer({ allowHalfOpen: true, pauseOnConnect: true }, (s) => gone.attach(s));
    const frontPort = await listen(front);
    const closed = events<ConnectionCloseMessage>(gone, 'connection:close');
    const c = await connect(frontPort);
    const err = once(c, 'error');
    assert.equal((await closed)[0].reason, 'core-unreachable');
    assert.equal(((await err)[0] as NodeJS.ErrnoException).code, 'ECONNRESET');
    await socketClosed(c);
    await new Promise((r) => front.close(r));
  });

  it('plain core - a coreKey with plainCore is refused, naming both', () => {
    assert.throws(() => createShell({ core: { host: '127.0.0.1', port: backendPort }, plainCore: true, coreKey: Buffer.alloc(32, 1) }),
      (e: Error) => e instanceof InvalidArgumentError && /coreKey/.test(e.message) && /plainCore/.test(e.message));
  });
});

/** rb and tb of skmem for the TCP socket whose local port is `port` (ss(8), as the kernel keeps them). */
async function buffersOf(port: number): Promise<{ rb: number; tb: number }> {
  const { stdout } = await promisify(execFile)('ss', ['-tmnH', `sport = :${port}`]);
  const m = /rb(\d+),t\d+,tb(\d+)/.exec(stdout);
  assert.ok(m, `ss shows no socket buffers for local port ${port}: ${stdout}`);
  return { rb: Number(m[1]), tb: Number(m[2]) };
}

describe('sdk - the shell\'s socketBuffer (loopback)', function () {
  let baseline: Record<string, number>;
  beforeEach(() => { projectTimers(); baseline = activeResources(); });
  afterEach(async () => assertNothingLeft(baseline));
  const SIZE = 40960; // the kernel keeps twice it; neither default (131072 / 16384) nor autotuned

  it('socketBuffer - both sockets of a connection get it (ss reads them back), the client\'s own does not, and the bytes arrive exact', async () => {
    const backend = net.createServer({ allowHalfOpen: true }, (s) => backend.emit('leg', s));
    const backendPort = await listen(backend);
    const shell = createShell({ core: { host: '127.0.0.1', port: backendPort }, plainCore: true, logger: quiet, socketBuffer: SIZE });
    const front = net.createServer({ allowHalfOpen: true, pauseOnConnect: true }, (s) => shell.attach(s));
    const port = await listen(front);
    const legs: net.Socket[] = [];
    backend.on('leg', (s: net.Socket) => legs.push(s));
    try {
      await checkBuffers(shell, backend, port);
    } finally {
      shell.destroy();
      for (const s of legs) s.destroy();
      await Promise.all([new Promise((r) => front.close(r)), new Promise((r) => backend.close(r))]);
    }
  });

  async function checkBuffers(shell: Shell, backend: net.Server, port: number) {
    const leg = events<net.Socket>(backend, 'leg');
    const relaying = events(shell, 'connection:phase');
    const c = await connect(port);
    const [[bside]] = await Promise.all([leg, relaying]);
    const [conn] = shell.connections();
    // The shell's side of the client's connection has the listening port; that of the core leg its own.
    const clientSide = await buffersOf(port), legSide = await buffersOf(conn!.coreLeg!.local.port);
    assert.deepEqual(clientSide, { rb: 2 * SIZE, tb: 2 * SIZE });
    assert.deepEqual(legSide, { rb: 2 * SIZE, tb: 2 * SIZE });
    assert.notEqual((await buffersOf(c.localPort!)).rb, 2 * SIZE, 'the client\'s socket keeps the kernel\'s own');
    const up = payload(4 << 20, 5), down = payload(3 << 20, 6);
    const [atB, atC] = await Promise.all([drain(bside!), drain(c), send(c, up), send(bside!, down)]);
    assert.equal(atB.sha, sha256(up));
    assert.equal(atC.sha, sha256(down));
    await socketClosed(c);
  }

  it('socketBuffer - a size below 4096, not whole, or above net.core.rmem_max is refused, naming it', () => {
    const core = { host: '127.0.0.1', port: 9 };
    const max = Math.min(...['rmem_max', 'wmem_max'].map((n) => Number(readFileSync(`/proc/sys/net/core/${n}`, 'utf8'))));
    for (const [bad, what] of [[100, /at least 4096/], [5000.5, /whole number/], [max + 1, /exceeds net\.core\.[rw]mem_max/]] as const) {
      assert.throws(() => createShell({ core, logger: quiet, socketBuffer: bad }), (e: Error) => e instanceof InvalidArgumentError && /socketBuffer/.test(e.message) && what.test(e.message), String(bad));
    }
  });

  it('socketBuffer - the CLI\'s --socket-buffer refuses a bad size (not bytes, k or m; below 4096) with exit 2 and one line', async () => {
    const run = (size: string) => promisify(execFile)(process.execPath, ['bin/tcp-stitch.js', 'shell', '--listen', '127.0.0.1:1', '--core', '127.0.0.1:2', '--switch', 'off', '--socket-buffer', size])
      .then(() => ({ code: 0, stderr: '' }), (e: { code: number; stderr: string }) => ({ code: e.code, stderr: e.stderr }));
    for (const [size, what] of [['abc', /--socket-buffer must be a size in bytes/], ['100', /--socket-buffer\) must be .* at least 4096/], ['1g', /--socket-buffer must be a size/]] as const) {
      const r = await run(size);
      assert.equal(r.code, 2, `${size}: ${r.stderr}`);
      assert.match(r.stderr, what);
      assert.equal(r.stderr.trim().split('\n').length, 1, r.stderr);
    }
  });
});
