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

/** A size in bytes: digits, optionally followed by k or m (KiB, MiB). */
export function byteSize(value: string, flag: string): number {
  const m = /^(\d+)([kKmM]?)$/.exec(value);
  if (!m) throw new UsageError(`${flag} must be a size in bytes (e.g. 262144, 256k or 1m), got ${JSON.stringify(value)}`);
  return Number(m[1]) * (m[2] === '' ? 1 : /k/i.test(m[2]!) ? 1024 : 1 << 20);
}
