// The contract between the switch's control daemon (stitch table) and its datapath (eBPF).
// A stitch joins the client leg C:p1<->A:p2 to the core leg A:v1<->B:v2.

/** One TCP endpoint; IPv4 dotted quad. */
export interface Endpoint { address: string; port: number }

export interface StitchSpec {
  /** Switch-assigned id, unique while the stitch exists. */
  id: number;
  /** The client leg as seen from the shell: C:p1 (remote) <-> A:p2 (local). */
  clientLeg: { client: Endpoint; shell: Endpoint };
  /** The core leg: A:v1 (local) <-> B:v2 (remote). */
  coreLeg: { shell: Endpoint; core: Endpoint };
  /**
   * The fixed byte mapping (DESIGN.md section 5). Byte k of the client's stream (k counted from 0 at
   * the client's first data byte) is byte k - clientOffset + corePreambleLength of the core leg's
   * A->B stream. Byte j of the core leg's B->A stream, j >= coreAnswerLength, is byte
   * j - coreAnswerLength + shellOffset of the client leg's A->C stream.
   */
  clientOffset: bigint;      // k0: client bytes that had passed before the core leg carried them
  corePreambleLength: number; // P: bytes A wrote on the core leg before relayed data
  shellOffset: bigint;       // j0: bytes A had sent to C before the core leg carried B's stream
  coreAnswerLength: number;  // R: bytes B wrote on the core leg before its relayed data
}

/** Where a stitch stands in the datapath. */
export type StitchState = 'draining' | 'stitched' | 'closing' | 'closed' | 'failed';

export interface StitchStatus {
  id: number;
  state: StitchState;
  /** Packets and bytes translated in each direction since install. */
  packetsClientToCore: number; packetsCoreToClient: number;
  bytesClientToCore: number; bytesCoreToClient: number;
  /** Packets of the shell's own sockets dropped (silenced) on the stitched legs. */
  shellPacketsDropped: number;
  /** Why it failed or closed, when it did: 'fin', 'client-rst', 'core-rst', 'untracked-leg', ... */
  reason?: string;
}

/**
 * A stitch a datapath took over from an earlier daemon (the eBPF datapath with a persistent pin
 * directory, docs/datapath.md "Daemon restart"): the legs are known from the datapath's commit entry,
 * the byte offsets are not (they are folded into the installed sequence deltas, which stay as they are).
 */
export interface AdoptedStitch {
  id: number;
  clientLeg: { client: Endpoint; shell: Endpoint };
  coreLeg: { shell: Endpoint; core: Endpoint };
  /** The generation the earlier daemon installed it with (kept). */
  gen: number;
  /** The commit entry's flags as installed (START_STITCHED 0x1, FORCE_STITCHED 0x2). */
  flags: number;
  /** The installed sequence deltas, [client side, core side] (mod 2^32): what is left of the offsets. */
  seqDelta: [number, number];
}

export interface DatapathCloseOptions {
  /** Tear everything down even when stitches are still installed (a persistent datapath otherwise
   *  leaves its fast path up for the next daemon to adopt). */
  detach?: boolean;
}

/** What the control daemon needs from a datapath. The eBPF one lives in switch/datapath.ts. */
export interface Datapath {
  /** Capabilities advertised in DISCOVER replies. */
  readonly capabilities: {
    translations: Array<'addr' | 'port' | 'seq' | 'ack' | 'sack' | 'timestamps' | 'wscale' | 'mss-clamp' | 'icmp' | 'checksum'>;
    tableSize: number;
  };
  /** Has the datapath seen both legs' handshakes? A stitch of an untracked leg is refused. */
  install(spec: StitchSpec): Promise<void>;
  /** Several installs at once (a STITCH_MANY), each refused on its own: per spec, undefined when
   *  installed or the error that refused it. Without it the daemon calls install() per spec. */
  installMany?(specs: StitchSpec[]): Promise<Array<Error | undefined>>;
  remove(id: number): Promise<void>;
  status(id: number): StitchStatus | undefined;
  /** Called with every state change the datapath observes (FIN, RST, drained, ...). */
  onStateChange(listener: (status: StitchStatus) => void): void;
  /** Stitches taken over from an earlier daemon and still installed (status/remove work for them). */
  adopted?(): AdoptedStitch[];
  /** Entries per datapath table (eBPF: legs, stitch_cfg, stitch_state, flows), to see nothing leaks. */
  entries?(): Record<string, number>;
  /** The datapath's packet counters (eBPF: docs/datapath.md, `stats`), summed over CPUs. */
  stats?(): Record<string, number>;
  close(opts?: DatapathCloseOptions): Promise<void>;
}
