// The segmented server on the namespace hosts: a backend and `tcp-stitch core` on B, `tcp-stitch shell`
// on A, started through the real CLI. Shared by the end-to-end tests and the demo.
import type { ChildProcess } from 'node:child_process';
import { nodeInNs, type Topology } from './hosts.ts';

export const SHELL_PORT = 8080;
export const CORE_PORT = 9000;
export const BACKEND_PORT = 8000;

/** Resolves with the first stdout line of `child` matching `re`; rejects if the child exits first. */
export function waitForLine(child: ChildProcess, re: RegExp, timeoutMs = 20000): Promise<string> {
  return new Promise((resolve, reject) => {
    let buf = '';
    const done = (fn: () => void) => { clearTimeout(timer); child.stdout?.off('data', onData); child.off('exit', onExit); fn(); };
    const onData = (d: Buffer) => {
      buf += d;
      const lines = buf.split('\n');
      buf = lines.pop()!;
      const hit = lines.find((l) => re.test(l));
      if (hit !== undefined) done(() => resolve(hit));
    };
    const onExit = (code: number | null) => done(() => reject(new Error(`process exited (${code}) before printing ${re}`)));
    const timer = setTimeout(() => done(() => reject(new Error(`no line matching ${re} within ${timeoutMs} ms`))), timeoutMs);
    child.stdout?.on('data', onData);
    child.once('exit', onExit);
  });
}

export interface Segmented {
  shell: ChildProcess;
  /** `tcp-stitch core`; none with plainCore (the shell's core legs go straight to the backend). */
  core?: ChildProcess;
  backend: ChildProcess;
  controlPath: string;
  /** The shell's external address, as C reaches it. */
  shellAddr: string;
  /** Collected stderr (JSON logs) of the shell and the core, for assertions and failure messages. */
  logs: { shell: string[]; core: string[] };
}

/** Collects a child's stderr JSON log lines into `into` (bounded), emitting 'log-lines' for waitForLog. */
export function collect(child: ChildProcess, into: string[]) {
  let buf = '';
  child.stderr?.on('data', (d: Buffer) => {
    buf += d;
    const lines = buf.split('\n');
    buf = lines.pop()!;
    into.push(...lines);
    if (into.length > 200_000) into.splice(0, 100_000);
    child.emit('log-lines');
  });
}

/**
 * Resolves once `count` lines collected from `child`'s stderr (into `lines`, by collect()) match
 * `re`; rejects if the child exits first or after timeoutMs.
 */
export function waitForLog(child: ChildProcess, lines: string[], re: RegExp, count = 1, timeoutMs = 30000): Promise<string[]> {
  const hits = () => lines.filter((l) => re.test(l));
  if (hits().length >= count) return Promise.resolve(hits());
  return new Promise((resolve, reject) => {
    const done = (fn: () => void) => { clearTimeout(timer); child.off('log-lines', check); child.off('exit', onExit); fn(); };
    const check = () => { const h = hits(); if (h.length >= count) done(() => resolve(h)); };
    const onExit = (code: number | null) => done(() => reject(new Error(`process exited (${code}) with ${hits().length}/${count} log lines matching ${re}; last lines:\n${lines.slice(-20).join('\n')}`)));
    const timer = setTimeout(() => done(() => reject(new Error(`${hits().length}/${count} log lines matching ${re} within ${timeoutMs} ms; last lines:\n${lines.slice(-20).join('\n')}`))), timeoutMs);
    child.on('log-lines', check);
    child.once('exit', onExit);
  });
}

export interface RunningSwitchProcess { child: ChildProcess; logs: string[]; controlPath: string }

