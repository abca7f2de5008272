// Turns the raw measurements into report.json (everything, raw) and report.md (the targets first,
// then the tables they come from).
import { DEFAULT_RATE_LIMIT } from '../switch/control-server.ts';
import { SHELL_BUFFER_CAP, SHELL_SOCKET_BUFFER, type HandoverRun } from './handover.ts';
import type { DaemonLoad, InstallRates } from './installs.ts';
import type { Rtt, RttHandover } from './rtt.ts';
import { MODES, type Run } from './throughput.ts';
import { median, quantile } from './bed.ts';

export interface Raw {
  when: string; kernel: string; cpus: number; runtimeS: number;
  /** Seconds each part took. */
  parts: Record<string, number>;
  settings: { rounds: number; targetRounds?: number; groRounds?: number; seconds: number; rttSamples: number; liveRuns?: number; handoverRounds: number; handoverConns: number; handoverMiB: number };
  throughput: Run[];
  /** Routed and stitched again with GRO on every veth (measureThroughputGro). */
  throughputGro?: Run[];
  rtt?: { routed: Rtt; shellRelay: Rtt; stitched: Rtt; handover?: RttHandover | { error: string }; handoverApart?: RttHandover | { error: string } };
  handover: HandoverRun[];
  /** Mid-load and control runs with the shell host's TCP buffers capped (measureHandoverCapped). */
  handoverCapped?: HandoverRun[];
  /** The same with the shell's own --socket-buffer instead (measureHandoverSocketBuffer). */
  handoverSocketBuffer?: HandoverRun[];
  installs?: InstallRates;
  daemon?: DaemonLoad[];
  errors: string[];
}

interface Target { figure: string; measured: string; target: string; verdict: string; why?: string; value: number | null; met: boolean | null }

const f = (x: number, d = 2) => (Number.isFinite(x) ? x.toFixed(d) : 'n/a');
const GiB = 2 ** 30;
const sum = (xs: number[]) => xs.reduce((a, b) => a + b, 0);
const ok = (r: Run) => !r.error && Number.isFinite(r.gbps);

/** 'met' or 'missed by X' for measured against a target (higher or lower is better). */
function verdict(measured: number, target: number, better: 'higher' | 'lower', unit: string, digits: number, strict = false): { verdict: string; met: boolean | null } {
  if (!Number.isFinite(measured)) return { verdict: 'not measured', met: null };
  const met = better === 'higher' ? measured >= target : strict ? measured < target : measured <= target;
  if (met) return { verdict: 'met', met };
  const by = Math.abs(measured - target);
  // A miss that rounds to nothing is shown with the digits it needs (0.949 against 0.95: 0.001).
  const d = Math.max(digits, Math.min(6, Math.ceil(-Math.log10(by))));
  const rel = target === 0 ? '' : better === 'higher' ? ` (${f((1 - measured / target) * 100, 1)} % short)` : ` (${f(measured / target, 1)}x the target)`;
  return { verdict: `missed by ${by.toFixed(d)}${unit}${rel}`, met };
}

// A stitch that never reached phase 3 (its connection ended while it drained) counts at the
// duration of its request, a lower bound: leaving it out would flatter the p99.
const neverPhase3 = (r: HandoverRun) => Math.max(0, r.stitch!.ok - r.stitch!.shellMs.length);
/** Decision → phase 3 at the shell, per stitch of runs stitched mid-load. */
const shellMsOf = (hs: HandoverRun[]) => hs.flatMap((r) => [...r.stitch!.shellMs, ...Array<number>(neverPhase3(r)).fill(r.stitch!.callMs)]);

/** Capped-buffer runs beside the default ones: handover, drain, RTOs, and the unstitched load's duration. */
function capped(raw: Raw, runs: HandoverRun[] = []) {
  const hs = runs.filter((r) => r.stitch), none = (rs: HandoverRun[]) => rs.filter((r) => !r.stitched && !r.error).map((r) => r.loadMs);
  const ms = shellMsOf(hs);
  if (!ms.length) return undefined;
  return {
    n: ms.length, p50: quantile(ms, 0.5), p99: quantile(ms, 0.99), dpP99: quantile(hs.flatMap((r) => r.stitch!.datapathMs), 0.99),
    rto: sum(hs.map((r) => (r.c['TcpExt.TCPTimeouts'] ?? 0) + (r.b['TcpExt.TCPTimeouts'] ?? 0))),
    exact: runs.filter((r) => !r.error).every((r) => r.exact), failed: runs.filter((r) => r.error).length,
    noneMs: median(none(runs)), noneMsDefault: median(none(raw.handover)),
  };
}

/** Medians of one mode's runs, each way. */
function modeStats(runs: Run[], mode: Run['mode']) {
  const rs = runs.filter((r) => r.mode === mode);
  const dir = (reverse: boolean) => rs.filter((r) => r.reverse === reverse && ok(r));
  return {
    mode,
    c2b: median(dir(false).map((r) => r.gbps)), b2c: median(dir(true).map((r) => r.gbps)),
    retransC2B: median(dir(false).map((r) => r.retransmits)), retransB2C: median(dir(true).map((r) => r.retransmits)),
    runs: rs.length, failed: rs.filter((r) => !ok(r)).length,
  };
}

