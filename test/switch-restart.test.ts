// A stitched connection survives a restart of the switch daemon (docs/datapath.md, "Daemon restart").
//
// Namespaces (root): a relay in A, stepped senders in C and B, the eBPF datapath in S driven by
// test/fixtures/bpf/stitch-driver.ts with the topology's bpffs. A first driver stitches and stops
// without detaching; the bytes sent while no daemon runs still cross S translated; a second driver
// adopts the stitch (same program, same generation) and the transfer completes byte-exact. A pin
// directory with another map layout, or garbage, is refused and left alone.
//
// In process (no privileges): the control server takes adopted stitches into its table, unclaimed,
// and the owner claims them with a STITCH of the same legs.
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { once } from 'node:events';
import winston from 'winston';
import { createControlClient, SwitchRequestError, type ControlClient } from '../agent/control-client.ts';
import { createSwitchControl, type SwitchControl, type SwitchControlInit } from '../switch/control-server.ts';
import { STITCH_OBJECT } from '../switch/datapath.ts';
import { runSwitch, type SwitchStatus } from '../switch/index.ts';
import type { Key, StitchLegs } from '../switch/protocol.ts';
import type { AdoptedStitch } from '../switch/stitch-types.ts';
import { ALL_TRANSLATIONS, createTableDatapath, type TableDatapath } from '../switch/table-datapath.ts';
import { payload } from './helpers.ts';
import { createTopology, nodeInNs, requirePrivileges, type Host, type Topology } from './hosts.ts';
import { JsonProc } from './bed.ts';

const GREETING = 'HELLO FROM THE SHELL\n';
const PREAMBLE = 'TCPSTITCH-PREAMBLE v1 0123456789\n';
const ANSWER = 'OK 42\n';
const FIRST = 1 << 20;
const CHUNK = 8 << 20;
const TOTAL = FIRST + 3 * CHUNK;
const S_IFACES = ['to-a', 'to-b', 'to-c'];

const spawnNode = (host: Host, name: string, script: string, args: string[]) =>
  new JsonProc(name, nodeInNs(host, script, args, { stdio: ['pipe', 'pipe', 'pipe'] }));

const sha = (...b: Buffer[]) => { const h = createHash('sha256'); for (const x of b) h.update(x); return h.digest('hex'); };

function startDriver(topo: Topology, name: string): JsonProc {
  return spawnNode(topo.s, name, 'test/fixtures/bpf/stitch-driver.ts', [JSON.stringify({ shellIface: 'to-a', bpffs: topo.bpffs })]);
}

/** Both senders write `n` more bytes; resolves once each end has received `upTo` bytes of the other's stream. */
async function step(client: JsonProc, server: JsonProc, n: number, upTo: number, what: string): Promise<void> {
  const atC = client.wait((o) => o.event === 'at' && o.n === GREETING.length + upTo, `C at ${upTo} (${what})`);
  const atB = server.wait((o) => o.event === 'at' && o.n === PREAMBLE.length + upTo, `B at ${upTo} (${what})`);
  client.line(`until ${GREETING.length + upTo}`);
  server.line(`until ${PREAMBLE.length + upTo}`);
  client.line(`send ${n}`);
  server.line(`send ${n}`);
  await Promise.all([atC, atB]);
}

async function relayCounters(relay: JsonProc): Promise<Record<string, number>> {
  const n = relay.lines.length;
  const p = relay.wait((o) => o.counters !== undefined && relay.lines.indexOf(o) >= n, 'counters');
  relay.line('counters');
  return (await p).counters as Record<string, number>;
}

/** The ids of the bpf programs attached to the ingress of S's interfaces ('' where none). */
async function attachedPrograms(topo: Topology): Promise<string[]> {
  return Promise.all(S_IFACES.map(async (i) => {
    const r = await topo.s.runOk('tc', ['filter', 'show', 'dev', i, 'ingress']);
    return /\bbpf\b.* id (\d+)/.exec(r.stdout)?.[1] ?? '';
  }));
}

