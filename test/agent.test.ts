// The agent's door over loopback: --switch parsing, fail-safe without a switch, the control-socket ops,
// stitching through a capable reference switch (runSwitch on lo with a table datapath that advertises
// every translation), the policy loop, re-installing after a switch restart, persisted discovery, and
// nothing left open after close().
//
// Addresses: the shell listens on 127.0.0.1, clients connect from 127.0.0.2, the core listens on
// 127.0.0.3, so a stitch's legs end at the shell's own address (the control source, 127.0.0.1) while C
// and B are other addresses, as the switch requires.
import assert from 'node:assert/strict';
import { EventEmitter, once } from 'node:events';
import { mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Writable } from 'node:stream';
import winston from 'winston';
import { createCore, createShell, type ConnectionPhaseMessage, type Core, type Shell, type StitchDecisionMessage } from '../sdk/index.ts';
import { createAgent, parseSwitchMode, type Agent, type AgentOptions, type AgentStatus, type StitchOutcome } from '../agent/index.ts';
import { ALL_TRANSLATIONS, createTableDatapath, runSwitch, type Key, type RunningSwitch, type StitchState, type SwitchStatus, type TableDatapath } from '../switch/index.ts';
import { activeResources, projectTimers } from './helpers.ts';

const KEY: Key = { id: 42, secret: Buffer.alloc(32, 0x5a) };

/** A winston logger whose JSON lines land in `lines`; `wait(re)` resolves at the first (or next) match. */
function captureLogger() {
  const lines: Record<string, unknown>[] = [];
  const bus = new EventEmitter();
  const stream = new Writable({
    write(chunk, _enc, cb) { const l = JSON.parse(String(chunk)); lines.push(l); bus.emit('line', l); cb(); },
  });
  const logger = winston.createLogger({ level: 'debug', format: winston.format.json(), transports: [new winston.transports.Stream({ stream })] });
  const matching = (re: RegExp) => lines.filter((l) => re.test(String(l.message)));
  const wait = (re: RegExp) => new Promise<Record<string, unknown>>((resolve) => {
    const on = (l: Record<string, unknown>) => { if (re.test(String(l.message))) { bus.off('line', on); resolve(l); } };
    bus.on('line', on);
  });
  return { logger, lines, matching, wait };
}

interface Bed {
  shell: Shell; core: Core; server: net.Server; port: number; corePort: number; clients: net.Socket[];
  /** A client connection from 127.0.0.2, once the shell relays it (phase 2); its id. */
  connect(): Promise<string>;
  close(): Promise<void>;
}

async function bed(logger: winston.Logger): Promise<Bed> {
  const core = createCore({ logger });
  const { port: corePort } = await core.listen(0, '127.0.0.3');
  core.on('connection', (c) => { c.stream.on('data', (d) => c.stream.write(d)); c.stream.on('end', () => c.stream.end()); c.stream.on('error', () => {}); });
  const shell = createShell({ core: { host: '127.0.0.3', port: corePort }, logger });
  const server = net.createServer({ allowHalfOpen: true, pauseOnConnect: true }, (s) => shell.attach(s));
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const port = (server.address() as net.AddressInfo).port;
  const clients: net.Socket[] = [];
  return {
    shell, core, server, port, corePort, clients,
    async connect() {
      const relaying = new Promise<string>((resolve) => {
        const on = (m: ConnectionPhaseMessage) => { if (m.to === 'relaying') { shell.off('connection:phase', on); resolve(m.connection.id); } };
        shell.on('connection:phase', on);
      });
      const c = net.connect({ host: '127.0.0.1', port, localAddress: '127.0.0.2', allowHalfOpen: true });
      c.on('error', () => {});
      clients.push(c);
      return relaying;
    },
    async close() {
      for (const c of clients) c.destroy();
      const done = new Promise((r) => server.close(r));
      shell.destroy();
      core.destroy();
      await Promise.all([done, core.close()]);
    },
  };
}

/** A capable reference switch on lo (all translations, every leg tracked). */
async function capableSwitch(logger: winston.Logger, port = 0, installState?: StitchState): Promise<RunningSwitch & { datapath: TableDatapath; datapathClose(): Promise<void> }> {
  const datapath = createTableDatapath({ translations: ALL_TRANSLATIONS, tracked: () => true, ...(installState && { installState }) });
  const sw = await runSwitch({ shellIface: 'lo', keys: [KEY], datapath, port, logger });
  return Object.assign(sw, { datapath, datapathClose: () => datapath.close() });
}