/** `tcp-stitch switch` in S (eBPF datapath unless args say otherwise); resolves once it serves. */
export async function startSwitch(topo: Topology, args: string[]): Promise<RunningSwitchProcess> {
  const controlPath = `/run/${topo.id}-switch.sock`;
  const child = nodeInNs(topo.s, 'bin/tcp-stitch.js', ['switch', '--shell-iface', 'to-a', '--control', controlPath, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  const logs: string[] = [];
  collect(child, logs);
  await waitForLog(child, logs, /"switch running"/);
  return { child, logs, controlPath };
}

/**
 * Starts backend (`echo` from test/fixtures/echo-backend.ts, `peer` from test/fixtures/peer.ts, an
 * iperf3 server, or a static HTTP server over `httpRoot`),
 * core on B and shell on A. Readiness is waited for on the listeners, never by sleeping.
 */
export async function startSegmented(topo: Topology, opts: ({ backend: 'echo' | 'peer' | 'iperf3' | 'rtt' } | { backend: 'http'; httpRoot: string }) & { coreArgs?: string[]; shellScript?: string; plainCore?: boolean }, shellArgs: string[] = ['--switch', 'off']): Promise<Segmented> {
  const { a, b } = topo;
  // Behind a core the backend listens on B's loopback; as a plain core, on B's address.
  const at = opts.plainCore ? b.addr : '127.0.0.1';
  const backend = opts.backend === 'http'
    ? b.spawn('python3', ['-m', 'http.server', String(BACKEND_PORT), '--bind', at, '--directory', opts.httpRoot], { stdio: ['ignore', 'pipe', 'pipe'] })
    : opts.backend === 'iperf3'
      ? b.spawn('iperf3', ['-s', '-p', String(BACKEND_PORT), '-B', at], { stdio: ['ignore', 'pipe', 'pipe'] })
      : opts.backend === 'echo'
      ? nodeInNs(b, 'test/fixtures/echo-backend.ts', [at, String(BACKEND_PORT)], { stdio: ['ignore', 'pipe', 'pipe'] })
      : opts.backend === 'rtt'
      ? nodeInNs(b, 'test/fixtures/rtt.ts', ['server', at, String(BACKEND_PORT)], { stdio: ['ignore', 'pipe', 'pipe'] })
      : nodeInNs(b, 'test/fixtures/peer.ts', ['listen', at, String(BACKEND_PORT)], { stdio: ['pipe', 'pipe', 'pipe'] });
  const logs = { shell: [] as string[], core: [] as string[] };
  const core = opts.plainCore ? undefined
    : nodeInNs(b, 'bin/tcp-stitch.js', ['core', '--listen', `${b.addr}:${CORE_PORT}`, '--forward', `127.0.0.1:${BACKEND_PORT}`, ...(opts.coreArgs ?? [])], { stdio: ['ignore', 'pipe', 'pipe'] });
  if (core) collect(core, logs.core);
  const coreAt = opts.plainCore ? [`${b.addr}:${BACKEND_PORT}`, '--plain-core'] : [`${b.addr}:${CORE_PORT}`];
  const controlPath = `/run/${topo.id}-shell.sock`;
  // shellScript: a runtime of its own instead of `tcp-stitch shell` (same --listen/--core, plus shellArgs).
  const shell = opts.shellScript
    ? nodeInNs(a, opts.shellScript, ['--listen', `${a.addr}:${SHELL_PORT}`, '--core', ...coreAt, ...shellArgs], { stdio: ['ignore', 'pipe', 'pipe'] })
    : nodeInNs(a, 'bin/tcp-stitch.js', ['shell', '--listen', `${a.addr}:${SHELL_PORT}`, '--core', ...coreAt, '--control', controlPath, ...shellArgs], { stdio: ['ignore', 'pipe', 'pipe'] });
  collect(shell, logs.shell);
  await Promise.all([b.waitForListen(BACKEND_PORT), ...(core ? [b.waitForListen(CORE_PORT)] : []), a.waitForListen(SHELL_PORT)]);
  return { shell, core, backend, controlPath, shellAddr: a.addr, logs };
}

/** A child speaking JSON lines on stdout; requests on stdin. */
export class JsonProc {
  readonly lines: Array<Record<string, unknown>> = [];
  private waiters: Array<{ pred: (o: Record<string, unknown>) => boolean; resolve: (o: Record<string, unknown>) => void }> = [];
  private stderr = '';
  private seq = 0;
  /** What the child wrote to stderr (its last 100-200 KB). */
  get errText(): string { return this.stderr; }
  /** Resolves once the child exited and its output is all read. */
  readonly exited: Promise<number | null>;
  constructor(readonly name: string, readonly child: ChildProcess) {
    let buf = '';
    this.exited = new Promise((resolve) => child.once('close', (code) => resolve(code)));
    child.stdout!.on('data', (d: Buffer) => {
      buf += d;
      const parts = buf.split('\n');
      buf = parts.pop()!;
      for (const l of parts) {
        if (!l.startsWith('{')) continue;
        const o = JSON.parse(l) as Record<string, unknown>;
        this.lines.push(o);
        for (const w of this.waiters.filter((x) => x.pred(o))) {
          this.waiters.splice(this.waiters.indexOf(w), 1);
          w.resolve(o);
        }
      }
    });
    child.stderr!.on('data', (d: Buffer) => { this.stderr += d; if (this.stderr.length > 200_000) this.stderr = this.stderr.slice(-100_000); });
  }
  logs(): string { return this.stderr; }
  /** The first line (already seen or to come) matching pred. */
  wait(pred: (o: Record<string, unknown>) => boolean, what: string, timeoutMs = 30_000): Promise<Record<string, unknown>> {
    const seen = this.lines.find(pred);
    if (seen) return Promise.resolve(seen);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`${this.name}: no ${what} within ${timeoutMs} ms; stderr: ${this.stderr.slice(-3000)}`)), timeoutMs);
      const onExit = (code: number | null) => { clearTimeout(timer); reject(new Error(`${this.name} exited (${code}) before ${what}; stderr: ${this.stderr.slice(-3000)}`)); };
      this.child.once('exit', onExit);
      this.waiters.push({ pred, resolve: (o) => { clearTimeout(timer); this.child.off('exit', onExit); resolve(o); } });
    });
  }
  line(s: string): void { this.child.stdin!.write(s + '\n'); }
  async request(req: Record<string, unknown>): Promise<Record<string, unknown>> {
    const seq = ++this.seq;
    const p = this.wait((o) => o.seq === seq, `answer to ${String(req.op)}`);
    this.child.stdin!.write(JSON.stringify({ ...req, seq }, (_k, v) => (typeof v === 'bigint' ? v.toString() : v)) + '\n');
    const r = await p;
    if (r.ok !== true) throw new Error(`${this.name}: ${String(req.op)} failed: ${JSON.stringify(r)}`);
    return r;
  }
}
