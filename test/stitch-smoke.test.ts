// End to end on the namespace hosts: a plain relay on A (phase 2 by hand), the eBPF datapath in S,
// real kernel TCP at C and B (timestamps, SACK, window scales 10 vs 7). After the stitch the bytes
// flow C<->B through S's translation: sha256 equal at both ends, and the relay moves nothing once
// the datapath reports 'stitched'. S's egress checksum offload is off (the topology's default).
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { createTopology, nodeInNs, requirePrivileges, type Host, type Topology } from './hosts.ts';
import { payload } from './helpers.ts';
import { JsonProc as Proc } from './bed.ts';

const GREETING = 'HELLO FROM THE SHELL\n';
const PREAMBLE = 'TCPSTITCH-PREAMBLE v1 0123456789\n';
const ANSWER = 'OK 42\n';

/** cpu: run the process on that CPU alone (taskset), see the idle-point test. */
const spawnNode = (host: Host, name: string, script: string, args: string[], cpu?: number) =>
  new Proc(name, nodeInNs(host, script, args, { cpu, stdio: ['pipe', 'pipe', 'pipe'] }));

const sha = (...b: Buffer[]) => { const h = createHash('sha256'); for (const x of b) h.update(x); return h.digest('hex'); };

interface Bed {
  driver: Proc; relay: Proc; client: Proc; server: Proc;
  spec: Record<string, unknown>;
  expect: { atClient: string; atServer: string; clientBytes: number; serverBytes: number };
}

async function bed(topo: Topology, sizes: { first: number; total: number; cpu?: number }, marks: number[], serverMarks: number[] = [], dpOptions: object = {}): Promise<Bed> {
  const driver = spawnNode(topo.s, 'S driver', 'test/fixtures/bpf/stitch-driver.ts', [JSON.stringify({ shellIface: 'to-a', bpffs: topo.bpffs, ...dpOptions })]);
  await driver.wait((o) => o.ready === true, 'datapath ready');
  const server = spawnNode(topo.b, 'B', 'test/fixtures/bpf/endpoint.ts', ['server', topo.b.addr, '9000', String(sizes.first), String(sizes.total), '22', ANSWER, [PREAMBLE.length + sizes.first, ...serverMarks].join(',')], sizes.cpu);
  await server.wait((o) => o.ready === true, 'B listening');
  const relay = spawnNode(topo.a, 'A relay', 'test/fixtures/bpf/relay.ts', [topo.a.addr, '8080', topo.b.addr, '9000', GREETING, PREAMBLE, String(ANSWER.length)], sizes.cpu);
  await relay.wait((o) => o.ready === true, 'relay listening');
  const client = spawnNode(topo.c, 'C', 'test/fixtures/bpf/endpoint.ts', ['client', topo.a.addr, '8080', String(sizes.first), String(sizes.total), '11', '-', [GREETING.length + sizes.first, ...marks].join(',')], sizes.cpu);
  const legs = await relay.wait((o) => o.event === 'legs', 'both legs');
  const cl = legs.client as { address: string; port: number };
  const spec = {
    id: 1,
    clientLeg: { client: { address: cl.address, port: cl.port }, shell: { address: topo.a.addr, port: 8080 } },
    coreLeg: { shell: { address: topo.a.addr, port: legs.coreLocalPort as number }, core: { address: topo.b.addr, port: 9000 } },
    clientOffset: 0n, corePreambleLength: PREAMBLE.length, shellOffset: BigInt(GREETING.length), coreAnswerLength: ANSWER.length,
  };
  const cData = payload(sizes.total, 11), bData = payload(sizes.total, 22);
  return {
    driver, relay, client, server, spec,
    expect: {
      atClient: sha(Buffer.from(GREETING), bData), atServer: sha(Buffer.from(PREAMBLE), cData),
      clientBytes: GREETING.length + sizes.total, serverBytes: PREAMBLE.length + sizes.total,
    },
  };
}

