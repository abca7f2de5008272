import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import { pathToFileURL } from 'node:url';
import type { IngressEgressPoint, Route } from '../agent/interfaces.ts';
import { findNextHop, type PingSession, type PingSessionFactory, type PingSessionOptions } from '../agent/next-hop.ts';
import { createTopology, PROJECT_ROOT, requirePrivileges, tsxLoader, type Host, type Topology } from './hosts.ts';
import { captureLogger } from './helpers.ts';


/** net-ping's error shapes: a name and, for ICMP errors, the answering address in `.source`. */
function netPingError(name: string, source?: string): Error {
  const e = new Error(`${name} (source=${source})`);
  e.name = name;
  return Object.assign(e, source ? { source } : {});
}

/** A fake net-ping: answers each pingHost with `answer` (asynchronously, like the real one). */
function fakePing(answer: (target: string) => Error | null | 'never' | 'throw-on-open') {
  const calls = { opened: [] as PingSessionOptions[], pinged: [] as string[], closed: 0 };
  const factory: PingSessionFactory = (options) => {
    calls.opened.push(options);
    if (answer('') === 'throw-on-open') throw new Error('Operation not permitted');
    const session: PingSession = {
      pingHost(target, cb) {
        calls.pinged.push(target);
        const a = answer(target);
        if (a !== 'never') setImmediate(() => cb(a as Error | null, target));
      },
      close() { calls.closed++; },
      on() { return session; },
    };
    return session;
  };
  return { factory, calls };
}

const POINT: IngressEgressPoint = { ifname: 'to-s', address: '198.18.2.2', prefixLen: 24, addresses: ['198.18.2.2/24'] };
const route = (destination: string, prefixLen: number, gateway?: string, ifname = 'to-s', metric = 0): Route => ({
  ifname, destination, prefixLen, metric, isDefault: prefixLen === 0, flags: gateway ? 3 : 1, ...(gateway ? { gateway } : {}),
});
const CONNECTED = route('198.18.2.0', 24);
const VIA_GATEWAY = [route('0.0.0.0', 0, '198.18.2.1'), CONNECTED];
// A device route to everything: the kernel ARPs for each destination, so the table cannot say which
// router answers (the two-hop variant with proxy ARP on R).
const UNCLEAR = [route('198.18.0.0', 15), CONNECTED];

describe('next-hop - from the routing table', () => {
  it('next-hop - a gateway route names the gateway; no probe', async () => {
    const { factory, calls } = fakePing(() => null);
    const r = await findNextHop({ towards: '198.18.3.2', point: POINT, routes: VIA_GATEWAY, pingSession: factory, logger: captureLogger().logger });
    assert.deepEqual(r, { address: '198.18.2.1', via: 'route', ifname: 'to-s' });
    assert.equal(calls.opened.length, 0);
  });

  it('next-hop - an on-link destination is its own next hop (combined / direct)', async () => {
    const { factory, calls } = fakePing(() => null);
    const r = await findNextHop({ towards: '198.18.2.1', point: POINT, routes: VIA_GATEWAY, pingSession: factory, logger: captureLogger().logger });
    assert.deepEqual(r, { address: '198.18.2.1', via: 'direct', ifname: 'to-s' });
    assert.equal(calls.opened.length, 0);
  });

  it('next-hop - a route that leaves by another interface is refused with the reason', async () => {
    const r = await findNextHop({ towards: '198.18.3.2', point: POINT, routes: [route('0.0.0.0', 0, '198.18.5.1', 'to-s2')], probe: 'always', logger: captureLogger().logger });
    assert.equal(r.address, undefined);
    assert.match(r.address === undefined ? r.reason : '', /leaves by to-s2, not by the ingress\/egress point to-s/);
  });

  it('next-hop - probe "never" with an unclear route gives no address and says why', async () => {
    const r = await findNextHop({ towards: '198.18.3.2', point: POINT, routes: UNCLEAR, probe: 'never', logger: captureLogger().logger });
    assert.equal(r.address, undefined);
    assert.match(r.address === undefined ? r.reason : '', /device route \(dev to-s\) outside 198\.18\.2\.2\/24/);
  });

  it('next-hop - rejects a towards that is not an IPv4 address', async () => {
    await assert.rejects(findNextHop({ towards: 'core.example', point: POINT, routes: VIA_GATEWAY }), { code: 'TCP_STITCH_INVALID_ARGUMENT' });
  });
});

