// Ingress/egress count (seed figure 5B, step 542): how many ways in and out of the shell host are
// there? Stitching needs exactly one — the switch must sit on the only path — unless the operator
// names the interface to use.
//
// Sources: os.networkInterfaces() for addresses, /sys/class/net/<if>/{operstate,flags} for link
// state, /proc/net/route for the IPv4 routes out (main table). Every reader can be injected, so
// tests describe a host as plain text instead of needing one.
import fs from 'node:fs';
import os from 'node:os';
import { InvalidArgumentError } from '../sdk/errors.ts';

/** One way in and out of the shell host: an up, non-loopback interface with an IPv4 address. */
export interface IngressEgressPoint {
  ifname: string;
  /** The interface's first IPv4 address. */
  address: string;
  prefixLen: number;
  /** Every IPv4 address on the interface, as `address/prefixLen`. */
  addresses: string[];
  /** Gateway of the default route leaving by this interface, if there is one. */
  gateway?: string;
}

/** One IPv4 route of the main table, decoded from /proc/net/route. */
export interface Route {
  ifname: string;
  destination: string;
  prefixLen: number;
  /** Next router; absent when the destination is on-link. */
  gateway?: string;
  metric: number;
  isDefault: boolean;
  /** RTF_* flags as the kernel reports them. */
  flags: number;
}

export type IngressEgressReason =
  | 'no-ingress-egress-point'
  | 'several-ingress-egress-points'
  | 'named-interface-missing'
  | 'named-interface-unusable';

export type IngressEgressVerdict =
  | { usable: true; point: IngressEgressPoint }
  | { usable: false; reason: IngressEgressReason; detail: string };

export interface IngressEgressCount {
  points: IngressEgressPoint[];
  routes: Route[];
  verdict: IngressEgressVerdict;
}

/** Readers of the host's state; each defaults to the real source. */
export interface InterfaceSources {
  networkInterfaces?: () => NodeJS.Dict<os.NetworkInterfaceInfo[]>;
  /** Contents of /sys/class/net/<ifname>/operstate, or undefined when unreadable. */
  readOperstate?: (ifname: string) => string | undefined;
  /** Contents of /sys/class/net/<ifname>/flags (e.g. "0x1003"), or undefined when unreadable. */
  readFlags?: (ifname: string) => string | undefined;
  /** Contents of /proc/net/route, or undefined when unreadable. */
  readRouteTable?: () => string | undefined;
  /** Byte order of this host, which /proc/net/route's hex words follow. */
  endianness?: 'LE' | 'BE';
}

export interface CountIngressEgressOptions {
  /** The operator names the interface to use: the count then only checks that one. */
  iface?: string;
  sources?: InterfaceSources;
}

// <linux/if.h>
const IFF_UP = 0x1;
const IFF_LOOPBACK = 0x8;
const IFF_RUNNING = 0x40;
// <linux/route.h>
const RTF_UP = 0x1;
const RTF_GATEWAY = 0x2;
const RTF_REJECT = 0x200;

function readSmallFile(path: string): string | undefined {
  try {
    return fs.readFileSync(path, 'utf8');
  } catch {
    return undefined;
  }
}

const realSources: Required<InterfaceSources> = {
  networkInterfaces: () => os.networkInterfaces(),
  readOperstate: (ifname) => readSmallFile(`/sys/class/net/${ifname}/operstate`),
  readFlags: (ifname) => readSmallFile(`/sys/class/net/${ifname}/flags`),
  readRouteTable: () => readSmallFile('/proc/net/route'),
  endianness: os.endianness(),
};

/** Decodes one 32-bit hex word of /proc/net/route (the kernel prints the raw network-order word). */
export function decodeProcAddress(hex: string, endianness: 'LE' | 'BE' = os.endianness()): string {
  if (!/^[0-9a-fA-F]{8}$/.test(hex)) throw new InvalidArgumentError(`not a /proc/net/route address word: "${hex}"`);
  const word = Number.parseInt(hex, 16) >>> 0;
  const octets = [word >>> 24, (word >>> 16) & 0xff, (word >>> 8) & 0xff, word & 0xff];
  if (endianness === 'LE') octets.reverse();
  return octets.join('.');
}