async function assertNothingLeft(topo: Topology, pinDir: string): Promise<void> {
  for (const i of S_IFACES) {
    const r = await topo.s.runOk('tc', ['filter', 'show', 'dev', i, 'ingress']);
    assert.equal(r.stdout.trim(), '', `no filter left on ${i}`);
    const q = await topo.s.runOk('tc', ['qdisc', 'show', 'dev', i]);
    assert.doesNotMatch(q.stdout, /clsact/, `no clsact left on ${i}`);
  }
  assert.notEqual((await topo.s.run('ls', [pinDir])).code, 0, `pin directory ${pinDir} removed`);
}

type Legs = { clientLeg: unknown; coreLeg: unknown };

describe('switch restart (namespaces, eBPF datapath)', function () {
  this.timeout(180_000);
  let topo: Topology | undefined;
  before(function () { requirePrivileges(this, 'eBPF restart tests'); });
  afterEach(async () => { await topo?.destroy(); topo = undefined; });

  it('switch restart - a stitch outlives its daemon: left attached at close, adopted by the next, byte-exact to the end, then nothing left', async () => {
    topo = await createTopology({ bpffs: true, differentWindowScales: true });
    const pinDir = `${topo.bpffs}/tcp-stitch-to-a`;
    const d1 = startDriver(topo, 'S driver 1');
    const ready1 = await d1.wait((o) => o.ready === true, 'datapath 1 ready');
    assert.equal(ready1.pinDir, pinDir, 'the pin directory is the stable one');
    assert.equal(ready1.persistent, true);
    assert.deepEqual(ready1.adopted, [], 'nothing to adopt at the first start');

    const server = spawnNode(topo.b, 'B', 'test/fixtures/bpf/stepped-endpoint.ts', ['server', topo.b.addr, '9000', String(TOTAL), '22', ANSWER]);
    await server.wait((o) => o.ready === true, 'B listening');
    const relay = spawnNode(topo.a, 'A relay', 'test/fixtures/bpf/relay.ts', [topo.a.addr, '8080', topo.b.addr, '9000', GREETING, PREAMBLE, String(ANSWER.length)]);
    await relay.wait((o) => o.ready === true, 'relay listening');
    const client = spawnNode(topo.c, 'C', 'test/fixtures/bpf/stepped-endpoint.ts', ['client', topo.a.addr, '8080', String(TOTAL), '11', '-']);
    const legs = await relay.wait((o) => o.event === 'legs', 'both legs');
    const cl = legs.client as { address: string; port: number };
    const spec = {
      id: 1,
      clientLeg: { client: { address: cl.address, port: cl.port }, shell: { address: topo.a.addr, port: 8080 } },
      coreLeg: { shell: { address: topo.a.addr, port: legs.coreLocalPort as number }, core: { address: topo.b.addr, port: 9000 } },
      clientOffset: 0n, corePreambleLength: PREAMBLE.length, shellOffset: BigInt(GREETING.length), coreAnswerLength: ANSWER.length,
    };

    // Phase 1 through the relay, the stitch, phase 2 stitched under daemon 1.
    await step(client, server, FIRST, FIRST, 'through the relay');
    await d1.request({ op: 'install', spec });
    const stitched = d1.wait((o) => o.event === 'state' && (o.status as { state: string }).state === 'stitched', 'stitched');
    await step(client, server, CHUNK, FIRST + CHUNK, 'stitched, daemon 1');
    await stitched;
    const relayAtStitch = await relayCounters(relay);
    const at1 = await d1.request({ op: 'status', id: 1 });
    const st1 = at1.status as Record<string, number>;
    const gen = (at1.raw as { gen: number }).gen;
    const progs = await attachedPrograms(topo);
    assert.ok(progs.every((p) => p !== ''), `the program is attached everywhere: ${progs.join(',')}`);

    // Daemon 1 stops without detaching: one stitch is installed, so the fast path stays up.
    const closed = await d1.request({ op: 'close', detach: false });
    assert.equal(closed.fdsAfter, closed.fdsBefore, 'close() left no fd open');
    d1.child.stdin!.end();
    await d1.exited;
    assert.match(d1.logs(), /fast path stays up for 1 stitch until the next daemon adopts it/);
    assert.deepEqual(await attachedPrograms(topo), progs, 'still attached after the daemon is gone');
    assert.equal((await topo.s.run('ls', [`${pinDir}/prog`, `${pinDir}/maps/stitch_cfg`])).code, 0, 'the pins stay');

    // Phase 3 without any daemon: translated by the program left attached (the relay moves nothing).
    await step(client, server, CHUNK, FIRST + 2 * CHUNK, 'no daemon');
    assert.deepEqual(await relayCounters(relay), relayAtStitch, 'no byte went through the shell while no daemon ran');

    // Daemon 2 adopts: the same program, the stitch with its generation, its state kept.
    const d2 = startDriver(topo, 'S driver 2');
    const ready2 = await d2.wait((o) => o.ready === true, 'datapath 2 ready');
    assert.equal(ready2.pinDir, pinDir);
    const adopted = ready2.adopted as AdoptedStitch[];
    assert.equal(adopted.length, 1, `one stitch adopted: ${JSON.stringify(adopted)}`);
    assert.equal(adopted[0]!.id, 1);
    assert.deepEqual({ clientLeg: adopted[0]!.clientLeg, coreLeg: adopted[0]!.coreLeg } satisfies Legs, { clientLeg: spec.clientLeg, coreLeg: spec.coreLeg });
    assert.equal(adopted[0]!.gen, gen, 'the generation is kept');
    assert.deepEqual(await attachedPrograms(topo), progs, 'the pinned program re-attached, not a new one');
    const st2 = (await d2.request({ op: 'status', id: 1 })).status as Record<string, number | string>;
    assert.equal(st2.state, 'stitched');
    assert.ok((st2.bytesClientToCore as number) >= st1.bytesClientToCore! + CHUNK, `the program counted the bytes of the gap: ${st1.bytesClientToCore} -> ${st2.bytesClientToCore}`);
    assert.ok((st2.bytesCoreToClient as number) >= st1.bytesCoreToClient! + CHUNK, `the program counted the bytes of the gap: ${st1.bytesCoreToClient} -> ${st2.bytesCoreToClient}`);
    const e2 = (await d2.request({ op: 'entries' })).entries as Record<string, number>;
    assert.deepEqual({ legs: e2.legs, stitch_cfg: e2.stitch_cfg, stitch_state: e2.stitch_state }, { legs: 2, stitch_cfg: 1, stitch_state: 1 });
    assert.ok(e2.flows! >= 2, `the tracked flows are kept: ${e2.flows}`);

    // Phase 4 under daemon 2, to the end; daemon 2 reports the adopted stitch's end.
    const ended = d2.wait((o) => o.event === 'state' && (o.status as { id: number; state: string }).id === 1 && (o.status as { state: string }).state === 'closed', 'closed', 60_000);
    await step(client, server, CHUNK, TOTAL, 'daemon 2');
    client.line('end');
    server.line('end');
    const [c, s] = await Promise.all([
      client.wait((o) => o.event === 'done', 'C done', 60_000),
      server.wait((o) => o.event === 'done', 'B done', 60_000),
    ]);
    assert.equal(c.bytes, GREETING.length + TOTAL, 'C received every byte');
    assert.equal(c.sha, sha(Buffer.from(GREETING), payload(TOTAL, 22)), 'C received exactly the greeting and B\'s stream');
    assert.equal(s.bytes, PREAMBLE.length + TOTAL, 'B received every byte');
    assert.equal(s.sha, sha(Buffer.from(PREAMBLE), payload(TOTAL, 11)), 'B received exactly the preamble and C\'s stream');
    assert.equal(((await ended).status as { reason: string }).reason, 'fin');
    assert.deepEqual(await relayCounters(relay), relayAtStitch, 'the relay moved nothing since the stitch');
    const [nc, nb] = await Promise.all([topo.c.netstat(), topo.b.netstat()]);
    assert.equal(nc['Tcp.InCsumErrors'] ?? 0, 0, 'no checksum error at C');
    assert.equal(nb['Tcp.InCsumErrors'] ?? 0, 0, 'no checksum error at B');

    // Removed, then a full teardown: nothing left behind.
    await d2.request({ op: 'remove', id: 1 });
    assert.deepEqual((await d2.request({ op: 'adopted' })).adopted, []);
    const e3 = (await d2.request({ op: 'entries' })).entries as Record<string, number>;
    assert.deepEqual({ legs: e3.legs, stitch_cfg: e3.stitch_cfg, stitch_state: e3.stitch_state }, { legs: 0, stitch_cfg: 0, stitch_state: 0 });
    const closed2 = await d2.request({ op: 'close', detach: true });
    assert.equal(closed2.fdsAfter, closed2.fdsBefore, 'close() left no fd open');
    d2.child.stdin!.end();
    await d2.exited;
    await assertNothingLeft(topo, pinDir);
  });

  it('switch restart - a pin directory with another map layout, or garbage, is refused and left alone; an empty one is used', async () => {
    topo = await createTopology({ bpffs: true });
    const pinDir = `${topo.bpffs}/tcp-stitch-to-a`;
    const refusal = async (name: string) => {
      const d = startDriver(topo!, name);
      const started = await d.wait((o) => o.ready === true, 'datapath ready').then(() => true, () => false);
      assert.equal(started, false, `${name}: the datapath started on a bad pin directory`);
      assert.notEqual(await d.exited, 0);
      for (const i of S_IFACES) {
        assert.equal((await topo!.s.runOk('tc', ['filter', 'show', 'dev', i, 'ingress'])).stdout.trim(), '', `${name}: nothing attached to ${i}`);
        assert.doesNotMatch((await topo!.s.runOk('tc', ['qdisc', 'show', 'dev', i])).stdout, /clsact/, `${name}: no clsact on ${i}`);
      }
      return d.logs();
    };

    // The layout of another build: stitch_cfg with 96-byte values.
    await topo.s.runOk('mkdir', ['-p', pinDir]);
    await topo.s.runOk('bpftool', ['prog', 'load', STITCH_OBJECT, `${pinDir}/prog`, 'type', 'classifier', 'pinmaps', `${pinDir}/maps`]);
    await topo.s.runOk('rm', [`${pinDir}/maps/stitch_cfg`]);
    await topo.s.runOk('bpftool', ['map', 'create', `${pinDir}/maps/stitch_cfg`, 'type', 'hash', 'key', '4', 'value', '96', 'entries', '16', 'name', 'stitch_cfg']);
    const m1 = await refusal('S driver (other layout)');
    assert.match(m1, /another map layout/);
    assert.match(m1, /stitch_cfg with keys of 4 and values of 96 bytes, this code expects 4 and 80/);
    assert.match(m1, new RegExp(`rm -r ${pinDir}`));
    assert.equal((await topo.s.run('ls', [`${pinDir}/prog`, `${pinDir}/maps/stitch_cfg`])).code, 0, 'the pins are left for the operator');

    // Garbage: a map that is none of ours and no program.
    await topo.s.runOk('rm', ['-r', pinDir]);
    await topo.s.runOk('mkdir', ['-p', `${pinDir}/maps`]);
    await topo.s.runOk('bpftool', ['map', 'create', `${pinDir}/maps/junk`, 'type', 'array', 'key', '4', 'value', '4', 'entries', '1', 'name', 'junk']);
    const m2 = await refusal('S driver (garbage)');
    assert.match(m2, /holds no pinned program prog/);
    assert.match(m2, /not a complete tcp-stitch pin directory/);
    assert.match(m2, new RegExp(`rm -r ${pinDir}`));
    assert.equal((await topo.s.run('ls', [`${pinDir}/maps/junk`])).code, 0, 'the garbage is left for the operator');

    // An empty directory (a load that never finished) is taken as it is: a fresh start.
    await topo.s.runOk('rm', ['-r', pinDir]);
    await topo.s.runOk('mkdir', ['-p', pinDir]);
    const d = startDriver(topo, 'S driver (empty directory)');
    const ready = await d.wait((o) => o.ready === true, 'datapath ready');
    assert.equal(ready.pinDir, pinDir);
    assert.deepEqual(ready.adopted, []);
    await d.request({ op: 'close' }); // no stitch: full teardown even without detach
    d.child.stdin!.end();
    await d.exited;
    await assertNothingLeft(topo, pinDir);
  });
});

