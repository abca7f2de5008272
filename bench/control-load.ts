// The agent's side of the control-protocol install bench, in a process of its own as in a real
// deployment (the agent lives in the shell on A, the switch daemon on S): `stitch()` calls with
// `inFlight` outstanding (the client sends one turn's calls as STITCH_MANY), then one UNSTITCH per
// stitch. Prints one JSON line with the rates, the datagrams and the retransmissions.
//   node --import tsx bench/control-load.ts PORT KEYID KEYHEX N IN_FLIGHT [ROUNDS]
import winston from 'winston';
import { createControlClient, type ControlClient } from '../agent/control-client.ts';
import { createSwitchControl } from '../switch/control-server.ts';
import { ALL_TRANSLATIONS, generateKey } from '../switch/index.ts';
import { legs } from './installs.ts';

const [port, keyId, keyHex, n, inFlight, measured = '3'] = process.argv.slice(2);
const silent = winston.createLogger({ silent: true, transports: [new winston.transports.Console({ silent: true })] });
const connect = (to: number, key: { id: number; secret: Buffer }) => createControlClient({
  switchAddress: '127.0.0.1', port: to, key, logger: silent, retransmit: { initialMs: 500, maxMs: 2000, totalMs: 20_000 },
});
const client = port === undefined ? undefined : connect(Number(port), { id: Number(keyId), secret: Buffer.from(keyHex!, 'hex') });

async function pool(count: number, job: (i: number) => Promise<void>): Promise<void> {
  let next = 0;
  await Promise.all(Array.from({ length: Number(inFlight) }, async () => { while (next < count) await job(next++); }));
}

/** One round: every stitch installed, then every one removed; the times and the datagrams it took. */
async function round(c: ControlClient, total: number) {
  const ids: number[] = [];
  const sent = c.counters().requests;
  const t0 = performance.now();
  await pool(total, async (i) => { ids.push((await c.stitch(legs(i, '127.0.0.1'))).id); });
  const installMs = performance.now() - t0;
  const datagrams = c.counters().requests - sent;
  if (new Set(ids).size !== ids.length) throw new Error(`duplicate ids: ${ids.length} stitches, ${new Set(ids).size} distinct`);
  const t1 = performance.now();
  await pool(ids.length, async (i) => { await c.unstitch(ids[i]!); });
  return { installMs, removeMs: performance.now() - t1, datagrams };
}

/**
 * The agent lives in a shell that has been running: its code is compiled and optimized before a
 * burst. A round against a switch of this process's own (no datapath behind it) gets it there, so
 * that the first round against the switch under test shows that switch's own first burst, as when
 * a restarted switch is handed back every stitch of a running shell.
 */
async function warmAgent(total: number): Promise<void> {
  const key = generateKey();
  const sw = createSwitchControl({
    shellAddress: '127.0.0.1', keys: [key], port: 0, logger: silent, rateLimit: { perSecond: 1_000_000, burst: 1_000_000 },
    datapath: {
      capabilities: { translations: [...ALL_TRANSLATIONS], tableSize: total },
      async install() { /* accepted */ },
      async installMany(specs) { return specs.map(() => undefined); },
      async remove() { /* gone */ },
      status: (id) => ({ id, state: 'draining', packetsClientToCore: 0, packetsCoreToClient: 0, bytesClientToCore: 0, bytesCoreToClient: 0, shellPacketsDropped: 0 }),
      onStateChange() { /* no traffic */ },
      async close() { /* nothing held */ },
    },
  });
  const c = connect((await sw.start()).port, key);
  try {
    await c.discover();
    await round(c, total);
  } finally {
    await c.close();
    await sw.close();
  }
}

if (client) {
  try {
    const total = Number(n);
    await warmAgent(total);
    await client.discover();
    // A daemon runs for days: its code is compiled and optimized long before most bursts. Its
    // first round is reported on its own: a switch that just started (or restarted).
    const warmUp = await round(client, total);
    const rounds = [];
    for (let r = 0; r < Number(measured); r++) rounds.push(await round(client, total));
    const median = (xs: number[]) => xs.sort((a, b) => a - b)[xs.length >> 1]!;
    const rate = (ms: number) => total / (ms / 1000);
    console.log(JSON.stringify({
      perSecond: rate(median(rounds.map((r) => r.installMs))), removalsPerSecond: rate(median(rounds.map((r) => r.removeMs))),
      rounds: rounds.map((r) => Math.round(rate(r.installMs))), warmUpPerSecond: Math.round(rate(warmUp.installMs)),
      inFlight: Number(inFlight), n: total, retransmissions: client.counters().retransmissions, datagrams: rounds[0]!.datagrams,
    }));
  } finally {
    await client.close();
  }
}
