// The bench's bed: one topology (window scales 10 vs 7, bpffs, S's checksum offload off) with
// everything every figure needs, started once through the real CLI:
//   S  `tcp-stitch switch` (eBPF datapath pinned in the topology's bpffs, so the bench can read its maps)
//   B  iperf3 on B's address (routed, HAProxy, and the shell's plain core) and on 127.0.0.1 (a
//      core's backend), a plain forwarder to the latter with the core's relay code
//      (test/fixtures/forward.ts), the RTT echo server, the load echo backend, and a
//      `tcp-stitch core --key-file` for each of the last two backends
//   A  one `tcp-stitch shell --switch auto --key-file --policy manual` per pair (nothing is stitched
//      until the bench says so: without a stitch each is the phase-2 relay), HAProxy in TCP mode.
//      Pairs `iperf` and `rtt` have a plain core (--plain-core: the server itself, so stitched and
//      routed end in the same socket); `iperfCore` and `load` go through `tcp-stitch core`.
import { execFileSync, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { askControl } from '../bin/control.ts';
import { formatKeyFile, generateKey } from '../switch/index.ts';
import { collect, startSwitch, waitForLog, type RunningSwitchProcess } from '../test/bed.ts';
import { createTopology, nodeInNs, PROJECT_ROOT, type Host, type Topology } from '../test/hosts.ts';

export const PORTS = {
  routedIperf: 5201, backendIperf: 5202, forward: 5301, rtt: 7000, echo: 8000, haproxy: 8090,
  core: { iperfCore: 9000, load: 9002 }, shell: { iperf: 8080, rtt: 8081, load: 8082, iperfCore: 8083 },
} as const;

/** Manual mode: nothing is stitched until `tcp-stitch stitch` says so. */
const MANUAL = { version: 1, mode: 'manual', rules: [] };

export const say = (s: string) => process.stderr.write(s + '\n');
export const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** One shell (A) with its core (B); the shell's control socket and both JSON logs. */
export interface Pair {
  name: 'iperf' | 'iperfCore' | 'rtt' | 'load';
  shell: ChildProcess;
  /** `tcp-stitch core`; none for a plain core (the backend itself). */
  core?: ChildProcess;
  port: number;
  controlPath: string;
  logs: { shell: string[]; core: string[] };
}

export interface ConnView {
  id: string; phase: number; state: string; bytesFromClient: number; bytesFromCore: number;
  clientEnded: boolean; coreEnded: boolean; client: { address: string; port: number }; stitchId?: number;
}

export interface Bed {
  topo: Topology;
  sw: RunningSwitchProcess;
  pairs: Record<Pair['name'], Pair>;
  /** The load backend (test/fixtures/echo-backend.ts): one verdict line per connection. */
  echo: ChildProcess;
  /** Where the switch's maps are pinned (readable from here: the bpffs lives in the root namespace). */
  mapsDir: string;
  /** bench/rtt-probe.c, built for this bed. */
  rttProbe: string;
  /** Stops a pair's shell and starts it again with `extra` arguments (the core stays), fresh log. */
  restartShell(name: Pair['name'], extra: string[]): Promise<void>;
  close(): Promise<void>;
}


export async function startBed(): Promise<Bed> {
  const topo = await createTopology({ differentWindowScales: true, bpffs: true });
  const dir = mkdtempSync(join(tmpdir(), 'tcp-stitch-bench-'));
  const haproxyCfg = join('/run', `${topo.id}-haproxy.cfg`);
  const close = async () => {
    await topo.destroy();
    rmSync(dir, { recursive: true, force: true });
    rmSync(haproxyCfg, { force: true });
  };
  try {
    const { a, b } = topo;
    // The round-trip probe in C (bench/rtt-probe.c): its own pauses stay out of the figures.
    const rttProbe = join(dir, 'rtt-probe');
    execFileSync('cc', ['-O2', '-Wall', '-o', rttProbe, join(PROJECT_ROOT, 'bench/rtt-probe.c')], { stdio: ['ignore', 'ignore', 'pipe'] });
    // One key per shell (and its core), all of them known to the switch: shells sharing a key share
    // its request sequence space, and two agents discovering at once get REPLAYED.
    const keys = { iperf: generateKey(), iperfCore: generateKey(), rtt: generateKey(), load: generateKey() };
    const keyFile = (name: keyof typeof keys | 'switch') => {
      const path = join(dir, `key-${name}`);
      writeFileSync(path, formatKeyFile(name === 'switch' ? Object.values(keys) : [keys[name]]), { mode: 0o600 });
      return path;
    };
    const policy = join(dir, 'policy.json');
    writeFileSync(policy, JSON.stringify(MANUAL));
    const sw = await startSwitch(topo, ['--key-file', keyFile('switch'), '--bpffs', topo.bpffs!]);

    b.spawn('iperf3', ['-s', '-p', String(PORTS.routedIperf), '-B', b.addr], { stdio: 'ignore' });
    b.spawn('iperf3', ['-s', '-p', String(PORTS.backendIperf), '-B', '127.0.0.1'], { stdio: 'ignore' });
    // The like-for-like routed baseline: B's iperf3 behind the same relay code the core uses.
    nodeInNs(b, 'test/fixtures/forward.ts', [b.addr, String(PORTS.forward), '127.0.0.1', String(PORTS.backendIperf)], { stdio: 'ignore' });
    b.spawn(rttProbe, ['server', '0.0.0.0', String(PORTS.rtt)], { stdio: 'ignore' });
    const echo = nodeInNs(b, 'test/fixtures/echo-backend.ts', ['127.0.0.1', String(PORTS.echo)], { stdio: ['ignore', 'pipe', 'ignore'] });
    echo.stdout!.resume(); // verdict lines; the load client's own check is what the bench reads

    // Where each shell's core legs go: a backend itself (plain), or a core forwarding to one.
    const cores: Record<Pair['name'], { plain: string } | { forward: string; port: number }> = {
      iperf: { plain: `${b.addr}:${PORTS.routedIperf}` }, rtt: { plain: `${b.addr}:${PORTS.rtt}` },
      iperfCore: { forward: `127.0.0.1:${PORTS.backendIperf}`, port: PORTS.core.iperfCore }, load: { forward: `127.0.0.1:${PORTS.echo}`, port: PORTS.core.load },
    };
    const pairs = {} as Record<Pair['name'], Pair>;
    const shellArgs = {} as Record<Pair['name'], string[]>;
    const startShell = (name: Pair['name'], extra: string[], log: string[]) => {
      const shell = nodeInNs(a, 'bin/tcp-stitch.js', [...shellArgs[name], ...extra], { stdio: ['ignore', 'ignore', 'pipe'] });
      collect(shell, log);
      return shell;
    };
    const restartShell = async (name: Pair['name'], extra: string[]) => {
      const p = pairs[name];
      if (p.shell.exitCode === null && p.shell.signalCode === null) {
        const exited = once(p.shell, 'exit');
        p.shell.kill('SIGTERM');
        await exited;
      }
      p.logs.shell = [];
      p.shell = startShell(name, extra, p.logs.shell);
      await waitForLog(p.shell, p.logs.shell, /"stitching available"/, 1, 60_000);
    };
    for (const name of ['iperf', 'iperfCore', 'rtt', 'load'] as const) {
      const key = keyFile(name), to = cores[name];
      const logs = { shell: [] as string[], core: [] as string[] };
      const core = 'forward' in to
        ? nodeInNs(b, 'bin/tcp-stitch.js', ['core', '--listen', `${b.addr}:${to.port}`, '--forward', to.forward, '--key-file', key], { stdio: ['ignore', 'ignore', 'pipe'] })
        : undefined;
      if (core) collect(core, logs.core);
      const controlPath = `/run/${topo.id}-bench-${name}.sock`;
      const coreArgs = 'forward' in to ? ['--core', `${b.addr}:${to.port}`] : ['--core', to.plain, '--plain-core'];
      shellArgs[name] = ['shell', '--listen', `${a.addr}:${PORTS.shell[name]}`, ...coreArgs, '--control', controlPath, '--switch', 'auto', '--key-file', key, '--policy', policy];
      pairs[name] = { name, shell: startShell(name, [], logs.shell), core, port: PORTS.shell[name], controlPath, logs };
    }
    writeFileSync(haproxyCfg, `global\n  maxconn 1000\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n` +
      `listen relay\n  bind ${a.addr}:${PORTS.haproxy}\n  server core ${b.addr}:${PORTS.routedIperf}\n`);
    a.spawn('haproxy', ['-f', haproxyCfg, '-db'], { stdio: 'ignore' });

    await Promise.all([
      // Ten node processes start at once on a few shared CPUs: give them time.
      ...[PORTS.routedIperf, PORTS.backendIperf, PORTS.forward, PORTS.rtt, PORTS.echo, ...Object.values(PORTS.core)].map((p) => b.waitForListen(p, 60_000)),
      a.waitForListen(PORTS.haproxy, 60_000),
      ...Object.values(pairs).map((p) => waitForLog(p.shell, p.logs.shell, /"stitching available"/, 1, 60_000)),
    ]);
    return { topo, sw, pairs, echo, rttProbe, mapsDir: join(topo.bpffs!, 'tcp-stitch-to-a', 'maps'), restartShell, close };
  } catch (e) {
    await close();
    throw e;
  }
}

// ---------------------------------------------------------------------------------------------------
// Small tools shared by the measurements

export async function connections(p: Pair): Promise<ConnView[]> {
  return ((await askControl(p.controlPath, { op: 'status' })) as { connections: ConnView[] }).connections;
}

/** Polls the shell's status until `pred` holds; resolves with the connections and when they were seen. */
export async function untilStatus(p: Pair, pred: (cs: ConnView[]) => boolean, what: string, timeoutMs = 60_000, everyMs = 20): Promise<ConnView[]> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const cs = await connections(p);
    if (pred(cs)) return cs;
    if (Date.now() > deadline) throw new Error(`shell ${p.name}: ${what} not reached within ${timeoutMs} ms: ${JSON.stringify(cs.map((c) => [c.state, c.bytesFromClient, c.bytesFromCore]))}`);
    await sleep(everyMs);
  }
}

