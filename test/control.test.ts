// The switch's control daemon and the agent's control client and discovery probe, talking over
// 127.0.0.1 with the table datapath; and, through a fake dgram module, the switch's admission rules
// (amplification, rate limit) over many datagrams without any traffic at all.
import assert from 'node:assert/strict';
import { EventEmitter, once } from 'node:events';
import type * as dgramModule from 'node:dgram';
import type { NetworkInterfaceInfo } from 'node:os';
import DgramAsPromised, { type SocketAsPromised } from 'dgram-as-promised';
import winston from 'winston';
import {
  DISCOVER_PADDING, OPCODES, RESPONSE_HEADER_SIZE, ZERO_BOOT_ID, computeMac, decode, encode, encodeBareResponse, newNonce,
  type Key, type Message, type Response, type StitchLegs, type StitchResult,
} from '../switch/protocol.ts';
import { createSwitchControl, type SwitchControl, type SwitchControlInit } from '../switch/control-server.ts';
import { ALL_TRANSLATIONS, createTableDatapath, untrackedLegError, type TableDatapath } from '../switch/table-datapath.ts';
import type { Datapath } from '../switch/stitch-types.ts';
import { createControlClient, SwitchRequestError, type ControlClient, type ControlClientInit } from '../agent/control-client.ts';
import { probeSwitch } from '../agent/discovery-probe.ts';
import { activeResources } from './helpers.ts';

const logger = winston.createLogger({ silent: true, transports: [new winston.transports.Console({ silent: true })] });
const KEY: Key = { id: 7, secret: Buffer.alloc(32, 0x11) };
const KEY2: Key = { id: 8, secret: Buffer.alloc(32, 0x22) };
const FAST = { initialMs: 30, maxMs: 120, totalMs: 1500 };

function legsFor(n: number, shell = '127.0.0.1', mapping: Partial<StitchLegs> = {}): StitchLegs {
  return {
    clientLeg: { client: { address: '198.18.0.1', port: 40000 + n }, shell: { address: shell, port: 8080 } },
    coreLeg: { shell: { address: shell, port: 50000 + n }, core: { address: '198.19.0.3', port: 9000 } },
    clientOffset: 100n, corePreambleLength: 64, shellOffset: 200n, coreAnswerLength: 32,
    ...mapping,
  };
}

// ---------------------------------------------------------------------------------------------
// Fixtures: everything a test opens is closed after it.
// ---------------------------------------------------------------------------------------------

const toClose: Array<{ close(): Promise<void> }> = [];
async function closeAll(): Promise<void> {
  while (toClose.length) await toClose.pop()!.close();
}

async function startSwitch(init: Partial<SwitchControlInit> = {}, dpInit: Parameters<typeof createTableDatapath>[0] = {}) {
  const dp = createTableDatapath({ translations: ALL_TRANSLATIONS, ...dpInit });
  const sw = createSwitchControl({ shellAddress: '127.0.0.1', keys: [KEY, KEY2], datapath: dp, port: 0, logger, ...init });
  toClose.push(dp, sw);
  const { port } = await sw.start();
  return { sw, dp, port };
}

function client(port: number, init: Partial<ControlClientInit> = {}): ControlClient {
  const c = createControlClient({ switchAddress: '127.0.0.1', port, key: KEY, logger, retransmit: FAST, ...init });
  toClose.push(c);
  return c;
}

async function refused(p: Promise<unknown>, result: string): Promise<void> {
  await assert.rejects(p, (err: unknown) => {
    assert.ok(err instanceof SwitchRequestError, `expected SwitchRequestError, got ${String(err)}`);
    assert.equal(err.result, result);
    return true;
  });
}

/** A bare UDP socket for hand-made datagrams; what arrives queues up until read. */
async function rawSocket(address = '127.0.0.1') {
  const s: SocketAsPromised = DgramAsPromised.createSocket('udp4');
  type Got = { msg: Buffer; address: string; port: number };
  const queue: Got[] = [];
  const waiters: Array<(g: Got) => void> = [];
  s.socket.on('message', (msg: Buffer, ri: dgramModule.RemoteInfo) => {
    const g = { msg, address: ri.address, port: ri.port };
    const w = waiters.shift(); if (w) w(g); else queue.push(g);
  });
  await s.bind(0, address);
  const recv = () => new Promise<Got>((resolve) => { const q = queue.shift(); if (q) resolve(q); else waiters.push(resolve); });
  const raw = {
    port: s.address().port,
    send: (b: Buffer, port: number, to = '127.0.0.1') => s.send(b, port, to),
    recv,
    next: async () => (await recv()).msg,
    async close() { await s.close(); s.destroy(); },
  };
  toClose.push(raw);
  return raw;
}

function signed(m: Message, key = KEY): Buffer { return encode(m, key); }

// ---------------------------------------------------------------------------------------------

