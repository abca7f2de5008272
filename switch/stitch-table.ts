// The control daemon's stitch table: which stitches exist, who owns each, and the admission rules
// (capacity, per-shell quota, one stitch per leg). The datapath holds the per-packet state; this
// table holds what the control protocol needs: ids, owners, legs, where to send NOTIFY.
import type { StitchSpec, StitchStatus } from './stitch-types.ts';
import { legKey, type StitchLegs } from './protocol.ts';

/** A stitch belongs to the shell address that asked for it, authenticated with one key. */
export interface StitchOwner { address: string; keyId: number }

/** The key id of an adopted stitch's owner before it claims the stitch (no key has it). */
export const UNKNOWN_KEY_ID = -1;

export interface TableEntry {
  spec: StitchSpec;
  owner: StitchOwner;
  /** UDP port of the owner's control socket (its last request), where NOTIFY goes. */
  notifyPort: number;
  /** Set while datapath.install runs: a concurrent identical STITCH waits on it. */
  installing?: Promise<void>;
  /** A state change the datapath reported while install was still running, delivered after it. */
  deferredStatus?: StitchStatus;
  /** Set while datapath.remove runs for an UNSTITCH. */
  removing?: boolean;
  /** The connection ended (closed/failed); freed when the owner acknowledges the NOTIFY. */
  ended?: boolean;
  /**
   * Taken over from the daemon before (the datapath kept it across the restart) and not claimed yet:
   * owner.keyId is UNKNOWN_KEY_ID, notifyPort 0 (no NOTIFY), the offsets in spec unknown (0). The
   * owner address claims it with a STITCH of the same legs, compared by their 4-tuples only.
   */
  adopted?: boolean;
  createdAt: number;
}

export type Admission =
  | { kind: 'new'; id: number }
  | { kind: 'existing'; entry: TableEntry }
  | { kind: 'refused'; reason: 'leg-in-use' | 'not-owner' | 'table-full' | 'quota'; entry?: TableEntry };

export interface StitchTable {
  readonly capacity: number;
  readonly size: number;
  readonly free: number;
  /** Decides what a STITCH of these legs by this owner means; does not change the table. */
  admit(legs: StitchLegs, owner: StitchOwner): Admission;
  add(entry: TableEntry): void;
  get(id: number): TableEntry | undefined;
  delete(id: number): TableEntry | undefined;
  /** Entries of one owner address, ascending id. */
  byOwner(address: string): TableEntry[];
  countFor(address: string): number;
  /** All entries, ascending id. */
  list(): TableEntry[];
  clear(): void;
}

export interface StitchTableInit {
  /** Most stitches at once (the datapath's table size). */
  capacity: number;
  /** Most stitches one shell address may hold (default: capacity). */
  quotaPerShell?: number;
}

const sameEndpoint = (a: { address: string; port: number }, b: { address: string; port: number }) => a.address === b.address && a.port === b.port;

/** Same 4-tuples of both legs, each in its role. */
export function sameLegs(a: StitchLegs | TableEntry['spec'], b: StitchLegs): boolean {
  return sameEndpoint(a.clientLeg.client, b.clientLeg.client) && sameEndpoint(a.clientLeg.shell, b.clientLeg.shell) &&
    sameEndpoint(a.coreLeg.shell, b.coreLeg.shell) && sameEndpoint(a.coreLeg.core, b.coreLeg.core);
}

function sameMapping(a: StitchLegs, b: StitchLegs): boolean {
  return a.clientOffset === b.clientOffset && a.shellOffset === b.shellOffset &&
    a.corePreambleLength === b.corePreambleLength && a.coreAnswerLength === b.coreAnswerLength;
}

export function clientLegKey(l: StitchLegs): string { return legKey(l.clientLeg.client, l.clientLeg.shell); }
export function coreLegKey(l: StitchLegs): string { return legKey(l.coreLeg.shell, l.coreLeg.core); }

export function createStitchTable(init: StitchTableInit): StitchTable {
  const capacity = init.capacity;
  const quota = init.quotaPerShell ?? capacity;
  const byId = new Map<number, TableEntry>();
  const byLeg = new Map<string, TableEntry>(); // both leg keys of every entry
  const perOwner = new Map<string, number>();
  let nextId = 1;

  function allocateId(): number {
    for (;;) {
      const id = nextId;
      nextId = nextId >= 0xffff_ffff ? 1 : nextId + 1;
      if (!byId.has(id)) return id;
    }
  }

  return {
    capacity,
    get size() { return byId.size; },
    get free() { return Math.max(0, capacity - byId.size); },
    admit(legs, owner) {
      const a = byLeg.get(clientLegKey(legs));
      const b = byLeg.get(coreLegKey(legs));
      if (a || b) {
        // An adopted entry's offsets are unknown: its legs are all there is to compare.
        if (a && a === b && (a.adopted ? sameLegs(a.spec, legs) : sameMapping(a.spec, legs))) {
          if (a.owner.address !== owner.address || (!a.adopted && a.owner.keyId !== owner.keyId)) return { kind: 'refused', reason: 'not-owner', entry: a };
          return { kind: 'existing', entry: a };
        }
        return { kind: 'refused', reason: 'leg-in-use', entry: (a ?? b)! };
      }
      if (byId.size >= capacity) return { kind: 'refused', reason: 'table-full' };
      if ((perOwner.get(owner.address) ?? 0) >= quota) return { kind: 'refused', reason: 'quota' };
      return { kind: 'new', id: allocateId() };
    },
    add(entry) {
      byId.set(entry.spec.id, entry);
      byLeg.set(clientLegKey(entry.spec), entry);
      byLeg.set(coreLegKey(entry.spec), entry);
      perOwner.set(entry.owner.address, (perOwner.get(entry.owner.address) ?? 0) + 1);
    },
    get: (id) => byId.get(id),
    delete(id) {
      const e = byId.get(id);
      if (!e) return undefined;
      byId.delete(id);
      if (byLeg.get(clientLegKey(e.spec)) === e) byLeg.delete(clientLegKey(e.spec));
      if (byLeg.get(coreLegKey(e.spec)) === e) byLeg.delete(coreLegKey(e.spec));
      const n = (perOwner.get(e.owner.address) ?? 1) - 1;
      if (n > 0) perOwner.set(e.owner.address, n); else perOwner.delete(e.owner.address);
      return e;
    },
    byOwner: (address) => [...byId.values()].filter((e) => e.owner.address === address).sort((x, y) => x.spec.id - y.spec.id),
    countFor: (address) => perOwner.get(address) ?? 0,
    list: () => [...byId.values()].sort((x, y) => x.spec.id - y.spec.id),
    clear() { byId.clear(); byLeg.clear(); perOwner.clear(); },
  };
}
