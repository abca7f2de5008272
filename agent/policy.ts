// The policy engine: which connections deserve a stitch (DESIGN.md §1, seed: "the decision to bypass
// the shell VM may be made based on ... the current state of the shell VM, type of connection, time,
// or amount of received data").
//
// A policy is a hand-written JSON file, loaded from an explicit path and validated against the
// published schema docs/policy.schema.json (additionalProperties: false everywhere) plus a few
// checks a schema says badly (a port range the wrong way round, a CIDR with host bits set, a rule
// that decides nothing). Every problem is reported with the JSON pointer of the offending field,
// what is wrong and what to write instead. A reload that fails keeps the policy in force.
//
// evaluate() is pure and deterministic: the same connection, load and policy give the same
// decision and the same reason, so a decision can be logged, shown in status and tested.
import fs from 'node:fs';
import path from 'node:path';
import { Ajv2020, type ErrorObject } from 'ajv/dist/2020.js';
import { InvalidArgumentError, PolicyError } from '../sdk/errors.ts';
import { componentLogger, type Logger } from '../sdk/log.ts';

// ---------------------------------------------------------------------------------------------
// Types (mirror docs/policy.schema.json)

export type PolicyMode = 'auto' | 'manual' | 'off';

export interface PolicyMatch {
  /** Port numbers or "FROM-TO" ranges of the shell's local port. */
  localPorts?: (number | string)[];
  /** IPv4 networks "A.B.C.D/N" or addresses of the remote end. */
  remoteCidrs?: string[];
}

export interface PolicyRule {
  name: string;
  description?: string;
  match?: PolicyMatch;
  /** Long-lived: age at least this many ms. */
  minAgeMs?: number;
  /** Heavy: any threshold given reached. */
  minBytes?: { total?: number; eitherDirection?: number };
  /** Overloaded: any threshold given exceeded. */
  shellLoad?: { cpuAbove?: number; eluAbove?: number };
  stitchImmediately?: true;
  never?: true;
}

export interface Policy {
  $schema?: string;
  version: 1;
  description?: string;
  mode: PolicyMode;
  evaluationIntervalMs: number;
  rules: PolicyRule[];
}

/** Phase of a connection as DESIGN.md names them: 1 link, 2 core leg relayed by the shell, 3 stitched. */
export type ConnectionPhase = 1 | 2 | 3;

/** What the engine needs to know about one connection. */
export interface PolicyConnection {
  id: string | number;
  localPort: number;
  remoteAddress: string;
  remotePort: number;
  ageMs: number;
  bytesIn: number;
  bytesOut: number;
  phase: ConnectionPhase;
}

/** The shell process's load (from the load monitor). */
export interface ShellLoad {
  /** CPU seconds per wall-clock second of the shell process (1 = one full core). */
  cpu: number;
  /** Event-loop utilization, 0..1. */
  elu: number;
}

export interface PolicyDecision {
  stitch: boolean;
  /** Human-readable: which rule and which condition decided, or why none did. */
  reason: string;
  /** Name of the deciding rule, when a rule decided. */
  rule?: string;
}

/** One problem found in a policy, located by JSON pointer (RFC 6901). */
export interface PolicyIssue {
  pointer: string;
  message: string;
}

export type PolicyErrorWithIssues = InstanceType<typeof PolicyError> & {
  /** The file, when the policy came from one. */
  file?: string;
  issues: PolicyIssue[];
};

// ---------------------------------------------------------------------------------------------
// Schema

const schemaUrl = new URL('../docs/policy.schema.json', import.meta.url);
/** The published schema (docs/policy.schema.json), parsed. */
export const policySchema: Record<string, unknown> = JSON.parse(fs.readFileSync(schemaUrl, 'utf8'));

const ajv = new Ajv2020({ allErrors: true, useDefaults: true, verbose: true, strict: true });
const validateSchema = ajv.compile(policySchema);

/** The default policy: stitch connections at least 2 s old that moved at least 1 MiB, or any connection when the shell's CPU is above 0.8. Same as examples/policies/default.json. */
export function defaultPolicy(): Policy {
  return {
    version: 1,
    description: 'Stitch connections that are both long-lived and heavy, and any connection while the shell is overloaded.',
    mode: 'auto',
    evaluationIntervalMs: 1000,
    rules: [
      {
        name: 'long-lived-and-heavy',
        description: 'at least 2 s old and at least 1 MiB moved',
        minAgeMs: 2000,
        minBytes: { total: 1048576 },
      },
      {
        name: 'shell-overloaded',
        description: 'the shell process uses more than 80% of a core',
        shellLoad: { cpuAbove: 0.8 },
      },
    ],
  };
}