/**
 * Waits (up to timeoutMs) for the shell to drop every connection, and returns the ids of those it
 * still holds then: a stitch that went wrong can leave one behind for good, and the runs after it
 * must not count it as theirs.
 */
export async function settle(p: Pair, timeoutMs = 5_000): Promise<Set<string>> {
  const cs = await untilStatus(p, (x) => x.length === 0, 'no connection left', timeoutMs, 50).catch(async () => connections(p));
  return new Set(cs.map((c) => c.id));
}

/** `tcp-stitch stitch --all` through the CLI, in A. */
export async function stitchAllCli(topo: Topology, p: Pair): Promise<{ lines: string[]; ok: boolean; ms: number }> {
  const t = performance.now();
  const r = await topo.a.run(process.execPath, ['bin/tcp-stitch.js', 'stitch', '--all', '--control', p.controlPath], { cwd: PROJECT_ROOT, timeoutMs: 150_000 });
  const lines = r.stdout.trim().split('\n').filter(Boolean);
  return { lines: r.code === 0 ? lines : [...lines, r.stderr.trim()], ok: r.code === 0 && lines.length > 0, ms: performance.now() - t };
}

/** The same request the CLI sends, straight to the control socket (no CLI start-up in the timing). */
export async function stitchAllDirect(p: Pair): Promise<{ outcomes: Array<{ id: string; ok: boolean; error?: string }>; ms: number }> {
  const t = performance.now();
  const outcomes = (await askControl(p.controlPath, { op: 'stitch', all: true }, 150_000)) as Array<{ id: string; ok: boolean; error?: string }>;
  return { outcomes, ms: performance.now() - t };
}

