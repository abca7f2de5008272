// The reference switch's one public door: runSwitch() starts the control daemon (discovery responder +
// authenticated control server, switch/control-server.ts) over a datapath, and hands back a small
// handle. It also re-exports what the agent and the CLI need from the switch part: the protocol's
// constants and types, the key-file helpers, and the in-memory table datapath.
//
// Keys. The control server always runs with at least one key (createSwitchControl refuses none). With a
// key file, shells holding the same file may install stitches. Without one, the switch makes up a
// random key that it never writes anywhere: it still answers an unauthenticated DISCOVER with its
// capabilities (so a shell can see it is there), but every authenticated request fails with
// UNKNOWN_KEY or NOT_AUTHORIZED, so no shell can install a stitch. It says so in its log at start.
//
// Datapaths. 'table' is the in-memory datapath and is honest about it: it advertises no translations,
// so discovery reports the switch as incapable and shells keep their connections on the shell path.
// 'ebpf' loads switch/datapath.ts (the kernel fast path) on demand; with `bpffs` its pins live in a
// stable directory there, so stitches survive a restart of the switch (docs/datapath.md, "Daemon
// restart"): the control server takes the adopted stitches into its table, and each shell claims its
// own when it re-installs them after seeing the new boot id. A Datapath object is used as
// given (tests pass createTableDatapath({ translations: ALL_TRANSLATIONS }) to get a capable switch
// without eBPF); it stays the caller's to close.
import { InvalidArgumentError, DatapathError, StitchError } from '../sdk/errors.ts';
import { componentLogger, type Logger } from '../sdk/log.ts';
import { createSwitchControl, type SwitchCounters, type SwitchSnapshot } from './control-server.ts';
import { DEFAULT_PORT, type Key } from './protocol.ts';
import { generateKey, loadKeyFile } from './keys.ts';
import { createTableDatapath } from './table-datapath.ts';
import type { Datapath, DatapathCloseOptions } from './stitch-types.ts';

export {
  DEFAULT_PORT, PROTOCOL_VERSION, TRANSLATIONS,
  type Key, type SwitchInfo, type StitchLegs, type StitchRecord, type StitchResult, type Translation, type ResultCode,
} from './protocol.ts';
export { formatKeyFile, generateKey, generateKeyFile, loadKeyFile, parseKeyFile, selectKey } from './keys.ts';
export { ALL_TRANSLATIONS, createTableDatapath, type TableDatapath, type TableDatapathInit } from './table-datapath.ts';
export type { AdoptedStitch, Datapath, DatapathCloseOptions, StitchSpec, StitchState, StitchStatus } from './stitch-types.ts';
export type { SwitchCounters, SwitchSnapshot } from './control-server.ts';

export interface RunSwitchOptions {
  /** The shell-facing interface (`--shell-iface`): the control socket binds to its IPv4 address. */
  shellIface: string;
  /** Key file shared with the shells (`tcp-stitch keygen`). Without it (and without `keys`), no shell can stitch. */
  keyFile?: string;
  /** Keys given directly instead of a key file (embedding, tests). */
  keys?: readonly Key[];
  logger?: Logger;
  /** 'table': in-memory, advertises no translations (incapable); 'ebpf': the kernel fast path; or a Datapath. */
  datapath: 'table' | 'ebpf' | Datapath;
  /** UDP port for DISCOVER and control. Default 7807; 0 picks a free one (tests). */
  port?: number;
  /** 16 hex digits; default derived from the host name and the shell interface. */
  switchId?: string;
  /** 'ebpf' only (`--bpffs`): a mounted bpffs for the datapath's pins, in the stable directory
   *  <bpffs>/tcp-stitch-<shellIface>. Stitches then survive a restart of the switch: close() leaves
   *  them in the kernel and the next runSwitch adopts them. Without it a restart loses them. */
  bpffs?: string;
}

export interface SwitchStatus extends SwitchSnapshot {
  datapath: 'table' | 'ebpf' | 'custom';
  /** False when the switch runs without a key file (unauthenticated DISCOVER only). */
  keyed: boolean;
  /** Entries per datapath table, when the datapath counts them (eBPF: flows, legs, stitch_cfg,
   *  stitch_state): legs = 2 x stitch_cfg = 2 x stitch_state when nothing leaks. */
  datapathEntries?: Record<string, number>;
  /** The datapath's packet counters, when it keeps them (eBPF: docs/datapath.md, `stats`). */
  datapathStats?: Record<string, number>;
}

export interface RunningSwitch {
  /** Serves the switch's local control socket: {op: 'status'} gives the snapshot `tcp-stitch switch-status` prints. */
  control(request: Record<string, unknown>): Promise<unknown>;
  /** Closes the control socket and the datapath runSwitch created. Idempotent. A persistent eBPF
   *  datapath (bpffs) with stitches installed stays up for the next switch unless { detach: true }. */
  close(opts?: DatapathCloseOptions): Promise<void>;
  readonly bootId: string;
  readonly switchId: string;
  readonly address: string;
  readonly port: number;
  counters(): SwitchCounters;
}

