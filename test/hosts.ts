// The end-to-end test bed: the hosts of DESIGN.md (C client, S switch, A shell, B core, and R for the
// two-hop variant) as Linux network namespaces joined by veth pairs, addressed only in 198.18.0.0/15.
//
// Naming: every namespace of one topology is `<id>-<host>`, id = `tst<pid>r<4 hex>` where pid is the
// creating process. sweepStale() removes namespaces (and bpffs mounts) whose pid is dead. Inside each
// namespace, an interface is named after its peer: in A "to-s", in S "to-a", "to-b", "to-c", ...
// Veth pairs are created directly inside the namespaces; nothing is ever created in the root namespace
// except the optional bpffs mount (/run/tcp-stitch-<id>), which must live outside because
// `ip netns exec` gives each command a fresh /sys.
//
// Everything here needs root; tests call requirePrivileges(this) in a before hook.

import { spawn as spawnChild, spawnSync, type ChildProcess, type SpawnOptions } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, readdirSync, readFileSync, rmdirSync } from 'node:fs';
import { createRequire } from 'node:module';
import { constants as osConstants } from 'node:os';
import { dirname, isAbsolute, join, resolve } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';

// ---------------------------------------------------------------------------------------------------
// Public types

export type HostName = 'c' | 's' | 'a' | 'b' | 'r';
export type Variant = 'standard' | 'two-hop' | 'multihomed' | 'combined';

export interface RunOptions {
  /** Kill the child (SIGKILL) and reject after this long. Default 30 000 ms. */
  timeoutMs?: number;
  /** Written to the child's stdin, which is then closed. */
  input?: string | Buffer;
  env?: NodeJS.ProcessEnv;
  cwd?: string;
}

export interface RunResult {
  stdout: string;
  stderr: string;
  /** Exit code; 128 + signal number when the child died of a signal. */
  code: number;
  signal: NodeJS.Signals | null;
}

export type PingResult = {
  /** 'reply': echo reply; 'time-exceeded' / 'unreachable': ICMP error from `from`; 'timeout': nothing. */
  result: 'reply' | 'time-exceeded' | 'unreachable' | 'timeout' | 'error';
  from?: string;
  /** Raw tool output, for assertion messages. */
  detail: string;
};

export interface PingOptions {
  ttl?: number;
  /** Wait for the answer this long (rounded up to whole seconds for the ping binary). Default 1000. */
  timeoutMs?: number;
  /** 'ping' (iputils binary), 'net-ping' (the project's net-ping over raw sockets), or 'auto' (default:
   *  the binary if installed, else net-ping). */
  tool?: 'auto' | 'ping' | 'net-ping';
}

export interface Host {
  name: HostName;
  /** Namespace name, e.g. tst1234r00ff-a. */
  ns: string;
  /** Primary address: the one facing S (for S itself and for B in 'combined': its A-facing address). */
  addr: string;
  /** Every address of the host, by interface name (e.g. { 'to-s': '198.18.2.2' }). */
  addrs: Record<string, string>;
  /** Run a command inside the namespace and collect its output. Resolves whatever the exit code;
   *  rejects on spawn failure or timeout (after killing the child). */
  run(cmd: string, args: string[], opts?: RunOptions): Promise<RunResult>;
  /** Like run(), but rejects with the command, code and stderr unless it exits 0. */
  runOk(cmd: string, args: string[], opts?: RunOptions): Promise<RunResult>;
  /** Start a long-lived command inside the namespace. Tracked: destroy() kills it by PID (SIGTERM,
   *  then SIGKILL after a grace period). */
  spawn(cmd: string, args: string[], opts?: SpawnOptions): ChildProcess;
  /** argv that runs `cmd args` inside this namespace, for callers that spawn on their own. */
  argv(cmd: string, args: string[]): string[];
  /** Counters of /proc/net/netstat and /proc/net/snmp inside the namespace, keyed 'Tcp.RetransSegs',
   *  'TcpExt.PAWSEstab', 'TcpExt.TCPSACKDiscard', 'Ip.InHdrErrors', ... */
  netstat(): Promise<Record<string, number>>;
  /** One ICMP echo from this host. `dst` must be in 198.18.0.0/15 or 127.0.0.0/8. */
  ping(dst: string, opts?: PingOptions): Promise<PingResult>;
  /** Resolve once a TCP listener on `port` exists in this namespace (polls `ss`; no fixed sleeps). */
  waitForListen(port: number, timeoutMs?: number): Promise<void>;
}

