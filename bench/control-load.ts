// The agent's side of the control-protocol install bench, in a process of its own as in a real
// deployment (the agent lives in the shell on A, the switch daemon on S): `stitch()` calls with
// `inFlight` outstanding (the client sends one turn's calls as STITCH_MANY), then one UNSTITCH per
// stitch. Prints one JSON line with the rates, the datagrams and the retransmissions.
//   node --import tsx bench/control-load.ts PORT KEYID KEYHEX N IN_FLIGHT
import winston from 'winston';
import { createControlClient } from '../agent/control-client.ts';
import { legs } from './installs.ts';

const [port, keyId, keyHex, n, inFlight] = process.argv.slice(2);
const silent = winston.createLogger({ silent: true, transports: [new winston.transports.Console({ silent: true })] });
const client = port === undefined ? undefined : createControlClient({
  switchAddress: '127.0.0.1', port: Number(port), key: { id: Number(keyId), secret: Buffer.from(keyHex!, 'hex') },
  logger: silent, retransmit: { initialMs: 500, maxMs: 2000, totalMs: 20_000 },
});

async function pool(count: number, job: (i: number) => Promise<void>): Promise<void> {
  let next = 0;
  await Promise.all(Array.from({ length: Number(inFlight) }, async () => { while (next < count) await job(next++); }));
}

if (client) {
  try {
    await client.discover();
    const ids: number[] = [];
    const total = Number(n);
    const t0 = performance.now();
    await pool(total, async (i) => { ids.push((await client.stitch(legs(i, '127.0.0.1'))).id); });
    const installMs = performance.now() - t0;
    const datagrams = client.counters().requests - 1;
    if (new Set(ids).size !== ids.length) throw new Error(`duplicate ids: ${ids.length} stitches, ${new Set(ids).size} distinct`);
    const t1 = performance.now();
    await pool(ids.length, async (i) => { await client.unstitch(ids[i]!); });
    const removeMs = performance.now() - t1;
    console.log(JSON.stringify({
      perSecond: total / (installMs / 1000), removalsPerSecond: ids.length / (removeMs / 1000), inFlight: Number(inFlight), n: total,
      retransmissions: client.counters().retransmissions, datagrams,
    }));
  } finally {
    await client.close();
  }
}
