// The SDK's public door: the shell-side API (attach connections, hooks, events, manual stitch) and the
// core-side API (accept core legs, one Duplex per logical connection). Everything else is internal.
export { createShell, type Shell, type ShellOptions, type Stitcher, type StitchTarget } from './shell.ts';
export { createCore, type Core, type CoreOptions } from './core.ts';
export { relay, type Relay, type RelayCallbacks } from './relay.ts';
export { spliceAvailable } from './splice.ts';
export { channels } from './diagnostics.ts';
export { PREAMBLE_LENGTH, ANSWER_LENGTH } from './preamble.ts';
export { componentLogger, defaultLogger, type Logger } from './log.ts';
export * from './errors.ts';
export type * from './types.ts';
