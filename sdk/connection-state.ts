// The per-connection phase machine, pure: (state, event) -> state. The shell and its tests drive it;
// nothing here touches a socket. Phases (DESIGN.md): 1 link, 2 core leg relayed by the shell, 3 stitched.
import { InvalidArgumentError } from './errors.ts';

export type ConnectionState = 'opening' | 'relaying' | 'stitching' | 'stitched' | 'closed';
export type Phase = 1 | 2 | 3;

export type ConnectionEvent =
  | 'core-accepted' | 'core-refused' | 'core-failed'
  | 'stitch-start' | 'stitch-done' | 'stitch-failed'
  | 'client-fin' | 'core-fin' | 'client-rst' | 'core-rst'
  | 'finished' | 'destroy';

export interface StateSnapshot {
  state: ConnectionState;
  /** FIN received from C (client leg) / from B (core leg). */
  clientEnded: boolean;
  coreEnded: boolean;
}

export const initialState: StateSnapshot = Object.freeze({ state: 'opening', clientEnded: false, coreEnded: false });

/** Phase of a state: opening and stitching still move bytes through the shell. */
export function phaseOf(state: ConnectionState): Phase {
  return state === 'stitched' ? 3 : 2;
}

const live = new Set<ConnectionState>(['opening', 'relaying', 'stitching', 'stitched']);

export function transition(s: StateSnapshot, event: ConnectionEvent): StateSnapshot {
  if (s.state === 'closed') return s; // late events from sockets already torn down
  const to = (state: ConnectionState, extra: Partial<StateSnapshot> = {}): StateSnapshot => ({ ...s, ...extra, state });
  switch (event) {
    case 'client-fin': return to(s.state, { clientEnded: true });
    case 'core-fin': return to(s.state, { coreEnded: true });
    case 'client-rst': case 'core-rst': case 'destroy': case 'finished': return to('closed');
    case 'core-accepted': if (s.state === 'opening') return to('relaying'); break;
    case 'core-refused': case 'core-failed': if (s.state === 'opening') return to('closed'); break;
    case 'stitch-start':
      if (s.state === 'relaying' && !s.clientEnded && !s.coreEnded) return to('stitching');
      break;
    case 'stitch-done': if (s.state === 'stitching') return to('stitched'); break;
    case 'stitch-failed': if (s.state === 'stitching') return to('relaying'); break;
  }
  if (!live.has(s.state)) return s;
  const halfClosed = s.clientEnded || s.coreEnded ? ' (half-closed)' : '';
  throw new InvalidArgumentError(`event '${event}' is not valid for a connection in state '${s.state}'${halfClosed}`);
}