describe('control', () => {
  afterEach(closeAll);

  it('control - stitch, query and unstitch over 127.0.0.1', async () => {
    const { sw, dp, port } = await startSwitch();
    const c = client(port);
    const r1 = await c.stitch(legsFor(1));
    const r2 = await c.stitch(legsFor(2));
    assert.deepStrictEqual(r1, { id: 1, state: 'stitched', existing: false });
    assert.equal(r2.id, 2);
    assert.equal(c.bootId, sw.bootId);
    assert.deepStrictEqual(dp.stitches.get(1), { id: 1, ...legsFor(1) });

    const one = await c.query(1);
    assert.deepStrictEqual(one.spec, { id: 1, ...legsFor(1) });
    assert.equal(one.status.state, 'stitched');
    const all = await c.query();
    assert.deepStrictEqual(all.map((r) => r.spec.id), [1, 2]);

    const last = await c.unstitch(1);
    assert.equal(last.state, 'closed');
    assert.equal(last.reason, 'unstitched');
    assert.equal(dp.stitches.has(1), false);
    await refused(c.query(1), 'NOT_FOUND');
    await refused(c.unstitch(1), 'NOT_FOUND');
    assert.deepStrictEqual((await c.query()).map((r) => r.spec.id), [2]);
    assert.equal(sw.counters().installs, 2);
    assert.equal(sw.counters().rejected['not-found'], 2);
  });

  it('control - QUERY pages through more stitches than fit one reply', async () => {
    const { port } = await startSwitch();
    const c = client(port);
    for (let i = 1; i <= 17; i++) await c.stitch(legsFor(i));
    const all = await c.query();
    assert.deepStrictEqual(all.map((r) => r.spec.id), Array.from({ length: 17 }, (_, i) => i + 1));
  });

  it('control - STITCH is idempotent: the same legs give the same id; another mapping is LEG_IN_USE', async () => {
    const { dp, port } = await startSwitch();
    const c = client(port);
    const a = await c.stitch(legsFor(1));
    const b = await c.stitch(legsFor(1));
    assert.deepStrictEqual(b, { ...a, existing: true });
    assert.equal(dp.installs, 1);
    await refused(c.stitch(legsFor(1, '127.0.0.1', { clientOffset: 101n })), 'LEG_IN_USE');
    // A new core leg for the same client leg is a conflict too.
    await refused(c.stitch({ ...legsFor(1), coreLeg: legsFor(5).coreLeg }), 'LEG_IN_USE');
  });

  for (const batched of [false, true]) {
    it(`control - stitch() calls in one event-loop turn travel as STITCH_MANY, ten per datagram; each settles with its own entry${batched ? ' (a datapath with installMany gets each datagram\'s new stitches in one call)' : ''}`, async () => {
      const { sw, dp, port } = await startSwitch({}, { tracked: (s) => s.clientLeg.client.port !== 40002 });
      const calls: number[][] = [];
      if (batched) {
        (dp as Datapath).installMany = async (specs) => {
          calls.push(specs.map((s) => s.id));
          const errors: Array<Error | undefined> = [];
          for (const s of specs) errors.push(await dp.install(s).then(() => undefined, (e: Error) => e));
          return errors;
        };
      }
      const c = client(port);
      await c.discover();
      const wanted = [...Array.from({ length: 23 }, (_, i) => legsFor(i + 1)), legsFor(5), legsFor(21)]; // 5 again later, 21 in its own datagram
      const turnEnd = new Promise((resolve) => setImmediate(resolve)); // queued before the client's flush
      const pending = wanted.map((l) => c.stitch(l));
      await turnEnd;
      assert.equal(c.counters().requests, 1 + 2, 'each full datagram left at once, without waiting for the turn to end');
      const settled = await Promise.allSettled(pending);
      assert.equal(c.counters().requests, 1 + 3, 'DISCOVER, then 25 stitches in three datagrams');
      const untracked = settled[1]!;
      assert.ok(untracked.status === 'rejected' && untracked.reason instanceof SwitchRequestError && untracked.reason.result === 'UNTRACKED_LEG');
      const ok = settled.filter((r): r is PromiseFulfilledResult<StitchResult> => r.status === 'fulfilled').map((r) => r.value);
      assert.equal(ok.length, 24);
      const value = (i: number) => (settled[i] as PromiseFulfilledResult<StitchResult>).value;
      assert.deepStrictEqual(value(23), { ...value(4), existing: true }, 'the same legs again: that stitch');
      assert.deepStrictEqual(value(24), { ...value(20), existing: true }, 'the same legs twice in one datagram: one stitch');
      assert.equal(dp.installs, 22);
      assert.equal(sw.counters().installs, 22);
      for (const [i, r] of settled.entries()) {
        if (r.status === 'fulfilled') assert.deepStrictEqual(dp.stitches.get(r.value.id), { id: r.value.id, ...wanted[i]! });
      }
      if (batched) assert.deepStrictEqual(calls.map((c) => c.length), [10, 10, 3], 'one call per datagram, the repeated legs not among them');
    });
  }

  it('control client - stitch() refuses legs it cannot encode, naming the field, and sends nothing', async () => {
    const { port } = await startSwitch();
    const c = client(port);
    await assert.rejects(c.stitch({ ...legsFor(1), clientOffset: -1n }), /clientOffset must be a bigint/);
    await assert.rejects(c.stitch({ ...legsFor(1), coreLeg: { ...legsFor(1).coreLeg, core: { address: 'b', port: 9000 } } }), /coreLeg\.core\.address must be an IPv4/);
    assert.equal(c.counters().requests, 0);
  });

  it('control client - a switch that does not know STITCH_MANY (UNSUPP_OPCODE) gets one STITCH per stitch', async () => {
    const { dp, port } = await startSwitch();
    // An "older switch": a relay to the real one that answers opcode 6 itself, as a v1 switch
    // without it would (a bare UNSUPP_OPCODE).
    const front = await rawSocket();
    const back = await rawSocket();
    let many = 0;
    let clientPort = 0;
    const pump = async (from: typeof front, to: (m: Buffer) => Promise<unknown>, onMsg?: (g: { msg: Buffer; port: number }) => Buffer | undefined) => {
      for (;;) {
        const g = await from.recv();
        const answer = onMsg?.(g);
        if (answer) await front.send(answer, g.port); else await to(g.msg);
      }
    };
    void pump(front, (m) => back.send(m, port), (g) => {
      clientPort = g.port;
      if ((g.msg[1]! & 0x7f) !== OPCODES.stitchMany) return undefined;
      many++;
      return encodeBareResponse({ opcode: OPCODES.stitchMany, nonce: g.msg.toString('hex', 4, 16), result: 'UNSUPP_OPCODE', bootId: ZERO_BOOT_ID, epoch: 0 });
    }).catch(() => undefined);
    void pump(back, (m) => front.send(m, clientPort)).catch(() => undefined);
    const c = client(front.port);
    await c.discover();
    const results = await Promise.all([1, 2, 3].map((i) => c.stitch(legsFor(i))));
    assert.deepStrictEqual(results.map((r) => r.id).sort(), [1, 2, 3]);
    assert.equal(many, 1, 'STITCH_MANY tried once');
    await Promise.all([4, 5].map((i) => c.stitch(legsFor(i))));
    assert.equal(many, 1, 'and not again');
    assert.equal(dp.installs, 5);
  });

  it('control - switch restart: the client emits switch:restarted at the next exchange', async () => {
    const first = await startSwitch();
    const c = client(first.port);
    const { id } = await c.stitch(legsFor(1));
    const oldBoot = c.bootId;
    await first.sw.close();

    const second = await startSwitch({ port: first.port });
    assert.notEqual(second.sw.bootId, oldBoot);
    const restarted = once(c, 'switch:restarted');
    // The old id means nothing in the new boot: refused, never applied to another stitch.
    await refused(c.unstitch(id), 'STALE_BOOT');
    const [ev] = await restarted;
    assert.deepStrictEqual({ previousBootId: ev.previousBootId, bootId: ev.bootId }, { previousBootId: oldBoot, bootId: second.sw.bootId });
    assert.equal(second.sw.counters().rejected['stale-boot'], 1);
    // Re-installing works against the new boot.
    const again = await c.stitch(legsFor(1));
    assert.equal(again.existing, false);
    assert.equal(second.dp.installs, 1);
  });

  it('control - a STITCH sent to the old boot is re-sent to the new one after a restart', async () => {
    const first = await startSwitch();
    const c = client(first.port);
    await c.stitch(legsFor(1));
    await first.sw.close();
    const second = await startSwitch({ port: first.port });
    let events = 0;
    c.on('switch:restarted', () => events++);
    const r = await c.stitch(legsFor(2));
    assert.equal(events, 1);
    assert.equal(r.id, 1);
    assert.equal(second.dp.installs, 1);
  });

  it('control - wrong key: NOT_AUTHORIZED, nothing applied, counted as bad-mac', async () => {
    const { sw, dp, port } = await startSwitch();
    const c = client(port, { key: { id: KEY.id, secret: Buffer.alloc(32, 0x99) } });
    await refused(c.stitch(legsFor(1)), 'NOT_AUTHORIZED');
    assert.equal(dp.installs, 0);
    assert.ok(sw.counters().rejected['bad-mac'] >= 1);
  });

  it('control - unknown key id: UNKNOWN_KEY, counted as unknown-key', async () => {
    const { sw, dp, port } = await startSwitch();
    const c = client(port, { key: { id: 999, secret: KEY.secret } });
    await refused(c.stitch(legsFor(1)), 'UNKNOWN_KEY');
    assert.equal(dp.installs, 0);
    assert.ok(sw.counters().rejected['unknown-key'] >= 1);
  });

  it('control - replayed sequence: REPLAYED, nothing applied, counted', async () => {
    const { sw, dp, port } = await startSwitch();
    const raw = await rawSocket();
    const base = { kind: 'request' as const, opcode: 'stitch' as const, bootId: sw.bootId };
    await raw.send(signed({ ...base, nonce: newNonce(), legs: legsFor(1), auth: { keyId: 7, sequence: 100n } }), port);
    assert.equal((decode(await raw.next(), KEY) as Response).result, 'SUCCESS');
    // Same sequence, new content: a replay (or a forgery that reuses a sequence).
    await raw.send(signed({ ...base, nonce: newNonce(), legs: legsFor(2), auth: { keyId: 7, sequence: 100n } }), port);
    const r2 = await raw.next();
    assert.equal((decode(r2, KEY) as Response).result, 'REPLAYED');
    assert.equal(r2.length, RESPONSE_HEADER_SIZE, 'bare, unauthenticated reply');
    // An older sequence.
    await raw.send(signed({ ...base, nonce: newNonce(), legs: legsFor(3), auth: { keyId: 7, sequence: 99n } }), port);
    assert.equal((decode(await raw.next(), KEY) as Response).result, 'REPLAYED');
    // Sequences are per key: key 8 may use 50.
    await raw.send(signed({ ...base, nonce: newNonce(), legs: legsFor(4), auth: { keyId: 8, sequence: 50n } }, KEY2), port);
    assert.equal((decode(await raw.next(), KEY2) as Response).result, 'SUCCESS');
    assert.equal(dp.installs, 2);
    assert.deepStrictEqual([...dp.stitches.keys()], [1, 2]);
    assert.equal(sw.counters().rejected.replayed, 2);
  });

  it('control - a retransmitted request is answered from the cache and applied once', async () => {
    const { sw, dp, port } = await startSwitch();
    const raw = await rawSocket();
    const req = signed({ kind: 'request', opcode: 'stitch', bootId: sw.bootId, nonce: newNonce(), legs: legsFor(1), auth: { keyId: 7, sequence: 5n } });
    await raw.send(req, port);
    const first = await raw.next();
    await raw.send(req, port);
    await raw.send(req, port);
    const again = [await raw.next(), await raw.next()];
    for (const a of again) assert.ok(a.equals(first), 'the cached reply, byte for byte');
    assert.equal(dp.installs, 1);
    assert.equal(sw.counters().answeredFromCache, 2);
    assert.equal(sw.counters().rejected.replayed, 0);
    // An UNSTITCH retransmitted after it was applied is not applied again either.
    const un = signed({ kind: 'request', opcode: 'unstitch', bootId: sw.bootId, nonce: newNonce(), id: 1, auth: { keyId: 7, sequence: 6n } });
    await raw.send(un, port);
    const u1 = await raw.next();
    await raw.send(un, port);
    assert.ok((await raw.next()).equals(u1));
    assert.equal((decode(u1, KEY) as Response).result, 'SUCCESS');
    assert.equal(sw.counters().rejected['not-found'], 0);
  });

  it('control - owner check: only the owning address and key may query or unstitch; legs must end at the requester', async () => {
    const { sw, port } = await startSwitch();
    const owner = client(port);
    const { id } = await owner.stitch(legsFor(1));
    const otherKey = client(port, { key: KEY2 });
    await refused(otherKey.query(id), 'NOT_OWNER');
    await refused(otherKey.unstitch(id), 'NOT_OWNER');
    await refused(otherKey.stitch(legsFor(1)), 'NOT_OWNER');
    assert.deepStrictEqual(await otherKey.query(), []);
    const otherAddress = client(port, { localAddress: '127.0.0.2' });
    await refused(otherAddress.query(id), 'NOT_OWNER');
    await refused(otherAddress.unstitch(id), 'NOT_OWNER');
    // Legs that end at 127.0.0.1, asked for from 127.0.0.2.
    await refused(otherAddress.stitch(legsFor(2)), 'BAD_LEGS');
    await refused(owner.stitch(legsFor(3, '127.0.0.1', { coreLeg: { shell: { address: '127.0.0.2', port: 1 }, core: { address: '198.19.0.3', port: 9 } } })), 'BAD_LEGS');
    await refused(owner.stitch({ ...legsFor(4), clientLeg: { client: { address: '198.18.0.1', port: 0 }, shell: { address: '127.0.0.1', port: 8080 } } }), 'BAD_LEGS');
    assert.equal((await owner.query(id)).spec.id, id);
    const rej = sw.counters().rejected;
    assert.equal(rej['not-owner'], 5);
    assert.equal(rej['bad-legs'], 3);
  });

  it('control - quota: a shell past its quota gets NO_RESOURCES, counted as quota', async () => {
    const { sw, port } = await startSwitch({ quotaPerShell: 2 });
    const c = client(port);
    await c.stitch(legsFor(1));
    await c.stitch(legsFor(2));
    await refused(c.stitch(legsFor(3)), 'NO_RESOURCES');
    assert.equal(sw.counters().rejected.quota, 1);
    // Another shell address still has its own quota.
    const other = client(port, { localAddress: '127.0.0.2' });
    assert.equal((await other.stitch(legsFor(9, '127.0.0.2'))).existing, false);
    // Freeing one makes room again.
    await c.unstitch(1);
    assert.equal((await c.stitch(legsFor(3))).existing, false);
  });

  it('control - table full: NO_RESOURCES, counted as table-full', async () => {
    const { sw, port } = await startSwitch({}, { tableSize: 1 });
    const c = client(port);
    await c.stitch(legsFor(1));
    await refused(c.stitch(legsFor(2)), 'NO_RESOURCES');
    assert.equal(sw.counters().rejected['table-full'], 1);
  });

  it('control - a leg the datapath has not seen is refused with UNTRACKED_LEG; a datapath failure with DATAPATH_ERROR', async () => {
    const { sw, port } = await startSwitch({}, {
      tracked: (s) => s.clientLeg.client.port !== 40002,
      failInstall: (s) => s.clientLeg.client.port === 40003,
    });
    const c = client(port);
    await refused(c.stitch(legsFor(2)), 'UNTRACKED_LEG');
    await refused(c.stitch(legsFor(3)), 'DATAPATH_ERROR');
    assert.equal(sw.snapshot().stitches.length, 0, 'a refused stitch leaves no entry');
    assert.equal(sw.counters().rejected['untracked-leg'], 1);
    assert.equal(sw.counters().rejected['datapath-error'], 1);
    assert.ok(untrackedLegError(1) instanceof Error);
  });

  it('control - unsupported version: the bare answer names version 1 and echoes the nonce', async () => {
    const { sw, port } = await startSwitch();
    const raw = await rawSocket();
    const req = signed({ kind: 'request', opcode: 'query', bootId: sw.bootId, nonce: newNonce(), id: 0, cursor: 0, auth: { keyId: 7, sequence: 1n } });
    req[0] = 2;
    await raw.send(req, port);
    const r = await raw.next();
    assert.equal(r[0], 1, 'byte 0 names the version the switch speaks');
    assert.equal(r[1], 0x80 | OPCODES.query);
    const m = decode(r) as Response;
    assert.equal(m.result, 'UNSUPP_VERSION');
    assert.equal(m.nonce, req.toString('hex', 4, 16));
    assert.equal(sw.counters().rejected['bad-version'], 1);
  });

  it('control - an unknown must-understand option gets UNSUPP_OPTION; an unknown optional option is ignored', async () => {
    const { sw, port } = await startSwitch();
    const raw = await rawSocket();
    const withOption = (code: number, seq: bigint) => {
      const b = signed({ kind: 'request', opcode: 'discover', bootId: ZERO_BOOT_ID, nonce: newNonce(), auth: { keyId: 7, sequence: seq } });
      const out = Buffer.concat([b.subarray(0, 24), Buffer.from([code, 0, 0, 4, 1, 2, 3, 4]), b.subarray(24)]);
      computeMac(KEY.secret, out.subarray(0, out.length - 32)).copy(out, out.length - 32);
      return out;
    };
    await raw.send(withOption(100, 1n), port);
    const r1 = decode(await raw.next(), KEY) as Response;
    assert.equal(r1.result, 'UNSUPP_OPTION');
    await raw.send(withOption(200, 2n), port);
    const r2 = decode(await raw.next(), KEY) as Response;
    assert.equal(r2.result, 'SUCCESS');
    assert.ok(r2.auth, 'an authenticated DISCOVER gets an authenticated reply');
    assert.equal(sw.counters().rejected['unknown-mandatory-option'], 1);
  });

  it('control - NOTIFY: the owner hears of a FIN, acknowledges, and the switch frees the stitch', async () => {
    const { sw, dp, port } = await startSwitch();
    const c = client(port);
    const { id } = await c.stitch(legsFor(1));
    const notified = once(c, 'notify');
    const acked = once(sw, 'notify:acked');
    dp.setState(id, 'closed', 'fin');
    const [n] = await notified;
    assert.equal(n.status.id, id);
    assert.equal(n.status.state, 'closed');
    assert.equal(n.status.reason, 'fin');
    assert.equal(n.bootId, sw.bootId);
    await acked;
    assert.equal(sw.snapshot().stitches.length, 0);
    assert.equal(dp.stitches.has(id), false);
    await refused(c.query(id), 'NOT_FOUND');
  });

  it('control - a state change reported during install reaches the owner after the STITCH reply', async () => {
    const inner = createTableDatapath({ translations: ALL_TRANSLATIONS });
    const dp: TableDatapath = Object.assign(Object.create(inner) as TableDatapath, {
      async install(spec: Parameters<TableDatapath['install']>[0]) {
        await inner.install(spec);
        inner.setState(spec.id, 'closed', 'rst'); // the client reset the connection right away
      },
    });
    const sw = createSwitchControl({ shellAddress: '127.0.0.1', keys: [KEY], datapath: dp, port: 0, logger });
    toClose.push(inner, sw);
    const { port } = await sw.start();
    const c = client(port);
    const order: string[] = [];
    const notified = once(c, 'notify').then(([n]) => { order.push('notify'); return n; });
    const acked = once(sw, 'notify:acked');
    const r = await c.stitch(legsFor(1));
    order.push('reply');
    const n = await notified;
    assert.deepStrictEqual(order, ['reply', 'notify']);
    assert.equal(n.status.id, r.id);
    assert.equal(n.status.reason, 'rst');
    await acked;
    assert.equal(sw.snapshot().stitches.length, 0, 'the switch freed the stitch once the owner acknowledged');
  });

  it('control - NOTIFY is retransmitted until acknowledged, then stops', async () => {
    const { sw, dp, port } = await startSwitch({ notifyRetransmit: { initialMs: 20, maxMs: 40, totalMs: 5000 } });
    const raw = await rawSocket();
    await raw.send(signed({ kind: 'request', opcode: 'stitch', bootId: sw.bootId, nonce: newNonce(), legs: legsFor(1), auth: { keyId: 7, sequence: 1n } }), port);
    await raw.next();
    dp.setState(1, 'draining');
    const n1 = await raw.next();
    const n2 = await raw.next();
    assert.ok(n1.equals(n2), 'a retransmission is the same datagram');
    const m = decode(n1, KEY);
    assert.equal(m.kind, 'request');
    assert.equal(m.opcode, 'notify');
    const acked = once(sw, 'notify:acked');
    await raw.send(signed({ kind: 'response', opcode: 'notify', result: 'SUCCESS', nonce: m.nonce, bootId: sw.bootId, epoch: 0, auth: { keyId: 7, sequence: 2n } }), port);
    await acked;
    assert.ok(sw.counters().notifies.retransmitted >= 1);
    assert.equal(sw.counters().notifies.acked, 1);
    assert.equal(sw.snapshot().stitches.length, 1, 'draining is not the end');
  });

  it('control - an ended stitch is kept (the shell still silenced) until its owner acknowledges, or the NOTIFY expires', async () => {
    const { sw, dp, port } = await startSwitch({ notifyRetransmit: { initialMs: 20, maxMs: 40, totalMs: 300 } });
    const raw = await rawSocket();
    await raw.send(signed({ kind: 'request', opcode: 'stitch', bootId: sw.bootId, nonce: newNonce(), legs: legsFor(1), auth: { keyId: 7, sequence: 1n } }), port);
    await raw.next();
    dp.setState(1, 'closed', 'client-rst');
    const n = decode(await raw.next(), KEY);
    assert.equal(n.opcode, 'notify');
    assert.equal(sw.snapshot().stitches.length, 1, 'kept while the owner has not answered');
    assert.equal(dp.stitches.has(1), true, 'the datapath entry too');
    await raw.send(signed({ kind: 'request', opcode: 'stitch', bootId: sw.bootId, nonce: newNonce(), legs: legsFor(1), auth: { keyId: 7, sequence: 2n } }), port);
    let reply = decode(await raw.next(), KEY);
    while (reply.kind === 'request') reply = decode(await raw.next(), KEY); // NOTIFY retransmissions
    assert.equal((reply as Response).result, 'LEG_IN_USE', 'an ended stitch cannot be taken again');
    await once(sw, 'notify:expired');
    assert.equal(sw.snapshot().stitches.length, 0, 'freed when the owner never answers');
    assert.equal(dp.stitches.has(1), false);
  });

  it('control client - a request refused as REPLAYED is sent again once with a fresh sequence', async () => {
    const { sw, dp, port } = await startSwitch();
    const seqs = [5n, 5n, 6n];
    const c = client(port, { sequence: () => seqs.shift() ?? 100n });
    const r = await c.stitch(legsFor(1)); // DISCOVER takes 5; STITCH with 5 is REPLAYED; again with 6
    assert.equal(r.existing, false);
    assert.equal(dp.installs, 1);
    assert.equal(sw.counters().rejected.replayed, 1);
  });

  it('control client - a retransmitted NOTIFY is acknowledged again and reported once; a replayed one is ignored', async () => {
    const fake = await rawSocket();
    const c = client(fake.port);
    const boot = '0a0b0c0d0e0f1011';
    // Play the switch: answer the client's DISCOVER, which tells us its port.
    const discovered = c.discover();
    const { msg, port } = await fake.recv();
    const d = decode(msg, KEY);
    await fake.send(signed({ kind: 'response', opcode: 'discover', result: 'SUCCESS', nonce: d.nonce, bootId: boot, epoch: 5, auth: { keyId: 7, sequence: 1n },
      info: { switchId: '0000000000000001', controlAddress: '127.0.0.1', controlPort: fake.port, versions: { min: 1, max: 1 }, translations: [], authAlgorithms: ['hmac-sha256'], tableSize: 1, freeSlots: 1 } }), port);
    await discovered;
    const notify = (seq: bigint, state: 'closed' | 'draining', nonce = newNonce()) => signed({
      kind: 'request', opcode: 'notify', nonce, bootId: boot, auth: { keyId: 7, sequence: seq },
      status: { id: 3, state, packetsClientToCore: 0, packetsCoreToClient: 0, bytesClientToCore: 0, bytesCoreToClient: 0, shellPacketsDropped: 0 },
    });
    const seen: string[] = [];
    c.on('notify', (n) => seen.push(n.status.state));
    const n10 = notify(10n, 'draining');
    await fake.send(n10, port);
    await fake.send(n10, port); // the switch did not get our ack in time
    const acks = [decode(await fake.next(), KEY), decode(await fake.next(), KEY)];
    for (const a of acks) {
      assert.equal(a.kind, 'response');
      assert.equal(a.opcode, 'notify');
      assert.equal(a.nonce, decode(n10, KEY).nonce);
      assert.ok(a.auth);
    }
    await fake.send(notify(10n, 'closed'), port); // same sequence, other content: a replay
    await fake.send(notify(11n, 'closed'), port);
    await fake.next();
    assert.deepStrictEqual(seen, ['draining', 'closed']);
    assert.equal(c.counters().rejected.replayed, 1);
    assert.equal(c.counters().notifies, 2);
    // A NOTIFY from another boot means the switch restarted.
    const restarted = once(c, 'switch:restarted');
    await fake.send(signed({
      kind: 'request', opcode: 'notify', nonce: newNonce(), bootId: 'ffffffffffffffff', auth: { keyId: 7, sequence: 1n },
      status: { id: 1, state: 'failed', packetsClientToCore: 0, packetsCoreToClient: 0, bytesClientToCore: 0, bytesCoreToClient: 0, shellPacketsDropped: 0 },
    }), port);
    assert.equal((await restarted)[0].bootId, 'ffffffffffffffff');
  });

  it('control - close leaves no socket or timer behind', async () => {
    await new Promise((resolve) => setImmediate(resolve)); // mocha's own test timer exists from here on
    const before = activeResources();
    const { sw, dp, port } = await startSwitch({ notifyRetransmit: { initialMs: 1000, maxMs: 1000, totalMs: 60_000 } });
    const raw = await rawSocket();
    await raw.send(signed({ kind: 'request', opcode: 'stitch', bootId: sw.bootId, nonce: newNonce(), legs: legsFor(1), auth: { keyId: 7, sequence: 1n } }), port);
    await raw.next();
    dp.setState(1, 'draining'); // a NOTIFY now waits for its ack, with a timer
    await raw.next();
    const c = client(port);
    await c.query();
    await closeAll();
    // libuv releases a closed handle on its next loop turn.
    for (let i = 0; i < 3; i++) await new Promise((resolve) => setImmediate(resolve));
    const after = activeResources();
    assert.ok((before.UDPWrap ?? 0) === 0 && (after.UDPWrap ?? 0) === 0, `UDP handles left: ${after.UDPWrap}`);
    assert.equal(after.Timeout ?? 0, before.Timeout ?? 0);
  });
});

