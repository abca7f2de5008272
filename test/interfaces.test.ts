import assert from 'node:assert/strict';
import type os from 'node:os';
import {
  countIngressEgress, decodeProcAddress, lookupRoute, maskToPrefixLen, parseRouteTable,
  type InterfaceSources,
} from '../agent/interfaces.ts';

// A host described as text: what os.networkInterfaces(), /sys/class/net and /proc/net/route say.
interface FakeIf { addrs: [string, number][]; operstate?: string; flags?: string; internal?: boolean }

function fakeHost(ifaces: Record<string, FakeIf>, routeTable: string): InterfaceSources {
  const toMask = (len: number) => {
    const m = len === 0 ? 0 : (~0 << (32 - len)) >>> 0;
    return [m >>> 24, (m >>> 16) & 255, (m >>> 8) & 255, m & 255].join('.');
  };
  return {
    endianness: 'LE',
    networkInterfaces: () => Object.fromEntries(Object.entries(ifaces).map(([name, f]) => [name,
      f.addrs.map(([address, len]): os.NetworkInterfaceInfo => ({
        address, netmask: toMask(len), family: 'IPv4', mac: '02:00:00:00:00:01', internal: f.internal ?? false, cidr: `${address}/${len}`,
      }))])),
    readOperstate: (n) => ifaces[n]?.operstate,
    readFlags: (n) => ifaces[n]?.flags,
    readRouteTable: () => routeTable,
  };
}

const HEADER = 'Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT';
const row = (ifname: string, dest: string, gw: string, flags: string, metric: number, mask: string) =>
  `${ifname}\t${dest}\t${gw}\t${flags}\t0\t0\t${metric}\t${mask}\t0\t0\t0`;
const LO: FakeIf = { addrs: [['127.0.0.1', 8]], operstate: 'unknown', flags: '0x9', internal: true };

// Shell A of the standard topology: to-s 198.18.2.2/24, default via 198.18.2.1.
const STANDARD_ROUTES = [HEADER,
  row('to-s', '00000000', '010212C6', '0003', 0, '00000000'),
  row('to-s', '000212C6', '00000000', '0001', 0, '00FFFFFF')].join('\n');

describe('interfaces - routes', () => {
  it('interfaces - decodes /proc/net/route hex words in host byte order', () => {
    assert.equal(decodeProcAddress('010212C6', 'LE'), '198.18.2.1');
    assert.equal(decodeProcAddress('C6120201', 'BE'), '198.18.2.1');
    assert.equal(decodeProcAddress('00FFFFFF', 'LE'), '255.255.255.0');
    assert.throws(() => decodeProcAddress('xyz', 'LE'), { code: 'TCP_STITCH_INVALID_ARGUMENT' });
  });

  it('interfaces - mask to prefix length, rejecting non-contiguous masks', () => {
    assert.equal(maskToPrefixLen('255.255.255.0'), 24);
    assert.equal(maskToPrefixLen('255.254.0.0'), 15);
    assert.equal(maskToPrefixLen('0.0.0.0'), 0);
    assert.equal(maskToPrefixLen('255.255.255.255'), 32);
    assert.equal(maskToPrefixLen('255.0.255.0'), undefined);
  });

  it('interfaces - parses the default route, its gateway and on-link routes', () => {
    assert.deepEqual(parseRouteTable(STANDARD_ROUTES, 'LE'), [
      { ifname: 'to-s', destination: '0.0.0.0', prefixLen: 0, metric: 0, isDefault: true, flags: 3, gateway: '198.18.2.1' },
      { ifname: 'to-s', destination: '198.18.2.0', prefixLen: 24, metric: 0, isDefault: false, flags: 1 },
    ]);
  });

  it('interfaces - skips routes that are down or reject, and malformed lines', () => {
    const text = [HEADER,
      row('eth0', '00000000', '010212C6', '0002', 0, '00000000'), // not RTF_UP
      row('eth0', '000013C6', '00000000', '0201', 0, '0000FFFF'), // RTF_REJECT (unreachable)
      'eth0\tgarbage',
      row('eth0', '000212C6', '00000000', '0001', 100, '00FFFFFF')].join('\n');
    assert.deepEqual(parseRouteTable(text, 'LE').map((r) => `${r.destination}/${r.prefixLen} m${r.metric}`), ['198.18.2.0/24 m100']);
  });

  it('interfaces - route lookup: longest prefix, then lowest metric; disagreeing equals are ties', () => {
    const routes = parseRouteTable([HEADER,
      row('eth0', '00000000', '010212C6', '0003', 100, '00000000'),
      row('eth0', '00000000', '020212C6', '0003', 50, '00000000'),
      row('eth0', '000312C6', '010212C6', '0003', 0, '00FFFFFF'),
      row('eth0', '000012C6', '00000000', '0001', 0, '0000FEFF')].join('\n'), 'LE');
    assert.equal(lookupRoute(routes, '198.18.3.2').route?.prefixLen, 24);
    assert.equal(lookupRoute(routes, '198.19.0.9').route?.prefixLen, 15);
    assert.equal(lookupRoute(routes, '203.0.113.1').route?.gateway, '198.18.2.2');
    const tied = parseRouteTable([HEADER,
      row('eth0', '00000000', '010212C6', '0003', 0, '00000000'),
      row('eth0', '00000000', '020212C6', '0003', 0, '00000000')].join('\n'), 'LE');
    assert.equal(lookupRoute(tied, '203.0.113.1').ties.length, 1);
    assert.deepEqual(lookupRoute([], '203.0.113.1'), { ties: [] });
  });
});