// ---------------------------------------------------------------------------------------------
// The control server's side, with the table datapath playing a datapath that adopted stitches.
// ---------------------------------------------------------------------------------------------

const logger = winston.createLogger({ silent: true, transports: [new winston.transports.Console({ silent: true })] });
const KEY: Key = { id: 7, secret: Buffer.alloc(32, 0x11) };
const FAST = { initialMs: 30, maxMs: 120, totalMs: 1500 };

function legsFor(n: number, mapping: Partial<StitchLegs> = {}): StitchLegs {
  return {
    clientLeg: { client: { address: '198.18.0.1', port: 40000 + n }, shell: { address: '127.0.0.1', port: 8080 } },
    coreLeg: { shell: { address: '127.0.0.1', port: 50000 + n }, core: { address: '198.19.0.3', port: 9000 } },
    clientOffset: 100n, corePreambleLength: 64, shellOffset: 200n, coreAnswerLength: 32,
    ...mapping,
  };
}

function adoptedFor(id: number, n: number, extra: { state?: 'closed' | 'draining'; reason?: string } = {}): AdoptedStitch & typeof extra {
  const l = legsFor(n);
  return { id, clientLeg: l.clientLeg, coreLeg: l.coreLeg, gen: 0x1234 + id, flags: 0, seqDelta: [1, 2], ...extra };
}

