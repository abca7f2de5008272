import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import fc from 'fast-check';
import {
  createPolicyEngine, defaultPolicy, findJsonSyntaxError, loadPolicyFile, policySchema, validatePolicy,
  type Policy, type PolicyConnection, type PolicyErrorWithIssues, type ShellLoad,
} from '../agent/policy.ts';
import { openSettings, parseSwitchOption, settingsNameFor } from '../agent/settings.ts';
import { PROJECT_ROOT } from './hosts.ts';
import { captureLogger } from './helpers.ts';

const EXAMPLES = path.join(PROJECT_ROOT, 'examples', 'policies');


/** The PolicyError a call throws (fails the test if it does not throw one). */
function policyErrorOf(fn: () => unknown): PolicyErrorWithIssues {
  try {
    fn();
  } catch (err) {
    assert.equal((err as { code?: string }).code, 'TCP_STITCH_POLICY', `expected a PolicyError, got ${String(err)}`);
    return err as PolicyErrorWithIssues;
  }
  assert.fail('expected a PolicyError');
}

const base = (rules: unknown[], extra: Record<string, unknown> = {}) => ({ version: 1, mode: 'auto', rules, ...extra });

const conn = (over: Partial<PolicyConnection> = {}): PolicyConnection => ({
  id: 'c1', localPort: 443, remoteAddress: '198.18.1.2', remotePort: 40000,
  ageMs: 0, bytesIn: 0, bytesOut: 0, phase: 2, ...over,
});
const idle: ShellLoad = { cpu: 0.05, elu: 0.05 };

let tmp: string;
const writeTmp = (name: string, text: string) => {
  const f = path.join(tmp, name);
  fs.writeFileSync(f, text);
  return f;
};

