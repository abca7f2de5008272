// A shell runtime that embeds the SDK and decides itself when to stitch: every connection is carried
// by the shell (phase 2) until the client has sent its first STITCH_AFTER bytes (think: a request
// header the shell had to read), then it asks for the stitch with shell.stitch(id). The agent finds
// the switch and does the handover; the connection goes on C<->B directly (phase 3).
//
//   node --import tsx examples/manual-stitch.ts --listen HOST:PORT --core HOST:PORT --key-file PATH
//
// Run it on the shell host (A) with `tcp-stitch core --key-file PATH` on B and `tcp-stitch switch
// --key-file PATH` on the switch between them; test/stitch-e2e.test.ts does exactly that.
import net from 'node:net';
import { parseArgs } from 'node:util';
import { createShell } from '../sdk/index.ts';
import { createAgent } from '../agent/index.ts';
import { loadKeyFile } from '../switch/index.ts';

const STITCH_AFTER = 64 << 10;
const { values } = parseArgs({ options: { listen: { type: 'string' }, core: { type: 'string' }, 'key-file': { type: 'string' } } });
const hostPort = (s: string | undefined, flag: string) => {
  const m = /^(.+):(\d+)$/.exec(s ?? '');
  if (!m) throw new Error(`${flag} HOST:PORT is required`);
  return { host: m[1]!, port: Number(m[2]) };
};
const listen = hostPort(values.listen, '--listen');
const core = hostPort(values.core, '--core');
if (!values['key-file']) throw new Error('--key-file PATH is required (tcp-stitch keygen makes one)');
const keys = await loadKeyFile(values['key-file']);

const shell = createShell({ core, coreKey: keys[0]!.secret });
// Manual policy: the agent stitches only when asked. Discovery finds the switch one hop away.
const agent = createAgent({ shell, core, keys, switch: { mode: 'auto' }, policyFile: new URL('./policies/manual.json', import.meta.url).pathname });
const out = (o: Record<string, unknown>) => process.stdout.write(JSON.stringify(o) + '\n');

shell.on('connection:phase', ({ connection, to }) => out({ event: 'phase', id: connection.id, to, bytesFromClient: connection.bytesFromClient, bytesFromCore: connection.bytesFromCore }));
shell.on('connection:close', ({ connection, reason }) => out({ event: 'closed', id: connection.id, reason, bytesFromClient: connection.bytesFromClient, bytesFromCore: connection.bytesFromCore }));

const server = net.createServer({ allowHalfOpen: true, pauseOnConnect: true }, (socket) => {
  const conn = shell.attach(socket);
  // The runtime's own decision: once the client's first STITCH_AFTER bytes went through the shell.
  const watch = setInterval(() => {
    const c = shell.get(conn.id);
    if (!c || c.state !== 'relaying') { if (!c || c.state === 'closed') clearInterval(watch); return; }
    if (c.bytesFromClient < STITCH_AFTER) return;
    clearInterval(watch);
    shell.stitch(conn.id, `first ${STITCH_AFTER} bytes seen`).then(
      () => out({ event: 'stitched', id: conn.id }),
      (err: Error) => out({ event: 'not-stitched', id: conn.id, error: err.message }), // stays on the shell path
    );
  }, 20);
});
server.listen(listen.port, listen.host);
await agent.start();
agent.on('discovery:change', (d) => out({ event: 'discovery', available: d.available, reason: d.reason }));
out({ event: 'ready', stitching: agent.status().stitching });

process.once('SIGTERM', () => { server.close(); shell.destroy(); agent.destroy(); });