type ModeStats = ReturnType<typeof modeStats>;
/** One row of a throughput table: a mode's medians and its ratios against routed. */
const modeRow = (m: ModeStats, routed: ModeStats) =>
  `| ${m.mode} | ${f(m.c2b)} | ${f(m.c2b / routed.c2b)} | ${f(m.b2c)} | ${f(m.b2c / routed.b2c)} | ${f(m.retransC2B, 0)} / ${f(m.retransB2C, 0)} | ${m.failed}/${m.runs} |`;

export function summarize(raw: Raw) {
  const modes = MODES.map((mode) => modeStats(raw.throughput, mode));
  const by = Object.fromEntries(modes.map((m) => [m.mode, m])) as Record<Run['mode'], ModeStats>;
  const ratio = { c2b: by.stitched.c2b / by.routed.c2b, b2c: by.stitched.b2c / by.routed.b2c };
  const groRuns = raw.throughputGro ?? [];
  const gro = groRuns.length ? (() => {
    const routed = modeStats(groRuns, 'routed'), stitched = modeStats(groRuns, 'stitched');
    return { routed, stitched, ratio: { c2b: stitched.c2b / routed.c2b, b2c: stitched.b2c / routed.b2c } };
  })() : undefined;
  const likeRatio = { c2b: by['stitched + B relay'].c2b / by['routed + B relay'].c2b, b2c: by['stitched + B relay'].b2c / by['routed + B relay'].b2c };
  const relay = raw.throughput.filter((r) => r.mode === 'shell relay' && ok(r));
  const stitched = raw.throughput.filter((r) => r.mode === 'stitched' && ok(r) && r.stitch);
  const cpu = {
    phase2: sum(relay.map((r) => r.shellCpu ?? 0)) / (sum(relay.map((r) => r.shellBytes ?? 0)) / GiB),
    phase3: sum(stitched.map((r) => r.shellCpu ?? 0)) / (sum(stitched.map((r) => r.shellBytes ?? 0)) / GiB),
    phase3CpuS: sum(stitched.map((r) => r.shellCpu ?? 0)), phase3GiB: sum(stitched.map((r) => r.shellBytes ?? 0)) / GiB,
    coreCpuPerS: median(raw.throughput.filter((r) => r.mode === 'stitched + B relay' && ok(r)).map((r) => r.stitch?.coreCpuPerS ?? NaN)),
  };
  // Every run that got as far as its counters counts for retransmissions and RTOs, a stalled one too.
  const hs = raw.handover.filter((r) => r.stitched && r.stitch);
  const hc = raw.handover.filter((r) => !r.stitched && r.c['Tcp.RetransSegs'] !== undefined);
  const hf = raw.handover.filter((r) => r.fromStart && r.c['Tcp.RetransSegs'] !== undefined);
  const shellMs = shellMsOf(hs);
  const dpMs = hs.flatMap((r) => r.stitch!.datapathMs);
  const views = hs.flatMap((r) => r.stitch!.datapath);
  const dp = {
    read: views.length, program: views.filter((v) => v.phase === 'stitched').length,
    forcedIdle: views.filter((v) => v.phase !== 'stitched' && v.forced).length,
    draining: views.filter((v) => v.phase === 'draining' && !v.forced).length,
    toDrainOkP50: quantile(views.filter((v) => v.toDrainOkMs !== undefined).map((v) => v.toDrainOkMs!), 0.5),
  };
  const tot = (rs: HandoverRun[], k: 'Tcp.RetransSegs' | 'TcpExt.TCPTimeouts', h: 'c' | 'b') => sum(rs.map((r) => r[h][k] ?? 0));
  const handover = {
    stitches: shellMs.length, attempted: sum(hs.map((r) => r.conns)), ok: sum(hs.map((r) => r.stitch!.ok)),
    neverPhase3: sum(hs.map(neverPhase3)),
    shellP50: quantile(shellMs, 0.5), shellP99: quantile(shellMs, 0.99), shellMax: Math.max(...shellMs),
    toInstalledP50: quantile(hs.flatMap((r) => r.stitch!.shellToInstalledMs), 0.5),
    toSwitchP50: quantile(hs.flatMap((r) => r.stitch!.shellToSwitchMs), 0.5),
    dpP50: quantile(dpMs, 0.5), dpP99: quantile(dpMs, 0.99), dpMax: Math.max(...dpMs), dp,
    callMs: hs.map((r) => r.stitch!.callMs),
    exact: raw.handover.filter((r) => !r.error).every((r) => r.exact),
    stalled: { stitched: hs.filter((r) => r.error).length, control: hc.filter((r) => r.error).length },
    stitchedRuns: hs.length, controlRuns: hc.length, fromStartRuns: hf.length,
    idle: {
      n: sum(hf.map((r) => r.idle?.shellMs.length ?? 0)),
      p50: quantile(hf.flatMap((r) => r.idle?.shellMs ?? []), 0.5), p99: quantile(hf.flatMap((r) => r.idle?.shellMs ?? []), 0.99),
      toSwitchP50: quantile(hf.flatMap((r) => r.idle?.shellToSwitchMs ?? []), 0.5),
    },
    rto: {
      stitched: { c: tot(hs, 'TcpExt.TCPTimeouts', 'c'), b: tot(hs, 'TcpExt.TCPTimeouts', 'b') }, control: { c: tot(hc, 'TcpExt.TCPTimeouts', 'c'), b: tot(hc, 'TcpExt.TCPTimeouts', 'b') },
      fromStart: { c: tot(hf, 'TcpExt.TCPTimeouts', 'c'), b: tot(hf, 'TcpExt.TCPTimeouts', 'b') },
    },
    retrans: {
      stitched: { c: tot(hs, 'Tcp.RetransSegs', 'c'), b: tot(hs, 'Tcp.RetransSegs', 'b') }, control: { c: tot(hc, 'Tcp.RetransSegs', 'c'), b: tot(hc, 'Tcp.RetransSegs', 'b') },
      fromStart: { c: tot(hf, 'Tcp.RetransSegs', 'c'), b: tot(hf, 'Tcp.RetransSegs', 'b') },
    },
  };
  return { modes, by, ratio, likeRatio, gro, cpu, handover, capped: capped(raw, raw.handoverCapped), socketBuffer: capped(raw, raw.handoverSocketBuffer) };
}

