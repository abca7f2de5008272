// One-hop discovery end to end (issue 3 acceptance), on real kernels in network namespaces: the agent
// (test/fixtures/discover.ts) runs in A over a dummy shell; the reference switch with a capable table
// datapath (test/fixtures/run-switch.ts) runs in S. What counts as "sent" is measured twice: in A, the
// namespace's Udp OutDatagrams around agent.discover() minus the control client's own requests; in S,
// the switch's received-datagram counter.
import assert from 'node:assert/strict';
import { spawnSync, type ChildProcess } from 'node:child_process';
import { EventEmitter, once } from 'node:events';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ALL_TRANSLATIONS, DEFAULT_PORT, formatKeyFile, generateKey, type SwitchCounters } from '../switch/index.ts';
import { waitForLine } from './bed.ts';
import { createTopology, nodeCommand, nodeInNs, PROJECT_ROOT, requirePrivileges, type Host, type Topology } from './hosts.ts';

const CORE_PORT = 9000;

interface Discovery {
  available: boolean; reason: string; detail?: string; address?: string; port?: number; switchId?: string; bootId?: string;
  capabilities?: { translations: string[] }; rttMs?: number; nextHop?: string; nextHopVia?: string;
}
interface DiscoverLine { type: 'discover'; discovery: Discovery; tookMs: number; udpOut: number; controlSent: number }
type Line = DiscoverLine | { type: 'started'; discovery: Discovery } | { type: 'control'; result?: any; error?: string } | { type: 'event'; event: string; [k: string]: unknown } | { type: 'closed' };

interface Switch { child: ChildProcess; info: { bootId: string; switchId: string; address: string; port: number }; stderr: string[] }

let dir: string;
let keyFile: string;

function collect(child: ChildProcess, into: string[]): void {
  child.stderr?.on('data', (d: Buffer) => into.push(String(d)));
}

async function startSwitch(host: Host, iface: string): Promise<Switch> {
  const child = nodeInNs(host, 'test/fixtures/run-switch.ts', [iface, keyFile], { stdio: ['pipe', 'pipe', 'pipe'] });
  const stderr: string[] = [];
  collect(child, stderr);
  const line = await waitForLine(child, /^ready /, 20_000).catch((err: Error) => {
    throw new Error(`${err.message}; switch stderr: ${stderr.join('')}`);
  });
  return { child, info: JSON.parse(line.slice('ready '.length)), stderr };
}

