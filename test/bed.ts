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
  core: ChildProcess;
  backend: ChildProcess;
  controlPath: string;
  /** The shell's external address, as C reaches it. */
  shellAddr: string;
  /** Collected stderr (JSON logs) of the shell and the core, for assertions and failure messages. */
  logs: { shell: string[]; core: string[] };
}

function collect(child: ChildProcess, into: string[]) {
  let buf = '';
  child.stderr?.on('data', (d: Buffer) => {
    buf += d;
    const lines = buf.split('\n');
    buf = lines.pop()!;
    into.push(...lines);
  });
}

/**
 * Starts backend (`echo` from test/fixtures/echo-backend.ts, or a static HTTP server over `httpRoot`),
 * core on B and shell on A. Readiness is waited for on the listeners, never by sleeping.
 */
export async function startSegmented(topo: Topology, opts: { backend: 'echo' } | { backend: 'http'; httpRoot: string }, shellArgs: string[] = ['--switch', 'off']): Promise<Segmented> {
  const { a, b } = topo;
  const backend = opts.backend === 'echo'
    ? nodeInNs(b, 'test/fixtures/echo-backend.ts', ['127.0.0.1', String(BACKEND_PORT)], { stdio: ['ignore', 'pipe', 'pipe'] })
    : b.spawn('python3', ['-m', 'http.server', String(BACKEND_PORT), '--bind', '127.0.0.1', '--directory', opts.httpRoot], { stdio: ['ignore', 'pipe', 'pipe'] });
  const logs = { shell: [] as string[], core: [] as string[] };
  const core = nodeInNs(b, 'bin/tcp-stitch.js', ['core', '--listen', `${b.addr}:${CORE_PORT}`, '--forward', `127.0.0.1:${BACKEND_PORT}`], { stdio: ['ignore', 'pipe', 'pipe'] });
  collect(core, logs.core);
  const controlPath = `/run/${topo.id}-shell.sock`;
  const shell = nodeInNs(a, 'bin/tcp-stitch.js', ['shell', '--listen', `${a.addr}:${SHELL_PORT}`, '--core', `${b.addr}:${CORE_PORT}`, '--control', controlPath, ...shellArgs], { stdio: ['ignore', 'pipe', 'pipe'] });
  collect(shell, logs.shell);
  await Promise.all([b.waitForListen(BACKEND_PORT), b.waitForListen(CORE_PORT), a.waitForListen(SHELL_PORT)]);
  return { shell, core, backend, controlPath, shellAddr: a.addr, logs };
}
