// An in-memory Datapath that keeps a table and translates nothing: for tests, and for running the
// switch's control daemon where no eBPF datapath can be loaded.
//
// By default it advertises NO translations, so a DISCOVER reply says "incapable" and an agent keeps
// its connections on the shell path (fail safe, DESIGN.md invariant 4). Tests that need a capable
// switch pass `translations` explicitly.
import { DatapathError } from '../sdk/errors.ts';
import type { AdoptedStitch, Datapath, StitchSpec, StitchState, StitchStatus } from './stitch-types.ts';
import { TRANSLATIONS, type Translation } from './protocol.ts';

export interface TableDatapathInit {
  tableSize?: number;                      // default 65536
  translations?: Translation[];            // default [] (incapable)
  /** Has the datapath "seen" this stitch's handshakes? Default: yes for every stitch. */
  tracked?: (spec: StitchSpec) => boolean;
  /** The state a fresh install reports (tests of a slow drain). Default 'stitched'. */
  installState?: StitchState;
  /** Make install fail with a datapath error (tests). */
  failInstall?: (spec: StitchSpec) => boolean;
  /** Stitches "left by an earlier daemon": installed from the start (state 'stitched', or as given)
   *  and reported by adopted(), as the eBPF datapath does with a persistent pin directory (tests). */
  adopted?: Array<AdoptedStitch & { state?: StitchState; reason?: string }>;
}

export interface TableDatapath extends Datapath {
  /** Installed stitches by id. */
  readonly stitches: ReadonlyMap<number, StitchSpec>;
  /** install() calls that succeeded, ever (tests check "applied once"). */
  readonly installs: number;
  /** Moves a stitch to a state and tells the listeners, as the eBPF datapath does on FIN/RST/drain. */
  setState(id: number, state: StitchState, reason?: string): StitchStatus;
}

/** All translations this codebase names: what a test passes to pretend to be capable. */
export const ALL_TRANSLATIONS: Translation[] = [...TRANSLATIONS];

/**
 * Error thrown by install() for a leg whose handshake the datapath has not seen. The control server
 * answers UNTRACKED_LEG for any error whose `reason` is 'untracked-leg' (the eBPF datapath should
 * throw the same shape), DATAPATH_ERROR for any other.
 */
export function untrackedLegError(id: number): Error {
  return Object.assign(new DatapathError(`stitch ${id}: the datapath has not seen both legs' handshakes`), { reason: 'untracked-leg' });
}

export function createTableDatapath(init: TableDatapathInit = {}): TableDatapath {
  const tableSize = init.tableSize ?? 65536;
  const stitches = new Map<number, StitchSpec>();
  const statuses = new Map<number, StitchStatus>();
  const listeners: Array<(s: StitchStatus) => void> = [];
  let installs = 0;
  let closed = false;
  const adopted = new Map<number, AdoptedStitch>();
  for (const a of init.adopted ?? []) {
    const { state, reason, ...rest } = a;
    adopted.set(a.id, structuredClone(rest));
    stitches.set(a.id, {
      id: a.id, clientLeg: structuredClone(a.clientLeg), coreLeg: structuredClone(a.coreLeg),
      clientOffset: 0n, corePreambleLength: 0, shellOffset: 0n, coreAnswerLength: 0,
    });
    statuses.set(a.id, {
      id: a.id, state: state ?? 'stitched', packetsClientToCore: 0, packetsCoreToClient: 0,
      bytesClientToCore: 0, bytesCoreToClient: 0, shellPacketsDropped: 0, ...(reason !== undefined && { reason }),
    });
  }

  return {
    capabilities: { translations: [...(init.translations ?? [])], tableSize },
    stitches,
    get installs() { return installs; },
    async install(spec) {
      if (closed) throw new DatapathError('datapath is closed');
      if (stitches.has(spec.id)) throw new DatapathError(`stitch ${spec.id} is already installed`);
      if (stitches.size >= tableSize) throw new DatapathError('datapath table is full');
      if (init.tracked && !init.tracked(spec)) throw untrackedLegError(spec.id);
      if (init.failInstall?.(spec)) throw new DatapathError(`stitch ${spec.id}: simulated datapath failure`);
      stitches.set(spec.id, structuredClone(spec));
      statuses.set(spec.id, {
        id: spec.id, state: init.installState ?? 'stitched', packetsClientToCore: 0, packetsCoreToClient: 0,
        bytesClientToCore: 0, bytesCoreToClient: 0, shellPacketsDropped: 0,
      });
      installs++;
    },
    async remove(id) {
      stitches.delete(id);
      statuses.delete(id);
      adopted.delete(id);
    },
    adopted: () => [...adopted.values()].map((a) => structuredClone(a)),
    entries: () => ({ stitches: stitches.size }),
    status(id) {
      const s = statuses.get(id);
      return s && { ...s };
    },
    onStateChange(listener) { listeners.push(listener); },
    setState(id, state, reason) {
      const s = statuses.get(id);
      if (!s) throw new DatapathError(`no stitch ${id}`);
      s.state = state;
      if (reason === undefined) delete s.reason; else s.reason = reason;
      const copy = { ...s };
      for (const l of listeners) l({ ...copy });
      return copy;
    },
    async close() {
      closed = true;
      stitches.clear();
      statuses.clear();
      adopted.clear();
      listeners.length = 0;
    },
  };
}