const switchStatus = async (sw: RunningSwitch) => (await sw.control({ op: 'status' })) as SwitchStatus;

describe('agent - parseSwitchMode', () => {
  it('agent - parseSwitchMode accepts auto, off, combined and IPv4 HOST:PORT', () => {
    assert.deepEqual(parseSwitchMode('auto'), { mode: 'auto' });
    assert.deepEqual(parseSwitchMode('off'), { mode: 'off' });
    assert.deepEqual(parseSwitchMode('combined'), { mode: 'combined' });
    assert.deepEqual(parseSwitchMode('198.18.2.1:7807'), { mode: 'preconfigured', host: '198.18.2.1', port: 7807 });
  });

  for (const bad of ['', 'on', 'AUTO', 'preconfigured', '198.18.2.1', '198.18.2.1:0', '198.18.2.1:65536', ':7807', 'switch.example:7807', '[::1]:7807']) {
    it(`agent - parseSwitchMode refuses ${JSON.stringify(bad)} with a one-line reason`, () => {
      assert.throws(() => parseSwitchMode(bad), (err: Error & { code?: string }) => {
        assert.equal(err.code, 'TCP_STITCH_INVALID_ARGUMENT');
        assert.match(err.message, /--switch/);
        assert.ok(!err.message.includes('\n'), err.message);
        return true;
      });
    });
  }
});