describe('switch restart (control server)', () => {
  const toClose: Array<{ close(): Promise<void> }> = [];
  afterEach(async () => { while (toClose.length) await toClose.pop()!.close(); });

  async function start(adopted: ReturnType<typeof adoptedFor>[], init: Partial<SwitchControlInit> = {}): Promise<{ sw: SwitchControl; dp: TableDatapath; port: number }> {
    const dp = createTableDatapath({ translations: ALL_TRANSLATIONS, adopted });
    const sw = createSwitchControl({ shellAddress: '127.0.0.1', keys: [KEY], datapath: dp, port: 0, logger, notifyRetransmit: FAST, ...init });
    toClose.push(dp, sw);
    const { port } = await sw.start();
    return { sw, dp, port };
  }
  function client(port: number): ControlClient {
    const c = createControlClient({ switchAddress: '127.0.0.1', port, key: KEY, logger, retransmit: FAST });
    toClose.push(c);
    return c;
  }

  it('switch restart - adopted stitches enter the table unclaimed; the owner claims one by re-sending STITCH and then hears its NOTIFYs', async () => {
    const { sw, dp, port } = await start([adoptedFor(3, 1), adoptedFor(9, 2)]);
    const rows = sw.snapshot().stitches;
    assert.deepEqual(rows.map((r) => [r.spec.id, r.owner, r.adopted]), [[3, { address: '127.0.0.1', keyId: -1 }, true], [9, { address: '127.0.0.1', keyId: -1 }, true]]);
    dp.setState(3, 'draining'); // unclaimed: nobody to tell
    assert.equal(sw.counters().notifies.sent, 0);
    const c = client(port);
    const r = await c.stitch(legsFor(1)); // the agent's re-install: same legs, its offsets
    assert.deepEqual(r, { id: 3, state: 'draining', existing: true });
    assert.equal(dp.installs, 0, 'nothing installed again: the datapath entry is kept as it is');
    const row = sw.snapshot().stitches.find((x) => x.spec.id === 3)!;
    assert.deepEqual(row.owner, { address: '127.0.0.1', keyId: KEY.id });
    assert.equal(row.adopted, undefined);
    assert.equal(row.spec.clientOffset, 100n, 'the offsets the owner gave');
    assert.equal(sw.snapshot().stitches.find((x) => x.spec.id === 9)!.adopted, true, 'the other one is still unclaimed');
    // Same legs again: the ordinary idempotent answer; other legs for the same client leg: LEG_IN_USE.
    assert.deepEqual(await c.stitch(legsFor(1)), { id: 3, state: 'draining', existing: true });
    await assert.rejects(c.stitch({ ...legsFor(1), coreLeg: legsFor(7).coreLeg }), (e: unknown) => e instanceof SwitchRequestError && e.result === 'LEG_IN_USE');
    // The claim took the owner's notify port and key: a state change reaches it.
    const notified = once(c, 'notify');
    dp.setState(3, 'stitched');
    assert.equal((await notified)[0].status.state, 'stitched');
    // Unclaimed entries can be queried and removed by their address.
    assert.deepEqual((await c.query()).map((x) => x.spec.id), [3, 9]);
    assert.equal((await c.unstitch(9)).reason, 'unstitched');
    assert.equal(dp.stitches.has(9), false);
  });

  it('switch restart - an adopted stitch that ended is kept until its owner claims it: it then gets the NOTIFY, and its ack frees it', async () => {
    const { sw, dp, port } = await start([adoptedFor(4, 1, { state: 'closed', reason: 'fin' })]);
    assert.equal(sw.snapshot().stitches.length, 1, 'kept: the owner has not heard of the end');
    assert.equal(sw.counters().notifies.sent, 0);
    const c = client(port);
    const notified = once(c, 'notify');
    const acked = once(sw, 'notify:acked');
    assert.deepEqual(await c.stitch(legsFor(1)), { id: 4, state: 'closed', existing: true });
    const [n] = await notified;
    assert.deepEqual([n.status.id, n.status.state, n.status.reason], [4, 'closed', 'fin']);
    await acked;
    assert.equal(sw.snapshot().stitches.length, 0, 'freed once the owner acknowledged');
    assert.equal(dp.stitches.has(4), false);
  });

  it('switch restart - an adopted stitch that ends and is never claimed is freed after the NOTIFY retransmission time', async () => {
    const { sw, dp } = await start([adoptedFor(5, 1)], { notifyRetransmit: { initialMs: 20, maxMs: 40, totalMs: 200 } });
    const remove = dp.remove.bind(dp);
    const freed = new Promise<number>((resolve) => { dp.remove = async (id) => { await remove(id); resolve(id); }; });
    const t0 = Date.now();
    dp.setState(5, 'closed', 'core-rst');
    assert.equal(sw.snapshot().stitches.length, 1, 'kept for a while');
    assert.equal(await freed, 5);
    assert.ok(Date.now() - t0 >= 190, 'not before the linger time');
    assert.equal(sw.snapshot().stitches.length, 0);
    assert.equal(dp.stitches.has(5), false, 'the datapath entry too');
    assert.equal(sw.counters().removals, 1);
    assert.equal(sw.counters().notifies.sent, 0, 'nobody was told: no owner port known');
  });

  it('switch restart - runSwitch status counts the datapath entries', async () => {
    const dp = createTableDatapath({ translations: ALL_TRANSLATIONS, adopted: [adoptedFor(1, 1)] });
    const sw = await runSwitch({ shellIface: 'lo', keys: [KEY], datapath: dp, port: 0, logger });
    toClose.push(dp, sw);
    const st = await sw.control({ op: 'status' }) as SwitchStatus;
    assert.deepEqual(st.datapathEntries, { stitches: 1 });
    assert.equal(st.stitches[0]!.adopted, true);
  });
});