function policyError(summary: string, issues: PolicyIssue[], file: string | undefined, cause?: unknown): PolicyErrorWithIssues {
  const where = file ? `policy file ${file}` : 'policy';
  const lines = issues.slice(0, 20).map((i) => `  ${i.pointer === '' ? '/' : i.pointer}: ${i.message}`);
  if (issues.length > 20) lines.push(`  ... and ${issues.length - 20} more`);
  const message = issues.length ? `${where}: ${summary}\n${lines.join('\n')}` : `${where}: ${summary}`;
  const err = new PolicyError(message, cause === undefined ? undefined : { cause }) as PolicyErrorWithIssues;
  err.issues = issues;
  if (file) err.file = file;
  return err;
}

/**
 * Validates a policy object (for example parsed from a file) against the published schema and the
 * semantic checks. Returns a copy with defaults filled in; throws PolicyError with `issues`.
 */
export function validatePolicy(value: unknown, file?: string): Policy {
  let copy: unknown;
  try {
    copy = structuredClone(value);
  } catch (err) {
    throw policyError('must be plain JSON data (objects, arrays, strings, numbers, booleans)', [], file, err);
  }
  const issues: PolicyIssue[] = [];
  if (!validateSchema(copy)) issues.push(...describeSchemaErrors(validateSchema.errors ?? []));
  else issues.push(...semanticIssues(copy as Policy));
  if (issues.length) {
    throw policyError(`${issues.length} problem${issues.length === 1 ? '' : 's'} (schema: docs/policy.schema.json)`, issues, file);
  }
  return copy as Policy;
}

/** Reads, parses and validates a policy file. Throws PolicyError saying which line, column or field is wrong. */
export function loadPolicyFile(file: string): Policy {
  if (typeof file !== 'string' || file === '')
    throw new InvalidArgumentError('a policy file path is required, e.g. --policy /etc/tcp-stitch/policy.json');
  const abs = path.resolve(file);
  let text: string;
  try {
    text = fs.readFileSync(abs, 'utf8');
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    const what = code === 'ENOENT' ? 'does not exist; check the path (examples: examples/policies/*.json)'
      : code === 'EACCES' ? 'cannot be read (permission denied)'
        : code === 'EISDIR' ? 'is a directory; name the policy file itself'
          : `cannot be read (${code ?? (err as Error).message})`;
    throw policyError(what, [], abs, err);
  }
  if (text.charCodeAt(0) === 0xfeff) text = text.slice(1);
  const syntax = findJsonSyntaxError(text);
  if (syntax) {
    const { line, column } = lineAndColumn(text, syntax.offset);
    throw policyError(`is not valid JSON at line ${line}, column ${column}: ${syntax.message}`,
      [{ pointer: syntax.pointer, message: `line ${line}, column ${column}: ${syntax.message}` }], abs);
  }
  return validatePolicy(JSON.parse(text), abs);
}

// ---------------------------------------------------------------------------------------------
// Schema error messages: pointer + what is wrong + what to do.

