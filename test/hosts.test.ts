// The namespace test bed itself: topologies, cleanup, helpers. Only 198.18.0.0/15 and loopback.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createTopology, nodeCommand, nodeInNs, pidAlive, requirePrivileges, sweepStale, type Topology } from './hosts.ts';

const ip = (...args: string[]) => spawnSync('ip', args, { encoding: 'utf8' });
const netnsNames = () => ip('netns', 'list').stdout.split('\n').map((l) => l.split(/\s+/)[0]!).filter(Boolean);
const ours = () => netnsNames().filter((n) => n.startsWith(`tst${process.pid}r`)).sort();
/** IPv4 addresses per non-loopback interface inside a namespace. */
function v4addrs(ns: string): Record<string, string> {
  const res: Record<string, string> = {};
  for (const l of ip('-n', ns, '-4', '-o', 'addr', 'show').stdout.split('\n')) {
    const m = /^\d+:\s+(\S+)\s+inet\s+([\d.]+)\//.exec(l);
    if (m && m[1] !== 'lo') res[m[1]!] = m[2]!;
  }
  return res;
}

describe('hosts', function () {
  this.timeout(15_000);
  before(function () { requirePrivileges(this, 'hosts tests'); });

  describe('standard topology', function () {
    let t: Topology;
    before(async function () { t = await createTopology(); });
    after(async function () { await t?.destroy(); });

    it('C pings B and A pings C', async function () {
      const cb = await t.c.ping(t.b.addr);
      assert.equal(cb.result, 'reply', cb.detail);
      const ac = await t.a.ping(t.c.addr);
      assert.equal(ac.result, 'reply', ac.detail);
    });

    it('addresses and names follow the plan', function () {
      assert.deepEqual([t.c.addr, t.s.addr, t.a.addr, t.b.addr], ['198.18.1.2', '198.18.2.1', '198.18.2.2', '198.18.3.2']);
      assert.deepEqual(v4addrs(t.s.ns), { 'to-c': '198.18.1.1', 'to-a': '198.18.2.1', 'to-b': '198.18.3.1' });
      assert.deepEqual(v4addrs(t.a.ns), t.a.addrs);
      assert.equal(t.r, undefined);
      assert.match(t.a.ns, /^tst\d+r[0-9a-f]{4}-a$/);
    });

    it("A's packets to B are routed via S", function () {
      assert.match(ip('-n', t.a.ns, 'route', 'get', '198.18.3.2').stdout, /198\.18\.3\.2 via 198\.18\.2\.1 dev to-s /);
    });

    it("a TTL-1 ping from A towards B dies at S, which answers from its A-facing address", async function () {
      const r = await t.a.ping('198.18.3.2', { ttl: 1 });
      assert.deepEqual([r.result, r.from], ['time-exceeded', '198.18.2.1'], r.detail);
    });

    it('the same probe through net-ping (the fallback without a ping binary) names S too', async function () {
      const r = await t.a.ping('198.18.3.2', { ttl: 1, tool: 'net-ping' });
      assert.deepEqual([r.result, r.from], ['time-exceeded', '198.18.2.1'], r.detail);
      const ok = await t.c.ping(t.b.addr, { tool: 'net-ping' });
      assert.equal(ok.result, 'reply', ok.detail);
    });

    it("S forwards with tx checksum offload off on its interfaces; IPv6 is off everywhere", async function () {
      assert.equal((await t.s.runOk('cat', ['/proc/sys/net/ipv4/ip_forward'])).stdout.trim(), '1');
      assert.equal((await t.a.runOk('cat', ['/proc/sys/net/ipv4/ip_forward'])).stdout.trim(), '0');
      for (const i of ['to-a', 'to-b', 'to-c']) {
        assert.match((await t.s.runOk('ethtool', ['-k', i])).stdout, /^tx-checksumming: off/m, i);
      }
      assert.match((await t.b.runOk('ethtool', ['-k', 'to-s'])).stdout, /^tx-checksumming: on/m);
      for (const h of t.hosts) assert.equal(ip('-n', h.ns, '-6', '-o', 'addr', 'show').stdout.trim(), '', h.ns);
    });

    it('netstat() reads the counters of its own namespace', async function () {
      const [c0, a0] = await Promise.all([t.c.netstat(), t.a.netstat()]);
      for (const k of ['Tcp.RetransSegs', 'TcpExt.PAWSEstab', 'TcpExt.TCPSACKDiscard', 'Tcp.InCsumErrors']) {
        assert.equal(typeof c0[k], 'number', k);
      }
      assert.equal((await t.c.ping(t.b.addr)).result, 'reply');
      const [c1, a1] = await Promise.all([t.c.netstat(), t.a.netstat()]);
      assert.equal(c1['Icmp.OutEchos']! - c0['Icmp.OutEchos']!, 1);
      assert.equal(a1['Icmp.OutEchos'], a0['Icmp.OutEchos']);
    });

    it('run() rejects on timeout and leaves nothing running', async function () {
      await assert.rejects(t.b.run('sleep', ['10'], { timeoutMs: 200 }), /timed out after 200 ms/);
      assert.equal(ip('netns', 'pids', t.b.ns).stdout.trim(), '');
      const r = await t.b.run('sh', ['-c', 'cat; echo err >&2; exit 3'], { input: 'in' });
      assert.deepEqual([r.stdout, r.stderr, r.code], ['in', 'err\n', 3]);
      await assert.rejects(t.b.runOk('false', []), /exited 1/);
    });

    it('waitForListen() and nodeInNs() run project TypeScript inside a namespace', async function () {
      const dir = mkdtempSync(join(tmpdir(), 'tst-hosts-'));
      try {
        const script = join(dir, 'srv.mts');
        writeFileSync(script, `import net from 'node:net';
const port: number = Number(process.argv[2]);
net.createServer((s) => s.end('hi from ' + process.argv[3])).listen(port, '0.0.0.0');\n`);
        const srv = nodeInNs(t.b, script, ['7001', 'b']);
        await t.b.waitForListen(7001);
        const [cmd, args] = nodeCommand(join(dir, 'cli.mts'));
        writeFileSync(join(dir, 'cli.mts'), `import net from 'node:net';
const s = net.connect(7001, '${t.b.addr}'); let d: string = ''; s.on('data', (b) => { d += b; }); s.on('end', () => console.log(d));\n`);
        const r = await t.c.runOk(cmd, args);
        assert.equal(r.stdout.trim(), 'hi from b');
        srv.kill();
      } finally { rmSync(dir, { recursive: true, force: true }); }
    });
  });

  describe('two-hop topology', function () {
    let t: Topology;
    before(async function () { t = await createTopology({ variant: 'two-hop' }); });
    after(async function () { await t?.destroy(); });

    it('a TTL-1 ping from A towards B answers from R, TTL 2 from S, and B is reachable', async function () {
      assert.ok(t.r);
      const r1 = await t.a.ping('198.18.3.2', { ttl: 1 });
      assert.deepEqual([r1.result, r1.from], ['time-exceeded', '198.18.4.1'], r1.detail);
      const r2 = await t.a.ping('198.18.3.2', { ttl: 2 });
      assert.deepEqual([r2.result, r2.from], ['time-exceeded', '198.18.2.1'], r2.detail);
      assert.equal((await t.a.ping(t.b.addr)).result, 'reply');
      assert.equal((await t.c.ping(t.a.addr)).result, 'reply');
      assert.deepEqual([t.a.addr, t.r.addr, t.s.addr], ['198.18.4.2', '198.18.2.2', '198.18.2.1']);
    });
  });

  describe('multihomed topology', function () {
    let t: Topology;
    before(async function () { t = await createTopology({ variant: 'multihomed' }); });
    after(async function () { await t?.destroy(); });

    it('A has two non-loopback interfaces with addresses, both usable', async function () {
      assert.deepEqual(v4addrs(t.a.ns), { 'to-s': '198.18.2.2', 'to-s2': '198.18.5.2' });
      assert.deepEqual(t.a.addrs, { 'to-s': '198.18.2.2', 'to-s2': '198.18.5.2' });
      assert.equal((await t.a.ping('198.18.5.1')).result, 'reply');
      assert.equal((await t.a.ping(t.c.addr)).result, 'reply');
    });
  });

  describe('combined topology', function () {
    let t: Topology;
    before(async function () { t = await createTopology({ variant: 'combined' }); });
    after(async function () { await t?.destroy(); });

    it('B is the router: C reaches B directly, and a TTL-1 probe from A is answered by B itself', async function () {
      assert.equal(t.s, t.b);
      assert.equal(t.hosts.length, 3);
      // one hop: C's next hop towards B's core address is B's own C-facing address
      assert.match(ip('-n', t.c.ns, 'route', 'get', t.b.addr).stdout, /via 198\.18\.1\.1 dev to-b /);
      assert.equal(t.b.addrs['to-c'], '198.18.1.1');
      assert.equal((await t.c.ping(t.b.addr, { ttl: 1 })).result, 'reply');
      const r = await t.a.ping(t.c.addr, { ttl: 1 });
      assert.deepEqual([r.result, r.from], ['time-exceeded', '198.18.2.1'], r.detail);
      assert.equal((await t.a.ping(t.c.addr)).result, 'reply');
      assert.match((await t.b.runOk('ethtool', ['-k', 'to-c'])).stdout, /^tx-checksumming: off/m);
    });
  });

  describe('options', function () {
    it('differentWindowScales gives the legs different window scales; mtu and tcp apply', async function () {
      const t = await createTopology({ differentWindowScales: true, mtu: { sb: 1400 }, tcp: { a: { 'net.ipv4.tcp_sack': 0 } } });
      try {
        assert.match(ip('-n', t.b.ns, 'link', 'show', 'to-s').stdout, / mtu 1400 /);
        assert.match(ip('-n', t.s.ns, 'link', 'show', 'to-b').stdout, / mtu 1400 /);
        assert.match(ip('-n', t.s.ns, 'link', 'show', 'to-c').stdout, / mtu 1500 /);
        assert.equal((await t.a.runOk('cat', ['/proc/sys/net/ipv4/tcp_sack'])).stdout.trim(), '0');
        const srv = t.b.spawn(process.execPath, ['-e', `require('net').createServer(() => {}).listen(7002)`]);
        await t.b.waitForListen(7002);
        const r = await t.c.runOk(process.execPath, ['-e', `
          const s = require('net').connect(7002, '${t.b.addr}', () => {
            console.log(require('child_process').execFileSync('ss', ['-Htin', 'dst', '${t.b.addr}']).toString());
            s.destroy();
          });`]);
        const m = /wscale:(\d+),(\d+)/.exec(r.stdout);
        assert.ok(m, r.stdout);
        const [snd, rcv] = [Number(m[1]), Number(m[2])]; // B's scale, C's scale
        assert.ok(rcv > snd, `C's window scale ${rcv} should exceed B's ${snd}`);
        srv.kill();
      } finally { await t.destroy(); }
    });

    it('bpffs: a private bpffs is mounted for the run and removed on destroy', async function () {
      const t = await createTopology({ bpffs: true });
      assert.ok(t.bpffs);
      assert.equal(spawnSync('mountpoint', ['-q', t.bpffs]).status, 0);
      assert.match(spawnSync('stat', ['-f', '-c', '%T', t.bpffs], { encoding: 'utf8' }).stdout, /bpf/);
      // visible from inside a namespace despite `ip netns exec` remounting /sys
      assert.equal((await t.s.run('mountpoint', ['-q', t.bpffs])).code, 0);
      await t.destroy();
      assert.equal(existsSync(t.bpffs), false);
    });

    it('a bad option fails with an error naming it and leaves nothing behind', async function () {
      const before = ours();
      await assert.rejects(createTopology({ mtu: { sb: 50 } }), /mtu\.sb=50 rejected by the kernel/);
      await assert.rejects(createTopology({ mtu: { ar: 1400 } }), /invalid option mtu\.ar: no such link in variant 'standard'/);
      await assert.rejects(createTopology({ tcp: { b: { 'net.ipv4.no_such_sysctl': 1 } } }), /configuring host B failed/);
      await assert.rejects(createTopology({ variant: 'bogus' as 'standard' }), /invalid option variant="bogus"/);
      assert.deepEqual(ours(), before);
      assert.deepEqual(spawnSync('sh', ['-c', `ls -d /run/tcp-stitch-tst${process.pid}r* 2>/dev/null`], { encoding: 'utf8' }).stdout, '');
    });
  });

  describe('cleanup', function () {
    it('destroy() kills spawned children (and their descendants), deletes every namespace, and is idempotent', async function () {
      const t = await createTopology({ variant: 'two-hop' });
      const names = t.hosts.map((h) => h.ns);
      assert.deepEqual(names.filter((n) => netnsNames().includes(n)).sort(), [...names].sort());
      const plain = t.a.spawn('sleep', ['60']);
      const stubborn = t.b.spawn('sh', ['-c', `trap '' TERM; sleep 60 & echo $!; wait`]);
      const grandchild = await new Promise<number>((res) => stubborn.stdout!.once('data', (b: Buffer) => res(Number(String(b).trim()))));
      const pids = [plain.pid!, stubborn.pid!, grandchild];
      assert.ok(pids.every(pidAlive));
      await t.destroy();
      assert.deepEqual(pids.filter(pidAlive), []);
      assert.deepEqual(names.filter((n) => netnsNames().includes(n)), []);
      await t.destroy(); // again: nothing to do, no error
    });

    it('sweepStale() removes namespaces and bpffs mounts of dead pids and leaves live ones alone', async function () {
      // Random names: several runs of this file may go on at once (other engineers, CI shards).
      let dead = 999_999 + Math.floor(Math.random() * 1000);
      while (pidAlive(dead)) dead++;
      const hex = () => randomBytes(2).toString('hex');
      const staleNs = `tst${dead}r${hex()}-c`;
      const liveNs = `tst${process.pid}r${hex()}-x`;
      const staleFs = `/run/tcp-stitch-tst${dead}r${hex()}`;
      const t = await createTopology();
      try {
        assert.equal(ip('netns', 'add', staleNs).status, 0);
        assert.equal(ip('netns', 'add', liveNs).status, 0);
        mkdirSync(staleFs, { recursive: true });
        assert.equal(spawnSync('mount', ['-t', 'bpf', 'bpf', staleFs]).status, 0);
        const removed = await sweepStale();
        assert.ok(removed.includes(staleNs), `removed: ${removed.join(', ')}`);
        assert.ok(removed.includes(staleFs), `removed: ${removed.join(', ')}`);
        assert.equal(existsSync(staleFs), false);
        const left = netnsNames();
        assert.ok(!left.includes(staleNs));
        assert.ok(left.includes(liveNs));
        for (const h of t.hosts) assert.ok(left.includes(h.ns), h.ns);
        assert.equal((await t.c.ping(t.b.addr)).result, 'reply');
      } finally {
        ip('netns', 'del', staleNs);
        ip('netns', 'del', liveNs);
        spawnSync('umount', [staleFs]);
        rmSync(staleFs, { recursive: true, force: true });
        await t.destroy();
      }
    });
  });

  after(function () {
    const left = ours();
    assert.deepEqual(left, [], `namespaces left behind: ${left.join(', ')}`);
  });
});