// ---------------------------------------------------------------------------------------------
// Admission over many datagrams, through a fake dgram module: no traffic, deterministic clock.
// ---------------------------------------------------------------------------------------------

class FakeUdpSocket extends EventEmitter {
  readonly sent: Array<{ msg: Buffer; port: number; address: string }> = [];
  private bound = { address: '0.0.0.0', port: 0, family: 'IPv4' };
  bind(port: number, address: string) {
    this.bound = { address, port: port || 7807, family: 'IPv4' };
    setImmediate(() => this.emit('listening'));
  }
  address() { return this.bound; }
  send(msg: Buffer, port: number, address: string, cb?: (err: Error | null, n: number) => void) {
    this.sent.push({ msg: Buffer.from(msg), port, address });
    cb?.(null, msg.length);
  }
  close() { setImmediate(() => this.emit('close')); }
  setTTL() { return this; }
}

function fakeSwitch(init: Partial<SwitchControlInit> = {}) {
  let socket: FakeUdpSocket | undefined;
  const dgram = { createSocket: () => (socket = new FakeUdpSocket()) } as unknown as typeof dgramModule;
  const iface: NetworkInterfaceInfo = { address: '198.18.1.1', netmask: '255.254.0.0', family: 'IPv4', mac: '00:00:00:00:00:00', internal: false, cidr: '198.18.1.1/15' };
  const dp: TableDatapath = createTableDatapath({ translations: ALL_TRANSLATIONS });
  const sw: SwitchControl = createSwitchControl({
    shellIface: 'veth0', keys: [KEY], datapath: dp, logger, dgram, networkInterfaces: () => ({ veth0: [iface] }), ...init,
  });
  toClose.push(dp, sw);
  return {
    sw,
    async start() { await sw.start(); return socket!; },
  };
}