export interface Topology {
  /** Run id, the prefix of every namespace: tst<pid>r<hex>. */
  id: string;
  variant: Variant;
  c: Host;
  /** The switch. In 'combined' s === b. */
  s: Host;
  a: Host;
  b: Host;
  /** The extra router between A and S ('two-hop' only). */
  r?: Host;
  /** Every distinct host. */
  hosts: Host[];
  /** bpffs mount point in the root namespace (visible inside every namespace), when asked for. */
  bpffs?: string;
  /** Kill tracked children (and anything else left in the namespaces), delete the namespaces, unmount
   *  the bpffs. Idempotent; does not throw when things are already gone. */
  destroy(): Promise<void>;
}

/** Link keys name the two hosts of a link, in either order: 'cs', 'as', 'bs', 'ar', 'rs', 'as2'
 *  (multihomed second link), 'cb' and 'ab' (combined). */
export type LinkKey = string;

export interface TopologyOptions {
  variant?: Variant;
  /** MTU per link, both ends, e.g. { sb: 1400 }. */
  mtu?: Record<LinkKey, number>;
  /** `ethtool -K <iface> tx off` on every interface of the switch (S, or B in 'combined'). Default
   *  true: with offload on, receivers trust partial checksums and checksum bugs go unseen. */
  checksumOffloadOffAtSwitch?: boolean;
  /** Extra namespaced sysctls (net.*) per host, applied after the defaults and presets, e.g.
   *  { b: { 'net.ipv4.tcp_rmem': '4096 131072 4194304' } }. */
  tcp?: Partial<Record<HostName, Record<string, string | number>>>;
  /** Preset: C's tcp_rmem max 32 MiB, B's 4 MiB (window scales 10 vs 7 here, where net.core.rmem_max
   *  is 4 MiB), A's left at the default. `tcp` entries override it. */
  differentWindowScales?: boolean;
  /** Mount a private bpffs for this run (Topology.bpffs). */
  bpffs?: boolean;
}

// ---------------------------------------------------------------------------------------------------
// Project paths, node-in-namespace

/** /work/main (computed from this file, not from the cwd). */
export const PROJECT_ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..');
const projectRequire = createRequire(join(PROJECT_ROOT, 'package.json'));

let tsxImport: string | undefined;
/** file: URL of tsx's ESM loader in the project's node_modules, for `node --import`. */
export function tsxLoader(): string {
  if (!tsxImport) {
    let p: string;
    try { p = projectRequire.resolve('tsx'); } catch (e) {
      throw new Error(`hosts: tsx not found under ${PROJECT_ROOT}/node_modules (run npm ci): ${(e as Error).message}`);
    }
    tsxImport = pathToFileURL(p).href;
  }
  return tsxImport;
}

/** [cmd, args] running `node --import tsx <script> args`; a relative script is taken from PROJECT_ROOT
 *  (e.g. 'bin/tcp-stitch.js'). Use with host.run(...nodeCommand(...)). A script outside the project
 *  (a temp file) is not covered by its "type": "module": name it .mts to get ESM there. */
export function nodeCommand(script: string, args: string[] = []): [string, string[]] {
  const file = isAbsolute(script) ? script : join(PROJECT_ROOT, script);
  return [process.execPath, ['--import', tsxLoader(), file, ...args]];
}

/** Spawn `node --import tsx <script> args` inside host's namespace (cwd PROJECT_ROOT unless given);
 *  tracked like host.spawn. `cpu`: run it on that CPU alone (taskset). */
export function nodeInNs(host: Host, script: string, args: string[] = [], { cpu, ...opts }: SpawnOptions & { cpu?: number } = {}): ChildProcess {
  const [cmd, argv] = nodeCommand(script, args);
  const [c, a] = cpu === undefined ? [cmd, argv] : ['taskset', ['-c', String(cpu), cmd, ...argv]];
  return host.spawn(c, a, { cwd: PROJECT_ROOT, ...opts });
}

// ---------------------------------------------------------------------------------------------------
// Privileges

let probeResult: string | null | undefined; // null: usable; string: why not

function probeNetns(): string | null {
  if (probeResult !== undefined) return probeResult;
  if (typeof process.getuid === 'function' && process.getuid() !== 0) {
    return (probeResult = `not root (uid ${process.getuid()})`);
  }
  const ns = `${newRunId()}-probe`;
  const add = spawnSync('ip', ['netns', 'add', ns], { encoding: 'utf8' });
  if (add.error) return (probeResult = `iproute2 'ip' not usable: ${add.error.message}`);
  if (add.status !== 0) return (probeResult = `'ip netns add' failed: ${(add.stderr || '').trim()}`);
  const ex = spawnSync('ip', ['netns', 'exec', ns, 'true'], { encoding: 'utf8' });
  spawnSync('ip', ['netns', 'del', ns]);
  if (ex.status !== 0) return (probeResult = `'ip netns exec' failed: ${(ex.stderr || '').trim()}`);
  return (probeResult = null);
}

