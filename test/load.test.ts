import assert from 'node:assert/strict';
import type { EventLoopUtilization } from 'node:perf_hooks';
import { createLoadMonitor } from '../agent/load.ts';
import { activeResources } from './helpers.ts';

/** Busy-waits the event loop (CPU and event-loop time) for `ms`. */
function spin(ms: number): void {
  const end = performance.now() + ms;
  while (performance.now() < end) { /* busy */ }
}

describe('load - monitor', () => {
  it('load - values are in range on the real clocks', async () => {
    const m = createLoadMonitor({ intervalMs: 20 });
    try {
      spin(30);
      const early = m.current();
      assert.ok(early.cpu >= 0 && early.cpu < 64, `cpu ${early.cpu}`);
      assert.ok(early.elu >= 0 && early.elu <= 1, `elu ${early.elu}`);
      assert.ok(early.cpu > 0.2, `a 30 ms spin should show as CPU, got ${early.cpu}`);
      assert.ok(early.elu > 0.3, `a 30 ms spin should show as event-loop use, got ${early.elu}`);
    } finally {
      m.close();
    }
  });

  it('load - deltas over the interval, from injected clocks', () => {
    let tick: (() => void) | undefined;
    let cpuMicros = 0, clock = 0;
    let elu = { idle: 0, active: 0, utilization: 0 };
    const m = createLoadMonitor({
      intervalMs: 1000,
      sources: {
        cpuUsage: () => ({ user: cpuMicros, system: 0 }),
        eventLoopUtilization: (a?: EventLoopUtilization, b?: EventLoopUtilization) => {
          if (!a) return { ...elu };
          const idle = a.idle - b!.idle, active = a.active - b!.active;
          return { idle, active, utilization: active / (idle + active) };
        },
        now: () => clock,
        setInterval: (fn) => { tick = fn; return {}; },
        clearInterval: () => { tick = undefined; },
      },
    });
    clock = 1000; cpuMicros = 1_500_000; elu = { idle: 250, active: 750, utilization: 0.75 };
    tick!();
    assert.deepEqual(m.current(), { cpu: 1.5, elu: 0.75, windowMs: 1000 });
    clock = 2000; cpuMicros = 1_600_000; elu = { idle: 1150, active: 850, utilization: 0.425 };
    tick!();
    assert.deepEqual(m.current(), { cpu: 0.1, elu: 0.1, windowMs: 1000 });
    m.close();
    assert.equal(tick, undefined);
  });

  it('load - close clears the timer, which never held the process open', () => {
    let handle: { t: NodeJS.Timeout; unref(): void } | undefined, unrefd = 0, cleared: unknown;
    const m = createLoadMonitor({
      intervalMs: 50,
      sources: {
        setInterval: (fn, ms) => {
          const t = setInterval(fn, ms);
          const h = { unref() { unrefd++; t.unref(); }, t };
          handle = h;
          return h;
        },
        clearInterval: (h) => { cleared = h; clearInterval((h as { t: NodeJS.Timeout }).t); },
      },
    });
    assert.equal(unrefd, 1);
    assert.equal(handle!.t.hasRef(), false);
    m.close();
    m.close();
    assert.equal(cleared, handle);
    assert.equal(m.closed, true);
  });

  it('load - the real timer keeps nothing active', () => {
    const before = activeResources().Timeout ?? 0;
    const m = createLoadMonitor({ intervalMs: 10 });
    assert.equal(activeResources().Timeout ?? 0, before, 'an unref\'d timer is not an active resource');
    m.close();
    assert.equal(activeResources().Timeout ?? 0, before);
  });

  it('load - rejects a bad interval', () => {
    assert.throws(() => createLoadMonitor({ intervalMs: 0 }), { code: 'TCP_STITCH_INVALID_ARGUMENT' });
    assert.throws(() => createLoadMonitor({ intervalMs: 1.5 }), { code: 'TCP_STITCH_INVALID_ARGUMENT' });
  });
});
