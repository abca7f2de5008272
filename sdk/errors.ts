// Error classes with a stable `code` and a matching `name`. Match on `code`, not on the class:
// the Symbol.for brand makes `instanceof` work across two copies of this library (as undici does).

const kStitchError = Symbol.for('tcp-stitch.error');

export interface ErrorOptions { cause?: unknown; reason?: string }

export class StitchError extends Error {
  readonly code: string;
  /** A machine-readable detail within the code (e.g. 'truncated', 'bad-mac'), when there is one. */
  readonly reason?: string;
  constructor(message: string, code = 'TCP_STITCH_ERROR', options?: ErrorOptions) {
    super(message, options);
    this.name = 'StitchError';
    this.code = code;
    if (options?.reason) this.reason = options.reason;
  }
  get [kStitchError]() { return true; }
  static [Symbol.hasInstance](obj: unknown): boolean {
    return !!obj && typeof obj === 'object' && (obj as Record<symbol, unknown>)[kStitchError] === true &&
      (this === StitchError || Function.prototype[Symbol.hasInstance].call(this, obj));
  }
}

function errorClass<C extends string>(name: string, code: C) {
  const cls = class extends StitchError {
    declare readonly code: C;
    constructor(message: string, options?: ErrorOptions) {
      super(message, code, options);
      this.name = name;
    }
  };
  Object.defineProperty(cls, 'name', { value: name });
  return cls;
}

/** Bad option, argument or configuration: nothing was changed. */
export const InvalidArgumentError = errorClass('InvalidArgumentError', 'TCP_STITCH_INVALID_ARGUMENT');
/** A core-leg preamble or answer that is malformed, unknown or not authentic. */
export const PreambleError = errorClass('PreambleError', 'TCP_STITCH_PREAMBLE');
/** The core refused a core leg (its answer says why). */
export const CoreRefusedError = errorClass('CoreRefusedError', 'TCP_STITCH_CORE_REFUSED');
/** A control-protocol message failed to decode, authenticate or validate. */
export const ProtocolError = errorClass('ProtocolError', 'TCP_STITCH_PROTOCOL');
/** Discovery failed or found no capable switch. */
export const DiscoveryError = errorClass('DiscoveryError', 'TCP_STITCH_DISCOVERY');
/** A policy file failed to load or validate. */
export const PolicyError = errorClass('PolicyError', 'TCP_STITCH_POLICY');
/** The switch refused, timed out or failed a request. */
export const SwitchError = errorClass('SwitchError', 'TCP_STITCH_SWITCH');
/** The eBPF datapath could not be built, loaded or driven. */
export const DatapathError = errorClass('DatapathError', 'TCP_STITCH_DATAPATH');
/** The object was closed or destroyed. */
export const ClosedError = errorClass('ClosedError', 'TCP_STITCH_CLOSED');

// Instance types, so `err as PreambleError` reads naturally.
export type InvalidArgumentError = InstanceType<typeof InvalidArgumentError>;
export type PreambleError = InstanceType<typeof PreambleError>;
export type CoreRefusedError = InstanceType<typeof CoreRefusedError>;
export type ProtocolError = InstanceType<typeof ProtocolError>;
export type DiscoveryError = InstanceType<typeof DiscoveryError>;
export type PolicyError = InstanceType<typeof PolicyError>;
export type SwitchError = InstanceType<typeof SwitchError>;
export type DatapathError = InstanceType<typeof DatapathError>;
export type ClosedError = InstanceType<typeof ClosedError>;