/** xorshift32: reproducible randomness. */
function rng(seed: number) {
  let x = seed >>> 0 || 1;
  const next = () => { x ^= x << 13; x >>>= 0; x ^= x >>> 17; x ^= x << 5; x >>>= 0; return x; };
  return { int: (n: number) => next() % n, bytes: (n: number) => { const b = Buffer.alloc(n); for (let i = 0; i < n; i++) b[i] = next() & 0xff; return b; } };
}

describe('control admission', () => {
  afterEach(closeAll);

  it('control - amplification: no unauthenticated reply is larger than its request (20,000 datagrams)', async () => {
    const f = fakeSwitch({ rateLimit: { perSecond: 1e9, burst: 1e9 } });
    const sock = await f.start();
    const r = rng(42);
    const wrong: Key = { id: KEY.id, secret: Buffer.alloc(32, 0x77) };
    const seeds: Buffer[] = [
      encode({ kind: 'request', opcode: 'discover', nonce: newNonce(), bootId: ZERO_BOOT_ID, padding: DISCOVER_PADDING }),
      encode({ kind: 'request', opcode: 'discover', nonce: newNonce(), bootId: ZERO_BOOT_ID, auth: { keyId: 7, sequence: 1n } }, KEY),
      encode({ kind: 'request', opcode: 'stitch', nonce: newNonce(), bootId: f.sw.bootId, legs: legsFor(1, '198.18.1.2'), auth: { keyId: 7, sequence: 1n } }, KEY),
      encode({ kind: 'request', opcode: 'unstitch', nonce: newNonce(), bootId: f.sw.bootId, id: 1, auth: { keyId: 7, sequence: 1n } }, KEY),
      encode({ kind: 'request', opcode: 'query', nonce: newNonce(), bootId: f.sw.bootId, id: 0, cursor: 0, auth: { keyId: 7, sequence: 1n } }, wrong),
    ];
    // Each authenticated seed once, fresh, from its rightful source: later copies are replays.
    for (const seed of seeds.slice(1, 4)) sock.emit('message', seed, { address: '198.18.1.2', port: 1, family: 'IPv4', size: seed.length });
    await new Promise((resolve) => setImmediate(resolve));
    sock.sent.length = 0;
    let answered = 0, sentDatagrams = 0, shortAnswered = 0;
    for (let i = 0; i < 20_000; i++) {
      let req: Buffer;
      const kind = r.int(6);
      if (kind === 0) {
        // DISCOVER padded to anything from nothing to more than the reply
        const pad = r.int(3) === 0 ? undefined : r.int(80);
        req = encode({ kind: 'request', opcode: 'discover', nonce: newNonce(), bootId: ZERO_BOOT_ID, ...(pad !== undefined && { padding: pad }) });
      } else if (kind === 1) {
        req = r.bytes(r.int(1200));
        if (r.int(2) === 0 && req.length > 0) req[0] = 1;
      } else if (kind === 2) {
        req = Buffer.from(r.bytes(4 * r.int(40)));
        if (req.length > 1) { req[0] = 2 + r.int(200); req[1]! &= 0x7f; }
      } else {
        req = Buffer.from(seeds[r.int(seeds.length)]!);
        const m = r.int(4);
        if (m === 0 && req.length) req[r.int(req.length)]! ^= 1 << r.int(8);
        else if (m === 1) req = req.subarray(0, r.int(req.length + 1));
        else if (m === 2) req = Buffer.concat([req, r.bytes(r.int(64))]);
        // m === 3: unchanged (wrong key, or a replay of the same sequence)
      }
      const before = sock.sent.length;
      const source = { address: `198.18.${r.int(2)}.${1 + r.int(250)}`, port: 1024 + r.int(60000), family: 'IPv4', size: req.length };
      sock.emit('message', req, source);
      sentDatagrams++;
      const replies = sock.sent.slice(before);
      assert.ok(replies.length <= 1, 'at most one reply per datagram');
      for (const rep of replies) {
        answered++;
        assert.ok(rep.msg.length <= req.length, `reply of ${rep.msg.length} bytes to a ${req.length}-byte datagram`);
        if (req.length < RESPONSE_HEADER_SIZE) shortAnswered++;
      }
    }
    await new Promise((resolve) => setImmediate(resolve));
    assert.equal(sock.sent.length, answered, 'no reply was sent later, outside the check');
    assert.equal(shortAnswered, 0, 'nothing shorter than a reply header is answered');
    assert.ok(answered > sentDatagrams / 5, `the test must exercise replies: ${answered} of ${sentDatagrams}`);
    assert.ok(f.sw.counters().rejected.amplification > 100, 'unpadded DISCOVERs were refused and counted');
  });

  it('control - rate limit: datagrams over a source\'s budget are dropped and counted', async () => {
    let t = 1_000_000;
    const f = fakeSwitch({ rateLimit: { perSecond: 10, burst: 5 }, now: () => t });
    const sock = await f.start();
    const discover = () => encode({ kind: 'request', opcode: 'discover', nonce: newNonce(), bootId: ZERO_BOOT_ID, padding: DISCOVER_PADDING });
    const burst = (address: string, n: number) => {
      const before = sock.sent.length;
      for (let i = 0; i < n; i++) sock.emit('message', discover(), { address, port: 5000, family: 'IPv4', size: 68 });
      return sock.sent.length - before;
    };
    assert.equal(burst('198.18.0.9', 20), 5);
    assert.equal(f.sw.counters().rejected['rate-limited'], 15);
    assert.equal(burst('198.18.0.10', 3), 3, 'another source has its own bucket');
    t += 300; // 3 tokens
    assert.equal(burst('198.18.0.9', 20), 3);
    t += 10_000; // refilled, but never beyond the burst
    assert.equal(burst('198.18.0.9', 20), 5);
    assert.equal(f.sw.counters().rejected['rate-limited'], 15 + 17 + 15);
  });

  it('control - DISCOVER from outside the shell-facing subnet is not answered', async () => {
    const f = fakeSwitch();
    const sock = await f.start();
    const req = encode({ kind: 'request', opcode: 'discover', nonce: newNonce(), bootId: ZERO_BOOT_ID, padding: DISCOVER_PADDING });
    sock.emit('message', req, { address: '198.20.0.1', port: 5000, family: 'IPv4', size: req.length });
    sock.emit('message', req, { address: '198.19.255.254', port: 5000, family: 'IPv4', size: req.length });
    assert.equal(sock.sent.length, 1);
    assert.equal(f.sw.counters().rejected['not-neighbour'], 1);
  });
});

