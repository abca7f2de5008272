// Load monitor: how busy is the shell process? Feeds the policy's "overloaded" condition.
//
// cpu: CPU time of this process (user + system, every thread) per wall-clock time over the last
//      interval, from process.cpuUsage() deltas; 1 = one full core, may exceed 1.
// elu: event-loop utilization over the last interval (perf_hooks), 0..1: the share of time the
//      loop was busy rather than waiting for I/O — the shell's own bottleneck.
//
// One unref'd interval timer samples both; close() clears it. current() before the first sample
// measures from creation until now.
import { performance, type EventLoopUtilization } from 'node:perf_hooks';
import { InvalidArgumentError } from '../sdk/errors.ts';

export interface LoadSample {
  /** CPU seconds per wall-clock second (1 = one full core). */
  cpu: number;
  /** Event-loop utilization, 0..1. */
  elu: number;
  /** Length of the window the values cover, ms. */
  windowMs: number;
}

export interface LoadMonitor {
  /** The last completed sample (or, before the first, the values since creation). */
  current(): LoadSample;
  /** Stops sampling: clears the timer. Idempotent. */
  close(): void;
  readonly closed: boolean;
}

/** Seams for tests. */
export interface LoadSources {
  cpuUsage?: (previous?: NodeJS.CpuUsage) => NodeJS.CpuUsage;
  eventLoopUtilization?: (a?: EventLoopUtilization, b?: EventLoopUtilization) => EventLoopUtilization;
  /** Monotonic clock in ms. */
  now?: () => number;
  setInterval?: (fn: () => void, ms: number) => { unref?(): unknown };
  clearInterval?: (handle: { unref?(): unknown }) => void;
}

export interface LoadMonitorOptions {
  /** Sampling interval, ms (10 to 3 600 000). Default 1000. */
  intervalMs?: number;
  sources?: LoadSources;
}

export function createLoadMonitor(opts: LoadMonitorOptions = {}): LoadMonitor {
  const intervalMs = opts.intervalMs ?? 1000;
  if (!Number.isInteger(intervalMs) || intervalMs < 10 || intervalMs > 3_600_000)
    throw new InvalidArgumentError(`intervalMs must be an integer from 10 to 3600000, got ${String(intervalMs)}`);
  const src = opts.sources ?? {};
  const cpuUsage = src.cpuUsage ?? ((prev?: NodeJS.CpuUsage) => process.cpuUsage(prev));
  const elu = src.eventLoopUtilization ?? ((a?: EventLoopUtilization, b?: EventLoopUtilization) =>
    performance.eventLoopUtilization(a, b));
  const now = src.now ?? (() => performance.now());
  const setTimer = src.setInterval ?? ((fn: () => void, ms: number) => setInterval(fn, ms));
  const clearTimer = src.clearInterval ?? ((h: { unref?(): unknown }) => clearInterval(h as NodeJS.Timeout));

  let mark = { cpu: cpuUsage(), elu: elu(), at: now() };
  let last: LoadSample | undefined;
  let closed = false;

  const measure = (): { sample: LoadSample; next: typeof mark } => {
    const next = { cpu: cpuUsage(), elu: elu(), at: now() };
    const windowMs = next.at - mark.at;
    const usedMicros = (next.cpu.user - mark.cpu.user) + (next.cpu.system - mark.cpu.system);
    const cpu = windowMs > 0 ? Math.max(0, usedMicros / 1000 / windowMs) : 0;
    const u = elu(next.elu, mark.elu).utilization;
    return { sample: { cpu, elu: Number.isFinite(u) ? Math.min(1, Math.max(0, u)) : 0, windowMs }, next };
  };

  const timer = setTimer(() => {
    const { sample, next } = measure();
    last = sample;
    mark = next;
  }, intervalMs);
  timer.unref?.();

  return {
    current() {
      if (last) return { ...last };
      return measure().sample;
    },
    close() {
      if (closed) return;
      closed = true;
      clearTimer(timer);
    },
    get closed() { return closed; },
  };
}
