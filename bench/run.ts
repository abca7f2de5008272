// `npm run bench`: every figure measured side by side in one run on the namespace hosts, reported as
// ratios against the routed baseline measured in the same run (these machines are noisy). Modes are
// interleaved round by round so that drift hits them alike. Writes bench/out/report.{md,json}.
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { createTopology, nodeInNs, nodeCommand, PROJECT_ROOT, type Host, type Topology } from '../test/hosts.ts';

const ROUNDS = Number(process.env.BENCH_ROUNDS ?? 3);
const SECONDS = Number(process.env.BENCH_SECONDS ?? 4);
const out = join(PROJECT_ROOT, 'bench/out');
const say = (s: string) => process.stderr.write(s + '\n');

interface Throughput { gbps: number; retransmits: number; bytes: number }

async function iperf(c: Host, host: string, port: number, reverse: boolean): Promise<Throughput> {
  const r = await c.runOk('iperf3', ['-c', host, '-p', String(port), '-t', String(SECONDS), '-J', ...(reverse ? ['-R'] : [])], { timeoutMs: (SECONDS + 30) * 1000 });
  const j = JSON.parse(r.stdout);
  return { gbps: j.end.sum_received.bits_per_second / 1e9, retransmits: j.end.sum_sent.retransmits ?? 0, bytes: j.end.sum_received.bytes };
}

function cpuSeconds(pid: number): number {
  const f = readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1].split(' ');
  return (Number(f[11]) + Number(f[12])) / 100; // utime + stime, in clock ticks of 1/100 s
}

async function rtt(c: Host, host: string, port: number): Promise<{ p50Us: number; p99Us: number }> {
  const [cmd, args] = nodeCommand('test/fixtures/rtt.ts', ['client', host, String(port), '3000']);
  return JSON.parse((await c.runOk(cmd, args, { timeoutMs: 60000 })).stdout.trim());
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];

