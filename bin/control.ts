// The shell's local control socket: JSON lines over a Unix socket, one request per line, one answer
// per line. `tcp-stitch status` and `tcp-stitch stitch` talk to it; several shells on one machine
// each have their own path (--control PATH).
import net from 'node:net';
import { once } from 'node:events';
import { mkdirSync, rmSync, existsSync } from 'node:fs';
import { dirname } from 'node:path';

export type Handler = (request: Record<string, unknown>) => Promise<unknown>;

export function defaultControlPath(kind: 'shell' | 'switch'): string {
  const base = process.getuid?.() === 0 ? '/run/tcp-stitch' : `${process.env.XDG_RUNTIME_DIR ?? '/tmp'}/tcp-stitch`;
  return `${base}/${kind}.sock`;
}

/** Serves the control socket; returns a closer. A stale socket file (no listener) is replaced. */
export async function serveControl(path: string, handler: Handler): Promise<() => Promise<void>> {
  mkdirSync(dirname(path), { recursive: true });
  if (existsSync(path)) {
    const alive = await new Promise<boolean>((resolve) => {
      const probe = net.connect(path, () => { probe.destroy(); resolve(true); });
      probe.on('error', () => resolve(false));
    });
    if (alive) throw new Error(`control socket ${path} is in use by another process; pick another with --control PATH`);
    rmSync(path);
  }
  const sockets = new Set<net.Socket>();
  // Half-open: a client sends its request and FIN at once; slow answers (a stitch waits for the
  // drain) must still reach it. The socket is ended once every request got its answer.
  const server = net.createServer({ allowHalfOpen: true }, (s) => {
    sockets.add(s);
    s.on('close', () => sockets.delete(s));
    s.on('error', () => {});
    let buf = '';
    let pending = 0;
    let ended = false;
    s.on('end', () => { ended = true; if (pending === 0) s.end(); });
    s.on('data', async (d) => {
      buf += d;
      let nl;
      while ((nl = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        let answer: unknown;
        pending++;
        try { answer = { ok: true, result: await handler(JSON.parse(line)) }; } catch (err) { answer = { ok: false, error: (err as Error).message }; }
        pending--;
        if (!s.destroyed) s.write(JSON.stringify(answer, (_k, v) => typeof v === 'bigint' ? v.toString() : v) + '\n');
        if (ended && pending === 0) s.end();
      }
    });
  });
  server.listen(path);
  await once(server, 'listening');
  return async () => {
    for (const s of sockets) s.destroy();
    await new Promise<void>((r) => server.close(() => r()));
    rmSync(path, { force: true });
  };
}

/** One request to a control socket; rejects with a clear message when nobody listens. */
export async function askControl(path: string, request: Record<string, unknown>, timeoutMs = 10000): Promise<unknown> {
  const s = net.connect(path);
  s.setTimeout(timeoutMs, () => s.destroy(new Error(`no answer on ${path} within ${timeoutMs} ms`)));
  try {
    await once(s, 'connect');
  } catch (err) {
    throw new Error(`cannot reach ${path} (${(err as NodeJS.ErrnoException).code ?? (err as Error).message}); is the process running with --control ${path}?`);
  }
  s.end(JSON.stringify(request) + '\n');
  let text = '';
  for await (const chunk of s) text += chunk;
  const answer = JSON.parse(text.split('\n')[0]) as { ok: boolean; result?: unknown; error?: string };
  if (!answer.ok) throw new Error(answer.error);
  return answer.result;
}