/** Skip the calling test/suite (after one clear log line) unless we are root and `ip netns` works.
 *  When process.env.CI is set, throw instead: CI must fail, not skip. */
export function requirePrivileges(ctx: Mocha.Context, what = 'network-namespace tests'): void {
  const why = probeNetns();
  if (why === null) return;
  const msg = `${what} need root and working 'ip netns': ${why}`;
  if (process.env.CI) throw new Error(`${msg} (CI is set, so this is a failure, not a skip)`);
  console.warn(`  [skip] ${msg}`);
  ctx.skip();
}

// ---------------------------------------------------------------------------------------------------
// Processes

const signalNumber = (s: NodeJS.Signals) => (osConstants.signals as Record<string, number>)[s] ?? 0;

function runArgv(argv: string[], opts: RunOptions = {}, tracked?: Set<ChildProcess>): Promise<RunResult> {
  const timeoutMs = opts.timeoutMs ?? 30_000;
  return new Promise((resolvePromise, reject) => {
    const child = spawnChild(argv[0]!, argv.slice(1), {
      stdio: ['pipe', 'pipe', 'pipe'], env: opts.env, cwd: opts.cwd,
    });
    tracked?.add(child);
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    let done = false;
    child.stdout!.on('data', (b: Buffer) => out.push(b));
    child.stderr!.on('data', (b: Buffer) => err.push(b));
    child.stdin!.on('error', () => { /* child may exit before reading its input */ });
    child.stdin!.end(opts.input ?? '');
    const finish = (f: () => void) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      tracked?.delete(child);
      f();
    };
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      child.once('exit', () => finish(() => {
        child.stdout!.destroy(); child.stderr!.destroy();
        reject(new Error(`timed out after ${timeoutMs} ms (child killed): ${argv.join(' ')}` +
          (err.length ? `; stderr: ${Buffer.concat(err).toString().trim()}` : '')));
      }));
    }, timeoutMs);
    child.once('error', (e) => finish(() => reject(new Error(`cannot run ${argv.join(' ')}: ${e.message}`))));
    child.once('close', (code, signal) => finish(() => resolvePromise({
      stdout: Buffer.concat(out).toString(), stderr: Buffer.concat(err).toString(),
      code: code ?? (signal ? 128 + signalNumber(signal) : 1), signal,
    })));
  });
}

async function runOkArgv(argv: string[], opts?: RunOptions, tracked?: Set<ChildProcess>): Promise<RunResult> {
  const r = await runArgv(argv, opts, tracked);
  if (r.code !== 0) throw new Error(`'${argv.join(' ')}' exited ${r.code}: ${r.stderr.trim() || r.stdout.trim()}`);
  return r;
}

const alive = (c: ChildProcess) => c.exitCode === null && c.signalCode === null && c.pid !== undefined;

function waitExit(c: ChildProcess, ms: number): Promise<boolean> {
  if (!alive(c)) return Promise.resolve(true);
  return new Promise((res) => {
    const t = setTimeout(() => { c.off('exit', on); res(false); }, ms);
    const on = () => { clearTimeout(t); res(true); };
    c.once('exit', on);
  });
}

/** SIGTERM, then SIGKILL after graceMs; resolves when the child has exited. */
async function killChild(c: ChildProcess, graceMs = 1000): Promise<void> {
  if (!alive(c)) return;
  try { process.kill(c.pid!, 'SIGTERM'); } catch { return; }
  if (await waitExit(c, graceMs)) return;
  try { process.kill(c.pid!, 'SIGKILL'); } catch { return; }
  await waitExit(c, 2000);
}

/** True while the process exists and is not a zombie (an orphan waits for init to reap it). */
export function pidAlive(pid: number): boolean {
  try { process.kill(pid, 0); } catch (e) { if ((e as NodeJS.ErrnoException).code !== 'EPERM') return false; }
  try { return !/^\d+ \(.*\) Z/s.test(readFileSync(`/proc/${pid}/stat`, 'utf8')); } catch { return false; }
}

// ---------------------------------------------------------------------------------------------------
// Names, registry of live runs, stale sweeping

const ID_RE = /^tst(\d+)r([0-9a-f]{4})$/;
const NS_RE = /^(tst(\d+)r[0-9a-f]{4})-/;
const BPFFS_PREFIX = '/run/tcp-stitch-';