let topo: Topology | undefined;
try {
  topo = await createTopology();
  const { a, b, c } = topo;
  b.spawn('iperf3', ['-s', '-p', '5201'], { stdio: 'ignore' });
  nodeInNs(b, 'test/fixtures/rtt.ts', ['server', '0.0.0.0', '7000'], { stdio: 'ignore' });
  const cli = (h: Host, args: string[]) => nodeInNs(h, 'bin/tcp-stitch.js', args, { stdio: ['ignore', 'ignore', 'ignore'] });
  cli(b, ['core', '--listen', `${b.addr}:9000`, '--forward', '127.0.0.1:5201']);
  cli(b, ['core', '--listen', `${b.addr}:9001`, '--forward', '127.0.0.1:7000']);
  const shell = cli(a, ['shell', '--listen', `${a.addr}:8080`, '--core', `${b.addr}:9000`, '--switch', 'off', '--control', `/run/${topo.id}-bench1.sock`]);
  cli(a, ['shell', '--listen', `${a.addr}:8081`, '--core', `${b.addr}:9001`, '--switch', 'off', '--control', `/run/${topo.id}-bench2.sock`]);
  const cfg = join('/run', `${topo.id}-haproxy.cfg`);
  writeFileSync(cfg, `global\n  maxconn 1000\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\nlisten relay\n  bind ${a.addr}:8090\n  server core ${b.addr}:5201\n`);
  a.spawn('haproxy', ['-f', cfg, '-db'], { stdio: 'ignore' });
  await Promise.all([b.waitForListen(5201), b.waitForListen(7000), b.waitForListen(9000), b.waitForListen(9001), a.waitForListen(8080), a.waitForListen(8081), a.waitForListen(8090)]);

  const modes: Record<string, { host: string; port: number }> = {
    routed: { host: b.addr, port: 5201 },
    'shell relay': { host: a.addr, port: 8080 },
    haproxy: { host: a.addr, port: 8090 },
  };
  const results: Record<string, { c2b: Throughput[]; b2c: Throughput[] }> = {};
  let shellCpu = 0, shellBytes = 0;
  for (let round = 0; round < ROUNDS; round++) {
    for (const [name, m] of Object.entries(modes)) {
      const r = (results[name] ??= { c2b: [], b2c: [] });
      for (const reverse of [false, true]) {
        const cpu0 = name === 'shell relay' ? cpuSeconds(shell.pid!) : 0;
        const t = await iperf(c, m.host, m.port, reverse);
        if (name === 'shell relay') { shellCpu += cpuSeconds(shell.pid!) - cpu0; shellBytes += t.bytes; }
        (reverse ? r.b2c : r.c2b).push(t);
        say(`round ${round + 1}/${ROUNDS} ${name.padEnd(12)} ${reverse ? 'B->C' : 'C->B'} ${t.gbps.toFixed(2)} Gbit/s, ${t.retransmits} retransmits`);
      }
    }
  }
  const rttRouted = await rtt(c, b.addr, 7000);
  const rttRelay = await rtt(c, a.addr, 8081);
  const base = { c2b: median(results.routed.c2b.map((t) => t.gbps)), b2c: median(results.routed.b2c.map((t) => t.gbps)) };
  const table = Object.entries(results).map(([name, r]) => {
    const c2b = median(r.c2b.map((t) => t.gbps)), b2c = median(r.b2c.map((t) => t.gbps));
    return { mode: name, c2bGbps: c2b, b2cGbps: b2c, c2bRatio: c2b / base.c2b, b2cRatio: b2c / base.b2c,
      retransmitsC2B: median(r.c2b.map((t) => t.retransmits)), retransmitsB2C: median(r.b2c.map((t) => t.retransmits)) };
  });
  const report = {
    when: new Date().toISOString(), rounds: ROUNDS, secondsPerRun: SECONDS, kernel: readFileSync('/proc/sys/kernel/osrelease', 'utf8').trim(),
    throughput: table,
    shellCpuSecondsPerGiB: { phase2: shellCpu / (shellBytes / 2 ** 30), phase3: null as number | null },
    rtt: { routed: rttRouted, shellRelay: rttRelay, stitched: null as null | { p50Us: number; p99Us: number } },
    notMeasured: ['stitched throughput, phase-3 shell CPU, stitched RTT, handover time and retransmissions, stitch installs/s: the eBPF stitch is not wired end to end yet (issue 4)'],
  };
  mkdirSync(out, { recursive: true });
  writeFileSync(join(out, 'report.json'), JSON.stringify(report, null, 2) + '\n');
  const md = [
    `# tcp-stitch bench (${report.when}, kernel ${report.kernel})`, '',
    `${ROUNDS} interleaved rounds of ${SECONDS} s iperf3 runs per mode and direction; medians; ratios against the routed path of the same run.`, '',
    '| mode | C→B Gbit/s | ratio | B→C Gbit/s | ratio | retransmits C→B / B→C (median, sender) |', '|---|---|---|---|---|---|',
    ...table.map((t) => `| ${t.mode} | ${t.c2bGbps.toFixed(2)} | ${t.c2bRatio.toFixed(2)} | ${t.b2cGbps.toFixed(2)} | ${t.b2cRatio.toFixed(2)} | ${t.retransmitsC2B} / ${t.retransmitsB2C} |`),
    '', `Shell CPU seconds per GiB relayed, phase 2: ${report.shellCpuSecondsPerGiB.phase2.toFixed(3)}`, '',
    `TCP round trip (1-byte ping-pong, 3000 samples): routed p50 ${rttRouted.p50Us} µs / p99 ${rttRouted.p99Us} µs; through the shell p50 ${rttRelay.p50Us} µs / p99 ${rttRelay.p99Us} µs (p50 ratio ${(rttRelay.p50Us / rttRouted.p50Us).toFixed(2)}).`, '',
    `Not measured in this run: ${report.notMeasured.join('; ')}.`, '',
  ].join('\n');
  writeFileSync(join(out, 'report.md'), md);
  process.stdout.write(md);
} finally {
  await topo?.destroy();
}
