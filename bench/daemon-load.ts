// The switch daemon's own CPU with a table of idle stitches, in a process of its own inside S: an
// eBPF datapath attached to IFACE alone (a veth of its own with SHELL_ADDR, no traffic), N stitches of fake tracked legs
// whose shell holds nothing, installed ten per installMany (as STITCH_MANYs arrive). Every one is
// stitched by rule 9 (docs/handover.md) without a packet; then the process's CPU in five windows of
// SECONDS with all N settled, then five with none: each figure is the median window, as a GC after
// the burst (or any other tenant of these vCPUs) can triple one window. Prints one JSON line.
//   node --import tsx bench/daemon-load.ts BPFFS IFACE SHELL_ADDR N SECONDS
import { join } from 'node:path';
import { encodeFlowKey } from '../switch/bpf/layout.ts';
import { clientLegKey, coreLegKey, createEbpfDatapath, persistentPinName } from '../switch/datapath.ts';
import * as native from '../switch/native/index.ts';
import { median } from './bed.ts';
import { legs, trackedFlow } from './installs.ts';

const [bpffs, iface, shell, nArg, secondsArg] = process.argv.slice(2) as [string, string, string, string, string];
const n = Number(nArg), ms = Number(secondsArg) * 1000;

const dp = await createEbpfDatapath({ shellIface: iface, ifaces: [iface], bpffs });
const flows = native.objGet(join(bpffs, persistentPinName(iface), 'maps', 'flows'));
// Both handshakes seen, and the shell holds nothing: C handed it 1000 bytes, which B acknowledged
// (+64, the preamble); B handed it 2000, which C acknowledged (-8, the answer).
const specs = Array.from({ length: n }, (_, i) => ({ id: i + 1, ...legs(i, shell) }));
for (const s of specs) {
  native.mapUpdate(flows, encodeFlowKey(clientLegKey(s)), trackedFlow(1000, 1992));
  native.mapUpdate(flows, encodeFlowKey(coreLegKey(s)), trackedFlow(2000, 1064));
}

const keepAlive = setInterval(() => undefined, 1000); // the datapath's timers are unref'd
const stitched = new Set<number>();
const all = new Promise<void>((res) => dp.onStateChange((s) => { if (s.state === 'stitched' && stitched.add(s.id).size === n) res(); }));
const t0 = performance.now();
for (let i = 0; i < n; i += 10) {
  const failed = (await dp.installMany!(specs.slice(i, i + 10))).find((r) => r);
  if (failed) throw failed;
}
const installMs = performance.now() - t0;
await all;
const allStitchedMs = performance.now() - t0;
/** CPU seconds per second of this process over ms. */
const cpuShare = async () => {
  const c = process.cpuUsage(), t = performance.now();
  await new Promise((r) => setTimeout(r, ms));
  const d = process.cpuUsage(c);
  return (d.user + d.system) / 1e3 / (performance.now() - t);
};
const windows = async () => { const w: number[] = []; for (let i = 0; i < 5; i++) w.push(await cpuShare()); return w; };
const settledWindows = await windows();
for (const s of specs) await dp.remove(s.id);
const emptyWindows = await windows();
clearInterval(keepAlive);
await dp.close();
native.closeFd(flows);
process.stdout.write(JSON.stringify({ n, installMs, allStitchedMs, settled: median(settledWindows), empty: median(emptyWindows), settledWindows, emptyWindows }) + '\n');
