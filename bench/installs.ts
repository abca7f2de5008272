// Stitch installs per second, on a freshly loaded stitch object (switch/bpf/stitch.bpf.o pinned in
// the topology's bpffs, not attached anywhere), with fake tracked flows in its `flows` map (both
// handshakes seen) for 4096 stitches (the table size):
//  - single:  StitchMaps.install, as the switch daemon does it: two flow lookups, the translation,
//             three map writes (state, both legs in one batch, commit entry), one bpf(2) call each;
//  - batched: StitchMaps.installMany, 256 installs at a time: one mapUpdateBatch per map (state,
//             legs, commit entries, in that order, so the commit-key pattern holds per batch);
//  - control protocol: stitch() calls over UDP on 127.0.0.1 (HMAC-authenticated, 256 in flight: as
//             many as the agent has in flight for `stitch --all`; the client sends the calls of one
//             event-loop turn as STITCH_MANY, ten per datagram) from the agent's control client (in
//             a process of its own, bench/control-load.ts) to the switch's control server here,
//             whose datapath installs each datagram's stitches with StitchMaps.installMany into the
//             same maps. Measured first, before this process has run the install code. The agent
//             warms up against a switch of its own, as a shell that has been running; then a first
//             round (all installed, all removed: a switch's first burst after it started), then
//             three more, whose median is the rate.
import winston from 'winston';
import { execFile } from 'node:child_process';
import { createWriteStream } from 'node:fs';
import { promisify } from 'node:util';
import { FLOW_DIR_SIZE, FLOW_SYN, FLOW_VAL_SIZE, MAX_STITCHES, encodeFlowKey, u32Key } from '../switch/bpf/layout.ts';
import { logFormat } from '../sdk/log.ts';
import { createSwitchControl } from '../switch/control-server.ts';
import { StitchMaps, clientLegKey, coreLegKey, openStitchObject } from '../switch/datapath.ts';
import { ALL_TRANSLATIONS, generateKey, type Datapath, type StitchLegs, type StitchSpec } from '../switch/index.ts';
import * as native from '../switch/native/index.ts';
import { nodeCommand, type Host } from '../test/hosts.ts';
import { quantile } from './bed.ts';

const run = promisify(execFile);

export interface InstallRates {
  stitches: number;
  single: { perSecond: number; p50Us: number; p99Us: number; rounds: number };
  batched: { perSecond: number; batch: number; rounds: number };
  control: {
    perSecond: number; removalsPerSecond: number; rounds: number[]; warmUpPerSecond: number;
    inFlight: number; n: number; retransmissions: number; datagrams: number;
  } | { error: string };
}

/** The legs of stitch i (bench/control-load.ts sends the same). */
export function legs(i: number, shell: string): StitchLegs {
  return {
    clientLeg: { client: { address: '198.18.1.2', port: 10000 + i }, shell: { address: shell, port: 8080 } },
    coreLeg: { shell: { address: shell, port: 20000 + i }, core: { address: '198.18.3.2', port: 9000 } },
    clientOffset: 0n, corePreambleLength: 64, shellOffset: 0n, coreAnswerLength: 8,
  };
}

/** A `flows` entry saying both handshakes of the leg were seen (all the install checks), and that
 *  the far end sent up to seqHi and acknowledged up to ackHi. */
export function trackedFlow(seqHi = 0, ackHi = 0): Buffer {
  const v = Buffer.alloc(FLOW_VAL_SIZE);
  v[45] = FLOW_SYN; // dir[0].flags (the shell's direction)
  v[FLOW_DIR_SIZE + 45] = FLOW_SYN; // dir[1].flags (the far end's)
  v.writeUInt32LE(seqHi, FLOW_DIR_SIZE + 4); // dir[1].seq_hi
  v.writeUInt32LE(ackHi, FLOW_DIR_SIZE + 8); // dir[1].ack_hi
  return v;
}

function deleteAll(fds: Record<'legs' | 'stitch_cfg' | 'stitch_state', number>, specs: StitchSpec[]): void {
  for (const s of specs) {
    native.mapDelete(fds.stitch_cfg, u32Key(s.id));
    native.mapDelete(fds.legs, encodeFlowKey(clientLegKey(s)));
    native.mapDelete(fds.legs, encodeFlowKey(coreLegKey(s)));
    native.mapDelete(fds.stitch_state, u32Key(s.id));
  }
}

