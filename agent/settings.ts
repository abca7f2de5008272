// The agent's own persisted state and settings, through conf (JSON file, schema-validated, atomic
// writes). Only what the agent owns lives here — switch mode, preconfigured switch address, key file
// path, last discovery result (for `tcp-stitch status`). conf fills schema defaults back into its
// file and is "not intended to be hand-edited", so the hand-written policy is a separate file
// (agent/policy.ts), never this one.
//
// Several shells on one machine: each gets its own file, named after its --control PATH, unless a
// directory (cwd) is given outright (tests).
import { createHash } from 'node:crypto';
import path from 'node:path';
import Conf from 'conf';
import { InvalidArgumentError } from '../sdk/errors.ts';
import { componentLogger, type Logger } from '../sdk/log.ts';

/** DESIGN.md §10 `--switch auto|off|combined|HOST:PORT`; HOST:PORT is 'preconfigured'. */
export type SwitchMode = 'auto' | 'off' | 'combined' | 'preconfigured';

/** The last discovery result, as `tcp-stitch status` shows it. */
export interface DiscoveryRecord {
  /** ISO 8601 time of the result. */
  at: string;
  available: boolean;
  /** Why stitching is (not) available, human-readable. */
  reason: string;
  mode: SwitchMode;
  /** The switch's control address HOST:PORT, when one answered or was configured. */
  switchAddress?: string;
  /** The ingress/egress interface and next hop that discovery used. */
  ifname?: string;
  nextHop?: string;
  nextHopVia?: 'route' | 'icmp' | 'direct';
  /** The switch's epoch (restart counter) from its answer. */
  epoch?: number;
  capabilities?: string[];
}

export interface AgentSettings {
  switchMode: SwitchMode;
  switchAddress?: string;
  keyFile?: string;
  lastDiscovery?: DiscoveryRecord;
}

/** Fields to change; null removes an optional field. */
export interface SettingsPatch {
  switchMode?: SwitchMode;
  switchAddress?: string | null;
  keyFile?: string | null;
}

export interface SettingsStore {
  /** The JSON file conf writes. */
  readonly path: string;
  read(): AgentSettings;
  /** Validates and writes the patch at once; on a bad patch throws InvalidArgumentError and changes nothing. */
  update(patch: SettingsPatch): AgentSettings;
  /** Stores the discovery result (`at` defaults to now). */
  recordDiscovery(record: Omit<DiscoveryRecord, 'at'> & { at?: string | Date }): DiscoveryRecord;
  clearDiscovery(): void;
}

export interface OpenSettingsOptions {
  /** Directory of the settings file. Default: the user config directory (env-paths). */
  cwd?: string;
  /** The shell's --control PATH: names the file, so several shells on one machine keep apart. */
  controlPath?: string;
  logger?: Logger;
}

const SWITCH_MODES: SwitchMode[] = ['auto', 'off', 'combined', 'preconfigured'];
const HOST_PORT = '^(\\[[0-9A-Fa-f:.]+\\]|[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252}))(?::)([0-9]{1,5})$';

// conf's `schema` option is the `properties` of the root schema.
const schema = {
  switchMode: { type: 'string', enum: SWITCH_MODES, default: 'auto' },
  switchAddress: { type: 'string', pattern: HOST_PORT },
  keyFile: { type: 'string', minLength: 1 },
  lastDiscovery: {
    type: 'object',
    additionalProperties: false,
    required: ['at', 'available', 'reason', 'mode'],
    properties: {
      at: { type: 'string', minLength: 1 },
      available: { type: 'boolean' },
      reason: { type: 'string' },
      mode: { type: 'string', enum: SWITCH_MODES },
      switchAddress: { type: 'string' },
      ifname: { type: 'string' },
      nextHop: { type: 'string' },
      nextHopVia: { type: 'string', enum: ['route', 'icmp', 'direct'] },
      epoch: { type: 'integer', minimum: 0 },
      capabilities: { type: 'array', items: { type: 'string' } },
    },
  },
} as const;

/** Validates a HOST:PORT switch address; returns it unchanged. */
export function checkSwitchAddress(value: string): string {
  const m = new RegExp(HOST_PORT).exec(value);
  const port = m ? Number(m[2]) : NaN;
  if (!m || port < 1 || port > 65535)
    throw new InvalidArgumentError(`switch address must be HOST:PORT with a port 1-65535, e.g. "198.18.2.1:4790", got ${JSON.stringify(value)}`);
  return value;
}