function escapePointer(segment: string): string {
  return segment.replace(/~/g, '~0').replace(/\//g, '~1');
}

function resolveRef(schema: unknown): Record<string, unknown> | undefined {
  if (!schema || typeof schema !== 'object') return undefined;
  const s = schema as Record<string, unknown>;
  if (typeof s.$ref === 'string' && s.$ref.startsWith('#/$defs/')) {
    const defs = policySchema.$defs as Record<string, Record<string, unknown>>;
    return defs[s.$ref.slice('#/$defs/'.length)];
  }
  return s;
}

function describeValue(v: unknown): string {
  if (v === null) return 'null';
  if (Array.isArray(v)) return 'an array';
  if (typeof v === 'object') return 'an object';
  if (typeof v === 'string') return JSON.stringify(v.length > 40 ? `${v.slice(0, 37)}...` : v);
  return String(v);
}

function editDistance(a: string, b: string): number {
  const d = Array.from({ length: b.length + 1 }, (_, j) => j);
  for (let i = 1; i <= a.length; i++) {
    let prev = d[0]!;
    d[0] = i;
    for (let j = 1; j <= b.length; j++) {
      const tmp = d[j]!;
      d[j] = Math.min(d[j]! + 1, d[j - 1]! + 1, prev + (a[i - 1]!.toLowerCase() === b[j - 1]!.toLowerCase() ? 0 : 1));
      prev = tmp;
    }
  }
  return d[b.length]!;
}

function describeSchemaErrors(errors: ErrorObject[]): PolicyIssue[] {
  const anyOfPaths = errors.filter((e) => e.keyword === 'anyOf').map((e) => e.schemaPath);
  const issues: PolicyIssue[] = [];
  const seen = new Set<string>();
  for (const e of errors) {
    if (e.keyword !== 'anyOf' && anyOfPaths.some((p) => e.schemaPath.startsWith(`${p}/`))) continue;
    const parent = (e.parentSchema ?? {}) as Record<string, unknown>;
    const expected = typeof parent.description === 'string' ? `; expected ${parent.description}` : '';
    let pointer = e.instancePath;
    let message: string;
    const p = e.params as Record<string, unknown>;
    switch (e.keyword) {
      case 'additionalProperties': {
        const extra = String(p.additionalProperty);
        pointer = `${e.instancePath}/${escapePointer(extra)}`;
        const allowed = Object.keys((parent.properties ?? {}) as object);
        const close = allowed.map((a) => ({ a, d: editDistance(extra, a) })).sort((x, y) => x.d - y.d)[0];
        const hint = close && close.d <= Math.max(2, Math.floor(extra.length / 3)) ? `did you mean "${close.a}"? ` : '';
        message = `unknown field "${extra}"; ${hint}(allowed here: ${allowed.join(', ')})`;
        break;
      }
      case 'required': {
        const missing = String(p.missingProperty);
        pointer = `${e.instancePath}/${escapePointer(missing)}`;
        const propSchema = resolveRef((parent.properties as Record<string, unknown> | undefined)?.[missing]);
        const desc = typeof propSchema?.description === 'string' ? ` (${propSchema.description})` : '';
        message = `required field "${missing}" is missing; add it${desc}`;
        break;
      }
      case 'type':
        message = `must be ${p.type === 'integer' ? 'an integer' : p.type === 'object' || p.type === 'array' ? `an ${p.type}` : `a ${p.type}`} (got ${describeValue(e.data)})${expected}`;
        break;
      case 'enum':
        message = `must be one of ${(p.allowedValues as unknown[]).map((v) => JSON.stringify(v)).join(', ')} (got ${describeValue(e.data)})${expected}`;
        break;
      case 'const':
        message = `must be ${JSON.stringify(p.allowedValue)} (got ${describeValue(e.data)})${expected}`;
        break;
      case 'minimum': case 'maximum': case 'exclusiveMinimum': case 'exclusiveMaximum':
        message = `must be ${p.comparison} ${p.limit} (got ${describeValue(e.data)})${expected}`;
        break;
      case 'pattern':
        message = `has the wrong form (got ${describeValue(e.data)})${expected}`;
        break;
      case 'anyOf':
        message = `is not valid (got ${describeValue(e.data)})${expected}`;
        break;
      case 'minProperties':
        message = `must not be empty${expected}`;
        break;
      default:
        message = `${e.message ?? 'is not valid'}${expected}`;
    }
    const key = `${pointer}\n${message}`;
    if (!seen.has(key)) {
      seen.add(key);
      issues.push({ pointer, message });
    }
  }
  return issues;
}

// ---------------------------------------------------------------------------------------------
// Checks the schema does not express well.

const CONDITIONS = ['minAgeMs', 'minBytes', 'shellLoad'] as const;

interface PortRange { from: number; to: number }

function parsePortSpec(spec: number | string): PortRange | string {
  if (typeof spec === 'number') return { from: spec, to: spec };
  const [a, b] = spec.split('-').map(Number) as [number, number];
  if (a < 1 || b > 65535) return `port range "${spec}" is outside 1-65535`;
  if (a > b) return `port range "${spec}" runs backwards; write "${b}-${a}"`;
  return { from: a, to: b };
}

interface Cidr { network: number; mask: number; text: string }

function parseCidr(text: string): Cidr | string {
  const [addr, lenText] = text.split('/') as [string, string | undefined];
  const octets = addr.split('.').map(Number);
  if (octets.some((o) => o > 255)) return `"${text}" has an octet above 255`;
  const len = lenText === undefined ? 32 : Number(lenText);
  if (len > 32) return `"${text}" has a prefix length above 32`;
  const ip = ((octets[0]! << 24) | (octets[1]! << 16) | (octets[2]! << 8) | octets[3]!) >>> 0;
  const mask = len === 0 ? 0 : (~0 << (32 - len)) >>> 0;
  const network = (ip & mask) >>> 0;
  if (network !== ip) {
    const fixed = [network >>> 24, (network >>> 16) & 255, (network >>> 8) & 255, network & 255].join('.');
    return `"${text}" has host bits set; write "${fixed}/${len}" for the network, or "${addr}" for the one address`;
  }
  return { network, mask, text };
}

function semanticIssues(policy: Policy): PolicyIssue[] {
  const issues: PolicyIssue[] = [];
  const names = new Map<string, number>();
  policy.rules.forEach((rule, i) => {
    const at = `/rules/${i}`;
    const first = names.get(rule.name);
    if (first !== undefined) issues.push({ pointer: `${at}/name`, message: `rule name "${rule.name}" is already used by /rules/${first}; give each rule its own name` });
    else names.set(rule.name, i);
    const conditions = CONDITIONS.filter((c) => rule[c] !== undefined);
    if (rule.never && rule.stitchImmediately)
      issues.push({ pointer: `${at}/never`, message: 'a rule cannot be both "never" and "stitchImmediately"; keep one' });
    else if (rule.never && conditions.length)
      issues.push({ pointer: `${at}/never`, message: `a "never" rule takes no condition (found ${conditions.join(', ')}); remove them, narrow it with "match" instead` });
    else if (rule.stitchImmediately && conditions.length)
      issues.push({ pointer: `${at}/stitchImmediately`, message: `"stitchImmediately" takes no condition (found ${conditions.join(', ')}); remove them, or remove "stitchImmediately"` });
    else if (!rule.never && !rule.stitchImmediately && !conditions.length)
      issues.push({ pointer: at, message: 'the rule decides nothing; add a condition (minAgeMs, minBytes, shellLoad), or "stitchImmediately": true, or "never": true' });
    rule.match?.localPorts?.forEach((spec, j) => {
      const r = parsePortSpec(spec);
      if (typeof r === 'string') issues.push({ pointer: `${at}/match/localPorts/${j}`, message: r });
    });
    rule.match?.remoteCidrs?.forEach((spec, j) => {
      const r = parseCidr(spec);
      if (typeof r === 'string') issues.push({ pointer: `${at}/match/remoteCidrs/${j}`, message: r });
    });
  });
  return issues;
}

// ---------------------------------------------------------------------------------------------
// JSON syntax errors with line and column (Node 20's JSON.parse often gives no position).

interface JsonSyntaxError { offset: number; message: string; pointer: string }

/** Returns the first syntax error of `text` as JSON (with duplicate keys counted as errors), or undefined. */
export function findJsonSyntaxError(text: string): JsonSyntaxError | undefined {
  let i = 0;
  const path: string[] = [];
  const ptr = () => path.map((s) => `/${escapePointer(s)}`).join('');
  class Stop { constructor(readonly err: JsonSyntaxError) {} }
  const fail = (message: string, at = i): never => { throw new Stop({ offset: at, message, pointer: ptr() }); };
  const describe = (ch: string | undefined) => ch === undefined ? 'end of file' : JSON.stringify(ch);
  const ws = () => {
    for (;;) {
      const c = text[i];
      if (c === ' ' || c === '\t' || c === '\n' || c === '\r') i++;
      else if (c === '/' && (text[i + 1] === '/' || text[i + 1] === '*')) fail('comments are not allowed in JSON; remove it (use a "description" field)');
      else return;
    }
  };
  const str = (): string => {
    const start = i;
    i++;
    for (;;) {
      const c = text[i];
      if (c === undefined) fail('unterminated string; add the closing double quote', start);
      if (c === '"') { i++; return JSON.parse(text.slice(start, i)) as string; }
      if (c === '\\') {
        const e = text[i + 1];
        if (e === 'u') {
          if (!/^[0-9a-fA-F]{4}$/.test(text.slice(i + 2, i + 6))) fail('bad \\u escape; write \\u followed by 4 hex digits');
          i += 6;
        } else if (e !== undefined && '"\\/bfnrt'.includes(e)) i += 2;
        else fail(`bad escape \\${e ?? ''} in a string; valid escapes are \\" \\\\ \\/ \\b \\f \\n \\r \\t \\uXXXX`);
      } else if (c < ' ') fail('control character (e.g. a line break) inside a string; escape it or close the string');
      else i++;
    }
  };
  const value = (): void => {
    ws();
    const c = text[i];
    if (c === '{') {
      i++; ws();
      if (text[i] === '}') { i++; return; }
      const keys = new Set<string>();
      for (;;) {
        ws();
        if (text[i] !== '"') fail(text[i] === '}' ? 'trailing comma before "}"; remove the comma' : `expected a field name in double quotes, found ${describe(text[i])}`);
        const keyAt = i;
        const key = str();
        if (keys.has(key)) { path.push(key); fail(`duplicate field "${key}"; keep one`, keyAt); }
        keys.add(key);
        ws();
        if (text[i] !== ':') fail(`expected ":" after the field name "${key}", found ${describe(text[i])}`);
        i++;
        path.push(key);
        value();
        path.pop();
        ws();
        if (text[i] === ',') { i++; continue; }
        if (text[i] === '}') { i++; return; }
        fail(`expected "," or "}" after the value of "${key}", found ${describe(text[i])}`);
      }
    }
    if (c === '[') {
      i++; ws();
      if (text[i] === ']') { i++; return; }
      for (let n = 0; ; n++) {
        ws();
        if (text[i] === ']') fail('trailing comma before "]"; remove the comma');
        path.push(String(n));
        value();
        path.pop();
        ws();
        if (text[i] === ',') { i++; continue; }
        if (text[i] === ']') { i++; return; }
        fail(`expected "," or "]" after an array item, found ${describe(text[i])}`);
      }
    }
    if (c === '"') { str(); return; }
    const num = /-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?/y;
    num.lastIndex = i;
    if (c === '-' || (c !== undefined && c >= '0' && c <= '9')) {
      const m = num.exec(text);
      if (!m) fail('malformed number');
      i += m![0].length;
      return;
    }
    for (const lit of ['true', 'false', 'null']) {
      if (text.startsWith(lit, i)) { i += lit.length; return; }
    }
    if (c === "'") fail('strings and field names take double quotes in JSON, not single quotes');
    fail(c === undefined ? 'unexpected end of file; expected a value' : `unexpected ${describe(c)}; expected a value (object, array, string, number, true, false or null)`);
  };
  try {
    value();
    ws();
    if (i < text.length) fail(`unexpected ${describe(text[i])} after the end of the JSON value`);
    return undefined;
  } catch (e) {
    if (e instanceof Stop) return e.err;
    throw e;
  }
}

function lineAndColumn(text: string, offset: number): { line: number; column: number } {
  let line = 1, lineStart = 0;
  for (let k = 0; k < offset && k < text.length; k++) {
    if (text[k] === '\n') { line++; lineStart = k + 1; }
  }
  return { line, column: offset - lineStart + 1 };
}

// ---------------------------------------------------------------------------------------------
// Evaluation

interface CompiledRule {
  rule: PolicyRule;
  ports?: PortRange[];
  cidrs?: Cidr[];
}

function compile(policy: Policy): CompiledRule[] {
  return policy.rules.map((rule) => {
    const c: CompiledRule = { rule };
    if (rule.match?.localPorts) c.ports = rule.match.localPorts.map((s) => parsePortSpec(s) as PortRange);
    if (rule.match?.remoteCidrs) c.cidrs = rule.match.remoteCidrs.map((s) => parseCidr(s) as Cidr);
    return c;
  });
}

function ipv4(address: string): number | undefined {
  const a = address.startsWith('::ffff:') ? address.slice(7) : address;
  const m = /^(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})$/.exec(a);
  if (!m) return undefined;
  const o = [m[1], m[2], m[3], m[4]].map(Number);
  if (o.some((x) => x > 255)) return undefined;
  return ((o[0]! << 24) | (o[1]! << 16) | (o[2]! << 8) | o[3]!) >>> 0;
}