function newRunId(): string {
  return `tst${process.pid}r${randomBytes(2).toString('hex')}`;
}

interface RunState {
  id: string;
  namespaces: Set<string>;   // every name we tried to create
  children: Set<ChildProcess>;
  bpffs?: string;
}
const liveRuns = new Map<string, RunState>();
let exitHookInstalled = false;

function installExitHook(): void {
  if (exitHookInstalled) return;
  exitHookInstalled = true;
  // Last resort for crashed or aborted tests: synchronous, best effort.
  process.on('exit', () => {
    for (const st of liveRuns.values()) {
      for (const c of st.children) if (alive(c)) try { process.kill(c.pid!, 'SIGKILL'); } catch { /* gone */ }
      for (const ns of st.namespaces) {
        killNsPidsSync(ns);
        spawnSync('ip', ['netns', 'del', ns], { stdio: 'ignore' });
      }
      if (st.bpffs) unmountSync(st.bpffs);
    }
    liveRuns.clear();
  });
}

function nsPidsSync(ns: string): number[] {
  const r = spawnSync('ip', ['netns', 'pids', ns], { encoding: 'utf8' });
  return r.status === 0 ? r.stdout.split(/\s+/).filter(Boolean).map(Number).filter((n) => n > 0) : [];
}

function killNsPidsSync(ns: string): void {
  for (const pid of nsPidsSync(ns)) if (pid !== process.pid) try { process.kill(pid, 'SIGKILL'); } catch { /* gone */ }
}

function unmountSync(dir: string): void {
  spawnSync('umount', [dir], { stdio: 'ignore' });
  if (isMountPoint(dir)) spawnSync('umount', ['-l', dir], { stdio: 'ignore' });
  try { rmdirSync(dir); } catch { /* not there or not empty */ }
}

function isMountPoint(dir: string): boolean {
  return spawnSync('mountpoint', ['-q', dir]).status === 0;
}

const nsExists = (ns: string) => existsSync(`/run/netns/${ns}`);

async function listNamespaces(): Promise<string[]> {
  const r = await runOkArgv(['ip', 'netns', 'list']);
  return r.stdout.split('\n').map((l) => l.trim().split(/\s+/)[0] ?? '').filter(Boolean);
}

/** Delete namespaces named tst<pid>r<hex>-* (and /run/tcp-stitch-tst<pid>r<hex> bpffs mounts) whose
 *  pid is no longer alive; returns what was removed. Processes still inside them are left alone: they
 *  are not ours. */
export async function sweepStale(): Promise<string[]> {
  const removed: string[] = [];
  for (const ns of await listNamespaces()) {
    const m = NS_RE.exec(ns);
    if (!m || pidAlive(Number(m[2]))) continue;
    const r = await runArgv(['ip', 'netns', 'del', ns]);
    if (r.code === 0 || !nsExists(ns)) removed.push(ns);
  }
  let entries: string[] = [];
  try { entries = readdirSync('/run'); } catch { /* no /run */ }
  for (const e of entries) {
    if (!e.startsWith('tcp-stitch-')) continue;
    const m = ID_RE.exec(e.slice('tcp-stitch-'.length));
    if (!m || pidAlive(Number(m[1]))) continue;
    const dir = `/run/${e}`;
    unmountSync(dir);
    if (!existsSync(dir)) removed.push(dir);
  }
  return removed;
}

// ---------------------------------------------------------------------------------------------------
// Variants

interface LinkSpec {
  key: string; // canonical: the two host letters sorted, plus an optional digit
  x: HostName; xIf: string; xAddr: string;
  y: HostName; yIf: string; yAddr: string;
}
interface VariantSpec {
  hosts: HostName[];
  links: LinkSpec[];
  /** `ip route add` argument lists per host. */
  routes: Partial<Record<HostName, string[][]>>;
  forwarders: HostName[];
  /** Interface carrying each host's primary address. */
  primary: Partial<Record<HostName, string>>;
  switchHost: HostName;
}

const link = (x: HostName, xIf: string, xAddr: string, y: HostName, yIf: string, yAddr: string, n = ''): LinkSpec =>
  ({ key: canonicalLinkKey(`${x}${y}${n}`)!, x, xIf, xAddr, y, yIf, yAddr });

const LINK_CS = link('c', 'to-s', '198.18.1.2', 's', 'to-c', '198.18.1.1');
const LINK_AS = link('a', 'to-s', '198.18.2.2', 's', 'to-a', '198.18.2.1');
const LINK_BS = link('b', 'to-s', '198.18.3.2', 's', 'to-b', '198.18.3.1');
const dflt = (via: string) => [['default', 'via', via]];

