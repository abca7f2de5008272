// The types a runtime programs against: connection views, events, hooks, diagnostics payloads.
import type { Socket } from 'node:net';
import type { ConnectionState, Phase } from './connection-state.ts';
import type { Endpoint } from './preamble.ts';

export type { ConnectionState, Phase, Endpoint };

/** Why a logical connection ended. */
export type CloseReason =
  | 'fin'              // both directions finished with FIN
  | 'client-reset'     // C reset the client leg
  | 'core-reset'       // B reset the core leg
  | 'core-refused'     // the core answered with a refusal
  | 'core-unreachable' // the core leg could not be opened
  | 'core-protocol'    // the core's answer was not understood
  | 'destroyed';       // the runtime or the shell's close()/destroy() ended it

/** A logical connection as the shell's runtime sees it. Read-only snapshot fields, live counters. */
export interface LogicalConnection {
  readonly id: string;
  readonly client: Endpoint;       // C:p1
  readonly shell: Endpoint;        // A:p2
  readonly coreLeg?: { local: Endpoint; core: Endpoint };   // A:v1 <-> B:v2, once connected
  readonly createdAt: number;      // ms since epoch
  readonly state: ConnectionState;
  readonly phase: Phase;
  /** FIN seen from C / from B. */
  readonly clientEnded: boolean;
  readonly coreEnded: boolean;
  /** Bytes the shell relayed C->B and B->C (stays flat once stitched). */
  readonly bytesFromClient: number;
  readonly bytesFromCore: number;
  /** The last phase decision or failure, human-readable. */
  readonly reason?: string;
}

export interface ConnectionOpenMessage { connection: LogicalConnection }
export interface ConnectionPhaseMessage { connection: LogicalConnection; from: ConnectionState; to: ConnectionState; reason: string }
export interface ConnectionCloseMessage { connection: LogicalConnection; reason: CloseReason; error?: Error }
export interface CoreLegOpenMessage { connectionId: string; client: Endpoint; shell: Endpoint; remote: Endpoint }
export interface CoreLegRejectMessage { remote: Endpoint; reason: string; error: Error }
export interface DiscoveryChangeMessage { available: boolean; reason: string; switch?: { address: string; port: number; id?: string } }
export interface SwitchRestartMessage { address: string; previousBootId: string; bootId: string }
export interface StitchDecisionMessage { connectionId: string; stitch: boolean; reason: string }

/** Typed events of the shell (`noun:verb`). */
export interface ShellEvents {
  'connection:open': [ConnectionOpenMessage];
  'connection:phase': [ConnectionPhaseMessage];
  'connection:close': [ConnectionCloseMessage];
  'error': [Error];
}

/** What the core runtime gets for each logical connection: one Duplex whatever the phase. */
export interface CoreConnection {
  readonly id: string;
  readonly client: Endpoint;
  readonly shell: Endpoint;
  /** The stream: the core leg itself, preamble consumed. Phase changes are invisible here. */
  readonly stream: Socket;
}

export interface CoreEvents {
  'connection': [CoreConnection];
  /**
   * 'fin': both directions ended with a FIN (also when relay() moved them in the kernel); 'reset': a
   * RST or error from the peer; 'destroyed': the runtime ended it. A RST right behind data reads as
   * EOF in Node (libuv): the core asks the kernel at 'end', so the stream emits the reset as 'error'
   * (ECONNRESET) right after 'end', and this reports 'reset' (relay() passes it on as a reset).
   */
  'connection:close': [{ id: string; reason: 'fin' | 'reset' | 'destroyed'; error?: Error }];
  'core-leg:reject': [CoreLegRejectMessage];
  'error': [Error];
}

/** Decide hooks: optional, may return a promise (as js-libp2p's ConnectionGater does). */
export interface ShellHooks {
  /** Veto (false) or force (true) a stitch the agent's policy proposes; undefined keeps the policy's choice. */
  shouldStitch?(connection: LogicalConnection, policyReason: string): boolean | undefined | Promise<boolean | undefined>;
}

export interface CoreHooks {
  /** Return false to refuse a logical connection (the shell resets the client). */
  accept?(info: { id: string; client: Endpoint; shell: Endpoint }): boolean | Promise<boolean>;
}