async function counters(sw: Switch): Promise<SwitchCounters> {
  const line = waitForLine(sw.child, /^\{"counters"/, 10_000);
  sw.child.stdin!.write('counters\n');
  return (JSON.parse(await line) as { counters: SwitchCounters }).counters;
}

/** Kills the switch process we started, by its PID (ip netns exec execs node, so this is node). */
async function kill(sw: Switch): Promise<void> {
  if (sw.child.exitCode !== null || sw.child.signalCode !== null) return;
  const exited = once(sw.child, 'exit');
  process.kill(sw.child.pid!, 'SIGKILL');
  await exited;
}

const NO_NET_RAW = ((): string[] | null => {
  const has = (cmd: string) => spawnSync('sh', ['-c', `command -v ${cmd}`], { stdio: 'ignore' }).status === 0;
  if (has('setpriv')) return ['setpriv', '--inh-caps=-net_raw', '--bounding-set=-net_raw'];
  if (has('capsh')) return ['capsh', '--drop=cap_net_raw', '--', '-c', 'exec "$0" "$@"'];
  return null;
})();

/** Runs the agent script in `host` with `commands` on stdin; resolves with its output lines and logs. */
async function runAgent(host: Host, args: Record<string, unknown>, commands: unknown[] = ['discover'], caps: 'all' | 'no-net-raw' = 'all') {
  const [cmd, argv] = nodeCommand('test/fixtures/discover.ts', [JSON.stringify(args)]);
  let full = [cmd, ...argv];
  if (caps === 'no-net-raw') full = [...NO_NET_RAW!, ...full];
  const r = await host.run(full[0]!, full.slice(1), {
    cwd: PROJECT_ROOT, timeoutMs: 30_000, input: commands.map((c) => (typeof c === 'string' ? c : JSON.stringify(c))).join('\n') + '\n',
  });
  assert.equal(r.code, 0, `agent script failed in ${host.ns}: ${r.stderr}`);
  const lines = r.stdout.trim().split('\n').map((l) => JSON.parse(l) as Line);
  assert.equal(lines.at(-1)?.type, 'closed', `the agent script did not close cleanly: ${r.stdout}`);
  return { lines, discovers: lines.filter((l): l is DiscoverLine => l.type === 'discover'), stderr: r.stderr };
}

/** The agent script kept running in `host`: commands go in one at a time, output lines are collected. */
function interactiveAgent(host: Host, args: Record<string, unknown>) {
  const child = nodeInNs(host, 'test/fixtures/discover.ts', [JSON.stringify(args)], { stdio: ['pipe', 'pipe', 'pipe'] });
  const stderr: string[] = [];
  collect(child, stderr);
  const lines: Line[] = [];
  const bus = new EventEmitter();
  let buf = '';
  child.stdout!.on('data', (d: Buffer) => {
    buf += d;
    const parts = buf.split('\n');
    buf = parts.pop()!;
    for (const p of parts) if (p.trim()) { lines.push(JSON.parse(p)); bus.emit('line'); }
  });
  child.once('exit', () => bus.emit('line'));
  /** The first line from index `from` on that satisfies `pred`; rejects if the script exits or after 15 s. */
  const next = (pred: (l: any) => boolean, from = lines.length): Promise<any> => new Promise((resolve, reject) => {
    const timer = setTimeout(() => done(() => reject(new Error(`no matching line within 15 s: ${JSON.stringify(lines)} ${stderr.join('')}`))), 15_000);
    const done = (f: () => void) => { clearTimeout(timer); bus.off('line', check); f(); };
    const check = () => {
      const hit = lines.slice(from).find(pred);
      if (hit) return done(() => resolve(hit));
      if (child.exitCode !== null || child.signalCode !== null) done(() => reject(new Error(`the agent script exited: ${stderr.join('')}`)));
    };
    bus.on('line', check);
    check();
  });
  return {
    next,
    /** Sends a command; resolves with the next line of `type` after it. */
    ask(command: unknown, type: Line['type']): Promise<any> {
      const from = lines.length;
      child.stdin!.write((typeof command === 'string' ? command : JSON.stringify(command)) + '\n');
      return next((l) => l.type === type, from);
    },
    /** Ends stdin: the agent closes and the script exits. */
    async end(): Promise<{ lines: Line[]; stderr: string }> {
      const exited = child.exitCode !== null ? Promise.resolve() : once(child, 'exit');
      child.stdin!.end();
      await exited;
      assert.equal(lines.at(-1)?.type, 'closed', `the agent script did not close cleanly: ${stderr.join('')}`);
      return { lines, stderr: stderr.join('') };
    },
  };
}

const logLines = (stderr: string, re: RegExp) => stderr.split('\n').filter((l) => re.test(l));

describe('discovery e2e (namespaces)', function () {
  this.timeout(60_000);
  before(function () {
    requirePrivileges(this);
    dir = mkdtempSync(join(tmpdir(), 'tcp-stitch-discovery-'));
    keyFile = join(dir, 'key');
    writeFileSync(keyFile, formatKeyFile([generateKey()]), { mode: 0o600 });
  });
  after(() => { if (dir) rmSync(dir, { recursive: true, force: true }); });

  describe('discovery e2e - standard: switch in S, one hop from A', () => {
    let topo: Topology | undefined;
    let sw: Switch;
    before(async () => {
      topo = await createTopology({ variant: 'standard' });
      sw = await startSwitch(topo.s, 'to-a');
    });
    after(async () => { await topo?.destroy(); });
    const core = () => ({ host: topo!.b.addr, port: CORE_PORT });

    it('discovery e2e - one hop away: available with its capabilities, RTT measured, whole discovery under 50 ms', async () => {
      const before = await counters(sw);
      const { discovers: [d] } = await runAgent(topo!.a, { core: core(), switch: 'auto', keyFile });
      const after = await counters(sw);
      const x = d!.discovery;
      assert.equal(x.available, true, JSON.stringify(x));
      assert.equal(x.reason, 'discovered');
      assert.deepEqual([x.address, x.port, x.switchId, x.bootId], ['198.18.2.1', DEFAULT_PORT, sw.info.switchId, sw.info.bootId]);
      assert.deepEqual(x.capabilities?.translations, ALL_TRANSLATIONS);
      assert.deepEqual([x.nextHop, x.nextHopVia], ['198.18.2.1', 'route']);
      assert.equal(typeof x.rttMs, 'number');
      assert.ok(x.rttMs! >= 0 && x.rttMs! < 50, `rtt ${x.rttMs} ms`);
      assert.ok(d!.tookMs < 50, `discovery took ${d!.tookMs} ms`);
      if (process.env.DEBUG_TEST) console.log(`      discovery took ${d!.tookMs.toFixed(2)} ms, DISCOVER rtt ${x.rttMs} ms`);
      // The positive control for the "nothing sent" checks below: here a DISCOVER did leave A and reach S.
      assert.ok(d!.udpOut - d!.controlSent >= 1, `discovery datagrams from A: ${d!.udpOut} - ${d!.controlSent}`);
      assert.ok(after.received - before.received >= 1, 'S received the DISCOVER');
    });

    it('discovery e2e - preconfigured HOST:PORT: no discovery datagram; capabilities from the authenticated control DISCOVER', async () => {
      const before = await counters(sw);
      const { discovers: [d] } = await runAgent(topo!.a, { core: core(), switch: `${sw.info.address}:${DEFAULT_PORT}`, keyFile });
      const after = await counters(sw);
      const x = d!.discovery;
      assert.equal(x.available, true, JSON.stringify(x));
      assert.deepEqual([x.reason, x.address, x.port, x.bootId], ['preconfigured', '198.18.2.1', DEFAULT_PORT, sw.info.bootId]);
      assert.deepEqual(x.capabilities?.translations, ALL_TRANSLATIONS);
      assert.ok(d!.controlSent >= 1, 'the control client asked the switch');
      assert.equal(d!.udpOut, d!.controlSent, 'every UDP datagram A sent was a control request');
      assert.equal(after.received - before.received, d!.controlSent, 'S received only the control requests');
    });

    it('discovery e2e - preconfigured without a key: available, and nothing at all is sent', async () => {
      const before = await counters(sw);
      const { discovers: [d] } = await runAgent(topo!.a, { core: core(), switch: `${sw.info.address}:${DEFAULT_PORT}` });
      const after = await counters(sw);
      assert.equal(d!.discovery.available, true);
      assert.equal(d!.discovery.reason, 'preconfigured');
      assert.match(d!.discovery.detail ?? '', /no key/);
      assert.equal(d!.udpOut, 0);
      assert.equal(after.received - before.received, 0);
    });

    it('discovery e2e - without CAP_NET_RAW: found from the routing table; one log line says why the ICMP probe was skipped', async function () {
      if (!NO_NET_RAW) {
        console.warn('  [skip] neither setpriv (util-linux) nor capsh (libcap2-bin) is installed');
        this.skip();
      }
      const args = { core: core(), switch: 'auto', keyFile, nextHopProbe: 'always' };
      const without = await runAgent(topo!.a, args, ['discover', 'discover'], 'no-net-raw');
      for (const d of without.discovers) {
        assert.equal(d.discovery.available, true, JSON.stringify(d.discovery));
        assert.deepEqual([d.discovery.nextHop, d.discovery.nextHopVia], ['198.18.2.1', 'route']);
      }
      const skipped = logLines(without.stderr, /probe skipped/);
      assert.equal(skipped.length, 1, without.stderr);
      assert.match(skipped[0]!, /CAP_NET_RAW/);
      // With the capability the same run probes for real and logs no such line.
      const withCap = await runAgent(topo!.a, args, ['discover']);
      assert.equal(withCap.discovers[0]!.discovery.available, true);
      assert.deepEqual(logLines(withCap.stderr, /probe skipped/), []);
    });

    it('discovery e2e - switch restarted: the agent sees the new boot at its next exchange and emits switch:restarted once', async () => {
      const agent = interactiveAgent(topo!.a, { core: core(), switch: 'auto', keyFile });
      const first = await agent.ask('discover', 'discover');
      assert.equal(first.discovery.bootId, sw.info.bootId);
      const q1 = await agent.ask({ op: 'query' }, 'control');
      assert.deepEqual(q1.result?.stitches, [], JSON.stringify(q1));

      await kill(sw);
      sw = await startSwitch(topo!.s, 'to-a');
      assert.notEqual(sw.info.bootId, first.discovery.bootId);

      const q2 = await agent.ask({ op: 'query' }, 'control');
      assert.equal(q2.result?.bootId, sw.info.bootId, JSON.stringify(q2));
      const again = await agent.ask('discover', 'discover');
      assert.equal(again.discovery.bootId, sw.info.bootId);
      const status = await agent.ask({ op: 'status' }, 'control');
      assert.equal(status.result.discovery.bootId, sw.info.bootId);

      const { lines, stderr } = await agent.end();
      const restarts = lines.filter((l): l is Extract<Line, { type: 'event' }> => l.type === 'event' && l.event === 'switch:restarted');
      assert.equal(restarts.length, 1, JSON.stringify(lines));
      assert.deepEqual([restarts[0]!.previousBootId, restarts[0]!.bootId], [first.discovery.bootId, sw.info.bootId]);
      assert.ok(lines.indexOf(restarts[0]!) > lines.indexOf(q1), 'detected after the restart, at the next exchange');
      assert.equal(logLines(stderr, /"component":"agent".*switch restarted|switch restarted.*"component":"agent"/).length, 1, stderr);
    });

    it('discovery e2e - interfaces change: a second interface in A makes stitching unavailable; removing it makes it available again', async () => {
      const agent = interactiveAgent(topo!.a, { core: core(), switch: 'auto', keyFile, interfacePollMs: 100 });
      const started = await agent.ask('start', 'started');
      assert.equal(started.discovery.available, true);
      const lost = agent.next((l) => l.type === 'event' && l.event === 'discovery:change' && l.available === false);
      // A veth pair with both ends inside A (no dummy module here): one more up interface with an address.
      await topo!.a.runOk('ip', ['-batch', '-'], { input: 'link add extra0 type veth peer name extra1\naddress add 198.18.9.1/24 dev extra0\nlink set extra1 up\nlink set extra0 up\n' });
      assert.equal((await lost).reason, 'several-ingress-egress-points');
      const back = agent.next((l) => l.type === 'event' && l.event === 'discovery:change' && l.available === true);
      await topo!.a.runOk('ip', ['link', 'del', 'extra0']);
      assert.equal((await back).reason, 'discovered');
      const { lines } = await agent.end();
      assert.deepEqual(lines.filter((l) => l.type === 'event' && l.event === 'discovery:change').map((l) => (l as unknown as { reason: string }).reason),
        ['discovered', 'several-ingress-egress-points', 'discovered']);
    });

    it('discovery e2e - no switch running: not available, within the configured wait', async () => {
      await kill(sw);
      const waitMs = 300;
      const { discovers: [d] } = await runAgent(topo!.a, { core: core(), switch: 'auto', keyFile, waitMs });
      assert.equal(d!.discovery.available, false);
      assert.equal(d!.discovery.reason, 'no-answer');
      assert.ok(d!.tookMs >= waitMs - 20 && d!.tookMs < waitMs + 150, `took ${d!.tookMs} ms with waitMs ${waitMs}`);
    });
  });

  describe('discovery e2e - two-hop: switch in S, router R between A and S', () => {
    let topo: Topology | undefined;
    let sw: Switch;
    before(async () => {
      topo = await createTopology({ variant: 'two-hop' });
      sw = await startSwitch(topo.s, 'to-r');
    });
    after(async () => { await topo?.destroy(); });

    it('discovery e2e - two hops away: not available, and the switch heard nothing', async () => {
      const { discovers: [d] } = await runAgent(topo!.a, { core: { host: topo!.b.addr, port: CORE_PORT }, switch: 'auto', keyFile, waitMs: 300 });
      assert.equal(d!.discovery.available, false, JSON.stringify(d!.discovery));
      assert.equal(d!.discovery.reason, 'no-answer');
      assert.equal(d!.discovery.nextHop, '198.18.4.1', 'the DISCOVER went to R, the next hop');
      assert.equal((await counters(sw)).received, 0);
    });
  });

  describe('discovery e2e - multihomed: A has two interfaces', () => {
    let topo: Topology | undefined;
    let sw: Switch;
    before(async () => {
      topo = await createTopology({ variant: 'multihomed' });
      sw = await startSwitch(topo.s, 'to-a');
    });
    after(async () => { await topo?.destroy(); });

    it('discovery e2e - several ingress/egress points: not available, and nothing is sent', async () => {
      const { discovers: [d] } = await runAgent(topo!.a, { core: { host: topo!.b.addr, port: CORE_PORT }, switch: 'auto', keyFile });
      assert.equal(d!.discovery.available, false);
      assert.equal(d!.discovery.reason, 'several-ingress-egress-points');
      assert.equal(d!.udpOut, 0);
      assert.equal((await counters(sw)).received, 0);
    });
  });

  describe('discovery e2e - combined: the switch runs in B, the core host', () => {
    let topo: Topology | undefined;
    let sw: Switch;
    before(async () => {
      topo = await createTopology({ variant: 'combined' });
      sw = await startSwitch(topo.b, 'to-a');
    });
    after(async () => { await topo?.destroy(); });

    it('discovery e2e - combined: the switch at the core host, port 7807, no discovery datagram', async () => {
      const { discovers: [d] } = await runAgent(topo!.a, { core: { host: topo!.b.addr, port: CORE_PORT }, switch: 'combined', keyFile });
      const x = d!.discovery;
      assert.equal(x.available, true, JSON.stringify(x));
      assert.deepEqual([x.reason, x.address, x.port, x.bootId], ['combined', topo!.b.addr, DEFAULT_PORT, sw.info.bootId]);
      assert.deepEqual(x.capabilities?.translations, ALL_TRANSLATIONS);
      assert.ok(d!.controlSent >= 1);
      assert.equal(d!.udpOut, d!.controlSent, 'every UDP datagram A sent was a control request');
      assert.equal((await counters(sw)).received, d!.controlSent);
    });
  });
});