/** Maps the shell's `--switch auto|off|combined|HOST:PORT` to settings. */
export function parseSwitchOption(value: string): { switchMode: SwitchMode; switchAddress?: string } {
  if (value === 'auto' || value === 'off' || value === 'combined') return { switchMode: value };
  if (value === 'preconfigured')
    throw new InvalidArgumentError('--switch preconfigured needs the address itself: --switch HOST:PORT');
  try {
    return { switchMode: 'preconfigured', switchAddress: checkSwitchAddress(value) };
  } catch {
    throw new InvalidArgumentError(`--switch must be auto, off, combined or HOST:PORT, got ${JSON.stringify(value)}`);
  }
}

/** The settings file name for a shell: `shell-<hash of the control path>`, or `config` without one. */
export function settingsNameFor(controlPath?: string): string {
  if (controlPath === undefined) return 'config';
  const digest = createHash('sha256').update(path.resolve(controlPath)).digest('hex').slice(0, 16);
  return `shell-${digest}`;
}

type Store = Omit<AgentSettings, 'switchMode'> & { switchMode: SwitchMode };

function consistent(s: AgentSettings): void {
  if (s.switchMode === 'preconfigured' && !s.switchAddress)
    throw new InvalidArgumentError('switch mode "preconfigured" needs a switch address (HOST:PORT)');
  if (s.switchAddress !== undefined) checkSwitchAddress(s.switchAddress);
  if (s.keyFile !== undefined && (typeof s.keyFile !== 'string' || s.keyFile === ''))
    throw new InvalidArgumentError('keyFile must be a non-empty path');
}

export function openSettings(opts: OpenSettingsOptions = {}): SettingsStore {
  const logger = opts.logger ?? componentLogger('settings');
  if (opts.cwd !== undefined && (typeof opts.cwd !== 'string' || opts.cwd === ''))
    throw new InvalidArgumentError('cwd must be a directory path');
  const base = {
    projectName: 'tcp-stitch',
    configName: settingsNameFor(opts.controlPath),
    schema,
    rootSchema: { additionalProperties: false },
    configFileMode: 0o600,
    ...(opts.cwd !== undefined ? { cwd: path.resolve(opts.cwd) } : {}),
  };
  let conf: Conf<Store>;
  try {
    conf = new Conf<Store>(base as ConstructorParameters<typeof Conf<Store>>[0]);
  } catch (err) {
    // The file is the agent's, not the operator's: a corrupt one is reset, and we say so.
    logger.warn('agent settings file is unreadable or invalid; starting from defaults', { error: (err as Error).message });
    conf = new Conf<Store>({ ...base, clearInvalidConfig: true } as ConstructorParameters<typeof Conf<Store>>[0]);
    conf.clear();
  }

  const read = (): AgentSettings => {
    const s = conf.store;
    const out: AgentSettings = { switchMode: s.switchMode ?? 'auto' };
    if (s.switchAddress !== undefined) out.switchAddress = s.switchAddress;
    if (s.keyFile !== undefined) out.keyFile = s.keyFile;
    if (s.lastDiscovery !== undefined) out.lastDiscovery = s.lastDiscovery;
    return out;
  };

  const write = (next: AgentSettings): void => {
    try {
      conf.store = next as Store;
    } catch (err) {
      throw new InvalidArgumentError(`agent settings not saved: ${(err as Error).message}`, { cause: err });
    }
  };

  return {
    get path() { return conf.path; },
    read,
    update(patch) {
      if (!patch || typeof patch !== 'object') throw new InvalidArgumentError('update(patch): patch must be an object');
      for (const k of Object.keys(patch)) {
        if (!['switchMode', 'switchAddress', 'keyFile'].includes(k))
          throw new InvalidArgumentError(`unknown setting "${k}"; settable: switchMode, switchAddress, keyFile`);
      }
      const next = read();
      if (patch.switchMode !== undefined) {
        if (!SWITCH_MODES.includes(patch.switchMode))
          throw new InvalidArgumentError(`switchMode must be one of ${SWITCH_MODES.join(', ')}, got ${JSON.stringify(patch.switchMode)}`);
        next.switchMode = patch.switchMode;
      }
      if (patch.switchAddress === null) delete next.switchAddress;
      else if (patch.switchAddress !== undefined) next.switchAddress = patch.switchAddress;
      if (patch.keyFile === null) delete next.keyFile;
      else if (patch.keyFile !== undefined) next.keyFile = typeof patch.keyFile === 'string' && patch.keyFile ? path.resolve(patch.keyFile) : patch.keyFile;
      consistent(next);
      write(next);
      return read();
    },
    recordDiscovery(record) {
      const at = record.at instanceof Date ? record.at.toISOString() : record.at ?? new Date().toISOString();
      const entry = { ...record, at } as DiscoveryRecord;
      write({ ...read(), lastDiscovery: entry });
      return entry;
    },
    clearDiscovery() {
      conf.delete('lastDiscovery');
    },
  };
}