/** Bytes for humans: exact below 1 KiB, else binary units with up to 2 decimals. */
export function formatBytes(n: number): string {
  if (n < 1024) return `${n} B`;
  const units = ['KiB', 'MiB', 'GiB', 'TiB'];
  let v = n / 1024, u = 0;
  while (v >= 1024 && u < units.length - 1) { v /= 1024; u++; }
  return `${Number(v.toFixed(2))} ${units[u]}`;
}

const fmtLoad = (x: number) => String(Number(x.toFixed(3)));

/** Why the match failed, or undefined when it matches. */
function matchFailure(c: CompiledRule, conn: PolicyConnection): string | undefined {
  if (c.ports && !c.ports.some((r) => conn.localPort >= r.from && conn.localPort <= r.to))
    return `local port ${conn.localPort} not in ${c.rule.match!.localPorts!.join(', ')}`;
  if (c.cidrs) {
    const a = ipv4(conn.remoteAddress);
    if (a === undefined || !c.cidrs.some((n) => ((a & n.mask) >>> 0) === n.network))
      return `remote ${conn.remoteAddress} not in ${c.rule.match!.remoteCidrs!.join(', ')}`;
  }
  return undefined;
}

/** Each condition's verdict: [holds, text]. */
function conditionResults(rule: PolicyRule, conn: PolicyConnection, load: ShellLoad): [boolean, string][] {
  const out: [boolean, string][] = [];
  if (rule.minAgeMs !== undefined) {
    const ok = conn.ageMs >= rule.minAgeMs;
    out.push([ok, `age ${conn.ageMs} ms ${ok ? '>=' : '<'} ${rule.minAgeMs} ms`]);
  }
  if (rule.minBytes) {
    const parts: [boolean, string][] = [];
    const total = conn.bytesIn + conn.bytesOut;
    if (rule.minBytes.total !== undefined) {
      const ok = total >= rule.minBytes.total;
      parts.push([ok, `${formatBytes(total)} moved ${ok ? '>=' : '<'} ${formatBytes(rule.minBytes.total)}`]);
    }
    if (rule.minBytes.eitherDirection !== undefined) {
      const most = Math.max(conn.bytesIn, conn.bytesOut);
      const dir = conn.bytesIn >= conn.bytesOut ? 'in' : 'out';
      const ok = most >= rule.minBytes.eitherDirection;
      parts.push([ok, `${formatBytes(most)} ${dir} ${ok ? '>=' : '<'} ${formatBytes(rule.minBytes.eitherDirection)}`]);
    }
    out.push(anyOf(parts));
  }
  if (rule.shellLoad) {
    const parts: [boolean, string][] = [];
    if (rule.shellLoad.cpuAbove !== undefined) {
      const ok = load.cpu > rule.shellLoad.cpuAbove;
      parts.push([ok, `shell CPU ${fmtLoad(load.cpu)} ${ok ? '>' : '<='} ${rule.shellLoad.cpuAbove}`]);
    }
    if (rule.shellLoad.eluAbove !== undefined) {
      const ok = load.elu > rule.shellLoad.eluAbove;
      parts.push([ok, `event-loop utilization ${fmtLoad(load.elu)} ${ok ? '>' : '<='} ${rule.shellLoad.eluAbove}`]);
    }
    out.push(anyOf(parts));
  }
  return out;
}

