// tcp-stitch: the operator surface (DESIGN.md section 10). Each command validates its arguments up
// front, exits 2 with one line on bad ones, and stops cleanly on SIGINT/SIGTERM.
import net from 'node:net';
import { once } from 'node:events';
import { parseArgs, type ParseArgsConfig } from 'node:util';
import { createCore, createShell, relay, defaultLogger, type Logger } from '../sdk/index.ts';
import { byteSize, hostPort, UsageError } from './args.ts';
import { askControl, defaultControlPath, serveControl } from './control.ts';

const HELP: Record<string, string> = {
  core: `tcp-stitch core --listen HOST:PORT --forward HOST:PORT [--key-file PATH]
  The core process: accepts core legs from the shell and hands each logical connection to the local
  backend at --forward. With --key-file, only core legs authenticated with that key are accepted.`,
  shell: `tcp-stitch shell --listen HOST:PORT --core HOST:PORT [--plain-core] [--switch auto|off|combined|HOST:PORT]
                 [--key-file PATH] [--policy PATH] [--control PATH] [--iface IFNAME] [--socket-buffer SIZE]
  The shell process with its agent: accepts external clients at --listen and carries each to the core
  at --core. --plain-core: the core is an unmodified TCP server, not \`tcp-stitch core\`; each core leg
  carries the client's bytes from the first, without preamble or answer (the server sees the shell's
  address, and --key-file then only keys the switch). --switch picks how the switch is found (default
  auto: one-hop discovery); --policy names a JSON policy file (docs/policy.schema.json); --control the
  local control socket (default ${defaultControlPath('shell')}). --socket-buffer (e.g. 256k) sets the
  kernel buffers of both sockets of each connection instead of autotuning: it bounds what a loaded
  handover drains through the shell, and slows clients whose bandwidth-delay product exceeds it.`,
  switch: `tcp-stitch switch --shell-iface IFNAME [--key-file PATH] [--control PATH] [--no-datapath]
                  [--bpffs PATH]
  The reference switch: discovery responder on the shell-facing interface, authenticated control
  server, and the eBPF fast path on its interfaces. --bpffs names a mounted bpf filesystem (e.g.
  /sys/fs/bpf) to pin the fast path in (PATH/tcp-stitch-IFNAME): stopping the switch then leaves the
  installed stitches running in the kernel, and the next start adopts them (the shells re-claim
  theirs). Without it a restart loses every stitch: the shells' re-installs are refused
  (UNTRACKED_LEG) and connections opened before the restart can no longer be stitched.`,
  keygen: `tcp-stitch keygen
  Prints a new key file (key id + secret) for the shell and the switch to share.`,
  status: `tcp-stitch status [--control PATH] [--json]
  A running shell's view: discovery result, switch, connections with phase and reason.`,
  stitch: `tcp-stitch stitch (ID|--all) [--control PATH]
  Stitches one connection (by id) or all eligible ones, now.`,
  'switch-status': `tcp-stitch switch-status [--control PATH] [--json]
  The switch's stitch table and counters.`,
};

const USAGE = `usage: tcp-stitch <command> [options]   (tcp-stitch <command> --help)
commands: ${Object.keys(HELP).join(', ')}`;

type Values = Record<string, string | boolean | undefined>;

function parse(argv: string[], options: ParseArgsConfig['options'], positionals = false) {
  try {
    return parseArgs({ args: argv, options: { ...options, help: { type: 'boolean' } }, allowPositionals: positionals, strict: true });
  } catch (err) {
    throw new UsageError((err as Error).message.split('\n')[0]);
  }
}

/** Runs `start`, then waits for SIGINT/SIGTERM; a first signal closes gracefully, a second forces. */
async function untilSignal(log: Logger, close: () => Promise<void>, destroy: () => void): Promise<number> {
  const signal = await new Promise<string>((resolve) => {
    process.once('SIGINT', () => resolve('SIGINT'));
    process.once('SIGTERM', () => resolve('SIGTERM'));
  });
  log.info('stopping', { signal });
  const force = () => { log.warn('second signal: stopping now'); destroy(); };
  process.once('SIGINT', force);
  process.once('SIGTERM', force);
  const grace = setTimeout(() => { log.warn('connections still open after 10 s; resetting them'); destroy(); }, 10000);
  await close();
  clearTimeout(grace);
  process.off('SIGINT', force);
  process.off('SIGTERM', force);
  log.info('stopped');
  return 0;
}