/** Number of leading one bits of a dotted netmask; undefined when the mask is not contiguous. */
export function maskToPrefixLen(mask: string): number | undefined {
  const n = ipv4ToInt(mask);
  if (n === undefined) return undefined;
  const inverted = ~n >>> 0;
  if ((inverted & (inverted + 1)) !== 0) return undefined; // ones must be contiguous from the top
  return 32 - Math.log2(inverted + 1);
}

/** Parses /proc/net/route into routes that are up and not reject routes. Malformed lines are skipped. */
export function parseRouteTable(text: string, endianness: 'LE' | 'BE' = os.endianness()): Route[] {
  const routes: Route[] = [];
  const lines = text.split('\n');
  const header = (lines[0] ?? '').trim().split(/\s+/);
  const col = (name: string, fallback: number) => {
    const i = header.indexOf(name);
    return i >= 0 ? i : fallback;
  };
  const iIface = col('Iface', 0), iDest = col('Destination', 1), iGw = col('Gateway', 2);
  const iFlags = col('Flags', 3), iMetric = col('Metric', 6), iMask = col('Mask', 7);
  for (const line of lines.slice(1)) {
    const f = line.trim().split(/\s+/);
    if (f.length < 8) continue;
    const flags = Number.parseInt(f[iFlags]!, 16);
    if (!Number.isFinite(flags) || !(flags & RTF_UP) || (flags & RTF_REJECT)) continue;
    let destination: string, gatewayWord: string, mask: string;
    try {
      destination = decodeProcAddress(f[iDest]!, endianness);
      gatewayWord = decodeProcAddress(f[iGw]!, endianness);
      mask = decodeProcAddress(f[iMask]!, endianness);
    } catch {
      continue;
    }
    const prefixLen = maskToPrefixLen(mask);
    if (prefixLen === undefined) continue;
    const route: Route = {
      ifname: f[iIface]!,
      destination,
      prefixLen,
      metric: Number.parseInt(f[iMetric]!, 10) || 0,
      isDefault: prefixLen === 0,
      flags,
    };
    if ((flags & RTF_GATEWAY) && gatewayWord !== '0.0.0.0') route.gateway = gatewayWord;
    routes.push(route);
  }
  return routes;
}

export function ipv4ToInt(address: string): number | undefined {
  const m = /^(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})$/.exec(address);
  if (!m) return undefined;
  let n = 0;
  for (let i = 1; i <= 4; i++) {
    const octet = Number(m[i]);
    if (octet > 255) return undefined;
    n = n * 256 + octet;
  }
  return n >>> 0;
}

/** True when `address` lies inside `network/prefixLen`. */
export function inPrefix(address: string, network: string, prefixLen: number): boolean {
  const a = ipv4ToInt(address), n = ipv4ToInt(network);
  if (a === undefined || n === undefined) return false;
  if (prefixLen === 0) return true;
  const mask = (~0 << (32 - prefixLen)) >>> 0;
  return ((a & mask) >>> 0) === ((n & mask) >>> 0);
}

/** Whether the link is up: operstate "up", or "unknown" (virtual links) with IFF_UP|IFF_RUNNING. */
function linkIsUp(ifname: string, src: Required<InterfaceSources>): { up: boolean; loopback: boolean } {
  const flagsText = src.readFlags(ifname)?.trim();
  const flags = flagsText !== undefined ? Number.parseInt(flagsText, 16) : undefined;
  const knownFlags = flags !== undefined && Number.isFinite(flags) ? flags : undefined;
  const loopback = knownFlags !== undefined && (knownFlags & IFF_LOOPBACK) !== 0;
  const operstate = src.readOperstate(ifname)?.trim().toLowerCase();
  if (operstate === 'up') return { up: true, loopback };
  if (operstate === 'unknown' || operstate === undefined) {
    // No sysfs at all: libuv lists only interfaces that are IFF_UP and IFF_RUNNING, so trust it.
    if (knownFlags === undefined) return { up: true, loopback };
    return { up: (knownFlags & (IFF_UP | IFF_RUNNING)) === (IFF_UP | IFF_RUNNING), loopback };
  }
  return { up: false, loopback };
}

/**
 * Counts the shell host's ingress/egress points and reads its routes out. More than one point
 * means stitching is not available (the switch could not see every packet) unless `iface` names
 * the one to use.
 */