const VARIANTS: Record<Variant, VariantSpec> = {
  standard: {
    hosts: ['c', 's', 'a', 'b'],
    links: [LINK_CS, LINK_AS, LINK_BS],
    routes: { c: dflt('198.18.1.1'), a: dflt('198.18.2.1'), b: dflt('198.18.3.1') },
    forwarders: ['s'],
    primary: { c: 'to-s', s: 'to-a', a: 'to-s', b: 'to-s' },
    switchHost: 's',
  },
  'two-hop': {
    hosts: ['c', 's', 'a', 'b', 'r'],
    links: [LINK_CS, LINK_BS,
      link('a', 'to-r', '198.18.4.2', 'r', 'to-a', '198.18.4.1'),
      link('r', 'to-s', '198.18.2.2', 's', 'to-r', '198.18.2.1')],
    routes: {
      c: dflt('198.18.1.1'), a: dflt('198.18.4.1'), b: dflt('198.18.3.1'), r: dflt('198.18.2.1'),
      s: [['198.18.4.0/24', 'via', '198.18.2.2']],
    },
    forwarders: ['s', 'r'],
    primary: { c: 'to-s', s: 'to-r', a: 'to-r', b: 'to-s', r: 'to-s' },
    switchHost: 's',
  },
  multihomed: {
    hosts: ['c', 's', 'a', 'b'],
    links: [LINK_CS, LINK_AS, LINK_BS, link('a', 'to-s2', '198.18.5.2', 's', 'to-a2', '198.18.5.1', '2')],
    routes: { c: dflt('198.18.1.1'), a: dflt('198.18.2.1'), b: dflt('198.18.3.1') },
    forwarders: ['s'],
    primary: { c: 'to-s', s: 'to-a', a: 'to-s', b: 'to-s' },
    switchHost: 's',
  },
  combined: {
    hosts: ['c', 'a', 'b'],
    links: [link('c', 'to-b', '198.18.1.2', 'b', 'to-c', '198.18.1.1'),
      link('a', 'to-b', '198.18.2.2', 'b', 'to-a', '198.18.2.1')],
    routes: { c: dflt('198.18.1.1'), a: dflt('198.18.2.1') },
    forwarders: ['b'],
    primary: { c: 'to-b', a: 'to-b', b: 'to-a' },
    switchHost: 'b',
  },
};

function canonicalLinkKey(k: string): string | undefined {
  const m = /^([csabr])([csabr])(\d?)$/.exec(k);
  if (!m || m[1] === m[2]) return undefined;
  return [m[1], m[2]].sort().join('') + m[3];
}

/** Link keys valid for a variant (canonical form). */
export function linkKeys(variant: Variant): string[] {
  return VARIANTS[variant].links.map((l) => l.key);
}

// ---------------------------------------------------------------------------------------------------
// Hosts

const TEST_DST = /^(198\.(18|19)\.\d{1,3}\.\d{1,3}|127\.\d{1,3}\.\d{1,3}\.\d{1,3})$/;
let pingBinary: boolean | undefined;

function hasPingBinary(): boolean {
  return (pingBinary ??= spawnSync('sh', ['-c', 'command -v ping'], { stdio: 'ignore' }).status === 0);
}

const NET_PING_SCRIPT = `
const ping = require(process.argv[1]);
const [dst, ttl, timeout] = [process.argv[2], Number(process.argv[3]), Number(process.argv[4])];
const out = (r) => { process.stdout.write(JSON.stringify(r) + '\\n'); };
let s;
try { s = ping.createSession({ ttl, timeout, retries: 0 }); } catch (e) { out({ result: 'error', detail: String(e.message) }); process.exit(0); }
s.on('error', (e) => { out({ result: 'error', detail: String(e.message) }); process.exit(0); });
s.pingHost(dst, (err, target) => {
  let r;
  if (!err) r = { result: 'reply', from: target, detail: 'echo reply from ' + target };
  else if (err instanceof ping.TimeExceededError) r = { result: 'time-exceeded', from: err.source, detail: err.message };
  else if (err instanceof ping.DestinationUnreachableError) r = { result: 'unreachable', from: err.source, detail: err.message };
  else if (err instanceof ping.RequestTimedOutError) r = { result: 'timeout', detail: err.message };
  else r = { result: 'error', detail: String(err.message) };
  out(r); s.close();
});
`;

