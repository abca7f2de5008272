// The switch's side of one-hop discovery (seed figure 5C): answer a DISCOVER only when the shell is
// one hop away, with the switch's capabilities.
//
// "One hop away" is decided by where the request came from, not by its TTL: Node's dgram cannot read
// a received datagram's IP TTL (no IP_RECVTTL), so the switch cannot check that the agent's TTL-1
// datagram arrived with TTL 1. Instead:
//   1. the switch binds its socket to the shell-facing interface's own address, so only datagrams
//      addressed to that interface reach it; and
//   2. it answers only a source address inside that interface's subnet (from os.networkInterfaces()),
//      i.e. a directly connected neighbour. A datagram from further away was routed, so its source
//      is outside the subnet (unless spoofed, and a spoofed source never sees the reply).
// The agent still sends with TTL 1, so a datagram to a switch that is more than one hop away dies on
// the way (the seed's alternative: "the one hop discovery packet dies after one hop").
import { createHash } from 'node:crypto';
import { hostname, networkInterfaces as osNetworkInterfaces, type NetworkInterfaceInfo } from 'node:os';
import { isIPv4 } from 'node:net';
import { InvalidArgumentError } from '../sdk/errors.ts';
import type { Datapath } from './stitch-types.ts';
import { AUTH_ALGORITHMS, SUPPORTED_VERSIONS, TRANSLATIONS, type SwitchInfo } from './protocol.ts';

export type NetworkInterfacesFn = () => NodeJS.Dict<NetworkInterfaceInfo[]>;

/** The shell-facing interface: its name, its IPv4 address and prefix length. */
export interface ShellInterface { name: string; address: string; prefixLength: number }

function ipToInt(a: string): number {
  const p = a.split('.').map(Number);
  return ((p[0]! << 24) | (p[1]! << 16) | (p[2]! << 8) | p[3]!) >>> 0;
}

function maskBits(netmask: string): number {
  let n = ipToInt(netmask), bits = 0;
  while (n & 0x8000_0000) { bits++; n = (n << 1) >>> 0; }
  return bits;
}

/** Is `address` inside `network`/`prefixLength`? IPv4 only. */
export function inSubnet(address: string, network: string, prefixLength: number): boolean {
  if (!isIPv4(address) || !isIPv4(network)) return false;
  if (prefixLength === 0) return true;
  const mask = prefixLength >= 32 ? 0xffff_ffff : (~((1 << (32 - prefixLength)) - 1)) >>> 0;
  return ((ipToInt(address) & mask) >>> 0) === ((ipToInt(network) & mask) >>> 0);
}

function isV4(i: NetworkInterfaceInfo): boolean {
  return i.family === 'IPv4' || (i.family as unknown) === 4;
}

/**
 * Finds the shell-facing interface by name, by address, or both (they must agree). Throws
 * InvalidArgumentError saying what to pass instead.
 */
export function resolveShellInterface(
  opts: { shellIface?: string; shellAddress?: string; networkInterfaces?: NetworkInterfacesFn },
): ShellInterface {
  const all = (opts.networkInterfaces ?? osNetworkInterfaces)();
  if (opts.shellIface !== undefined) {
    const list = all[opts.shellIface];
    if (!list) throw new InvalidArgumentError(`no interface named ${opts.shellIface}; see 'ip -br addr'`);
    const v4 = list.filter(isV4).filter((i) => opts.shellAddress === undefined || i.address === opts.shellAddress);
    const i = v4[0];
    if (!i) {
      throw new InvalidArgumentError(opts.shellAddress === undefined
        ? `interface ${opts.shellIface} has no IPv4 address; give it one or pick another --shell-iface`
        : `interface ${opts.shellIface} does not hold ${opts.shellAddress}`);
    }
    return { name: opts.shellIface, address: i.address, prefixLength: maskBits(i.netmask) };
  }
  if (opts.shellAddress !== undefined) {
    if (!isIPv4(opts.shellAddress)) throw new InvalidArgumentError(`shellAddress must be an IPv4 address, got ${opts.shellAddress}`);
    for (const [name, list] of Object.entries(all)) {
      const i = list?.filter(isV4).find((x) => x.address === opts.shellAddress);
      if (i) return { name, address: i.address, prefixLength: maskBits(i.netmask) };
    }
    throw new InvalidArgumentError(`no interface holds ${opts.shellAddress}; pass the shell-facing interface's address or shellIface`);
  }
  throw new InvalidArgumentError('give shellIface or shellAddress: the switch answers on the shell-facing interface only');
}

export interface DiscoveryResponderInit {
  shell: ShellInterface;
  datapath: Datapath;
  /** Free slots in the stitch table right now. */
  freeSlots: () => number;
  /** The port the control socket is bound to (known only once it is bound). */
  controlPort: () => number;
  /** 16 hex digits; default: derived from the host name and the shell interface, stable across restarts. */
  switchId?: string;
}

export interface DiscoveryResponder {
  readonly shell: ShellInterface;
  readonly switchId: string;
  /** Is this source a directly connected neighbour on the shell-facing interface? */
  isNeighbour(address: string): boolean;
  /** What a DISCOVER reply says now. */
  info(): SwitchInfo;
}

export function defaultSwitchId(shell: ShellInterface): string {
  return createHash('sha256').update(`${hostname()}|${shell.name}|${shell.address}`).digest('hex').slice(0, 16);
}

export function createDiscoveryResponder(init: DiscoveryResponderInit): DiscoveryResponder {
  const switchId = init.switchId ?? defaultSwitchId(init.shell);
  if (!/^[0-9a-f]{16}$/.test(switchId)) throw new InvalidArgumentError('switchId must be 16 lowercase hex digits');
  const { shell, datapath } = init;
  return {
    shell,
    switchId,
    isNeighbour: (address) => inSubnet(address, shell.address, shell.prefixLength),
    info: () => ({
      switchId,
      controlAddress: shell.address,
      controlPort: init.controlPort(),
      versions: { min: SUPPORTED_VERSIONS.min, max: SUPPORTED_VERSIONS.max },
      translations: TRANSLATIONS.filter((t) => datapath.capabilities.translations.includes(t)),
      authAlgorithms: [...AUTH_ALGORITHMS],
      tableSize: datapath.capabilities.tableSize,
      freeSlots: init.freeSlots(),
    }),
  };
}