export async function measureInstalls(bpffs: string, rounds = 5): Promise<InstallRates> {
  const obj = await openStitchObject({ bpffs });
  try {
    const maps = new StitchMaps(obj.maps);
    const n = MAX_STITCHES;
    const flow = trackedFlow();
    const specs: StitchSpec[] = [];
    for (let i = 0; i < n; i++) {
      for (const shell of ['198.18.2.2', '127.0.0.1']) {
        const s = { id: i + 1, ...legs(i, shell) };
        native.mapUpdate(obj.maps.flows, encodeFlowKey(clientLegKey(s)), flow);
        native.mapUpdate(obj.maps.flows, encodeFlowKey(coreLegKey(s)), flow);
        if (shell !== '127.0.0.1') specs.push(s);
      }
    }

    // First, while this process has not run the install code yet: a switch that just started.
    let control: InstallRates['control'];
    try {
      control = await throughControl(maps);
    } catch (e) {
      control = { error: (e as Error).message };
    }

    // Single installs, one bpf(2) call per map update.
    for (const s of specs.slice(0, 512)) maps.install(s, { drain: true }); // warm-up
    deleteAll(obj.maps, specs.slice(0, 512));
    const lat: number[] = [];
    let ns = 0;
    for (let r = 0; r < rounds; r++) {
      for (const s of specs) {
        const t = process.hrtime.bigint();
        maps.install(s, { drain: true });
        const d = Number(process.hrtime.bigint() - t);
        ns += d;
        lat.push(d / 1e3);
      }
      deleteAll(obj.maps, specs);
    }
    const single = { perSecond: (rounds * n) / (ns / 1e9), p50Us: quantile(lat, 0.5), p99Us: quantile(lat, 0.99), rounds };

    // Batched: StitchMaps.installMany (a STITCH_MANY's path) on chunks of B: lookups and translation
    // per stitch, then one batch call per map.
    const B = 256;
    const batchOnce = (chunk: StitchSpec[]) => {
      const failed = maps.installMany(chunk, { drain: true }).find((r) => r instanceof Error);
      if (failed) throw failed;
    };
    batchOnce(specs.slice(0, B));
    deleteAll(obj.maps, specs.slice(0, B));
    let bns = 0;
    for (let r = 0; r < rounds; r++) {
      for (let i = 0; i < n; i += B) {
        const t = process.hrtime.bigint();
        batchOnce(specs.slice(i, i + B));
        bns += Number(process.hrtime.bigint() - t);
      }
      deleteAll(obj.maps, specs);
    }
    const batched = { perSecond: (rounds * n) / (bns / 1e9), batch: B, rounds };

    return { stitches: n, single, batched, control };
  } finally {
    await obj.close();
  }
}

async function throughControl(maps: StitchMaps): Promise<InstallRates['control']> {
  const installed = new Map<number, ReturnType<StitchMaps['install']>>();
  const datapath: Datapath = {
    capabilities: { translations: [...ALL_TRANSLATIONS], tableSize: MAX_STITCHES },
    async install(spec) { installed.set(spec.id, maps.install(spec, { drain: true })); },
    async installMany(specs) {
      return maps.installMany(specs, { drain: true }).map((r) => {
        if (r instanceof Error) return r;
        installed.set(r.spec.id, r);
        return undefined;
      });
    },
    async remove(id) { const i = installed.get(id); if (i) { maps.remove(i); installed.delete(id); } },
    status(id) {
      return installed.has(id) ? { id, state: 'draining', packetsClientToCore: 0, packetsCoreToClient: 0, bytesClientToCore: 0, bytesCoreToClient: 0, shellPacketsDropped: 0 } : undefined;
    },
    onStateChange() { /* no traffic: no state changes */ },
    async close() { /* the maps are the caller's */ },
  };
  const key = generateKey();
  // The daemon's own log lines (sdk/log.ts: JSON at info), written to /dev/null: part of its cost.
  const devNull = createWriteStream('/dev/null');
  const daemonLog = winston.createLogger({ level: 'info', format: logFormat(), transports: [new winston.transports.Stream({ stream: devNull })] });
  const sw = createSwitchControl({
    shellAddress: '127.0.0.1', keys: [key], datapath, port: 0, logger: daemonLog,
    rateLimit: { perSecond: 1_000_000, burst: 1_000_000 },
  });
  const { port } = await sw.start();
  // The agent's side runs in a process of its own (bench/control-load.ts), as it does deployed.
  const n = MAX_STITCHES - 96, inFlight = 256;
  try {
    const [cmd, args] = nodeCommand('bench/control-load.ts', [String(port), String(key.id), key.secret.toString('hex'), String(n), String(inFlight)]);
    const r = await run(cmd, args, { timeout: 120_000 });
    return JSON.parse(r.stdout.trim().split('\n').at(-1)!) as InstallRates['control'];
  } finally {
    await sw.close();
    devNull.end();
    for (const i of installed.values()) maps.remove(i);
  }
}

/** The switch daemon's CPU share with `n` idle stitches, all settled, and with none (bench/daemon-load.ts). */
export interface DaemonLoad {
  n: number; installMs: number; allStitchedMs: number;
  /** CPU share, the median of five windows (each window's share in the arrays). */
  settled: number; empty: number; settledWindows?: number[]; emptyWindows?: number[];
}

/**
 * bench/daemon-load.ts in S, once with one stitch and once with a full table, each in a fresh
 * process, on a veth pair of its own (no traffic; removed after).
 */
export async function measureDaemon(s: Host, bpffs: string, seconds = 1): Promise<DaemonLoad[]> {
  const [iface, addr] = ['pb0', '198.18.250.1'];
  await s.runOk('ip', ['link', 'add', iface, 'type', 'veth', 'peer', 'name', 'pb1']);
  try {
    await s.runOk('ip', ['addr', 'add', `${addr}/24`, 'dev', iface]);
    await s.runOk('ip', ['link', 'set', iface, 'up']);
    const out: DaemonLoad[] = [];
    for (const n of [1, MAX_STITCHES]) {
      const r = await s.runOk(...nodeCommand('bench/daemon-load.ts', [bpffs, iface, addr, String(n), String(seconds)]), { timeoutMs: 120_000 });
      out.push(JSON.parse(r.stdout.trim().split('\n').at(-1)!) as DaemonLoad);
    }
    return out;
  } finally {
    await s.run('ip', ['link', 'del', iface]);
  }
}