function targets(raw: Raw, s: ReturnType<typeof summarize>): Target[] {
  const out: Target[] = [];
  for (const [k, name, reverse] of [['c2b', 'C→B', false], ['b2c', 'B→C', true]] as const) {
    const failures = raw.throughput.filter((r) => r.mode === 'stitched' && r.reverse === reverse && !ok(r));
    let v = verdict(s.ratio[k], 0.95, 'higher', '', 2);
    let why: string | undefined;
    if (v.met === null && failures.length) {
      v = { verdict: `missed: none of ${failures.length} stitched runs completed`, met: false };
      why = failures[0]!.error;
    } else if (v.met === false) {
      const st = s.by.stitched, ro = s.by.routed;
      why = 'stitched and routed end in the same iperf3 socket on B (the shell\'s core is plain); what differs is S: ' +
        'the program rewrites every stitched packet (routed packets pass the same program, which finds no stitch), and the stitched path\'s own ' +
        `retransmissions (sender median ${f(reverse ? st.retransB2C : st.retransC2B, 0)} stitched vs ${f(reverse ? ro.retransB2C : ro.retransC2B, 0)} routed per run; whole runs, ` +
        'the relay phase and the handover included: where they fall, docs/handover.md, Open), ' +
        `on the same two vCPUs as C, A and B. Per round: ${pairs(raw, reverse)}.` +
        (s.gro ? ` With GRO on every veth (a flow's packets in order, as from a NIC's receive queue; Throughput), ${f(s.gro.ratio[k], 3)}.` : '') +
        (failures.length ? ` ${failures.length} stitched run(s) failed: ${failures[0]!.error}` : '');
    }
    out.push({ figure: `stitched / routed throughput ${name}`, measured: f(s.ratio[k], 3), target: '≥ 0.95', ...v, value: s.ratio[k], ...(why && { why }) });
  }
  // The issue's iperf3 acceptance asks ≥ 0.9 of the same figure; its test (test/stitch-e2e.test.ts)
  // runs one pair, which these vCPUs make too noisy to hold a 0.9 line.
  const worst = Math.min(s.ratio.c2b, s.ratio.b2c);
  const av = verdict(worst, 0.9, 'higher', '', 2);
  out.push({ figure: 'iperf3 through the shell stitched mid-run, after the stitch / routed, the worse of C→B and B→C', measured: `${f(worst, 3)} (C→B ${f(s.ratio.c2b, 3)}, B→C ${f(s.ratio.b2c, 3)})`, target: '≥ 0.9',
    ...av, value: worst, ...(av.met === false && { why: 'the runs of the two rows above: see their why' }) });
  const cr = s.cpu.phase3 / s.cpu.phase2;
  const cv = verdict(cr, 0.01, 'lower', '', 4);
  out.push({ figure: 'shell CPU per GiB, phase 3 / phase 2', measured: `${f(cr, 4)} (${f(s.cpu.phase3, 4)} / ${f(s.cpu.phase2, 3)} s/GiB)`, target: '≤ 0.01', ...cv, value: cr,
    ...(cv.met === false && { why: `the shell still spent ${f(s.cpu.phase3CpuS, 2)} CPU-s over ${f(s.cpu.phase3GiB, 1)} GiB stitched (timers of the agent and the shell; /proc/PID/stat has 10 ms resolution)` }) });
  const h = s.handover;
  const hv = verdict(h.shellP99, 2, 'lower', ' ms', 0, true);
  const cap = s.capped;
  out.push({ figure: 'handover p99, decision → phase 3 (shell log)', measured: `${f(h.shellP99, 0)} ms (p50 ${f(h.shellP50, 0)} ms, ${h.stitches} stitches${h.neverPhase3 ? `; ${h.neverPhase3} never reached phase 3, counted at its request's duration` : ''})`, target: '< 2 ms', ...hv, value: h.shellP99,
    ...(hv.met === false && { why: `decision → installed at the switch p50 ${f(h.toSwitchP50, 0)} ms, → answer seen by the agent p50 ${f(h.toInstalledP50, 0)} ms ` +
      `(${raw.settings.handoverConns} requests at once from a shell whose event loop relays as many loaded connections); ` +
      `the drain itself (first packet → stitched) p50 ${f(h.dpP50, 0)} / p99 ${f(h.dpP99, 0)} ms in the datapath; then the switch's read of the state (the program's event) and the NOTIFY` +
      (cap ? `. The drain waits on the shell's backlog, which its sockets' buffers bound: with the shell host's TCP buffers capped at ${SHELL_BUFFER_CAP >> 10} KiB, p99 ${f(cap.p99, 0)} ms` +
        (s.socketBuffer ? `, with the shell's own --socket-buffer ${SHELL_SOCKET_BUFFER >> 10}k, p99 ${f(s.socketBuffer.p99, 0)} ms` : '') + ' (Handover under load)' : '') }) });
  if (h.idle.n) {
    const iv = verdict(h.idle.p99, 2, 'lower', ' ms', 0, true);
    out.push({ figure: 'handover p99, idle connections (nothing in the shell), decision → phase 3 (shell log)', measured: `${f(h.idle.p99, 0)} ms (p50 ${f(h.idle.p50, 0)} ms, ${h.idle.n} stitches)`, target: '< 2 ms', ...iv, value: h.idle.p99,
      ...(iv.met === false && { why: `${raw.settings.handoverConns} stitched with one request: decision → installed at the switch p50 ${f(h.idle.toSwitchP50, 0)} ms (two STITCH_MANY datagrams, the switch's install code still cold after a few dozen installs), ` +
        'then rule 9\'s check and its confirmation (each as soon as the program runs in progress at the daemon\'s write have ended), a log line and a NOTIFY per stitch, and the agent\'s and the shell\'s handling of each: ' +
        '0.3-0.7 ms per stitch in each of the agent, the switch and the shell (log lines, HMACs, system calls at 10-70 µs), one after another on two vCPUs (docs/handover.md, rule 9)' }) });
  }
  const live = raw.rtt?.handover;
  if (live && 'error' in live) {
    out.push({ figure: 'handover as a live connection sees it (1-byte ping-pong stitched mid-run)', measured: 'n/a', target: '< 2 ms', verdict: 'missed: not measured', met: false, value: NaN, why: live.error });
  } else if (live) {
    const lv = verdict(live.longest.p99Us / 1000, 2, 'lower', ' ms', 1, true);
    const ms = (us: number) => f(us / 1000, 1);
    const ap = raw.rtt?.handoverApart;
    const apart = !ap ? '' : 'error' in ap ? '; kept apart: not measured' :
      `; the switch daemon and the shell kept on separate vCPUs, as on their own hosts, ${ap.runs.length} more: p50 ${ms(ap.longest.p50Us)}, p99 ${ms(ap.longest.p99Us)} ms (windows outside p50 ${ms(ap.windows.p50Us)}, p99 ${ms(ap.windows.p99Us)} ms)`;
    out.push({ figure: `handover as a live connection sees it: the longest round trip during its handover, p99 over ${live.runs.length} connections (1-byte ping-pong stitched mid-run)`,
      measured: `${ms(live.longest.p99Us)} ms (p50 ${ms(live.longest.p50Us)} ms; handovers p50 ${f(median(live.runs.map((r) => r.handoverMs)), 0)} ms; ` +
        `windows of the same length outside them, the longest round trip in each: p50 ${ms(live.windows.p50Us)}, p99 ${ms(live.windows.p99Us)} ms${apart})`,
      target: '< 2 ms', ...lv, value: live.longest.p99Us / 1000,
      ...(lv.met === false && {
        why: `the longest round trip of a typical handover (p50 ${ms(live.longest.p50Us)} ms) against that of a typical window of the same length outside it (p50 ${ms(live.windows.p50Us)} ms): ` +
          'a ping that reaches the shell while its one JavaScript thread handles the stitch (the control request, the decision, the STITCH and its answer, the NOTIFY) waits for it, and so does one the shell cannot relay while the switch daemon, answering the STITCH, holds a vCPU the shell needs: here S and A share two (the connections run with the two kept apart show how much of it that is; docs/handover.md, Open); ' +
          `the windows' own p99 (${ms(live.windows.p99Us)} ms) is phase 2's: every ping crosses the shell's event loop, on vCPUs shared by C, S, A and B`,
      }) });
  }
  const dv = verdict(h.dpP99, 2, 'lower', ' ms', 2, true);
  out.push({ figure: 'handover p99, datapath drain (first packet after commit → stitched)', measured: `${f(h.dpP99)} ms (p50 ${f(h.dpP50)} ms; ${h.dp.program} of ${h.dp.read} stitches switched on a packet)`, target: '< 2 ms', ...dv, value: h.dpP99,
    ...(dv.met === false && { why: 'the drain lasts until both far ends acknowledged what the shell held (its socket backlog under load) plus the 1 ms hold (docs/handover.md, rule 8)' }) });
  const rto = h.rto.stitched.c + h.rto.stitched.b, rtoCtl = h.rto.control.c + h.rto.control.b, rtoFs = h.rto.fromStart.c + h.rto.fromStart.b;
  const measured = h.stitchedRuns ? rto : NaN;
  const rv = verdict(measured, 0, 'lower', ' RTO', 0);
  const stalls = h.stalled.stitched ? `; ${h.stalled.stitched} of ${h.stitchedRuns} stitched runs stalled (${h.stalled.control} of ${h.controlRuns} without a stitch)` : '';
  const fromStart = h.fromStartRuns ? `; stitched before the load, no handover: ${rtoFs}` : '';
  out.push({ figure: 'retransmission timeouts in loaded runs stitched mid-load (C + B)', measured: Number.isFinite(measured) ? `${rto} (same load on the shell path: ${rtoCtl}${fromStart})${stalls}` : 'n/a', target: '0', ...rv, value: measured,
    ...(rv.met === false && { why: (h.fromStartRuns && rto <= rtoFs
      ? 'no more than the same load has on the stitched path without a handover (stitched before the load): the load\'s own, at the stitched path\'s higher packet rate on two saturated vCPUs, which the shell path never reaches'
      : `${h.fromStartRuns ? `${rto - rtoFs} more than the same load stitched before it started` : 'more than the same load without a stitch'}: caused by the handover. One known way (docs/handover.md, Open): ACKs reordered by ≥ 2 ms across the veths\' per-CPU queues and dropped as PAWS-old; any others are not examined yet`) +
      (stalls ? `; a stalled connection retransmits into a dead path until the bench gives up on it` : '') }) });
  const ins = raw.installs;
  const single = ins?.single.perSecond ?? NaN;
  out.push({ figure: 'stitch installs/s, datapath (StitchMaps.install, one at a time)', measured: f(single, 0), target: '≥ 10,000', ...verdict(single, 10_000, 'higher', '/s', 0), value: single });
  const ctl = ins && 'perSecond' in ins.control ? ins.control : undefined;
  const ctv = verdict(ctl?.perSecond ?? NaN, 10_000, 'higher', '/s', 0);
  const why = `the switch's control server runs in one Node event loop: per datagram (ten stitches) decoding, two HMACs, the response cache, two system calls and one log line, per stitch two flow lookups and the translation, and the map writes batched per datagram`;
  out.push({ figure: 'stitch installs/s, end to end over the control protocol (median of 3 rounds after a warm-up)', measured: f(ctl?.perSecond ?? NaN, 0), target: '≥ 10,000', ...ctv, value: ctl?.perSecond ?? NaN,
    ...(ctv.met === false && { why: `${why}. The CLI switch also rate-limits each shell to ${DEFAULT_RATE_LIMIT.perSecond} datagrams/s (lifted here)` }) });
  if (ctl) {
    const cold = verdict(ctl.warmUpPerSecond, 10_000, 'higher', '/s', 0);
    out.push({ figure: 'stitch installs/s, the same, the first round of a switch that just started (a warm agent)', measured: f(ctl.warmUpPerSecond, 0), target: '≥ 10,000', ...cold, value: ctl.warmUpPerSecond,
      ...(cold.met === false && { why: `the switch's code, the map writes included, is not compiled and optimized yet (V8 does that while it runs); ${why}` }) });
  }
  return out;
}