/** utime + stime of a process, in seconds (clock ticks of 1/100 s). */
export function cpuSeconds(pid: number): number {
  const st = readFileSync(`/proc/${pid}/stat`, 'utf8');
  const f = st.slice(st.lastIndexOf(')') + 2).split(' ');
  return (Number(f[11]) + Number(f[12])) / 100;
}

/** Samples cpuSeconds(pid) every `everyMs` with performance.now() timestamps. */
export function cpuTrace(pid: number, everyMs = 50): { stop(): Array<[number, number]> } {
  const samples: Array<[number, number]> = [[performance.now(), cpuSeconds(pid)]];
  const timer = setInterval(() => { try { samples.push([performance.now(), cpuSeconds(pid)]); } catch { /* exited */ } }, everyMs);
  return { stop() { clearInterval(timer); try { samples.push([performance.now(), cpuSeconds(pid)]); } catch { /* exited */ } return samples; } };
}

/** CPU seconds a trace shows between two times (linear between samples). */
export function cpuBetween(samples: Array<[number, number]>, from: number, to: number): number {
  const at = (t: number) => {
    let i = samples.findIndex(([ts]) => ts >= t);
    if (i < 0) return samples.at(-1)![1];
    if (i === 0) return samples[0]![1];
    const [t0, c0] = samples[i - 1]!, [t1, c1] = samples[i]!;
    return c0 + (c1 - c0) * ((t - t0) / Math.max(1e-9, t1 - t0));
  };
  return at(to) - at(from);
}

export function quantile(xs: number[], q: number): number {
  if (xs.length === 0) return NaN;
  const s = [...xs].sort((x, y) => x - y);
  return s[Math.min(s.length - 1, Math.floor(q * s.length))]!;
}
export const median = (xs: number[]) => quantile(xs, 0.5);

export type { Host };