describe('policy', () => {
  before(() => { tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'tcp-stitch-policy-')); });
  after(() => { fs.rmSync(tmp, { recursive: true, force: true }); });

  describe('policy - schema and examples', () => {
    it('policy - every example policy validates', () => {
      const files = fs.readdirSync(EXAMPLES).filter((f) => f.endsWith('.json')).sort();
      assert.deepEqual(files, ['default.json', 'heavy.json', 'immediately.json', 'long-lived.json', 'manual.json']);
      for (const f of files) {
        const p = loadPolicyFile(path.join(EXAMPLES, f));
        assert.ok(p.rules.length > 0 || p.mode === 'manual', `${f}: rules, unless stitching is manual`);
      }
    });

    it('policy - examples/policies/default.json is the built-in default policy', () => {
      const fromFile = loadPolicyFile(path.join(EXAMPLES, 'default.json'));
      const { $schema: _ignored, ...rest } = fromFile;
      assert.deepEqual(rest, defaultPolicy());
    });

    it('policy - the published schema says additionalProperties:false on every object', () => {
      const objects: string[] = [];
      const walk = (node: unknown, at: string) => {
        if (!node || typeof node !== 'object') return;
        const n = node as Record<string, unknown>;
        if (n.type === 'object') {
          objects.push(at);
          assert.equal(n.additionalProperties, false, `${at} lacks additionalProperties:false`);
        }
        for (const [k, v] of Object.entries(n)) walk(v, `${at}/${k}`);
      };
      walk(policySchema, '#');
      assert.ok(objects.length >= 5, `found only ${objects.join(', ')}`);
    });

    it('policy - evaluationIntervalMs defaults to 1000 when left out', () => {
      assert.equal(validatePolicy(base([{ name: 'a', minAgeMs: 1 }])).evaluationIntervalMs, 1000);
    });
  });

  describe('policy - validation errors point at the field', () => {
    it('policy - unknown field is rejected, with its pointer and a suggestion', () => {
      const err = policyErrorOf(() => validatePolicy(base([{ name: 'a', minAgeMS: 2000 }])));
      assert.deepEqual(err.issues.map((i) => i.pointer), ['/rules/0/minAgeMS']);
      assert.match(err.issues[0]!.message, /unknown field "minAgeMS"; did you mean "minAgeMs"\?/);
      assert.match(err.message, /\/rules\/0\/minAgeMS/);
    });

    it('policy - unknown top-level field is rejected', () => {
      const err = policyErrorOf(() => validatePolicy(base([{ name: 'a', minAgeMs: 1 }], { interval: 5 })));
      assert.deepEqual(err.issues.map((i) => i.pointer), ['/interval']);
      assert.match(err.issues[0]!.message, /allowed here: .*evaluationIntervalMs/);
    });

    const cases: [string, unknown, string, RegExp][] = [
      ['wrong mode', { version: 1, mode: 'automatic', rules: [] }, '/mode', /must be one of "auto", "manual", "off" \(got "automatic"\)/],
      ['missing mode', { version: 1, rules: [] }, '/mode', /required field "mode" is missing; add it/],
      ['wrong version', { version: 2, mode: 'auto', rules: [] }, '/version', /must be 1 \(got 2\)/],
      ['string where integer', base([{ name: 'a', minAgeMs: '2000' }]), '/rules/0/minAgeMs', /must be an integer \(got "2000"\)/],
      ['negative bytes', base([{ name: 'a', minBytes: { total: -1 } }]), '/rules/0/minBytes/total', /must be >= 0 \(got -1\)/],
      ['elu above 1', base([{ name: 'a', shellLoad: { eluAbove: 1.5 } }]), '/rules/0/shellLoad/eluAbove', /must be <= 1 \(got 1.5\)/],
      ['empty shellLoad', base([{ name: 'a', shellLoad: {} }]), '/rules/0/shellLoad', /must not be empty; expected overloaded/],
      ['bad rule name', base([{ name: 'has space', minAgeMs: 1 }]), '/rules/0/name', /has the wrong form \(got "has space"\)/],
      ['bad port', base([{ name: 'a', match: { localPorts: [443, 70000] }, minAgeMs: 1 }]), '/rules/0/match/localPorts/1', /port number 1-65535 or a range/],
      ['bad cidr form', base([{ name: 'a', match: { remoteCidrs: ['198.18/15'] }, minAgeMs: 1 }]), '/rules/0/match/remoteCidrs/0', /has the wrong form/],
      ['interval too small', base([], { evaluationIntervalMs: 1 }), '/evaluationIntervalMs', /must be >= 50/],
      ['stitchImmediately false', base([{ name: 'a', stitchImmediately: false }]), '/rules/0/stitchImmediately', /must be true \(got false\)/],
    ];
    for (const [what, policy, pointer, message] of cases) {
      it(`policy - schema error names ${pointer} (${what})`, () => {
        const err = policyErrorOf(() => validatePolicy(policy));
        const issue = err.issues.find((i) => i.pointer === pointer);
        assert.ok(issue, `no issue at ${pointer}: ${JSON.stringify(err.issues)}`);
        assert.match(issue.message, message);
      });
    }

    const semantic: [string, unknown, string, RegExp][] = [
      ['backwards port range', base([{ name: 'a', match: { localPorts: ['9000-8000'] }, minAgeMs: 1 }]), '/rules/0/match/localPorts/0', /runs backwards; write "8000-9000"/],
      ['port range past 65535', base([{ name: 'a', match: { localPorts: ['1-99999'] }, minAgeMs: 1 }]), '/rules/0/match/localPorts/0', /outside 1-65535/],
      ['cidr with host bits', base([{ name: 'a', match: { remoteCidrs: ['198.18.1.2/15'] }, minAgeMs: 1 }]), '/rules/0/match/remoteCidrs/0', /host bits set; write "198.18.0.0\/15"/],
      ['octet above 255', base([{ name: 'a', match: { remoteCidrs: ['198.300.0.0/16'] }, minAgeMs: 1 }]), '/rules/0/match/remoteCidrs/0', /octet above 255/],
      ['duplicate rule name', base([{ name: 'a', minAgeMs: 1 }, { name: 'a', minAgeMs: 2 }]), '/rules/1/name', /already used by \/rules\/0/],
      ['rule that decides nothing', base([{ name: 'a', match: { localPorts: [80] } }]), '/rules/0', /decides nothing; add a condition/],
      ['never with a condition', base([{ name: 'a', never: true, minAgeMs: 5 }]), '/rules/0/never', /takes no condition \(found minAgeMs\)/],
      ['stitchImmediately with a condition', base([{ name: 'a', stitchImmediately: true, shellLoad: { cpuAbove: 1 } }]), '/rules/0/stitchImmediately', /takes no condition \(found shellLoad\)/],
      ['never and stitchImmediately', base([{ name: 'a', stitchImmediately: true, never: true }]), '/rules/0/never', /both "never" and "stitchImmediately"/],
    ];
    for (const [what, policy, pointer, message] of semantic) {
      it(`policy - check names ${pointer} (${what})`, () => {
        const err = policyErrorOf(() => validatePolicy(policy));
        assert.deepEqual(err.issues.map((i) => i.pointer), [pointer]);
        assert.match(err.issues[0]!.message, message);
      });
    }

    it('policy - a missing file says so and names the path', () => {
      const err = policyErrorOf(() => loadPolicyFile(path.join(tmp, 'nope.json')));
      assert.match(err.message, /nope\.json: does not exist; check the path/);
    });

    it('policy - bad JSON reports line and column', () => {
      const f = writeTmp('trailing.json', '{\n  "version": 1,\n  "mode": "auto",\n  "rules": [],\n}\n');
      const err = policyErrorOf(() => loadPolicyFile(f));
      assert.match(err.message, /not valid JSON at line 5, column 1: trailing comma before "}"/);
    });

    it('policy - JSON syntax errors: missing comma, comment, duplicate field, truncated', () => {
      const at = (text: string) => {
        const e = findJsonSyntaxError(text);
        assert.ok(e, `no error found in ${JSON.stringify(text)}`);
        return e;
      };
      assert.deepEqual([at('{"a": 1 "b": 2}').offset, at('{"a": 1 "b": 2}').message], [8, 'expected "," or "}" after the value of "a", found "\\""']);
      assert.match(at('{"a": 1 // no\n}').message, /comments are not allowed/);
      assert.deepEqual({ ...at('{"mode": "auto", "mode": "off"}') }, { offset: 17, message: 'duplicate field "mode"; keep one', pointer: '/mode' });
      assert.match(at('{"rules": [').message, /unexpected end of file/);
      assert.equal(findJsonSyntaxError('{"a": [1, {"b": "\\u00e9"}], "c": -1.5e3, "d": null}'), undefined);
    });

    it('policy - a file that parses but breaks the schema names the file and the pointer', () => {
      const f = writeTmp('bad-schema.json', JSON.stringify(base([{ name: 'a', minAgeMs: -5 }])));
      const err = policyErrorOf(() => loadPolicyFile(f));
      assert.equal(err.file, f);
      assert.match(err.message, /bad-schema\.json: 1 problem/);
      assert.match(err.message, /\/rules\/0\/minAgeMs: must be >= 0/);
    });
  });

  describe('policy - engine', () => {
    it('policy - reload keeps the old policy on a bad file', () => {
      const { logger, lines } = captureLogger();
      const good = writeTmp('good.json', JSON.stringify(base([{ name: 'old-rule', minAgeMs: 1000 }])));
      const engine = createPolicyEngine({ policy: loadPolicyFile(good), file: good, logger });
      const before = engine.policy;
      const decision = engine.evaluate(conn({ ageMs: 1500 }), idle);

      const bad = writeTmp('bad.json', '{"version": 1, "mode": "auto", "rules": [{"name": "new-rule", "minAgeMs": "soon"}]}');
      const err = policyErrorOf(() => engine.reload(bad));
      assert.match(err.message, /\/rules\/0\/minAgeMs/);
      assert.equal(engine.policy, before);
      assert.equal(engine.file, good);
      assert.deepEqual(engine.evaluate(conn({ ageMs: 1500 }), idle), decision);
      policyErrorOf(() => engine.reload(path.join(tmp, 'missing.json')));
      assert.equal(engine.policy, before);
      const failures = lines.filter((l) => l.level === 'error');
      assert.equal(failures.length, 2);
      assert.match(String(failures[0]!.message), /previous policy stays in force/);
    });

    it('policy - reload puts a good file in force, and rereads the same file without a path', () => {
      const { logger } = captureLogger();
      const f = writeTmp('swap.json', JSON.stringify(base([{ name: 'first', minAgeMs: 1000 }])));
      const engine = createPolicyEngine({ policy: loadPolicyFile(f), file: f, logger });
      fs.writeFileSync(f, JSON.stringify(base([{ name: 'second', minAgeMs: 10 }], { mode: 'manual', evaluationIntervalMs: 250 })));
      engine.reload();
      assert.equal(engine.policy.rules[0]!.name, 'second');
      assert.equal(engine.mode, 'manual');
      assert.equal(engine.evaluationIntervalMs, 250);
    });

    it('policy - createPolicyEngine validates the policy it is given', () => {
      policyErrorOf(() => createPolicyEngine({ policy: { version: 1, mode: 'auto' } as unknown as Policy }));
    });

    describe('policy - evaluate', () => {
      const { logger } = captureLogger();
      const engine = (rules: unknown[], extra: Record<string, unknown> = {}) =>
        createPolicyEngine({ policy: base(rules, extra) as Policy, logger });

      it('policy - evaluate long-lived: age at least minAgeMs (inclusive)', () => {
        const e = engine([{ name: 'long', minAgeMs: 2000 }]);
        assert.deepEqual(e.evaluate(conn({ ageMs: 2000 }), idle), { stitch: true, reason: 'rule "long": age 2000 ms >= 2000 ms', rule: 'long' });
        assert.deepEqual(e.evaluate(conn({ ageMs: 1999 }), idle), { stitch: false, reason: 'no rule selects it: "long" (age 1999 ms < 2000 ms)' });
      });

      it('policy - evaluate heavy: total bytes, or the larger direction', () => {
        const total = engine([{ name: 'heavy', minBytes: { total: 1048576 } }]);
        assert.deepEqual(total.evaluate(conn({ bytesIn: 524288, bytesOut: 524288 }), idle),
          { stitch: true, reason: 'rule "heavy": 1 MiB moved >= 1 MiB', rule: 'heavy' });
        assert.equal(total.evaluate(conn({ bytesIn: 524288, bytesOut: 524287 }), idle).stitch, false);

        const either = engine([{ name: 'one-way', minBytes: { eitherDirection: 1000 } }]);
        assert.deepEqual(either.evaluate(conn({ bytesIn: 10, bytesOut: 1000 }), idle),
          { stitch: true, reason: 'rule "one-way": 1000 B out >= 1000 B', rule: 'one-way' });
        assert.deepEqual(either.evaluate(conn({ bytesIn: 999, bytesOut: 999 }), idle),
          { stitch: false, reason: 'no rule selects it: "one-way" (999 B in < 1000 B)' });
      });

      it('policy - evaluate overloaded: CPU or event-loop utilization above the threshold (strict)', () => {
        const e = engine([{ name: 'busy', shellLoad: { cpuAbove: 0.8, eluAbove: 0.9 } }]);
        assert.deepEqual(e.evaluate(conn(), { cpu: 0.81, elu: 0.1 }),
          { stitch: true, reason: 'rule "busy": shell CPU 0.81 > 0.8', rule: 'busy' });
        assert.deepEqual(e.evaluate(conn(), { cpu: 0.1, elu: 0.95 }),
          { stitch: true, reason: 'rule "busy": event-loop utilization 0.95 > 0.9', rule: 'busy' });
        assert.deepEqual(e.evaluate(conn(), { cpu: 0.8, elu: 0.9 }),
          { stitch: false, reason: 'no rule selects it: "busy" (shell CPU 0.8 <= 0.8 and event-loop utilization 0.9 <= 0.9)' });
      });

      it('policy - evaluate needs every condition of a rule', () => {
        const e = createPolicyEngine({ policy: defaultPolicy(), logger });
        assert.deepEqual(e.evaluate(conn({ ageMs: 2500, bytesIn: 2 * 1048576 }), idle),
          { stitch: true, reason: 'rule "long-lived-and-heavy": age 2500 ms >= 2000 ms, 2 MiB moved >= 1 MiB', rule: 'long-lived-and-heavy' });
        assert.deepEqual(e.evaluate(conn({ ageMs: 2500, bytesIn: 1000 }), idle), {
          stitch: false,
          reason: 'no rule selects it: "long-lived-and-heavy" (1000 B moved < 1 MiB); "shell-overloaded" (shell CPU 0.05 <= 0.8)',
        });
        assert.equal(e.evaluate(conn({ ageMs: 10 }), { cpu: 1.7, elu: 0.2 }).rule, 'shell-overloaded');
      });

      it('policy - evaluate stitchImmediately stitches a brand-new connection', () => {
        const e = engine([{ name: 'now', stitchImmediately: true }]);
        assert.deepEqual(e.evaluate(conn({ ageMs: 0 }), idle),
          { stitch: true, reason: 'rule "now": stitched immediately after initiation', rule: 'now' });
      });

      it('policy - evaluate never wins when it comes first, and only for what it matches', () => {
        const e = engine([
          { name: 'keep-ssh', match: { localPorts: [22] }, never: true },
          { name: 'all', stitchImmediately: true },
        ]);
        assert.deepEqual(e.evaluate(conn({ localPort: 22, ageMs: 1e9 }), { cpu: 9, elu: 1 }),
          { stitch: false, reason: 'rule "keep-ssh": never stitched', rule: 'keep-ssh' });
        assert.equal(e.evaluate(conn({ localPort: 2222 }), idle).rule, 'all');
      });

      it('policy - evaluate matches port ranges and remote CIDRs (IPv4-mapped too)', () => {
        const e = engine([{ name: 'bench', match: { localPorts: [80, '8000-8999'], remoteCidrs: ['198.18.0.0/15', '203.0.113.7'] }, stitchImmediately: true }]);
        assert.equal(e.evaluate(conn({ localPort: 8999, remoteAddress: '198.19.255.1' }), idle).stitch, true);
        assert.equal(e.evaluate(conn({ localPort: 80, remoteAddress: '::ffff:198.18.1.2' }), idle).stitch, true);
        assert.equal(e.evaluate(conn({ localPort: 80, remoteAddress: '203.0.113.7' }), idle).stitch, true);
        assert.deepEqual(e.evaluate(conn({ localPort: 9000 }), idle),
          { stitch: false, reason: 'no rule selects it: "bench" (local port 9000 not in 80, 8000-8999)' });
        assert.deepEqual(e.evaluate(conn({ localPort: 80, remoteAddress: '198.20.0.1' }), idle),
          { stitch: false, reason: 'no rule selects it: "bench" (remote 198.20.0.1 not in 198.18.0.0/15, 203.0.113.7)' });
        assert.equal(e.evaluate(conn({ localPort: 80, remoteAddress: 'fd00::1' }), idle).stitch, false);
      });

      it('policy - evaluate in mode off or manual stitches nothing, and says why', () => {
        const rules = [{ name: 'now', stitchImmediately: true }];
        assert.deepEqual(engine(rules, { mode: 'off' }).evaluate(conn(), idle), { stitch: false, reason: 'policy mode is "off": nothing is stitched' });
        assert.match(engine(rules, { mode: 'manual' }).evaluate(conn(), idle).reason, /manual.*tcp-stitch stitch/);
      });

      it('policy - evaluate does not stitch twice, and says when there are no rules', () => {
        assert.deepEqual(engine([{ name: 'now', stitchImmediately: true }]).evaluate(conn({ phase: 3 }), idle),
          { stitch: false, reason: 'already stitched (phase 3)' });
        assert.deepEqual(engine([]).evaluate(conn(), idle), { stitch: false, reason: 'the policy has no rules' });
      });

      it('policy - evaluate rejects nonsense input rather than guessing', () => {
        const e = engine([{ name: 'now', stitchImmediately: true }]);
        assert.throws(() => e.evaluate(conn({ ageMs: Number.NaN }), idle), { code: 'TCP_STITCH_INVALID_ARGUMENT' });
        assert.throws(() => e.evaluate(conn(), { cpu: -1, elu: 0 }), { code: 'TCP_STITCH_INVALID_ARGUMENT' });
      });

      it('policy - evaluate of the default policy is (long-lived and heavy) or overloaded, deterministically', () => {
        const e = createPolicyEngine({ policy: defaultPolicy(), logger });
        fc.assert(fc.property(
          fc.nat(10_000), fc.nat(4 * 1048576), fc.nat(4 * 1048576), fc.double({ min: 0, max: 4, noNaN: true }), fc.double({ min: 0, max: 1, noNaN: true }),
          (ageMs, bytesIn, bytesOut, cpu, elu) => {
            const c = conn({ ageMs, bytesIn, bytesOut });
            const load = { cpu, elu };
            const snapshot = JSON.stringify([c, load]);
            const d = e.evaluate(c, load);
            assert.equal(d.stitch, (ageMs >= 2000 && bytesIn + bytesOut >= 1048576) || cpu > 0.8);
            assert.deepEqual(e.evaluate(c, load), d);
            assert.equal(JSON.stringify([c, load]), snapshot);
          }));
      });
    });
  });

  // The agent's own settings (agent/settings.ts, conf): kept here with the policy, the other half of
  // the agent's configuration.
  describe('settings - agent state through conf', () => {
    const quiet = () => captureLogger().logger;

    it('settings - a fresh store has the defaults, in a file of its own per control path', () => {
      const a = openSettings({ cwd: tmp, controlPath: '/run/tcp-stitch/a.sock', logger: quiet() });
      const b = openSettings({ cwd: tmp, controlPath: '/run/tcp-stitch/b.sock', logger: quiet() });
      assert.notEqual(a.path, b.path);
      assert.equal(path.dirname(a.path), tmp);
      assert.equal(path.basename(a.path), `${settingsNameFor('/run/tcp-stitch/a.sock')}.json`);
      assert.deepEqual(a.read(), { switchMode: 'auto' });
      a.update({ switchMode: 'off' });
      assert.deepEqual(b.read(), { switchMode: 'auto' });
    });

    it('settings - update writes at once, survives a reopen, and refuses bad values without changing anything', () => {
      const s = openSettings({ cwd: tmp, controlPath: '/run/x.sock', logger: quiet() });
      s.update({ switchMode: 'preconfigured', switchAddress: '198.18.2.1:4790', keyFile: '/etc/tcp-stitch/key' });
      const saved = fs.readFileSync(s.path, 'utf8');
      assert.throws(() => s.update({ switchAddress: null }), { code: 'TCP_STITCH_INVALID_ARGUMENT', message: /preconfigured" needs a switch address/ });
      assert.throws(() => s.update({ switchAddress: '198.18.2.1:99999' }), { code: 'TCP_STITCH_INVALID_ARGUMENT' });
      assert.throws(() => s.update({ switchMode: 'sometimes' as never }), { code: 'TCP_STITCH_INVALID_ARGUMENT' });
      assert.throws(() => s.update({ policy: 'x' } as never), { message: /unknown setting "policy"/ });
      assert.equal(fs.readFileSync(s.path, 'utf8'), saved);
      assert.deepEqual(openSettings({ cwd: tmp, controlPath: '/run/x.sock', logger: quiet() }).read(),
        { switchMode: 'preconfigured', switchAddress: '198.18.2.1:4790', keyFile: '/etc/tcp-stitch/key' });
    });

    it('settings - the last discovery result is kept for status, and checked', () => {
      const s = openSettings({ cwd: tmp, controlPath: '/run/d.sock', logger: quiet() });
      const rec = s.recordDiscovery({ at: new Date(0), available: false, reason: 'several-ingress-egress-points', mode: 'auto' });
      assert.equal(rec.at, '1970-01-01T00:00:00.000Z');
      assert.deepEqual(s.read().lastDiscovery, rec);
      assert.throws(() => s.recordDiscovery({ available: true, reason: 'x', mode: 'auto', extra: 1 } as never), { code: 'TCP_STITCH_INVALID_ARGUMENT' });
      assert.deepEqual(s.read().lastDiscovery, rec);
      s.clearDiscovery();
      assert.equal(s.read().lastDiscovery, undefined);
    });

    it('settings - a corrupt file is reset to defaults, with a warning', () => {
      const first = openSettings({ cwd: tmp, controlPath: '/run/c.sock', logger: quiet() });
      first.update({ switchMode: 'off' });
      fs.writeFileSync(first.path, '{"switchMode": "off",');
      const { logger, lines } = captureLogger();
      const again = openSettings({ cwd: tmp, controlPath: '/run/c.sock', logger });
      assert.deepEqual(again.read(), { switchMode: 'auto' });
      assert.equal(lines.filter((l) => l.level === 'warn').length, 1);
    });

    it('settings - --switch auto|off|combined|HOST:PORT maps to settings', () => {
      assert.deepEqual(parseSwitchOption('combined'), { switchMode: 'combined' });
      assert.deepEqual(parseSwitchOption('198.18.2.1:4790'), { switchMode: 'preconfigured', switchAddress: '198.18.2.1:4790' });
      assert.throws(() => parseSwitchOption('sometimes'), { message: /--switch must be auto, off, combined or HOST:PORT/ });
    });
  });
});