/** The Round trip section's rows of one set of live handovers. */
const liveRows = (label: string, h: RttHandover) => [
  `| longest during a handover${label} | ${h.runs.length} | ${h.longest.p50Us} | ${h.longest.p99Us} | ${h.longest.maxUs} |`,
  `| longest in a window outside${label} | ${h.windows.n} | ${h.windows.p50Us} | ${h.windows.p99Us} | ${h.windows.maxUs} |`,
  `| every round trip outside${label} | ${h.outside.n} | ${h.outside.p50Us} | ${h.outside.p99Us} | ${h.outside.maxUs} |`,
];
const perConn = (h: RttHandover) => h.runs.map((x) => `${f(x.handoverMs, 0)}/${x.during}/${x.longestUs}@${f(x.longestAtMs, 1)}`).join(', ');

/** Each round's stitched rate over the same round's routed rate, one direction. */
function pairs(raw: Raw, reverse: boolean, runs = raw.throughput): string {
  const rounds = [...new Set(runs.map((r) => r.round))];
  return rounds.map((round) => {
    const get = (mode: Run['mode']) => runs.find((r) => r.round === round && r.reverse === reverse && r.mode === mode);
    const st = get('stitched'), ro = get('routed');
    return st && ro && ok(st) && ok(ro) ? f(st.gbps / ro.gbps) : 'n/a';
  }).join(', ');
}