function parsePingOutput(out: string): PingResult {
  const detail = out.trim();
  let m = /bytes from (\S+?):/.exec(out);
  if (m) return { result: 'reply', from: m[1], detail };
  m = /From (\S+?)(?::)? icmp_seq=\d+ (.*)/.exec(out);
  if (m) {
    if (/Time to live exceeded/i.test(m[2]!)) return { result: 'time-exceeded', from: m[1], detail };
    if (/Unreachable/i.test(m[2]!)) return { result: 'unreachable', from: m[1], detail };
    return { result: 'error', from: m[1], detail };
  }
  return { result: 'timeout', detail };
}

function parseProcNet(text: string): Record<string, number> {
  const res: Record<string, number> = {};
  const lines = text.split('\n').filter(Boolean);
  for (let i = 0; i + 1 < lines.length; i++) {
    const h = lines[i]!.split(/\s+/);
    const v = lines[i + 1]!.split(/\s+/);
    if (h[0] !== v[0] || !h[0]!.endsWith(':') || !/^-?\d+$/.test(v[1] ?? '')) continue;
    const group = h[0]!.slice(0, -1);
    for (let j = 1; j < h.length && j < v.length; j++) res[`${group}.${h[j]}`] = Number(v[j]);
    i++;
  }
  return res;
}

function makeHost(name: HostName, ns: string, addr: string, addrs: Record<string, string>, st: RunState): Host {
  const argv = (cmd: string, args: string[]) => ['ip', 'netns', 'exec', ns, cmd, ...args];
  const host: Host = {
    name, ns, addr, addrs,
    argv,
    run: (cmd, args, opts) => runArgv(argv(cmd, args), opts, st.children),
    runOk: (cmd, args, opts) => runOkArgv(argv(cmd, args), opts, st.children),
    spawn(cmd, args, opts = {}) {
      const child = spawnChild('ip', ['netns', 'exec', ns, cmd, ...args], opts);
      st.children.add(child);
      const forget = () => st.children.delete(child);
      child.once('exit', forget);
      child.once('error', forget);
      return child;
    },
    async netstat() {
      const r = await runOkArgv(argv('cat', ['/proc/net/netstat', '/proc/net/snmp']));
      return parseProcNet(r.stdout);
    },
    async ping(dst, opts = {}) {
      if (!TEST_DST.test(dst)) throw new Error(`hosts: refusing to ping ${dst}: tests may only reach 198.18.0.0/15 or loopback`);
      const ttl = opts.ttl ?? 64;
      const timeoutMs = opts.timeoutMs ?? 1000;
      const tool = opts.tool === 'ping' || (opts.tool !== 'net-ping' && hasPingBinary()) ? 'ping' : 'net-ping';
      if (tool === 'ping') {
        const w = String(Math.max(1, Math.ceil(timeoutMs / 1000)));
        const r = await runArgv(argv('ping', ['-n', '-c1', '-W', w, '-t', String(ttl), dst]), { timeoutMs: timeoutMs + 5000 });
        return parsePingOutput(r.stdout + r.stderr);
      }
      const netPing = projectRequire.resolve('net-ping');
      const r = await runArgv(argv(process.execPath, ['-e', NET_PING_SCRIPT, netPing, dst, String(ttl), String(timeoutMs)]),
        { timeoutMs: timeoutMs + 5000 });
      try { return JSON.parse(r.stdout.trim().split('\n').pop()!) as PingResult; } catch {
        return { result: 'error', detail: `net-ping gave no result (exit ${r.code}): ${r.stderr.trim()}` };
      }
    },
    async waitForListen(port, timeoutMs = 5000) {
      const deadline = Date.now() + timeoutMs;
      for (let delay = 5; ; delay = Math.min(delay * 2, 100)) {
        const r = await runArgv(argv('ss', ['-Htln', `sport = :${port}`]));
        if (r.code === 0 && r.stdout.trim()) return;
        if (Date.now() > deadline) throw new Error(`${ns}: nothing listens on TCP port ${port} after ${timeoutMs} ms`);
        await new Promise((res) => setTimeout(res, delay));
      }
    },
  };
  return host;
}

// ---------------------------------------------------------------------------------------------------
// Create / destroy