/** Waits for the datapath's 'stitched' event; on failure says where the drain stood. */
async function waitStitched(topo: Topology, b: Bed, timeoutMs = 30_000): Promise<Record<string, unknown>> {
  try {
    return await b.driver.wait((o) => o.event === 'state' && (o.status as { state: string }).state === 'stitched', 'stitched', timeoutMs);
  } catch (e) {
    const raw = await b.driver.request({ op: 'status', id: 1 }).catch((x: Error) => ({ error: x.message }));
    const stats = await b.driver.request({ op: 'stats' }).catch((x: Error) => ({ error: x.message }));
    const flows = await b.driver.request({ op: 'flows', spec: b.spec }).catch((x: Error) => ({ error: x.message }));
    const ss = await Promise.all([topo.c, topo.a, topo.b].map(async (h) => {
      const r = await h.run('ss', ['-tinmoe', 'state', 'established']);
      const n = await h.netstat();
      const tcp = Object.entries(n).filter(([k, v]) => v && /^(TcpExt|Tcp)\./.test(k) && !/^Tcp\.(RtoAlgorithm|RtoMin|RtoMax|MaxConn)/.test(k));
      return `${h.name}: ${r.stdout}\n${h.name} counters: ${tcp.map(([k, v]) => `${k}=${v}`).join(' ')}`;
    }));
    throw new Error(`${(e as Error).message.slice(0, 300)}\nstate: ${JSON.stringify(raw)}\nstats: ${JSON.stringify(stats)}\nflows: ${JSON.stringify(flows)}\n${ss.join('\n')}`);
  }
}

async function counters(relay: Proc): Promise<Record<string, number>> {
  const n = relay.lines.length;
  const p = relay.wait((o) => o.counters !== undefined && relay.lines.indexOf(o) >= n, 'counters');
  relay.line('counters');
  return (await p).counters as Record<string, number>;
}

async function finish(b: Bed): Promise<void> {
  const [c, s] = await Promise.all([
    b.client.wait((o) => o.event === 'done', 'C done', 120_000),
    b.server.wait((o) => o.event === 'done', 'B done', 120_000),
  ]);
  assert.equal(c.bytes, b.expect.clientBytes, 'C received every byte');
  assert.equal(c.sha, b.expect.atClient, 'C received exactly the greeting and B\'s stream');
  assert.equal(s.bytes, b.expect.serverBytes, 'B received every byte');
  assert.equal(s.sha, b.expect.atServer, 'B received exactly the preamble and C\'s stream');
}

async function closeDriver(topo: Topology, driver: Proc): Promise<void> {
  const pinDir = (driver.lines.find((o) => o.ready) as { pinDir: string }).pinDir;
  const closed = await driver.request({ op: 'close' });
  assert.equal(closed.fdsAfter, closed.fdsBefore, 'close() left no fd open');
  driver.child.stdin!.end();
  await new Promise<void>((res) => (driver.child.exitCode !== null ? res() : driver.child.once('exit', () => res())));
  for (const i of ['to-a', 'to-b', 'to-c']) {
    const r = await topo.s.runOk('tc', ['filter', 'show', 'dev', i, 'ingress']);
    assert.equal(r.stdout.trim(), '', `no filter left on ${i}`);
    const q = await topo.s.runOk('tc', ['qdisc', 'show', 'dev', i]);
    assert.doesNotMatch(q.stdout, /clsact/, `no clsact left on ${i}`);
  }
  const ls = await topo.s.run('ls', [pinDir]);
  assert.notEqual(ls.code, 0, `pin directory ${pinDir} removed`);
}