export function render(raw: Raw): { md: string; json: unknown } {
  const s = summarize(raw);
  const t = targets(raw, s);
  const by = s.by;
  const md: string[] = [
    `# tcp-stitch bench (${raw.when}, kernel ${raw.kernel}, ${raw.cpus} vCPUs, ${f(raw.runtimeS, 0)} s: ${Object.entries(raw.parts).map(([k, v]) => `${k} ${f(v, 0)} s`).join(', ')})`, '',
    'One run, one topology: C, S, A, B as network namespaces (window scales 10 at C vs 7 at B, S\'s tx checksum offload off), ' +
    '`tcp-stitch switch` (eBPF) in S; in A `tcp-stitch shell --switch auto --key-file --policy (manual)` four times, HAProxy (TCP mode); ' +
    'two of the shells have a plain core (`--plain-core`: iperf3 and the RTT server on B themselves), two a `tcp-stitch core --key-file` in B that relays to a backend on B\'s loopback. ' +
    'Other tenants may share the CPUs: compare the figures within this report only.', '',
    '## Targets', '',
    '| figure | measured | target | verdict | why (when missed) |', '|---|---|---|---|---|',
    ...t.map((x) => `| ${x.figure} | ${x.measured} | ${x.target} | ${x.verdict} | ${x.why ?? ''} |`), '',
    '## Throughput', '',
    `${raw.settings.rounds} interleaved rounds of every mode${(raw.settings.targetRounds ?? 0) > raw.settings.rounds ? `, then routed and stitched alone up to ${raw.settings.targetRounds} rounds (single runs here range over ±25 %)` : ''}; iperf3 -i 1 -J, ${raw.settings.seconds} s per run (stitched: ${raw.settings.seconds + 3} s, counting only the 1-s intervals that start ≥ 1 s after \`tcp-stitch stitch --all\` returned); medians; ratios against routed.`, '',
    '| mode | C→B Gbit/s | ratio | B→C Gbit/s | ratio | retransmits C→B / B→C (median, sender, whole run) | runs failed |', '|---|---|---|---|---|---|---|',
    ...s.modes.map((m) => modeRow(m, by.routed)), '',
    '"stitched" and "shell relay" go through the shell with a plain core: iperf3 on B is the shell\'s core, the same server routed and HAProxy use. ' +
    `"stitched + B relay" goes through \`tcp-stitch core\`, which relays to iperf3 on B's loopback (core ${f(s.cpu.coreCpuPerS)} CPU-s/s while stitched, median): ` +
    `a second TCP connection on B, on the same two vCPUs. Its like-for-like baseline is "routed + B relay" (B's iperf3 behind test/fixtures/forward.ts, the same relay code); against it: C→B ${f(s.likeRatio.c2b)}, B→C ${f(s.likeRatio.b2c)}.`, '',
    `Stitched / routed per round (routed run just before): C→B ${pairs(raw, false)}; B→C ${pairs(raw, true)}.`, '',
    ...(s.gro ? [
      `With GRO on every veth: ${raw.settings.groRounds} more rounds of routed and stitched, after the rounds above (GRO off again after them). Linux's veth (GRO off, its default) hands each packet to the CPU that sent it, ` +
      'so a flow whose sender sends from both vCPUs arrives out of order, which a NIC with a receive queue per flow does not do; with GRO on, a veth receives through NAPI, one CPU at a time, in order.', '',
      '| mode, GRO on | C→B Gbit/s | ratio | B→C Gbit/s | ratio | retransmits C→B / B→C (median, sender, whole run) | runs failed |', '|---|---|---|---|---|---|---|',
      modeRow(s.gro.routed, s.gro.routed), modeRow(s.gro.stitched, s.gro.routed), '',
      `Per round, GRO on: C→B ${pairs(raw, false, raw.throughputGro)}; B→C ${pairs(raw, true, raw.throughputGro)}.`, ''] : []),
    'Stitched runs: ' + raw.throughput.filter((r) => r.mode.startsWith('stitched')).map((r) => `${r.mode}, ${r.reverse ? 'B→C' : 'C→B'} ${r.error ? `failed (${r.error})` :
      `${f(r.gbps)} Gbit/s (${r.stitch!.beforeGbps.length ? `before the stitch ${r.stitch!.beforeGbps.map((x) => f(x, 1)).join('/')}; ` : ''}stitch returned at ${f(r.stitch!.returnedAtS, 1)} s after ${f(r.stitch!.cliMs, 0)} ms of CLI` +
      `${r.stitch!.coreCpuPerS === undefined ? '' : `; core ${f(r.stitch!.coreCpuPerS)} CPU`})`}`).join('; ') + '.', '',
    '## Shell CPU', '',
    `Shell CPU seconds per GiB moved: phase 2 (relay runs, whole run) ${f(s.cpu.phase2, 3)}; phase 3 (stitched runs, counted intervals only) ${f(s.cpu.phase3, 4)} ` +
    `(${f(s.cpu.phase3CpuS, 2)} CPU-s over ${f(s.cpu.phase3GiB, 2)} GiB; utime+stime from /proc/PID/stat, 10 ms ticks); ratio ${f(s.cpu.phase3 / s.cpu.phase2, 4)}.`, '',
    '## Round trip', '',
  ];
  if (raw.rtt) {
    const r = raw.rtt;
    const apart = r.handoverApart && !('error' in r.handoverApart) ? r.handoverApart : undefined;
    md.push(`1-byte ping-pong over one TCP connection (bench/rtt-probe.c: C at both ends), ${r.routed.n} samples each.`, '', '| path | p50 µs | p99 µs | p50 vs routed |', '|---|---|---|---|',
      ...([['routed', r.routed], ['shell relay (phase 2)', r.shellRelay], ['stitched (phase 3)', r.stitched]] as const)
        .map(([n, x]) => `| ${n} | ${x.p50Us} | ${x.p99Us} | ${f(x.p50Us / r.routed.p50Us)} |`), '',
      'All three end in the same echo server on B: the RTT shell\'s core is plain.', '',
      ...(r.handover && 'error' in r.handover ? [`Stitched mid-run: failed (${r.handover.error}).`, ''] : []),
      ...(r.handover && !('error' in r.handover) ? [`Stitched mid-run: ${r.handover.runs.length} connections one after another (and as many kept apart, in between: below), each the same ping-pong (${r.handover.n} pings) through the shell, stitched after a third of its pings. ` +
        'During each handover (decision → phase 3 in the shell\'s log, ±1 ms), and in windows of the same length outside it on the same connection (phase 2 before, phase 3 after), the longest round trip (docs/handover.md, rule 12):', '',
        '| | n | p50 µs | p99 µs | max µs |', '|---|---|---|---|---|',
        ...liveRows('', r.handover),
        ...(apart ? liveRows(', kept apart', apart) : []), '',
        ...(r.handoverApart && 'error' in r.handoverApart ? [`Kept apart: failed (${r.handoverApart.error}).`, ''] : []),
        ...(apart ? ['"Kept apart": the connections in between, run with the switch daemon on one vCPU and the shell on the other (`taskset`, all threads), ' +
          'as on their own hosts S and A; the probes, the echo server and the kernel\'s packet work run anywhere, as in the rest of the bench.', ''] : []),
        `Per connection, decision → phase 3 ms / round trips during it / the longest µs @ when it began, ms after the decision: ${perConn(r.handover)}` +
          `${apart ? `; kept apart: ${perConn(apart)}` : ''}.`, ''] : []));
  } else md.push('Not measured (see errors).', '');
  const h = s.handover;
  md.push('## Handover under load', '',
    `${raw.settings.handoverRounds} rounds × (stitched mid-load, not stitched, stitched before the load) of ${raw.settings.handoverConns} connections sending ${raw.settings.handoverMiB} MiB each way at full speed ` +
    '(test/fixtures/load-client.ts → shell → core → echo-backend.ts), stitched with one `stitch --all` request once each moved 1 MiB each way (mid-load) ' +
    'or while all were idle before the load began (`load-client.ts --wait`: the stitched path\'s own retransmissions, without a handover).', '',
    `- stitched: ${h.ok}/${h.attempted} connections; every transfer byte-exact at C: ${h.exact}`,
    `- decision → phase 3 at the shell (log timestamps, 1 ms resolution): p50 ${f(h.shellP50, 0)} ms, p99 ${f(h.shellP99, 0)} ms, max ${f(h.shellMax, 0)} ms` +
      `${h.neverPhase3 ? ` (${h.neverPhase3} of ${h.stitches} never reached phase 3: the datapath still showed them draining when their connection ended and the request returned; counted at the request's duration, a lower bound)` : ''}; ` +
      `of which decision → installed at the switch (its log): p50 ${f(h.toSwitchP50, 0)} ms, decision → answer seen by the agent: p50 ${f(h.toInstalledP50, 0)} ms`,
    ...(h.idle.n ? [`- idle connections stitched before the load (nothing in the shell to drain), decision → phase 3 at the shell: p50 ${f(h.idle.p50, 0)} ms, p99 ${f(h.idle.p99, 0)} ms over ${h.idle.n}; decision → installed at the switch p50 ${f(h.idle.toSwitchP50, 0)} ms`] : []),
    `- datapath (the switch's pinned stitch_state/stitch_cfg entries, watched every 10 ms until the request returned): of ${h.dp.read} stitches, ${h.dp.program} switched to stitched by the program on a packet ` +
      `(first packet after the commit → stitched: p50 ${f(h.dpP50)} ms, p99 ${f(h.dpP99)} ms, max ${f(h.dpMax)} ms); ${h.dp.forcedIdle} marked stitched by the daemon because no packet came ` +
      `after the drain condition held (FORCE_STITCHED; the program switches on their next packet); ${h.dp.draining} still draining. First packet → drain condition held: p50 ${f(h.dp.toDrainOkP50)} ms.`,
    `- whole \`stitch --all\` request: ${h.callMs.map((x) => f(x, 0)).join(', ')} ms`,
    ...raw.handover.filter((r) => r.error || r.note || r.leftAtShell).map((r) => `- round ${r.round + 1} ${r.fromStart ? 'stitched before the load' : r.stitched ? 'with a stitch' : 'without'}: ` +
      [r.error, r.note, r.leftAtShell && `${r.leftAtShell} connection(s) still at the shell 5 s after the load ended (the shell never learnt they closed)`].filter(Boolean).join('; ')), '',
    '| runs | retransmitted segments C / B | RTOs C / B |', '|---|---|---|',
    `| stitched mid-load (${h.stitchedRuns}) | ${h.retrans.stitched.c} / ${h.retrans.stitched.b} | ${h.rto.stitched.c} / ${h.rto.stitched.b} |`,
    `| same load, no stitch (${h.controlRuns}) | ${h.retrans.control.c} / ${h.retrans.control.b} | ${h.rto.control.c} / ${h.rto.control.b} |`,
    `| same load, stitched before it (${h.fromStartRuns}) | ${h.retrans.fromStart.c} / ${h.retrans.fromStart.b} | ${h.rto.fromStart.c} / ${h.rto.fromStart.b} |`, '');
  const cap = s.capped;
  // The capped runs of one kind against the default ones above.
  const cappedFigures = (c: NonNullable<typeof cap>) => `decision → phase 3 p50 ${f(c.p50, 0)} ms, p99 ${f(c.p99, 0)} ms over ${c.n} stitches (default buffers, above: p50 ${f(h.shellP50, 0)}, p99 ${f(h.shellP99, 0)} ms); ` +
    `datapath drain p99 ${f(c.dpP99, 0)} ms; RTOs ${c.rto}; every transfer byte-exact: ${c.exact}${c.failed ? ` (${c.failed} runs failed)` : ''}. ` +
    `The same load without a stitch took ${f(c.noneMs, 0)} ms (default buffers: ${f(c.noneMsDefault, 0)} ms)`;
  if (cap) md.push(`With the shell host's TCP buffers capped at ${SHELL_BUFFER_CAP >> 10} KiB (the max of net.ipv4.tcp_rmem and tcp_wmem in A, restored after; the same rounds, mid-load and without a stitch): ` +
    `${cappedFigures(cap)}: what the cap costs the shell path here, where every round trip is short. ` +
    'A client far away needs the shell\'s receive buffer to cover its bandwidth-delay product, so the cap is a choice for near clients, not a default.', '');
  const sb = s.socketBuffer;
  if (sb) md.push(`With the shell's own \`--socket-buffer ${SHELL_SOCKET_BUFFER >> 10}k\` instead (SO_RCVBUF and SO_SNDBUF of its two sockets of each connection, which the kernel doubles; the host's sysctls untouched; the load shell restarted with it, and without it after): ` +
    `${cappedFigures(sb)}.`, '');
  const ins = raw.installs;
  md.push('## Stitch installs', '');
  if (ins) {
    md.push(`On a freshly loaded stitch object (not attached), fake tracked flows for ${ins.stitches} stitches (the table size):`, '',
      `- StitchMaps.install, one at a time (2 flow lookups, 3 map writes: the two legs in one batch): ${f(ins.single.perSecond, 0)}/s (p50 ${f(ins.single.p50Us, 1)} µs, p99 ${f(ins.single.p99Us, 1)} µs per install)`,
      `- batched, ${ins.batched.batch} installs per mapUpdateBatch per map: ${f(ins.batched.perSecond, 0)}/s`,
      'perSecond' in ins.control
        ? `- end to end over the control protocol (UDP 127.0.0.1, ${ins.control.inFlight} stitch() calls in flight, ${ins.control.n} stitches in ${ins.control.datagrams ?? '?'} STITCH/STITCH_MANY datagrams, into the same maps, each datagram's installs batched, the daemon's log lines written to /dev/null; measured before the two rows above, while the install code is cold; the agent warmed up first against a switch of its own, as a running shell): ${f(ins.control.perSecond, 0)} installs/s, the median of ${ins.control.rounds?.map((r) => f(r, 0)).join(', ') ?? '?'} after a first round at ${f(ins.control.warmUpPerSecond, 0)}/s, the switch's first burst (all installed, then all removed, per round); removals (one UNSTITCH each) ${f(ins.control.removalsPerSecond, 0)}/s; ${ins.control.retransmissions} retransmissions`
        : `- end to end over the control protocol: failed (${ins.control.error})`,
      `- measured with the control server's rate limit lifted: \`tcp-stitch switch\` keeps its default of ${DEFAULT_RATE_LIMIT.perSecond} requests/s per source address ` +
      `(burst ${DEFAULT_RATE_LIMIT.burst}), so one shell gets at most ten times that many stitches per second (STITCH_MANY) through the CLI switch`, '');
  } else md.push('Not measured (see errors).', '');
  md.push('## The switch daemon at a full table', '');
  if (raw.daemon) {
    const [one, full] = raw.daemon;
    const pcts = (w?: number[]) => (w ? ` (${w.map((x) => f(x * 100, 2)).join(', ')})` : '');
    md.push('A datapath of its own in S (bench/daemon-load.ts, on a veth without traffic), idle stitches of fake tracked legs whose shell holds nothing, ' +
      'installed ten per installMany; each is stitched by rule 9 (docs/handover.md) without a packet. The daemon process\'s CPU (user + system) while all are settled, then with none: the median of five 1-s windows each (all five in brackets)', '',
      '| stitches | installed in | all stitched after | CPU, all settled | CPU, none left |', '|---|---|---|---|---|',
      ...raw.daemon.map((d) => `| ${d.n} | ${f(d.installMs, 0)} ms | ${f(d.allStitchedMs, 0)} ms | ${f(d.settled * 100, 2)} % of a core${pcts(d.settledWindows)} | ${f(d.empty * 100, 2)} %${pcts(d.emptyWindows)} |`), '',
      ...(one && full ? [`A full table against one stitch: ${f(full.settled / one.settled)}x the CPU.`, ''] : []));
  } else md.push('Not measured (see errors).', '');
  if (raw.errors.length) md.push('## Errors', '', ...raw.errors.map((e) => `- ${e}`), '');
  return { md: md.join('\n'), json: { ...raw, summary: { ...s, targets: t } } };
}