async function destroyRun(st: RunState): Promise<void> {
  await Promise.all([...st.children].map((c) => killChild(c)));
  // Anything else still inside our namespaces descends from what we started there (a shell's
  // grandchildren, say); left alive it would keep the namespace and its veths around after `del`.
  const leftovers = new Set<number>();
  for (const ns of st.namespaces) {
    if (!nsExists(ns)) continue;
    const r = await runArgv(['ip', 'netns', 'pids', ns]);
    for (const p of r.stdout.split(/\s+/).filter(Boolean).map(Number)) {
      if (p > 0 && p !== process.pid) { leftovers.add(p); try { process.kill(p, 'SIGKILL'); } catch { /* gone */ } }
    }
  }
  for (let i = 0; i < 50 && [...leftovers].some(pidAlive); i++) await new Promise((res) => setTimeout(res, 10));
  const stuck: string[] = [];
  await Promise.all([...st.namespaces].map(async (ns) => {
    if (!nsExists(ns)) return;
    const r = await runArgv(['ip', 'netns', 'del', ns]);
    if (r.code !== 0 && nsExists(ns)) stuck.push(`${ns} (${r.stderr.trim()})`);
  }));
  if (st.bpffs && existsSync(st.bpffs)) {
    await runArgv(['umount', st.bpffs]);
    if (isMountPoint(st.bpffs)) await runArgv(['umount', '-l', st.bpffs]);
    try { rmdirSync(st.bpffs); } catch { /* keep going */ }
  }
  if (stuck.length) throw new Error(`hosts: could not delete namespaces: ${stuck.join(', ')}`);
  liveRuns.delete(st.id);
}

