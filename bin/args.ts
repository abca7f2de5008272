// Argument helpers for the CLI: every bad argument becomes a one-line UsageError.
import { isIP } from 'node:net';

export class UsageError extends Error {}

export function hostPort(value: string | undefined, flag: string): { host: string; port: number } {
  if (value === undefined) throw new UsageError(`${flag} HOST:PORT is required`);
  const m = /^(?:\[([^\]]+)\]|([^:]+)):(\d+)$/.exec(value);
  const port = Number(m?.[3]);
  const host = m?.[1] ?? m?.[2];
  if (!m || !host || !Number.isInteger(port) || port < 1 || port > 65535) {
    throw new UsageError(`${flag} must be HOST:PORT with a port in 1..65535, got ${JSON.stringify(value)}`);
  }
  if (!isIP(host) && !/^[a-zA-Z0-9.-]+$/.test(host)) throw new UsageError(`${flag}: ${JSON.stringify(host)} is not an address or host name`);
  return { host, port };
}