describe('next-hop - TTL-1 probe (fake ping session)', () => {
  it('next-hop - time-exceeded names the router, and the session is closed', async () => {
    const { factory, calls } = fakePing(() => netPingError('TimeExceededError', '198.18.4.1'));
    const r = await findNextHop({ towards: '198.18.3.2', point: POINT, routes: UNCLEAR, pingSession: factory, logger: captureLogger().logger });
    assert.deepEqual(r, { address: '198.18.4.1', via: 'icmp', ifname: 'to-s', probe: { status: 'answered', address: '198.18.4.1', kind: 'time-exceeded' } });
    assert.deepEqual(calls.opened, [{ ttl: 1, timeout: 1000, retries: 1 }]);
    assert.deepEqual(calls.pinged, ['198.18.3.2']);
    assert.equal(calls.closed, 1);
  });

  it('next-hop - an echo reply at TTL 1 means the destination is the next hop', async () => {
    const { factory, calls } = fakePing(() => null);
    const r = await findNextHop({ towards: '198.18.3.2', point: POINT, routes: UNCLEAR, pingSession: factory, logger: captureLogger().logger });
    assert.equal(r.address, '198.18.3.2');
    assert.ok(r.address !== undefined && r.via === 'icmp');
    assert.equal(calls.closed, 1);
  });

  it('next-hop - equal routes that disagree are unclear, so the probe decides', async () => {
    const { factory } = fakePing(() => netPingError('TimeExceededError', '198.18.2.9'));
    const r = await findNextHop({
      towards: '198.18.3.2', point: POINT, pingSession: factory, logger: captureLogger().logger,
      routes: [route('0.0.0.0', 0, '198.18.2.1'), route('0.0.0.0', 0, '198.18.2.9'), CONNECTED],
    });
    assert.deepEqual([r.address, r.address !== undefined && r.via], ['198.18.2.9', 'icmp']);
  });

  it('next-hop - probe "always" confirms the table, and wins (with a warning) when they differ', async () => {
    const same = fakePing(() => netPingError('TimeExceededError', '198.18.2.1'));
    const ok = await findNextHop({ towards: '198.18.3.2', point: POINT, routes: VIA_GATEWAY, probe: 'always', pingSession: same.factory, logger: captureLogger().logger });
    assert.deepEqual(ok, { address: '198.18.2.1', via: 'route', ifname: 'to-s', probe: { status: 'answered', address: '198.18.2.1', kind: 'time-exceeded' } });

    const other = fakePing(() => netPingError('TimeExceededError', '198.18.2.7'));
    const { logger, lines } = captureLogger();
    const differ = await findNextHop({ towards: '198.18.3.2', point: POINT, routes: VIA_GATEWAY, probe: 'always', pingSession: other.factory, logger });
    assert.deepEqual([differ.address, differ.address !== undefined && differ.via], ['198.18.2.7', 'icmp']);
    assert.equal(lines.filter((l) => l.level === 'warn' && /disagree/.test(String(l.message))).length, 1);
  });

  it('next-hop - a timeout is a failed probe wrapped in DiscoveryError; the session is closed', async () => {
    const { factory, calls } = fakePing(() => netPingError('RequestTimedOutError'));
    const r = await findNextHop({ towards: '198.18.3.2', point: POINT, routes: UNCLEAR, pingSession: factory, logger: captureLogger().logger });
    assert.equal(r.address, undefined);
    assert.ok(r.probe?.status === 'failed');
    assert.equal(r.probe.error?.code, 'TCP_STITCH_DISCOVERY');
    assert.equal((r.probe.error?.cause as Error).name, 'RequestTimedOutError');
    assert.match(r.address === undefined ? r.reason : '', /TTL-1 probe failed: .*RequestTimedOutError/);
    assert.equal(calls.closed, 1);
  });

  it('next-hop - a session that never calls back is given up, and closed', async () => {
    const { factory, calls } = fakePing(() => 'never');
    const r = await findNextHop({ towards: '198.18.3.2', point: POINT, routes: UNCLEAR, pingSession: factory, probeTimeoutMs: 10, probeRetries: 0, logger: captureLogger().logger });
    assert.ok(r.address === undefined && r.probe?.status === 'failed');
    assert.equal(calls.closed, 1);
  });

  it('next-hop - EPERM on session creation: probe skipped with one log line, no throw, table answer kept', async () => {
    const { factory, calls } = fakePing(() => 'throw-on-open');
    const { logger, lines } = captureLogger();
    const clear = await findNextHop({ towards: '198.18.3.2', point: POINT, routes: VIA_GATEWAY, probe: 'always', pingSession: factory, logger });
    assert.deepEqual(clear, { address: '198.18.2.1', via: 'route', ifname: 'to-s', probe: { status: 'skipped', reason: 'no raw-socket privilege (CAP_NET_RAW)' } });
    const unclear = await findNextHop({ towards: '198.18.3.2', point: POINT, routes: UNCLEAR, pingSession: factory, logger });
    assert.equal(unclear.address, undefined);
    assert.match(unclear.address === undefined ? unclear.reason : '', /TTL-1 probe skipped: no raw-socket privilege/);
    assert.equal(lines.length, 1, JSON.stringify(lines));
    assert.equal(lines[0]!.level, 'warn');
    assert.match(String(lines[0]!.message), /probe skipped: opening a raw socket was refused \(needs CAP_NET_RAW/);
    assert.equal(calls.opened.length, 1, 'once refused, the probe is not tried again');
  });

  it('next-hop - another error opening the session is a failed probe, not a crash', async () => {
    const factory: PingSessionFactory = () => { throw new Error('raw.node: cannot open shared object file'); };
    const r = await findNextHop({ towards: '198.18.3.2', point: POINT, routes: VIA_GATEWAY, probe: 'always', pingSession: factory, logger: captureLogger().logger });
    assert.equal(r.address, '198.18.2.1');
    assert.ok(r.probe?.status === 'failed' && r.probe.error?.code === 'TCP_STITCH_DISCOVERY');
  });
});

/** Socket file descriptors this process holds (a raw socket is not a libuv handle, so count fds). */
function openSockets(): string[] {
  return fs.readdirSync('/proc/self/fd').flatMap((fd) => {
    try {
      const target = fs.readlinkSync(`/proc/self/fd/${fd}`);
      return target.startsWith('socket:') ? [target] : [];
    } catch {
      return [];
    }
  }).sort();
}

// Real net-ping on loopback only (allowed traffic): opens a raw socket, sends one TTL-1 echo to
// 127.0.0.2 and must leave no handle behind.
describe('next-hop - real net-ping on loopback', () => {
  before(function () {
    if (process.getuid?.() !== 0) {
      console.warn('  [skip] next-hop - real net-ping needs root (CAP_NET_RAW)');
      this.skip();
    }
  });

  it('next-hop - a real session answers and is closed (no leaked socket)', async () => {
    const before = openSockets();
    const lo: IngressEgressPoint = { ifname: 'lo', address: '127.0.0.1', prefixLen: 32, addresses: ['127.0.0.1/32'] };
    const r = await findNextHop({ towards: '127.0.0.2', point: lo, routes: [route('127.0.0.0', 8, undefined, 'lo')], logger: captureLogger().logger });
    assert.deepEqual(r, { address: '127.0.0.2', via: 'icmp', ifname: 'lo', probe: { status: 'answered', address: '127.0.0.2', kind: 'echo-reply' } });
    assert.deepEqual(openSockets(), before, 'the raw socket was not closed');
  });
});

// ---------------------------------------------------------------------------------------------------
// In network namespaces: the real kernel's interfaces and routes, real ICMP.

/** Runs inside a namespace: prints countIngressEgress() and findNextHop() results as one JSON line. */
const SCRIPT = `
const [root, argsJson] = process.argv.slice(1);
const { countIngressEgress } = await import(root + '/agent/interfaces.ts');
const { findNextHop } = await import(root + '/agent/next-hop.ts');
const args = JSON.parse(argsJson);
const count = countIngressEgress(args.iface ? { iface: args.iface } : {});
const hops = [];
if (count.verdict.usable) {
  for (let i = 0; i < (args.calls ?? 1); i++) {
    hops.push(await findNextHop({ towards: args.towards, point: count.verdict.point, probe: args.probe }));
  }
}
process.stdout.write(JSON.stringify({ count, hops }) + '\\n');
`;

interface ScriptResult {
  count: { points: { ifname: string; address: string }[]; verdict: { usable: boolean; reason?: string; point?: { ifname: string } } };
  hops: { address?: string; via?: string; reason?: string; probe?: { status: string; kind?: string } }[];
  stderr: string;
}

type Caps = 'all' | 'no-net-raw';
let dropCaps: string[] | undefined | null;

/** argv prefix that runs a command without CAP_NET_RAW (setpriv from util-linux, else capsh). */
function noNetRawPrefix(): string[] | null {
  if (dropCaps !== undefined) return dropCaps;
  const has = (cmd: string) => spawnSync('sh', ['-c', `command -v ${cmd}`], { stdio: 'ignore' }).status === 0;
  if (has('setpriv')) return (dropCaps = ['setpriv', '--inh-caps=-net_raw', '--bounding-set=-net_raw']);
  if (has('capsh')) return (dropCaps = ['capsh', '--drop=cap_net_raw', '--', '-c', 'exec "$0" "$@"']);
  return (dropCaps = null);
}

async function runScript(host: Host, args: Record<string, unknown>, caps: Caps = 'all'): Promise<ScriptResult> {
  const node = [process.execPath, '--import', tsxLoader(), '--input-type=module', '-e', SCRIPT,
    pathToFileURL(PROJECT_ROOT).href, JSON.stringify(args)];
  let argv = node;
  if (caps === 'no-net-raw') {
    const prefix = noNetRawPrefix();
    assert.ok(prefix, 'neither setpriv nor capsh is installed');
    argv = [...prefix, ...node];
  }
  const r = await host.run(argv[0]!, argv.slice(1), { cwd: PROJECT_ROOT, timeoutMs: 30_000 });
  assert.equal(r.code, 0, `script failed in ${host.ns}: ${r.stderr}`);
  const line = r.stdout.trim().split('\n').pop()!;
  return { ...(JSON.parse(line) as Omit<ScriptResult, 'stderr'>), stderr: r.stderr };
}

const skipLines = (stderr: string) => stderr.split('\n').filter((l) => /probe skipped/.test(l));

describe('next-hop - in network namespaces', function () {
  this.timeout(120_000);
  before(function () { requirePrivileges(this); });

  describe('next-hop - standard topology', () => {
    let topo: Topology | undefined;
    before(async () => { topo = await createTopology({ variant: 'standard' }); });
    after(async () => { await topo?.destroy(); });

    it('next-hop - standard: one ingress/egress point, next hop S 198.18.2.1 from the routing table', async () => {
      const r = await runScript(topo!.a, { towards: topo!.b.addr });
      assert.deepEqual(r.count.points.map((p) => [p.ifname, p.address]), [['to-s', '198.18.2.2']]);
      assert.equal(r.count.verdict.usable, true);
      assert.deepEqual(r.hops, [{ address: '198.18.2.1', via: 'route', ifname: 'to-s' }]);
      assert.deepEqual(skipLines(r.stderr), []);
    });

    it('next-hop - standard: a real TTL-1 probe confirms S', async () => {
      const r = await runScript(topo!.a, { towards: topo!.b.addr, probe: 'always' });
      assert.deepEqual(r.hops[0], { address: '198.18.2.1', via: 'route', ifname: 'to-s', probe: { status: 'answered', address: '198.18.2.1', kind: 'time-exceeded' } });
    });

    it('next-hop - standard without CAP_NET_RAW: next hop from the table, exactly one log line says why the probe was skipped', async function () {
      if (!noNetRawPrefix()) {
        console.warn('  [skip] neither setpriv (util-linux) nor capsh (libcap2-bin) is installed');
        this.skip();
      }
      const r = await runScript(topo!.a, { towards: topo!.b.addr, probe: 'always', calls: 2 }, 'no-net-raw');
      assert.equal(r.hops.length, 2);
      for (const hop of r.hops) {
        assert.deepEqual(hop, { address: '198.18.2.1', via: 'route', ifname: 'to-s', probe: { status: 'skipped', reason: 'no raw-socket privilege (CAP_NET_RAW)' } });
      }
      const lines = skipLines(r.stderr);
      assert.equal(lines.length, 1, r.stderr);
      assert.match(lines[0]!, /CAP_NET_RAW/);
    });
  });

  describe('next-hop - multihomed topology', () => {
    let topo: Topology | undefined;
    before(async () => { topo = await createTopology({ variant: 'multihomed' }); });
    after(async () => { await topo?.destroy(); });

    it('next-hop - multihomed: not usable, several-ingress-egress-points', async () => {
      const r = await runScript(topo!.a, { towards: topo!.b.addr });
      assert.deepEqual(r.count.points.map((p) => p.ifname).sort(), ['to-s', 'to-s2']);
      assert.equal(r.count.verdict.usable, false);
      assert.equal(r.count.verdict.reason, 'several-ingress-egress-points');
      assert.deepEqual(r.hops, []);
    });

    it('next-hop - multihomed: usable once the operator names the interface', async () => {
      const r = await runScript(topo!.a, { towards: topo!.b.addr, iface: 'to-s' });
      assert.equal(r.count.verdict.point?.ifname, 'to-s');
      assert.deepEqual(r.hops, [{ address: '198.18.2.1', via: 'route', ifname: 'to-s' }]);
    });
  });

  describe('next-hop - two-hop topology, route unclear', () => {
    let topo: Topology | undefined;
    before(async () => {
      topo = await createTopology({ variant: 'two-hop' });
      // A loses its gateway: one device route for the whole test range, so A ARPs for every
      // destination and R answers by proxy ARP. The table no longer says who forwards.
      await topo.a.runOk('ip', ['route', 'del', 'default']);
      await topo.a.runOk('ip', ['route', 'add', '198.18.0.0/15', 'dev', 'to-r']);
      await topo.r!.runOk('sh', ['-c', 'echo 1 > /proc/sys/net/ipv4/conf/to-a/proxy_arp']);
    });
    after(async () => { await topo?.destroy(); });

    it('next-hop - two-hop: ICMP time-exceeded names R 198.18.4.1', async () => {
      const r = await runScript(topo!.a, { towards: topo!.b.addr });
      assert.equal(r.count.verdict.usable, true);
      assert.deepEqual(r.hops, [{ address: '198.18.4.1', via: 'icmp', ifname: 'to-r', probe: { status: 'answered', address: '198.18.4.1', kind: 'time-exceeded' } }]);
    });

    it('next-hop - two-hop without CAP_NET_RAW: no next hop, the reason says why, one log line', async function () {
      if (!noNetRawPrefix()) this.skip();
      const r = await runScript(topo!.a, { towards: topo!.b.addr, calls: 2 }, 'no-net-raw');
      for (const hop of r.hops) {
        assert.equal(hop.address, undefined);
        assert.match(hop.reason!, /device route .* TTL-1 probe skipped: no raw-socket privilege/);
      }
      assert.equal(skipLines(r.stderr).length, 1, r.stderr);
    });
  });
});