export function countIngressEgress(opts: CountIngressEgressOptions = {}): IngressEgressCount {
  if (opts.iface !== undefined && (typeof opts.iface !== 'string' || opts.iface === '' || opts.iface.includes('/')))
    throw new InvalidArgumentError(`iface must be an interface name such as "eth0", got ${JSON.stringify(opts.iface)}`);
  const src: Required<InterfaceSources> = { ...realSources, ...opts.sources };
  const routes = parseRouteTable(src.readRouteTable() ?? '', src.endianness);
  const ifaces = src.networkInterfaces();

  const candidates: { ifname: string; point?: IngressEgressPoint; why?: string }[] = [];
  for (const ifname of Object.keys(ifaces).sort()) {
    const v4 = (ifaces[ifname] ?? []).filter((a) => a.family === 'IPv4');
    const link = linkIsUp(ifname, src);
    const loopback = link.loopback || v4.some((a) => a.internal) || (v4.length > 0 && v4.every((a) => a.address.startsWith('127.')));
    if (loopback) { candidates.push({ ifname, why: 'is the loopback interface' }); continue; }
    if (!link.up) { candidates.push({ ifname, why: 'is not up' }); continue; }
    if (v4.length === 0) { candidates.push({ ifname, why: 'has no IPv4 address' }); continue; }
    const first = v4[0]!;
    const prefixLen = prefixOf(first);
    const point: IngressEgressPoint = {
      ifname,
      address: first.address,
      prefixLen,
      addresses: v4.map((a) => `${a.address}/${prefixOf(a)}`),
    };
    const gateway = routes
      .filter((r) => r.ifname === ifname && r.isDefault && r.gateway)
      .sort((x, y) => x.metric - y.metric)[0]?.gateway;
    if (gateway) point.gateway = gateway;
    candidates.push({ ifname, point });
  }
  const points = candidates.flatMap((c) => (c.point ? [c.point] : []));

  let verdict: IngressEgressVerdict;
  if (opts.iface !== undefined) {
    const named = candidates.find((c) => c.ifname === opts.iface);
    if (!named) {
      verdict = {
        usable: false,
        reason: 'named-interface-missing',
        detail: `interface "${opts.iface}" has no address on this host (interfaces: ${Object.keys(ifaces).sort().join(', ') || 'none'}); name an existing interface`,
      };
    } else if (!named.point) {
      verdict = { usable: false, reason: 'named-interface-unusable', detail: `interface "${opts.iface}" ${named.why}` };
    } else {
      verdict = { usable: true, point: named.point };
    }
  } else if (points.length === 1) {
    verdict = { usable: true, point: points[0]! };
  } else if (points.length === 0) {
    verdict = {
      usable: false,
      reason: 'no-ingress-egress-point',
      detail: 'no interface is up with an IPv4 address (loopback does not count)',
    };
  } else {
    verdict = {
      usable: false,
      reason: 'several-ingress-egress-points',
      detail: `${points.length} ingress/egress points (${points.map((p) => `${p.ifname} ${p.address}/${p.prefixLen}`).join(', ')}); ` +
        'a switch one hop away cannot see every packet — name the interface to use if the others do not carry stitched traffic',
    };
  }
  return { points, routes, verdict };
}

function prefixOf(info: os.NetworkInterfaceInfo): number {
  if (info.cidr) {
    const n = Number(info.cidr.split('/')[1]);
    if (Number.isInteger(n)) return n;
  }
  return maskToPrefixLen(info.netmask) ?? 32;
}

/**
 * The best route for `address`: longest prefix, then lowest metric. `ties` holds the other routes
 * of equal prefix and metric that disagree (another gateway or interface), which makes the choice
 * unclear.
 */
export function lookupRoute(routes: readonly Route[], address: string): { route?: Route; ties: Route[] } {
  let best: Route | undefined;
  let ties: Route[] = [];
  for (const r of routes) {
    if (!inPrefix(address, r.destination, r.prefixLen)) continue;
    if (!best || r.prefixLen > best.prefixLen || (r.prefixLen === best.prefixLen && r.metric < best.metric)) {
      best = r;
      ties = [];
    } else if (r.prefixLen === best.prefixLen && r.metric === best.metric &&
      (r.gateway !== best.gateway || r.ifname !== best.ifname)) {
      ties.push(r);
    }
  }
  return best ? { route: best, ties } : { ties };
}