function anyOf(parts: [boolean, string][]): [boolean, string] {
  const held = parts.filter(([ok]) => ok);
  if (held.length) return [true, held.map(([, t]) => t).join(' and ')];
  return [false, parts.map(([, t]) => t).join(' and ')];
}

function checkInputs(conn: PolicyConnection, load: ShellLoad): void {
  if (!conn || typeof conn !== 'object') throw new InvalidArgumentError('evaluate(conn, load): conn must be a connection object');
  for (const k of ['localPort', 'ageMs', 'bytesIn', 'bytesOut'] as const) {
    if (typeof conn[k] !== 'number' || !(conn[k] >= 0)) throw new InvalidArgumentError(`evaluate: conn.${k} must be a non-negative number, got ${String(conn[k])}`);
  }
  if (typeof conn.remoteAddress !== 'string') throw new InvalidArgumentError('evaluate: conn.remoteAddress must be a string');
  if (!load || typeof load.cpu !== 'number' || !(load.cpu >= 0) || typeof load.elu !== 'number' || !(load.elu >= 0))
    throw new InvalidArgumentError('evaluate: load must be { cpu, elu } with non-negative numbers (from the load monitor)');
}

const MAX_LISTED = 5;

function evaluateWith(policy: Policy, rules: CompiledRule[], conn: PolicyConnection, load: ShellLoad): PolicyDecision {
  checkInputs(conn, load);
  if (conn.phase === 3) return { stitch: false, reason: 'already stitched (phase 3)' };
  if (policy.mode === 'off') return { stitch: false, reason: 'policy mode is "off": nothing is stitched' };
  if (policy.mode === 'manual') return { stitch: false, reason: 'policy mode is "manual": stitched only on request (tcp-stitch stitch)' };
  if (rules.length === 0) return { stitch: false, reason: 'the policy has no rules' };
  const misses: string[] = [];
  for (const c of rules) {
    const { rule } = c;
    const miss = matchFailure(c, conn);
    if (miss) { misses.push(`"${rule.name}" (${miss})`); continue; }
    if (rule.never) return { stitch: false, reason: `rule "${rule.name}": never stitched`, rule: rule.name };
    if (rule.stitchImmediately) return { stitch: true, reason: `rule "${rule.name}": stitched immediately after initiation`, rule: rule.name };
    const results = conditionResults(rule, conn, load);
    const failed = results.filter(([ok]) => !ok);
    if (failed.length === 0) return { stitch: true, reason: `rule "${rule.name}": ${results.map(([, t]) => t).join(', ')}`, rule: rule.name };
    misses.push(`"${rule.name}" (${failed.map(([, t]) => t).join(', ')})`);
  }
  const listed = misses.slice(0, MAX_LISTED).join('; ');
  const more = misses.length > MAX_LISTED ? `; and ${misses.length - MAX_LISTED} more` : '';
  return { stitch: false, reason: `no rule selects it: ${listed}${more}` };
}