// ---------------------------------------------------------------------------------------------
// Discovery probe against the real switch and against hand-made answers, over 127.0.0.1.
// ---------------------------------------------------------------------------------------------

describe('discovery', () => {
  afterEach(closeAll);

  const quick = { initialMs: 30, maxMs: 60, totalMs: 400 };

  it('discovery - finds a capable switch one hop away, unauthenticated and authenticated', async () => {
    const { sw, port } = await startSwitch();
    const plain = await probeSwitch({ nextHop: '127.0.0.1', port, logger, retransmit: quick });
    assert.equal(plain.available, true);
    if (!plain.available) return;
    assert.equal(plain.bootId, sw.bootId);
    assert.equal(plain.switchId, sw.switchId);
    assert.equal(plain.port, port);
    assert.equal(plain.address, '127.0.0.1');
    assert.equal(plain.authenticated, false);
    assert.deepStrictEqual(plain.capabilities.translations, ALL_TRANSLATIONS);
    const auth = await probeSwitch({ nextHop: '127.0.0.1', port, key: KEY, logger, retransmit: quick });
    assert.equal(auth.available && auth.authenticated, true);
    assert.equal(sw.counters().rejected.amplification, 0);
  });

  /** A fake switch that answers the probe's first datagram with `reply(request)`. */
  async function fakeSwitchAnswering(reply: (req: Buffer) => Buffer) {
    const fake = await rawSocket();
    const answered = fake.recv().then(async ({ msg, port }) => { await fake.send(reply(msg), port); });
    return { port: fake.port, answered };
  }

  const info = (port: number) => ({
    switchId: '0000000000000001', controlAddress: '127.0.0.1', controlPort: port, versions: { min: 1, max: 1 },
    translations: [...ALL_TRANSLATIONS], authAlgorithms: ['hmac-sha256' as const], tableSize: 10, freeSlots: 10,
  });

  it('discovery - a reply with a wrong nonce gives wrong-nonce', async () => {
    let sentNonce = '';
    const fake = await fakeSwitchAnswering((req) => {
      const m = decode(req);
      assert.equal(m.opcode, 'discover');
      assert.equal(req.length, 68, 'an unauthenticated DISCOVER is padded to the reply size');
      sentNonce = newNonce();
      return encode({ kind: 'response', opcode: 'discover', result: 'SUCCESS', nonce: sentNonce, bootId: '0102030405060708', epoch: 1, info: info(1) });
    });
    const r = await probeSwitch({ nextHop: '127.0.0.1', port: fake.port, logger, retransmit: quick });
    await fake.answered;
    assert.ok(sentNonce);
    assert.deepStrictEqual(!r.available && r.reason, 'wrong-nonce');
  });

  it('discovery - a reply with the right nonce from the same fake is accepted (control for the test above)', async () => {
    const fake = await fakeSwitchAnswering((req) => encode({
      kind: 'response', opcode: 'discover', result: 'SUCCESS', nonce: decode(req).nonce, bootId: '0102030405060708', epoch: 1, info: info(1),
    }));
    const r = await probeSwitch({ nextHop: '127.0.0.1', port: fake.port, logger, retransmit: quick });
    await fake.answered;
    assert.equal(r.available, true);
  });

  it('discovery - a malformed reply gives malformed-reply', async () => {
    const fake = await fakeSwitchAnswering((req) => Buffer.concat([req.subarray(0, 16), Buffer.from('not a reply')]));
    const r = await probeSwitch({ nextHop: '127.0.0.1', port: fake.port, logger, retransmit: quick });
    await fake.answered;
    assert.deepStrictEqual(!r.available && r.reason, 'malformed-reply');
  });

  it('discovery - an authenticated probe refuses an unauthenticated reply', async () => {
    const fake = await fakeSwitchAnswering((req) => encode({
      kind: 'response', opcode: 'discover', result: 'SUCCESS', nonce: decode(req, KEY).nonce, bootId: '0102030405060708', epoch: 1, info: info(1),
    }));
    const r = await probeSwitch({ nextHop: '127.0.0.1', port: fake.port, key: KEY, logger, retransmit: quick });
    await fake.answered;
    assert.deepStrictEqual(!r.available && r.reason, 'unauthenticated');
  });

  it('discovery - the switch does not answer a source outside the shell-facing subnet', async () => {
    const lo: NetworkInterfaceInfo = { address: '127.0.0.1', netmask: '255.255.255.255', family: 'IPv4', mac: '00:00:00:00:00:00', internal: true, cidr: '127.0.0.1/32' };
    const { sw, port } = await startSwitch({ networkInterfaces: () => ({ lo: [lo] }) });
    const rejected = once(sw, 'request:rejected');
    const r = await probeSwitch({ nextHop: '127.0.0.1', port, localAddress: '127.0.0.2', logger, retransmit: quick });
    assert.deepStrictEqual(!r.available && r.reason, 'no-answer');
    assert.equal((await rejected)[0].reason, 'not-neighbour');
  });

  it('discovery - an incapable switch (a datapath without translations) gives incapable', async () => {
    const { port } = await startSwitch({}, { translations: [] });
    const r = await probeSwitch({ nextHop: '127.0.0.1', port, logger, retransmit: quick });
    assert.equal(r.available, false);
    assert.equal(!r.available && r.reason, 'incapable');
  });

  it('discovery - nobody answering gives no-answer within the bounded wait', async () => {
    const silent = await rawSocket(); // bound, never answers
    const t0 = Date.now();
    const r = await probeSwitch({ nextHop: '127.0.0.1', port: silent.port, logger, retransmit: quick });
    assert.deepStrictEqual(!r.available && r.reason, 'no-answer');
    assert.ok(Date.now() - t0 < 2000);
  });
});