function isDatapath(d: unknown): d is Datapath {
  const x = d as Partial<Datapath> | null;
  return !!x && typeof x === 'object' && typeof x.install === 'function' && typeof x.remove === 'function' &&
    typeof x.status === 'function' && typeof x.onStateChange === 'function' && typeof x.close === 'function' &&
    !!x.capabilities && Array.isArray(x.capabilities.translations);
}

type EbpfModule = { createEbpfDatapath?: (o: { shellIface: string; logger?: Logger; bpffs?: string }) => Datapath | Promise<Datapath> };

async function loadEbpfDatapath(shellIface: string, logger: Logger, bpffs: string | undefined): Promise<Datapath> {
  let mod: EbpfModule;
  try {
    // Loaded on demand: the table datapath and the agent never need the native binding.
    mod = await import(new URL('./datapath.ts', import.meta.url).href) as EbpfModule;
  } catch (err) {
    throw new DatapathError(`the eBPF datapath (switch/datapath.ts) cannot be loaded: ${(err as Error).message}; ` +
      'run the switch with --no-datapath to serve discovery and control without a fast path', { cause: err });
  }
  if (typeof mod.createEbpfDatapath !== 'function') {
    throw new DatapathError('switch/datapath.ts does not export createEbpfDatapath({ shellIface, logger })');
  }
  try {
    return await mod.createEbpfDatapath({ shellIface, logger, ...(bpffs !== undefined && { bpffs }) });
  } catch (err) {
    if (err instanceof StitchError) throw err;
    throw new DatapathError(`the eBPF datapath failed to start on ${shellIface}: ${(err as Error).message}`, { cause: err });
  }
}

/** Starts the reference switch on `shellIface`; resolves once its control socket listens. */
export async function runSwitch(opts: RunSwitchOptions): Promise<RunningSwitch> {
  if (!opts || typeof opts !== 'object') throw new InvalidArgumentError('runSwitch({ shellIface, datapath, keyFile }) needs options');
  if (typeof opts.shellIface !== 'string' || opts.shellIface === '') {
    throw new InvalidArgumentError('shellIface must name the shell-facing interface, e.g. "eth0"');
  }
  const d = opts.datapath;
  if (d !== 'table' && d !== 'ebpf' && !isDatapath(d)) {
    throw new InvalidArgumentError("datapath must be 'table', 'ebpf' or a Datapath object (createTableDatapath())");
  }
  if (opts.bpffs !== undefined && (typeof opts.bpffs !== 'string' || opts.bpffs === '')) throw new InvalidArgumentError('bpffs must name a mounted bpf filesystem, e.g. /sys/fs/bpf');
  if (opts.bpffs !== undefined && d !== 'ebpf') throw new InvalidArgumentError("bpffs is an option of the eBPF datapath (datapath 'ebpf')");
  const log = componentLogger('switch', opts.logger);

  let keys: readonly Key[];
  let keyed = true;
  if (opts.keys !== undefined && opts.keys.length > 0) keys = opts.keys;
  else if (opts.keyFile !== undefined) keys = await loadKeyFile(opts.keyFile, log);
  else {
    keys = [generateKey()];
    keyed = false;
    log.warn("no key file: answering unauthenticated DISCOVER only; no shell can install a stitch (pass --key-file, see 'tcp-stitch keygen')");
  }

  const kind: SwitchStatus['datapath'] = d === 'table' || d === 'ebpf' ? d : 'custom';
  const owned = kind !== 'custom';
  const datapath = d === 'table' ? createTableDatapath() : d === 'ebpf' ? await loadEbpfDatapath(opts.shellIface, log, opts.bpffs) : d;
  if (kind === 'table') log.info('table datapath: no packet translation, so the switch advertises no capability and shells will not stitch');

  let control: ReturnType<typeof createSwitchControl>;
  let bound: { address: string; port: number };
  try {
    control = createSwitchControl({
      shellIface: opts.shellIface, keys, datapath, port: opts.port ?? DEFAULT_PORT, logger: opts.logger ?? log,
      ...(opts.switchId !== undefined && { switchId: opts.switchId }),
    });
    try {
      bound = await control.start();
    } catch (err) {
      await control.close();
      throw err;
    }
  } catch (err) {
    if (owned) await datapath.close().catch(() => undefined);
    throw err;
  }

  let closing: Promise<void> | undefined;
  return {
    bootId: control.bootId,
    switchId: control.switchId,
    address: bound.address,
    port: bound.port,
    counters: () => control.counters(),
    async control(request) {
      const op = request && typeof request === 'object' ? request.op : undefined;
      if (op === 'status') {
        let entries: Record<string, number> | undefined, stats: Record<string, number> | undefined;
        try { entries = datapath.entries?.(); stats = datapath.stats?.(); } catch (err) { log.warn('datapath entries or counters not read', { err }); }
        return { ...control.snapshot(), datapath: kind, keyed, ...(entries && { datapathEntries: entries }), ...(stats && { datapathStats: stats }) } satisfies SwitchStatus;
      }
      throw new InvalidArgumentError(`unknown op ${JSON.stringify(op)}; valid ops: status`);
    },
    close(closeOpts) {
      closing ??= (async () => {
        await control.close();
        if (owned) await datapath.close(closeOpts);
      })();
      return closing;
    },
  };
}
