import assert from 'node:assert/strict';
import { initialState, phaseOf, transition, type ConnectionEvent, type StateSnapshot } from '../sdk/connection-state.ts';
import { InvalidArgumentError } from '../sdk/errors.ts';

const run = (...events: ConnectionEvent[]): StateSnapshot => events.reduce(transition, initialState);

describe('connection state', () => {
  it('connection state - opening -> relaying -> stitching -> stitched, phases 2,2,2,3', () => {
    const states = ['core-accepted', 'stitch-start', 'stitch-done'].reduce<StateSnapshot[]>(
      (acc, e) => [...acc, transition(acc.at(-1)!, e as ConnectionEvent)], [initialState]);
    assert.deepEqual(states.map((s) => s.state), ['opening', 'relaying', 'stitching', 'stitched']);
    assert.deepEqual(states.map((s) => phaseOf(s.state)), [2, 2, 2, 3]);
  });

  it('connection state - a failed stitch returns to relaying', () => {
    assert.equal(run('core-accepted', 'stitch-start', 'stitch-failed').state, 'relaying');
  });

  it('connection state - refusal or failure while opening closes', () => {
    assert.equal(run('core-refused').state, 'closed');
    assert.equal(run('core-failed').state, 'closed');
  });

  it('connection state - half-close is tracked per direction and survives the stitch', () => {
    const s = run('core-accepted', 'client-fin');
    assert.deepEqual({ ...s }, { state: 'relaying', clientEnded: true, coreEnded: false });
    const t = transition(s, 'core-fin');
    assert.equal(t.coreEnded && t.clientEnded, true);
    assert.equal(run('core-accepted', 'stitch-start', 'stitch-done', 'core-fin').coreEnded, true);
  });

  it('connection state - resets close from every live state', () => {
    for (const prefix of [[], ['core-accepted'], ['core-accepted', 'stitch-start'], ['core-accepted', 'stitch-start', 'stitch-done']] as ConnectionEvent[][]) {
      for (const e of ['client-rst', 'core-rst', 'destroy'] as ConnectionEvent[]) assert.equal(run(...prefix, e).state, 'closed');
    }
  });

  it('connection state - invalid events are refused with the state named', () => {
    assert.throws(() => run('stitch-start'), (e: unknown) => e instanceof InvalidArgumentError && /stitch-start.*opening/.test((e as Error).message));
    assert.throws(() => run('core-accepted', 'client-fin', 'stitch-start'), /half-closed/);
    assert.throws(() => run('core-accepted', 'stitch-done'), /stitch-done/);
    assert.throws(() => run('core-accepted', 'core-accepted'), /core-accepted/);
  });

  it('connection state - events after close change nothing', () => {
    const closed = run('client-rst');
    for (const e of ['core-accepted', 'stitch-start', 'client-fin'] as ConnectionEvent[]) assert.equal(transition(closed, e), closed);
  });
});
