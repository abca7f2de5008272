// Key files: the shared secrets the shell's agent and the switch authenticate control messages with.
//
// Format (text, one key per line, '#' starts a comment, blank lines ignored):
//
//   # tcp-stitch key file: give the same file to the shell (--key-file) and the switch (--key-file)
//   key 2882400001 hmac-sha256 5f0c...64 hex digits...e1
//
// The key id is a decimal integer 1..4294967295; the secret is exactly 32 bytes as 64 hex digits.
// A switch may hold several keys (one line per shell); an agent uses the first key, or the one it
// names by id. `tcp-stitch keygen` prints generateKeyFile().
import { randomBytes, randomInt } from 'node:crypto';
import { readFile, stat } from 'node:fs/promises';
import { InvalidArgumentError } from '../sdk/errors.ts';
import type { Logger } from '../sdk/log.ts';
import type { Key } from './protocol.ts';

export type { Key } from './protocol.ts';

export const KEY_SECRET_SIZE = 32;
export const KEY_ALGORITHM = 'hmac-sha256';

/** A new random key (id 1..2^32-1, 32-byte secret). */
export function generateKey(): Key {
  return { id: randomInt(1, 2 ** 32 - 1), secret: randomBytes(KEY_SECRET_SIZE) };
}

/** Key file text for the given keys (default: one new key). */
export function formatKeyFile(keys: readonly Key[]): string {
  const lines = [
    '# tcp-stitch key file: give the same file to the shell and the switch (--key-file PATH).',
    '# Keep it secret (chmod 600). Format: key <id> hmac-sha256 <64 hex digits>',
  ];
  for (const k of keys) {
    checkKey(k);
    lines.push(`key ${k.id} ${KEY_ALGORITHM} ${k.secret.toString('hex')}`);
  }
  return lines.join('\n') + '\n';
}

/** What `tcp-stitch keygen` prints: a key file with one new key. */
export function generateKeyFile(): string {
  return formatKeyFile([generateKey()]);
}

function checkKey(k: Key): void {
  if (!Number.isInteger(k.id) || k.id < 1 || k.id > 0xffff_ffff) {
    throw new InvalidArgumentError(`key id must be an integer 1..4294967295, got ${String(k.id)}`);
  }
  if (!Buffer.isBuffer(k.secret) || k.secret.length !== KEY_SECRET_SIZE) {
    throw new InvalidArgumentError(`key ${k.id}: secret must be ${KEY_SECRET_SIZE} bytes`);
  }
}

/** Parses key file text. Throws InvalidArgumentError naming the line at fault. */
export function parseKeyFile(text: string, source = 'key file'): Key[] {
  const keys: Key[] = [];
  text.split(/\r?\n/).forEach((raw, i) => {
    const line = raw.replace(/#.*$/, '').trim();
    if (!line) return;
    const where = `${source} line ${i + 1}`;
    const f = line.split(/\s+/);
    if (f.length !== 4 || f[0] !== 'key') {
      throw new InvalidArgumentError(`${where}: expected 'key <id> ${KEY_ALGORITHM} <64 hex digits>'`);
    }
    if (!/^[1-9][0-9]{0,9}$/.test(f[1]!) || Number(f[1]) > 0xffff_ffff) {
      throw new InvalidArgumentError(`${where}: key id must be a decimal integer 1..4294967295, got '${f[1]}'`);
    }
    if (f[2] !== KEY_ALGORITHM) {
      throw new InvalidArgumentError(`${where}: unsupported algorithm '${f[2]}', use ${KEY_ALGORITHM}`);
    }
    if (!/^[0-9a-fA-F]{64}$/.test(f[3]!)) {
      throw new InvalidArgumentError(`${where}: secret must be exactly 64 hex digits (32 bytes); run 'tcp-stitch keygen'`);
    }
    const id = Number(f[1]);
    if (keys.some((k) => k.id === id)) throw new InvalidArgumentError(`${where}: key id ${id} appears twice`);
    keys.push({ id, secret: Buffer.from(f[3]!, 'hex') });
  });
  if (keys.length === 0) throw new InvalidArgumentError(`${source}: no key; run 'tcp-stitch keygen > FILE'`);
  return keys;
}

/**
 * Reads and parses a key file. Warns (does not refuse) when group or others may read it: tests and
 * containers often run with a loose umask, and refusing would only push people to weaker workarounds.
 */
export async function loadKeyFile(path: string, logger?: Logger): Promise<Key[]> {
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (err) {
    throw new InvalidArgumentError(`cannot read key file ${path}: ${(err as Error).message}`, { cause: err });
  }
  const keys = parseKeyFile(text, path);
  if (logger) {
    const st = await stat(path).catch(() => undefined);
    if (st && (st.mode & 0o077) !== 0) logger.warn('key file is readable by group or others; chmod 600 it', { path });
  }
  return keys;
}

/** Picks the key an agent signs with: the given id, or the first key. */
export function selectKey(keys: readonly Key[], id?: number): Key {
  const k = id === undefined ? keys[0] : keys.find((x) => x.id === id);
  if (!k) throw new InvalidArgumentError(id === undefined ? 'no key given' : `key id ${id} is not in the key file`);
  return k;
}