// ---------------------------------------------------------------------------------------------
// Engine

export interface PolicyEngineOptions {
  /** A policy (validated here) — from loadPolicyFile(), defaultPolicy() or code. */
  policy: Policy;
  /** The file the policy came from; reload() without a path rereads it. */
  file?: string;
  logger?: Logger;
}

export interface PolicyEngine {
  /** The policy in force. */
  readonly policy: Policy;
  readonly mode: PolicyMode;
  readonly evaluationIntervalMs: number;
  /** The file the policy in force came from, if any. */
  readonly file: string | undefined;
  /** Pure and deterministic: same connection, load and policy, same decision and reason. */
  evaluate(conn: PolicyConnection, load: ShellLoad): PolicyDecision;
  /**
   * Loads a policy file and puts it in force. When the file is missing or bad, throws the
   * PolicyError and keeps the previous policy in force.
   */
  reload(file?: string): Policy;
}

export function createPolicyEngine(opts: PolicyEngineOptions): PolicyEngine {
  if (!opts || typeof opts !== 'object') throw new InvalidArgumentError('createPolicyEngine({ policy, logger }): options are required');
  const logger = opts.logger ?? componentLogger('policy');
  let policy = validatePolicy(opts.policy, opts.file);
  let rules = compile(policy);
  let file = opts.file === undefined ? undefined : path.resolve(opts.file);
  return {
    get policy() { return policy; },
    get mode() { return policy.mode; },
    get evaluationIntervalMs() { return policy.evaluationIntervalMs; },
    get file() { return file; },
    evaluate(conn, load) {
      return evaluateWith(policy, rules, conn, load);
    },
    reload(next = file) {
      if (next === undefined) throw new InvalidArgumentError('reload(file): no file given and the policy in force did not come from one');
      let loaded: Policy;
      try {
        loaded = loadPolicyFile(next);
      } catch (err) {
        logger.error('policy reload failed; the previous policy stays in force', {
          file: path.resolve(next), error: (err as Error).message, kept: file ?? 'in-memory policy',
        });
        throw err;
      }
      policy = loaded;
      rules = compile(loaded);
      file = path.resolve(next);
      logger.info('policy loaded', { file, mode: policy.mode, rules: policy.rules.map((r) => r.name) });
      return policy;
    },
  };
}