async function loadCoreKey(path: string | undefined): Promise<Buffer | undefined> {
  if (path === undefined) return undefined;
  const { loadKeyFile } = await import('../switch/keys.ts');
  return (await loadKeyFile(path))[0].secret;
}

async function listenOn(server: net.Server, at: { host: string; port: number }, flag: string) {
  server.listen(at.port, at.host);
  try { await once(server, 'listening'); } catch (err) {
    throw new UsageError(`${flag} ${at.host}:${at.port}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
  }
}

async function cmdCore(v: Values): Promise<number> {
  const listen = hostPort(v.listen as string, '--listen');
  const forward = hostPort(v.forward as string, '--forward');
  const log = defaultLogger();
  const core = createCore({ logger: log, coreKey: await loadCoreKey(v['key-file'] as string | undefined) });
  core.on('connection', (conn) => {
    // The backend sees one ordinary TCP connection per logical connection, whatever its phase. The
    // kernel relays between the two (splice): stitched, this is the only hop B adds to the path.
    const backend = net.connect({ host: forward.host, port: forward.port, allowHalfOpen: true, noDelay: true });
    relay(conn.stream, backend, {
      onReset: (from, err) => log.info('connection reset', { connectionId: conn.id, from: from === 'a' ? 'core leg' : 'backend', error: err.message }),
    });
  });
  try { await core.listen(listen.port, listen.host); } catch (err) {
    throw new UsageError(`--listen ${listen.host}:${listen.port}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
  }
  log.info('core listening', { listen, forward });
  return untilSignal(log, () => core.close(), () => core.destroy());
}

async function cmdShell(v: Values): Promise<number> {
  const listen = hostPort(v.listen as string, '--listen');
  const coreAt = hostPort(v.core as string, '--core');
  const controlPath = (v.control as string | undefined) ?? defaultControlPath('shell');
  const log = defaultLogger();
  const keyFile = v['key-file'] as string | undefined;
  const { keys, coreKey } = keyFile ? await (async () => {
    const { loadKeyFile } = await import('../switch/keys.ts');
    const keys = await loadKeyFile(keyFile);
    return { keys, coreKey: keys[0].secret };
  })() : { keys: undefined, coreKey: undefined };
  const plainCore = v['plain-core'] === true;
  const socketBuffer = v['socket-buffer'] === undefined ? undefined : byteSize(v['socket-buffer'] as string, '--socket-buffer');
  const shell = createShell({ core: coreAt, logger: log, plainCore, coreKey: plainCore ? undefined : coreKey, socketBuffer });
  const { createAgent, parseSwitchMode } = await import('../agent/index.ts');
  const agent = createAgent({
    shell, logger: log, core: coreAt, keys, controlPath,
    switch: parseSwitchMode((v.switch as string | undefined) ?? 'auto'),
    policyFile: v.policy as string | undefined,
    iface: v.iface as string | undefined,
  });
  const server = net.createServer({ allowHalfOpen: true, pauseOnConnect: true, noDelay: true }, (s) => {
    try { shell.attach(s); } catch (err) { log.warn('connection not attached', { error: (err as Error).message }); s.destroy(); }
  });
  await listenOn(server, listen, '--listen');
  const stopControl = await serveControl(controlPath, (req) => agent.control(req));
  await agent.start();
  log.info('shell listening', { listen, core: coreAt, plainCore, control: controlPath, ...(socketBuffer !== undefined && { socketBuffer }) });
  return untilSignal(log, async () => {
    server.close();
    await stopControl();
    await shell.close();
    await agent.close();
  }, () => { shell.destroy(); agent.destroy(); server.close(); });
}

async function cmdSwitch(v: Values): Promise<number> {
  const iface = v['shell-iface'] as string | undefined;
  if (!iface) throw new UsageError('--shell-iface IFNAME is required');
  const { runSwitch } = await import('../switch/index.ts');
  const log = defaultLogger();
  const bpffs = v.bpffs as string | undefined;
  if (bpffs !== undefined && v['no-datapath']) throw new UsageError('--bpffs is for the eBPF datapath; leave it out with --no-datapath');
  const sw = await runSwitch({
    shellIface: iface, keyFile: v['key-file'] as string | undefined, logger: log, datapath: v['no-datapath'] ? 'table' : 'ebpf',
    ...(bpffs !== undefined && { bpffs }),
  });
  const stopControl = await serveControl((v.control as string | undefined) ?? defaultControlPath('switch'), async (req) => sw.control(req));
  log.info('switch running', { shellIface: iface });
  return untilSignal(log, async () => { await stopControl(); await sw.close(); }, () => void sw.close());
}

function print(v: Values, result: unknown, text: (r: any) => string) {
  process.stdout.write(v.json ? JSON.stringify(result, null, 2) + '\n' : text(result));
}

async function cmdStatus(v: Values): Promise<number> {
  const result = await askControl((v.control as string | undefined) ?? defaultControlPath('shell'), { op: 'status' });
  print(v, result, (r) => {
    const d = r.discovery;
    const lines = [`switch: ${d?.available ? `${d.address}:${d.port} (${d.mode}, epoch ${d.epoch ?? '?'})` : `not available: ${d?.reason ?? 'unknown'}`}`];
    lines.push(`connections: ${r.connections.length}`);
    for (const c of r.connections) {
      lines.push(`  ${c.id}  phase ${c.phase} ${c.state.padEnd(9)} ${c.client.address}:${c.client.port}  in ${c.bytesFromClient} out ${c.bytesFromCore}  ${c.reason ?? ''}`);
    }
    return lines.join('\n') + '\n';
  });
  return 0;
}

async function cmdStitch(v: Values, positionals: string[]): Promise<number> {
  if (!v.all && positionals.length !== 1) throw new UsageError('name one connection ID, or --all');
  if (v.all && positionals.length) throw new UsageError('give either an ID or --all, not both');
  const result = await askControl((v.control as string | undefined) ?? defaultControlPath('shell'), v.all ? { op: 'stitch', all: true } : { op: 'stitch', id: positionals[0] }, 120_000) as Array<{ id: string; ok: boolean; error?: string }>;
  for (const r of result) process.stdout.write(`${r.id} ${r.ok ? 'stitched' : `not stitched: ${r.error}`}\n`);
  return result.every((r) => r.ok) ? 0 : 1;
}

async function cmdSwitchStatus(v: Values): Promise<number> {
  const result = await askControl((v.control as string | undefined) ?? defaultControlPath('switch'), { op: 'status' });
  print(v, result, (r) => JSON.stringify(r, null, 2) + '\n');
  return 0;
}

async function cmdKeygen(): Promise<number> {
  const { generateKeyFile } = await import('../switch/keys.ts');
  process.stdout.write(generateKeyFile());
  return 0;
}

const OPTIONS: Record<string, ParseArgsConfig['options']> = {
  core: { listen: { type: 'string' }, forward: { type: 'string' }, 'key-file': { type: 'string' } },
  shell: { listen: { type: 'string' }, core: { type: 'string' }, 'plain-core': { type: 'boolean' }, switch: { type: 'string' }, 'key-file': { type: 'string' },
    policy: { type: 'string' }, control: { type: 'string' }, iface: { type: 'string' }, 'socket-buffer': { type: 'string' } },
  switch: { 'shell-iface': { type: 'string' }, 'key-file': { type: 'string' }, control: { type: 'string' }, 'no-datapath': { type: 'boolean' },
    bpffs: { type: 'string' } },
  keygen: {},
  status: { control: { type: 'string' }, json: { type: 'boolean' } },
  stitch: { control: { type: 'string' }, all: { type: 'boolean' } },
  'switch-status': { control: { type: 'string' }, json: { type: 'boolean' } },
};

export async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = argv;
  if (!command || command === '--help' || command === '-h' || command === 'help') {
    process.stdout.write(USAGE + '\n');
    return command ? 0 : 2;
  }
  try {
    if (!(command in OPTIONS)) throw new UsageError(`unknown command ${JSON.stringify(command)}; commands: ${Object.keys(OPTIONS).join(', ')}`);
    const { values, positionals } = parse(rest, OPTIONS[command], command === 'stitch');
    if (values.help) { process.stdout.write(HELP[command] + '\n'); return 0; }
    const v = values as Values;
    switch (command) {
      case 'core': return await cmdCore(v);
      case 'shell': return await cmdShell(v);
      case 'switch': return await cmdSwitch(v);
      case 'keygen': return await cmdKeygen();
      case 'status': return await cmdStatus(v);
      case 'stitch': return await cmdStitch(v, positionals);
      default: return await cmdSwitchStatus(v);
    }
  } catch (err) {
    const e = err as Error & { code?: string };
    process.stderr.write(`tcp-stitch ${command}: ${e.message}\n`);
    return e instanceof UsageError || e.code === 'TCP_STITCH_INVALID_ARGUMENT' || e.code === 'TCP_STITCH_POLICY' ? 2 : 1;
  }
}