describe('stitch smoke (namespaces, eBPF datapath)', function () {
  this.timeout(180_000);
  let topo: Topology | undefined;
  before(function () { requirePrivileges(this, 'eBPF end-to-end tests'); });
  afterEach(async () => { await topo?.destroy(); topo = undefined; });

  it('stitch smoke - stitched at an idle point: 32 MiB each way C<->B, sha256 equal; once stitched the relay moves nothing', async () => {
    topo = await createTopology({ bpffs: true, differentWindowScales: true });
    // C, B and the relay run on one CPU, so each flow's packets stay in order, as a NIC with RSS
    // keeps them. On these veths a flow's packets otherwise split across the two CPUs' backlogs
    // and arrive out of order by up to a few ms: plain routed TCP, iperf3 --bidir C<->B for 3 s,
    // then counts PAWS drops too (63 / 137 and 40 / 0 at C / B in 2 of 6 runs here; 0 in 6 runs
    // pinned). Pinned, a PAWS drop below can only be the timestamp translation's.
    const b = await bed(topo, { first: 1 << 20, total: 32 << 20, cpu: 0 }, []);
    await Promise.all([
      b.client.wait((o) => o.event === 'mark', 'C phase 1'),
      b.server.wait((o) => o.event === 'mark', 'B phase 1'),
    ]);
    const before = await counters(b.relay);
    await b.driver.request({ op: 'install', spec: b.spec });
    // The same id again is refused, and the stitch installed first carries on (checked below).
    await assert.rejects(b.driver.request({ op: 'install', spec: b.spec }), /stitch 1 is already installed/);
    b.client.line('go');
    b.server.line('go');
    const stitched = await waitStitched(topo, b);
    assert.equal((stitched.status as { id: number }).id, 1);
    const atStitched = await counters(b.relay);
    await finish(b);
    const after = await counters(b.relay);
    assert.deepEqual(after, atStitched, 'the relay moved nothing once the datapath said stitched');
    // Between the install and 'stitched' the shell may still take what it had promised C or B (its
    // advertised window, when the other far end's window was smaller): never more than that.
    const moved = { toCore: atStitched.toCore! - before.toCore!, toClient: atStitched.toClient! - before.toClient! };
    console.log(`      relay moved after the install: ${moved.toCore} bytes to B, ${moved.toClient} to C`);
    assert.ok(moved.toCore <= 8 << 20 && moved.toClient <= 8 << 20, `at most one window through the shell: ${JSON.stringify(moved)}`);
    const st = (await b.driver.request({ op: 'status', id: 1 })).status as Record<string, number>;
    // every byte sent after the stitch went through S's translation, or (what the shell had
    // promised) through the shell before it was silenced
    assert.ok(st.bytesClientToCore + moved.toCore >= 31 << 20, `C->B bytes translated: ${st.bytesClientToCore} + relayed ${moved.toCore}`);
    assert.ok(st.bytesCoreToClient + moved.toClient >= 31 << 20, `B->C bytes translated: ${st.bytesCoreToClient} + relayed ${moved.toClient}`);
    const [nc, nb] = await Promise.all([topo.c.netstat(), topo.b.netstat()]);
    assert.equal(nc['TcpExt.PAWSEstab'] ?? 0, 0, 'no PAWS drop at C');
    assert.equal(nb['TcpExt.PAWSEstab'] ?? 0, 0, 'no PAWS drop at B');
    assert.equal(nc['Tcp.InCsumErrors'] ?? 0, 0, 'no checksum error at C');
    assert.equal(nb['Tcp.InCsumErrors'] ?? 0, 0, 'no checksum error at B');
    // Both ends sent FIN and acknowledged the other's: the program reports the end in its events
    // ring, and the daemon reads it from there (its sweep of settled stitches runs only when a
    // record was lost): without the ring nothing would report it.
    const closed = await b.driver.wait((o) => o.event === 'state' && (o.status as { state: string }).state === 'closed', 'closed', 10_000);
    assert.equal((closed.status as { reason: string }).reason, 'fin');
    assert.doesNotMatch(b.driver.errText, /events ring not watched/);
    await closeDriver(topo, b.driver);
  });

  it('stitch smoke - a drain gone quiet (B\'s window never covers what the shell promised C, and C stops): stitched after a quiet second, then byte-exact without the shell', async () => {
    topo = await createTopology({ bpffs: true, differentWindowScales: true });
    // B's receive buffer held at 32 KiB: its window (under 16 KiB) stays far below the edge the
    // shell advertised to C (64 KiB or more), so the drain's window half (rule 8) cannot hold.
    await topo.b.runOk('sysctl', ['-qw', 'net.ipv4.tcp_rmem=4096 16384 32768']);
    const first = 4 << 20, nudge = 4 << 10;
    const b = await bed(topo, { first, total: 32 << 20 }, [], [PREAMBLE.length + first + nudge]);
    await Promise.all([
      b.client.wait((o) => o.event === 'mark', 'C phase 1'),
      b.server.wait((o) => o.event === 'mark', 'B phase 1'),
    ]);
    await b.driver.request({ op: 'install', spec: b.spec });
    // A few packets after the commit start the drain; the shell relays them (they lie below its
    // edge), B acknowledges them, and then nothing moves.
    b.client.line(`send ${nudge}`);
    await b.server.wait((o) => o.event === 'mark' && o.n === PREAMBLE.length + first + nudge, 'B has the nudge');
    await waitStitched(topo, b, 15_000);
    const raw = (await b.driver.request({ op: 'status', id: 1 })).raw as { drainOkNs: string; firstNs: string; lastNs: string };
    assert.equal(raw.drainOkNs, '0', 'the full drain condition never held: only the quiet rule can have stitched it');
    assert.notEqual(raw.firstNs, '0', 'a packet came after the commit: this was a drain, not an idle stitch (rule 9)');
    // The shell is not needed any more: kill it (its kernel's FIN or RST are dropped at S).
    b.relay.child.kill('SIGKILL');
    await new Promise<void>((res) => (b.relay.child.exitCode !== null || b.relay.child.signalCode !== null ? res() : b.relay.child.once('exit', () => res())));
    b.client.line('go');
    b.server.line('go');
    await finish(b);
    const [nc, nb] = await Promise.all([topo.c.netstat(), topo.b.netstat()]);
    console.log(`      retransmits C ${nc['Tcp.RetransSegs']} B ${nb['Tcp.RetransSegs']}, RTOs C ${nc['TcpExt.TCPTimeouts']} B ${nb['TcpExt.TCPTimeouts']}`);
    await closeDriver(topo, b.driver);
  });

  it('stitch smoke - 1% of translated packets dropped (drop injector): still byte-exact at both ends', async () => {
    topo = await createTopology({ bpffs: true, differentWindowScales: true });
    const b = await bed(topo, { first: 1 << 20, total: 32 << 20 }, []);
    await Promise.all([
      b.client.wait((o) => o.event === 'mark', 'C phase 1'),
      b.server.wait((o) => o.event === 'mark', 'B phase 1'),
    ]);
    await b.driver.request({ op: 'install', spec: b.spec });
    await b.driver.request({ op: 'drop', ppm: 10_000 });
    b.client.line('go');
    b.server.line('go');
    await finish(b);
    const raw = (await b.driver.request({ op: 'status', id: 1 })).raw as { injectedDrops: string };
    assert.ok(Number(raw.injectedDrops) > 0, 'the injector dropped packets');
    const [nc, nb] = await Promise.all([topo.c.netstat(), topo.b.netstat()]);
    console.log(`      injected drops ${raw.injectedDrops}; retransmits C ${nc['Tcp.RetransSegs']} B ${nb['Tcp.RetransSegs']}, RTOs C ${nc['TcpExt.TCPTimeouts']} B ${nb['TcpExt.TCPTimeouts']}, ` +
      `SACK discards C ${nc['TcpExt.TCPSACKDiscard']} B ${nb['TcpExt.TCPSACKDiscard']}`);
    await closeDriver(topo, b.driver);
  });

  it('stitch smoke - stitched under load (both ends at full speed): no byte lost, the relay flat once stitched (the daemon reading its states in batches)', async () => {
    topo = await createTopology({ bpffs: true, differentWindowScales: true });
    // batchReadFrom 1: every poll reads the state table with one BPF_MAP_LOOKUP_BATCH
    const b = await bed(topo, { first: 1 << 20, total: 64 << 20 }, [8 << 20], [], { batchReadFrom: 1 });
    b.client.line('go');
    b.server.line('go');
    await b.client.wait((o) => o.event === 'mark' && o.n === 8 << 20, 'C at 8 MiB');
    await b.driver.request({ op: 'install', spec: b.spec });
    await waitStitched(topo, b);
    const atStitched = await counters(b.relay);
    await finish(b);
    const after = await counters(b.relay);
    assert.deepEqual(after, atStitched, 'the relay moved nothing once the datapath said stitched');
    assert.doesNotMatch(b.driver.errText, /state batch read failed/, 'the batch reads worked');
    const raw = (await b.driver.request({ op: 'status', id: 1 })).raw as { firstNs: string; stitchedNs: string };
    const [nc, nb] = await Promise.all([topo.c.netstat(), topo.b.netstat()]);
    console.log(`      drain ${((Number(raw.stitchedNs) - Number(raw.firstNs)) / 1e6).toFixed(1)} ms; retransmits C ${nc['Tcp.RetransSegs']} B ${nb['Tcp.RetransSegs']}, RTOs C ${nc['TcpExt.TCPTimeouts']} B ${nb['TcpExt.TCPTimeouts']}, ` +
      `SACK discards C ${nc['TcpExt.TCPSACKDiscard']} B ${nb['TcpExt.TCPSACKDiscard']}, relay moved ${atStitched.toCore} / ${atStitched.toClient}`);
    await closeDriver(topo, b.driver);
  });
});