/** In each namespace: one shell script of sysctl writes and ethtool calls (one exec per namespace). */
function sysctlScript(settings: [string, string][], ethtoolOff: string[]): string {
  const q = (s: string) => `'${s.replace(/'/g, `'\\''`)}'`;
  const lines = ['set -e'];
  for (const [k, v] of settings) lines.push(`printf '%s\\n' ${q(v)} > /proc/sys/${k.replace(/\./g, '/')} || { echo "sysctl ${k}=${v} failed" >&2; exit 1; }`);
  for (const i of ethtoolOff) lines.push(`ethtool -K ${q(i)} tx off >/dev/null`);
  return lines.join('\n');
}

let sweptOnce: Promise<unknown> | undefined;

function validate(opts: TopologyOptions): { variant: Variant; mtu: Map<string, [string, number]> } {
  const variant = opts.variant ?? 'standard';
  if (!Object.hasOwn(VARIANTS, variant)) {
    throw new Error(`createTopology: invalid option variant=${JSON.stringify(variant)} (one of ${Object.keys(VARIANTS).join(', ')})`);
  }
  const spec = VARIANTS[variant];
  const mtu = new Map<string, [string, number]>();
  for (const [k, v] of Object.entries(opts.mtu ?? {})) {
    const key = canonicalLinkKey(k);
    if (!key || !spec.links.some((l) => l.key === key)) {
      throw new Error(`createTopology: invalid option mtu.${k}: no such link in variant '${variant}' (links: ${linkKeys(variant).join(', ')})`);
    }
    if (!Number.isInteger(v) || v <= 0) throw new Error(`createTopology: invalid option mtu.${k}=${String(v)}: not a positive integer`);
    mtu.set(key, [k, v]);
  }
  for (const [h, set] of Object.entries(opts.tcp ?? {})) {
    if (!spec.hosts.includes(h as HostName)) throw new Error(`createTopology: invalid option tcp.${h}: no host '${h}' in variant '${variant}'`);
    for (const [k, v] of Object.entries(set ?? {})) {
      if (!/^net\.[\w.-]+$/.test(k)) throw new Error(`createTopology: invalid option tcp.${h}['${k}']: only namespaced net.* sysctls`);
      if (typeof v !== 'number' && typeof v !== 'string') throw new Error(`createTopology: invalid option tcp.${h}['${k}']: not a string or number`);
    }
  }
  return { variant, mtu };
}

/** Build a topology. On any failure, everything created so far is removed before the error is thrown. */
export async function createTopology(opts: TopologyOptions = {}): Promise<Topology> {
  const { variant, mtu } = validate(opts);
  const spec = VARIANTS[variant];
  sweptOnce ??= sweepStale().catch(() => undefined);
  await sweptOnce;
  installExitHook();

  const id = newRunId();
  const st: RunState = { id, namespaces: new Set(), children: new Set() };
  liveRuns.set(id, st);
  const nsOf = (h: HostName) => `${id}-${h}`;
  const ipn = (h: HostName, args: string[]) => runOkArgv(['ip', '-n', nsOf(h), ...args]);
  // Run steps together, but let all of them settle before failing, so cleanup sees a quiet state.
  const all = async (ps: Promise<unknown>[]) => {
    const rs = await Promise.allSettled(ps);
    const bad = rs.find((r): r is PromiseRejectedResult => r.status === 'rejected');
    if (bad) throw bad.reason;
  };

  try {
    if (opts.bpffs) {
      const dir = `${BPFFS_PREFIX}${id}`;
      mkdirSync(dir, { recursive: true });
      st.bpffs = dir;
      await runOkArgv(['mount', '-t', 'bpf', 'bpf', dir]);
    }
    for (const h of spec.hosts) st.namespaces.add(nsOf(h));
    await all(spec.hosts.map((h) => runOkArgv(['ip', 'netns', 'add', nsOf(h)])));

    // Veth pairs, created inside the namespaces; still down.
    await all(spec.links.map((l) =>
      ipn(l.x, ['link', 'add', l.xIf, 'type', 'veth', 'peer', 'name', l.yIf, 'netns', nsOf(l.y)])));

    // Sysctls (IPv6 off before any link is up: no RS/MLD/DAD noise), forwarding, offloads, presets.
    const sysctls = new Map<HostName, Map<string, string>>();
    for (const h of spec.hosts) {
      sysctls.set(h, new Map([
        ['net.ipv6.conf.all.disable_ipv6', '1'], ['net.ipv6.conf.default.disable_ipv6', '1'],
        ['net.ipv4.ip_forward', spec.forwarders.includes(h) ? '1' : '0'],
      ]));
    }
    if (opts.differentWindowScales) {
      sysctls.get('c')!.set('net.ipv4.tcp_rmem', '4096 131072 33554432');
      sysctls.get('b')!.set('net.ipv4.tcp_rmem', '4096 131072 4194304');
    }
    for (const [h, set] of Object.entries(opts.tcp ?? {})) {
      for (const [k, v] of Object.entries(set ?? {})) sysctls.get(h as HostName)!.set(k, String(v));
    }
    const offload = opts.checksumOffloadOffAtSwitch ?? true;
    const ifacesOf = (h: HostName) => spec.links.flatMap((l) => (l.x === h ? [l.xIf] : l.y === h ? [l.yIf] : []));
    await all(spec.hosts.map(async (h) => {
      const script = sysctlScript([...sysctls.get(h)!], offload && h === spec.switchHost ? ifacesOf(h) : []);
      await runOkArgv(['ip', 'netns', 'exec', nsOf(h), 'sh', '-c', script]).catch((e: Error) => {
        throw new Error(`createTopology: configuring host ${h.toUpperCase()} failed: ${e.message}`);
      });
    }));

    // MTUs (the kernel judges the value; the error names the option).
    for (const l of spec.links) {
      const m = mtu.get(l.key);
      if (!m) continue;
      try {
        await ipn(l.x, ['link', 'set', l.xIf, 'mtu', String(m[1])]);
        await ipn(l.y, ['link', 'set', l.yIf, 'mtu', String(m[1])]);
      } catch (e) {
        throw new Error(`createTopology: invalid option mtu.${m[0]}=${m[1]} rejected by the kernel: ${(e as Error).message}`);
      }
    }

    // Addresses, links up, routes: one `ip -batch` per namespace.
    const batch = new Map<HostName, string[]>(spec.hosts.map((h) => [h, ['link set lo up']]));
    for (const l of spec.links) {
      batch.get(l.x)!.push(`address add ${l.xAddr}/24 dev ${l.xIf}`, `link set ${l.xIf} up`);
      batch.get(l.y)!.push(`address add ${l.yAddr}/24 dev ${l.yIf}`, `link set ${l.yIf} up`);
    }
    for (const h of spec.hosts) for (const r of spec.routes[h] ?? []) batch.get(h)!.push(`route add ${r.join(' ')}`);
    await all(spec.hosts.map((h) =>
      runOkArgv(['ip', '-n', nsOf(h), '-batch', '-'], { input: batch.get(h)!.join('\n') + '\n' })));

    const hosts = new Map<HostName, Host>();
    for (const h of spec.hosts) {
      const addrs: Record<string, string> = {};
      for (const l of spec.links) {
        if (l.x === h) addrs[l.xIf] = l.xAddr;
        if (l.y === h) addrs[l.yIf] = l.yAddr;
      }
      hosts.set(h, makeHost(h, nsOf(h), addrs[spec.primary[h]!]!, addrs, st));
    }
    let destroying: Promise<void> | undefined;
    const topo: Topology = {
      id, variant,
      c: hosts.get('c')!, a: hosts.get('a')!, b: hosts.get('b')!,
      s: hosts.get(spec.switchHost)!,
      hosts: [...hosts.values()],
      destroy() {
        destroying ??= destroyRun(st).finally(() => { destroying = undefined; });
        return destroying;
      },
    };
    if (hosts.has('r')) topo.r = hosts.get('r')!;
    if (st.bpffs) topo.bpffs = st.bpffs;
    return topo;
  } catch (e) {
    await destroyRun(st).catch(() => undefined);
    throw e;
  }
}
