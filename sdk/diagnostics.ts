// diagnostics_channel publishers, named tcp-stitch:<noun>:<verb> (as undici does). Every publish is
// guarded by hasSubscribers so an unobserved process pays nothing. Payload shapes are in types.ts.
import diagnostics from 'node:diagnostics_channel';
import type * as T from './types.ts';

export const channels = {
  connectionOpen: diagnostics.channel('tcp-stitch:connection:open'),
  connectionPhase: diagnostics.channel('tcp-stitch:connection:phase'),
  connectionClose: diagnostics.channel('tcp-stitch:connection:close'),
  coreLegOpen: diagnostics.channel('tcp-stitch:core-leg:open'),
  coreLegReject: diagnostics.channel('tcp-stitch:core-leg:reject'),
  discoveryChange: diagnostics.channel('tcp-stitch:discovery:change'),
  switchRestart: diagnostics.channel('tcp-stitch:switch:restart'),
  stitchDecision: diagnostics.channel('tcp-stitch:stitch:decision'),
} as const;

type Payloads = {
  connectionOpen: T.ConnectionOpenMessage; connectionPhase: T.ConnectionPhaseMessage;
  connectionClose: T.ConnectionCloseMessage; coreLegOpen: T.CoreLegOpenMessage;
  coreLegReject: T.CoreLegRejectMessage; discoveryChange: T.DiscoveryChangeMessage;
  switchRestart: T.SwitchRestartMessage; stitchDecision: T.StitchDecisionMessage;
};

export function publish<K extends keyof Payloads>(name: K, message: Payloads[K]): void {
  const ch = channels[name];
  if (ch.hasSubscribers) ch.publish(message);
}