describe('agent (loopback)', function () {
  let b: Bed | undefined;
  let agent: Agent | undefined;
  let sw: Awaited<ReturnType<typeof capableSwitch>> | undefined;
  let dir: string | undefined;
  let log: ReturnType<typeof captureLogger>;
  let baseline: Record<string, number>;

  const make = (opts: Partial<AgentOptions>): Agent => {
    agent = createAgent({ shell: b!.shell, logger: log.logger, core: { host: '127.0.0.3', port: b!.corePort }, switch: { mode: 'off' }, ...opts });
    return agent;
  };
  const preconfigured = (): Partial<AgentOptions> => ({ switch: { mode: 'preconfigured', host: '127.0.0.1', port: sw!.port }, keys: [KEY] });

  beforeEach(async () => {
    projectTimers();
    baseline = activeResources();
    log = captureLogger();
    b = await bed(log.logger);
  });

  afterEach(async () => {
    await agent?.close();
    await b?.close();
    await sw?.close();
    await sw?.datapathClose();
    agent = undefined; b = undefined; sw = undefined;
    if (dir) rmSync(dir, { recursive: true, force: true });
    dir = undefined;
    // A handle's close callback runs in the loop's close phase: two turns let every one of them run.
    for (let i = 0; i < 2; i++) await new Promise((r) => setImmediate(r));
    // Nothing the agent, the shell or the switch opened is left: no timer, no socket.
    assert.deepEqual(projectTimers(), [], 'timers left pending');
    const now = activeResources();
    for (const k of ['UDPWrap', 'TCPSocketWrap', 'TCPServerWrap']) {
      assert.equal(now[k] ?? 0, baseline[k] ?? 0, `leaked ${k}: ${JSON.stringify(now)} vs ${JSON.stringify(baseline)}`);
    }
  });

  it('agent - switch off: not available "switch off"; shell.stitch rejects saying why; the connection keeps relaying', async () => {
    const a = make({ switch: { mode: 'off' } });
    const changes: unknown[] = [];
    a.on('discovery:change', (m) => changes.push(m));
    await a.start();
    const s = a.status();
    assert.equal(s.discovery.available, false);
    assert.equal(s.discovery.reason, 'switch off');
    assert.deepEqual(s.stitching, { available: false, reason: 'switch off: the shell runs with --switch off' });
    assert.equal(changes.length, 1);
    const id = await b!.connect();
    await assert.rejects(b!.shell.stitch(id), /stitching is not available/);
    assert.deepEqual(await a.control({ op: 'stitch', id }), [{ id, ok: false, error: 'stitching is not available: switch off: the shell runs with --switch off' }]);
    assert.equal(b!.shell.get(id)?.state, 'relaying');
    // Bytes still flow on the shell path.
    const c = b!.clients[0]!;
    c.write('ping');
    const [echo] = await once(c, 'data');
    assert.equal(String(echo), 'ping');
    assert.ok(log.matching(/stitching not available/).length === 1);
  });

  it('agent - control ops: status is JSON-safe, stitch takes an id or all, unknown ops name the valid ones', async () => {
    const a = make({});
    await a.start();
    const id = await b!.connect();
    const status = (await a.control({ op: 'status' })) as AgentStatus;
    assert.deepEqual(JSON.parse(JSON.stringify(status)), status);
    assert.deepEqual(status.connections.map((c) => [c.id, c.state, c.phase, c.client.address]), [[id, 'relaying', 2, '127.0.0.2']]);
    assert.equal(status.policy.mode, 'auto');
    assert.deepEqual(await a.control({ op: 'stitch', id: 'nope' }), [{ id: 'nope', ok: false, error: 'no connection with id nope' }]);
    const all = (await a.control({ op: 'stitch', all: true })) as StitchOutcome[];
    assert.deepEqual(all.map((r) => [r.id, r.ok]), [[id, false]]);
    await assert.rejects(a.control({ op: 'stitch' }), /either id .* or all: true/);
    await assert.rejects(a.control({ op: 'stitch', id, all: true }), /either id/);
    await assert.rejects(a.control({ op: 'reboot' }), (err: Error & { code?: string }) => {
      assert.equal(err.code, 'TCP_STITCH_INVALID_ARGUMENT');
      assert.match(err.message, /unknown op "reboot"; valid ops: status, stitch .*, discover, query/);
      return true;
    });
    await assert.rejects(a.control({ op: 'query' }), /no switch to ask: switch off/);
    assert.equal(((await a.control({ op: 'discover' })) as { reason: string }).reason, 'switch off');
  });

  it('agent - preconfigured capable switch: capabilities from the control DISCOVER; a manual stitch installs both legs at the switch', async () => {
    sw = await capableSwitch(log.logger);
    const a = make(preconfigured());
    await a.start();
    const d = a.status().discovery;
    assert.equal(d.available, true, JSON.stringify(d));
    assert.deepEqual([d.reason, d.address, d.port, d.bootId, d.switchId], ['preconfigured', '127.0.0.1', sw.port, sw.bootId, sw.switchId]);
    assert.deepEqual(d.capabilities?.translations, ALL_TRANSLATIONS);
    const id = await b!.connect();
    const conn = b!.shell.get(id)!;
    const decisions: StitchDecisionMessage[] = [];
    a.on('stitch:decision', (m) => decisions.push(m));
    assert.deepEqual(await a.control({ op: 'stitch', id }), [{ id, ok: true }]);
    assert.equal(conn.state, 'stitched');
    assert.deepEqual(decisions, [{ connectionId: id, stitch: true, reason: 'manual stitch' }]);
    const table = (await switchStatus(sw)).stitches;
    assert.equal(table.length, 1);
    assert.deepEqual(table[0]!.spec.clientLeg, { client: conn.client, shell: conn.shell });
    assert.deepEqual(table[0]!.spec.coreLeg, { shell: conn.coreLeg!.local, core: conn.coreLeg!.core });
    assert.equal(table[0]!.spec.coreAnswerLength > 0 && table[0]!.spec.corePreambleLength > 0, true);
    assert.equal(a.status().connections[0]!.stitchId, table[0]!.spec.id);
    const q = (await a.control({ op: 'query' })) as { bootId: string; stitches: Array<{ spec: { id: number; clientOffset: string } }> };
    assert.equal(q.bootId, sw.bootId);
    assert.deepEqual(q.stitches.map((r) => [r.spec.id, typeof r.spec.clientOffset]), [[table[0]!.spec.id, 'string']]);
  });

  it('agent - a slow drain is waited for, with a warning after drainWarnMs; the connection stays stitching until the switch says stitched', async () => {
    sw = await capableSwitch(log.logger, 0, 'draining');
    const a = make({ ...preconfigured(), drainWarnMs: 20 });
    await a.start();
    const id = await b!.connect();
    const slow = log.wait(/handover slow/);
    const done = a.control({ op: 'stitch', id });
    const warned = await slow;
    const stitchId = (await switchStatus(sw)).stitches[0]!.spec.id;
    assert.deepEqual([warned.connectionId, warned.stitchId, warned.afterMs], [id, stitchId, 20]);
    assert.equal(b!.shell.get(id)!.state, 'stitching', 'a draining connection is neither back on the shell path nor stitched');
    sw.datapath.setState(stitchId, 'stitched');
    assert.deepEqual(await done, [{ id, ok: true }]);
    assert.equal(b!.shell.get(id)!.state, 'stitched');
    assert.equal(log.matching(/handover slow/).length, 1, 'warned once');
  });

  it('agent - an honest table switch (no translations) is "incapable": nothing is stitched, the shell path stays', async () => {
    const datapath = createTableDatapath();
    const plain = await runSwitch({ shellIface: 'lo', keys: [KEY], datapath, port: 0, logger: log.logger });
    sw = Object.assign(plain, { datapath, datapathClose: () => datapath.close() });
    const a = make(preconfigured());
    await a.start();
    const d = a.status().discovery;
    assert.equal(d.available, false);
    assert.equal(d.reason, 'incapable');
    assert.match(d.detail!, /lacks translations: addr, port, seq, ack, sack, timestamps, checksum/);
    const id = await b!.connect();
    await assert.rejects(b!.shell.stitch(id), /stitching is not available/);
    assert.equal((await switchStatus(sw)).stitches.length, 0);
  });

  it('agent - policy loop: stitchImmediately stitches a relaying connection; stitch:decision says why', async () => {
    sw = await capableSwitch(log.logger);
    dir = mkdtempSync(join(tmpdir(), 'tcp-stitch-agent-'));
    const policyFile = join(dir, 'policy.json');
    writeFileSync(policyFile, JSON.stringify({ version: 1, mode: 'auto', evaluationIntervalMs: 50, rules: [{ name: 'everything', stitchImmediately: true }] }));
    const a = make({ ...preconfigured(), policyFile });
    await a.start();
    assert.equal(a.status().policy.file, policyFile);
    const decided = once(a, 'stitch:decision');
    const stitched = new Promise<ConnectionPhaseMessage>((resolve) => b!.shell.on('connection:phase', (m) => { if (m.to === 'stitched') resolve(m); }));
    const id = await b!.connect();
    const [[decision], phase] = await Promise.all([decided, stitched]);
    assert.deepEqual(decision, { connectionId: id, stitch: true, reason: 'rule "everything": stitched immediately after initiation' });
    assert.equal(phase.connection.id, id);
    assert.equal(phase.reason, 'rule "everything": stitched immediately after initiation');
    assert.equal((await switchStatus(sw)).stitches.length, 1);
  });

  it('agent - policy loop: a decision that does not change is emitted each round but logged once', async () => {
    dir = mkdtempSync(join(tmpdir(), 'tcp-stitch-agent-'));
    const policyFile = join(dir, 'policy.json');
    writeFileSync(policyFile, JSON.stringify({ version: 1, mode: 'auto', evaluationIntervalMs: 50, rules: [{ name: 'none', never: true }] }));
    const a = make({ policyFile });
    await a.start();
    const id = await b!.connect();
    const seen: StitchDecisionMessage[] = [];
    await new Promise<void>((resolve) => a.on('stitch:decision', (m) => { seen.push(m); if (seen.length === 3) resolve(); }));
    assert.deepEqual(new Set(seen.map((m) => JSON.stringify(m))), new Set([JSON.stringify({ connectionId: id, stitch: false, reason: 'rule "none": never stitched' })]));
    assert.equal(log.matching(/^not stitched$/).length, 1);
    assert.deepEqual(a.status().connections[0]!.decision, { stitch: false, reason: 'rule "none": never stitched' });
  });

  it('agent - policy loop: a policy stitch without a switch is not attempted; the reason says why', async () => {
    dir = mkdtempSync(join(tmpdir(), 'tcp-stitch-agent-'));
    const policyFile = join(dir, 'policy.json');
    writeFileSync(policyFile, JSON.stringify({ version: 1, mode: 'auto', evaluationIntervalMs: 50, rules: [{ name: 'everything', stitchImmediately: true }] }));
    const a = make({ policyFile });
    await a.start();
    const decided = once(a, 'stitch:decision');
    const id = await b!.connect();
    const [m] = (await decided) as [StitchDecisionMessage];
    assert.equal(m.connectionId, id);
    assert.equal(m.stitch, false);
    assert.match(m.reason, /^rule "everything": .*; not stitched: stitching is not available \(switch off/);
    assert.equal(b!.shell.get(id)!.state, 'relaying');
  });

  it('agent - switch restart: detected at the next exchange, switch:restarted emitted once, stitches re-installed', async () => {
    sw = await capableSwitch(log.logger);
    const port = sw.port;
    const a = make(preconfigured());
    await a.start();
    const id = await b!.connect();
    assert.deepEqual(await a.control({ op: 'stitch', id }), [{ id, ok: true }]);
    const oldBoot = sw.bootId;
    await sw.close();
    await sw.datapathClose();
    sw = await capableSwitch(log.logger, port);
    assert.equal((await switchStatus(sw)).stitches.length, 0);

    const restarts: unknown[] = [];
    a.on('switch:restarted', (m) => restarts.push(m));
    const reinstalled = log.wait(/stitch re-installed/);
    await a.control({ op: 'query' });
    await reinstalled;
    assert.deepEqual(restarts, [{ address: `127.0.0.1:${port}`, previousBootId: oldBoot, bootId: sw.bootId }]);
    const table = (await switchStatus(sw)).stitches;
    assert.equal(table.length, 1);
    assert.equal(table[0]!.spec.clientLeg.client.port, b!.shell.get(id)!.client.port);
    assert.equal(a.status().discovery.bootId, sw.bootId);
    // Discovering again sees the same new boot: no second event.
    await a.discover();
    assert.equal(restarts.length, 1);
  });

  it('agent - the last discovery is persisted (conf), one file per control path', async () => {
    dir = mkdtempSync(join(tmpdir(), 'tcp-stitch-agent-'));
    const a = make({ controlPath: join(dir, 'shell-1.sock'), settingsDir: dir });
    await a.start();
    const files = readdirSync(dir).filter((f) => f.endsWith('.json'));
    assert.equal(files.length, 1);
    assert.match(files[0]!, /^shell-[0-9a-f]{16}\.json$/);
    const saved = JSON.parse(readFileSync(join(dir, files[0]!), 'utf8'));
    assert.equal(saved.switchMode, 'off');
    assert.equal(saved.lastDiscovery.available, false);
    assert.equal(saved.lastDiscovery.mode, 'off');
    assert.match(saved.lastDiscovery.reason, /^switch off/);
  });

  it('agent - close() leaves no timer, socket or control client, and a closed agent refuses to start', async () => {
    sw = await capableSwitch(log.logger);
    const a = make({ ...preconfigured(), discovery: { rediscoverMs: 1000, interfacePollMs: 100 } });
    await a.start();
    assert.ok(projectTimers().some((t) => /agent\/index\.ts/.test(t)), 'the agent runs timers while started');
    assert.ok(a.status().control, 'a control client exists');
    await a.close();
    await a.close();
    await new Promise((r) => setImmediate(r));
    assert.deepEqual(projectTimers().filter((t) => /\/agent\//.test(t)), []);
    await assert.rejects(a.start(), { code: 'TCP_STITCH_CLOSED' });
    await assert.rejects(a.discover(), { code: 'TCP_STITCH_CLOSED' });
    const id = await b!.connect();
    await assert.rejects(b!.shell.stitch(id), /stitching is not available/);
  });

  it('agent - createAgent validates its options and the policy file up front', async () => {
    const base = { shell: b!.shell, logger: log.logger, core: { host: '127.0.0.3', port: 9 }, switch: { mode: 'off' as const } };
    assert.throws(() => createAgent({ ...base, core: { host: '', port: 9 } }), /core must be/);
    assert.throws(() => createAgent({ ...base, switch: { mode: 'maybe' } as never }), /switch must be/);
    assert.throws(() => createAgent({ ...base, discovery: { waitMs: 0 } }), /discovery\.waitMs/);
    assert.throws(() => createAgent({ ...base, drainWarnMs: 0 }), /drainWarnMs must be a number of milliseconds from 1 to 3600000, got 0/);
    dir = mkdtempSync(join(tmpdir(), 'tcp-stitch-agent-'));
    const policyFile = join(dir, 'bad.json');
    writeFileSync(policyFile, JSON.stringify({ version: 1, mode: 'auto', evaluationIntervalMs: 1000, rules: [{ name: 'x', minAgeMS: 5 }] }));
    assert.throws(() => createAgent({ ...base, policyFile }), (err: Error & { code?: string }) => {
      assert.equal(err.code, 'TCP_STITCH_POLICY');
      assert.match(err.message, /\/rules\/0\/minAgeMS/);
      return true;
    });
  });
});