describe('interfaces - count', () => {
  it('interfaces - one point: usable, with its default gateway', () => {
    const r = countIngressEgress({ sources: fakeHost({ lo: LO, 'to-s': { addrs: [['198.18.2.2', 24]], operstate: 'up', flags: '0x1003' } }, STANDARD_ROUTES) });
    const point = { ifname: 'to-s', address: '198.18.2.2', prefixLen: 24, addresses: ['198.18.2.2/24'], gateway: '198.18.2.1' };
    assert.deepEqual(r.points, [point]);
    assert.deepEqual(r.verdict, { usable: true, point });
    assert.equal(r.routes.length, 2);
  });

  it('interfaces - two points: not usable, several-ingress-egress-points', () => {
    const r = countIngressEgress({ sources: fakeHost({
      lo: LO,
      'to-s': { addrs: [['198.18.2.2', 24]], operstate: 'up' },
      'to-s2': { addrs: [['198.18.5.2', 24]], operstate: 'up' },
    }, STANDARD_ROUTES) });
    assert.equal(r.points.length, 2);
    assert.equal(r.verdict.usable, false);
    assert.ok(!r.verdict.usable && r.verdict.reason === 'several-ingress-egress-points');
    assert.match(!r.verdict.usable ? r.verdict.detail : '', /2 ingress\/egress points \(to-s 198\.18\.2\.2\/24, to-s2 198\.18\.5\.2\/24\)/);
  });

  it('interfaces - two addresses on one interface are one point', () => {
    const r = countIngressEgress({ sources: fakeHost({ 'to-s': { addrs: [['198.18.2.2', 24], ['198.18.6.2', 24]], operstate: 'up' } }, STANDARD_ROUTES) });
    assert.equal(r.verdict.usable, true);
    assert.deepEqual(r.points[0]!.addresses, ['198.18.2.2/24', '198.18.6.2/24']);
  });

  it('interfaces - none: loopback, down links and IPv6-only links do not count', () => {
    const r = countIngressEgress({ sources: fakeHost({
      lo: LO,
      eth0: { addrs: [['198.18.2.2', 24]], operstate: 'down', flags: '0x1002' },
      eth1: { addrs: [], operstate: 'up' },
      dummy0: { addrs: [['198.18.7.1', 24]], operstate: 'unknown', flags: '0x83' }, // UP but not RUNNING
    }, '') });
    assert.deepEqual(r.points, []);
    assert.deepEqual(r.verdict, { usable: false, reason: 'no-ingress-egress-point', detail: 'no interface is up with an IPv4 address (loopback does not count)' });
  });

  it("interfaces - operstate 'unknown' with IFF_UP|IFF_RUNNING counts as up", () => {
    const r = countIngressEgress({ sources: fakeHost({ tun0: { addrs: [['198.18.8.2', 30]], operstate: 'unknown', flags: '0x10d1' } }, '') });
    assert.equal(r.verdict.usable, true);
    assert.equal(r.points[0]!.gateway, undefined);
  });

  it('interfaces - a loopback flag excludes an interface whatever its address', () => {
    const r = countIngressEgress({ sources: fakeHost({ lo2: { addrs: [['198.18.9.1', 32]], operstate: 'unknown', flags: '0x49' } }, '') });
    assert.equal(r.points.length, 0);
  });

  it('interfaces - named interface: chosen among several points', () => {
    const r = countIngressEgress({ iface: 'to-s2', sources: fakeHost({
      'to-s': { addrs: [['198.18.2.2', 24]], operstate: 'up' },
      'to-s2': { addrs: [['198.18.5.2', 24]], operstate: 'up' },
    }, STANDARD_ROUTES) });
    assert.equal(r.points.length, 2);
    assert.ok(r.verdict.usable);
    assert.equal(r.verdict.point.ifname, 'to-s2');
  });

  it('interfaces - named interface missing or unusable', () => {
    const sources = fakeHost({ lo: LO, 'to-s': { addrs: [['198.18.2.2', 24]], operstate: 'up' } }, STANDARD_ROUTES);
    const missing = countIngressEgress({ iface: 'eth9', sources }).verdict;
    assert.ok(!missing.usable && missing.reason === 'named-interface-missing');
    assert.match(missing.detail, /"eth9".*interfaces: lo, to-s/);
    const lo = countIngressEgress({ iface: 'lo', sources }).verdict;
    assert.ok(!lo.usable && lo.reason === 'named-interface-unusable');
    assert.match(lo.detail, /loopback/);
    assert.throws(() => countIngressEgress({ iface: '../etc', sources }), { code: 'TCP_STITCH_INVALID_ARGUMENT' });
  });

  it('interfaces - this host, read for real, gives a well-formed answer', () => {
    const r = countIngressEgress();
    for (const p of r.points) {
      assert.ok(p.ifname && p.address && p.prefixLen >= 0 && p.prefixLen <= 32);
      assert.ok(!p.address.startsWith('127.'));
    }
    assert.equal(r.verdict.usable, r.points.length === 1);
  });
});
