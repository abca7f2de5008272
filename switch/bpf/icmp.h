/* ICMP errors about a stitched flow. A "destination unreachable" (fragmentation needed included) or
 * "time exceeded" that a host or router beyond S sends about a packet S translated is addressed to
 * A, and its quoted header shows the translated flow (A:v1 -> B:v2, or A:p2 -> C:p1). Left alone it
 * would reach the shell, whose socket is not the sender. Translated back, it reaches the far end
 * that really sent the packet, quoting that end's own flow and sequence number, from A's address
 * (the end believes it talks to A). Frag-needed keeps its MTU: the bottleneck is on the path. In
 * combined mode the sender can be this host (B's core leg): the error then goes up its own stack. */
#ifndef STITCH_ICMP_H
#define STITCH_ICMP_H

#include "translate.h"

#define ICMP_QUOTE 36  /* ICMP header 8 + quoted IP header 20 + first 8 bytes of TCP */

__attribute__((noinline)) int stitch_icmp(struct __sk_buff *skb)
{
	struct scratch *scr = get_scratch();
	struct global_cfg *g = get_cfg();
	struct flow_key key = {};
	struct leg_val *leg;
	struct stitch_cfg *sc;
	struct stitch_state *st;
	struct iphdr oip;
	__u32 l4, id, o, s, seq, phase, daddr, saddr;
	__u8 *q, *nq;
	__s64 diff, isum;
	__u16 icsum;

	if (!skb || !scr || !g)
		return TC_ACT_OK;
	if (bpf_skb_load_bytes(skb, ETH_HLEN, &oip, sizeof(oip)) || oip.ihl != 5)
		return TC_ACT_OK;
	l4 = ETH_HLEN + 20;
	if (bpf_skb_load_bytes(skb, l4, scr->old_hdr, ICMP_QUOTE))
		return TC_ACT_OK;
	q = scr->old_hdr;
	if (q[0] != ICMP_DEST_UNREACH && q[0] != ICMP_TIME_EXCEEDED)
		return TC_ACT_OK;
	/* the quoted packet: IPv4 without options, TCP, from the shell to a far end */
	if (q[8] != 0x45 || q[8 + 9] != IPPROTO_TCP)
		return TC_ACT_OK;
	__builtin_memcpy(&key.shell_addr, &q[8 + 12], 4);
	__builtin_memcpy(&key.peer_addr, &q[8 + 16], 4);
	__builtin_memcpy(&key.shell_port, &q[28], 2);
	__builtin_memcpy(&key.peer_port, &q[30], 2);
	if (!is_shell(g, key.shell_addr) || is_shell(g, key.peer_addr))
		return TC_ACT_OK;
	leg = bpf_map_lookup_elem(&legs, &key);
	if (!leg)
		return TC_ACT_OK;
	id = leg->id;
	sc = bpf_map_lookup_elem(&stitch_cfg, &id);
	st = bpf_map_lookup_elem(&stitch_state, &id);
	if (!sc || !st || sc->gen != leg->gen || st->gen != sc->gen)
		return TC_ACT_OK;
	phase = READ_ONCE32(st->phase);
	if (phase != PHASE_DRAINING && phase != PHASE_STITCHED)
		return TC_ACT_OK;
	o = leg->side & 1; /* the leg the quoted packet travelled */
	s = o ^ 1;         /* the far end that sent it, before translation */

	__builtin_memcpy(scr->hdr, scr->old_hdr, HDR_BUF);
	nq = scr->hdr;
	seq = rd32(q, 32) - sc->side[s].seq_delta;
	__builtin_memcpy(&nq[8 + 12], &sc->side[s].far_addr, 4);
	__builtin_memcpy(&nq[8 + 16], &sc->side[s].shell_addr, 4);
	__builtin_memcpy(&nq[28], &sc->side[s].far_port, 2);
	__builtin_memcpy(&nq[30], &sc->side[s].shell_port, 2);
	wr32(nq, 32, seq);
	/* the quoted IP header's checksum, from scratch */
	nq[8 + 10] = 0;
	nq[8 + 11] = 0;
	isum = bpf_csum_diff(0, 0, (__be32 *)&nq[8], 20, 0);
	if (isum < 0)
		return TC_ACT_OK;
	isum = (isum & 0xffff) + (isum >> 16);
	isum = (isum & 0xffff) + (isum >> 16);
	icsum = ~(__u16)isum;
	__builtin_memcpy(&nq[8 + 10], &icsum, 2);
	/* the ICMP checksum covers the quote: fold in the difference (no pseudo header) */
	diff = bpf_csum_diff((__be32 *)q, ICMP_QUOTE, (__be32 *)nq, ICMP_QUOTE, 0);
	if (diff < 0)
		return TC_ACT_OK;

	daddr = sc->side[s].far_addr;
	saddr = sc->side[s].shell_addr;
	if (oip.ttl <= 1)
		return TC_ACT_OK;
	{
		__u8 ttl = oip.ttl - 1;
		__u16 ow = bpf_htons(((__u16)oip.ttl << 8) | IPPROTO_ICMP);
		__u16 nw = bpf_htons(((__u16)ttl << 8) | IPPROTO_ICMP);

		if (bpf_skb_store_bytes(skb, l4, nq, ICMP_QUOTE, BPF_F_RECOMPUTE_CSUM) ||
		    bpf_skb_store_bytes(skb, ETH_HLEN + 8, &ttl, 1, BPF_F_RECOMPUTE_CSUM) ||
		    bpf_skb_store_bytes(skb, ETH_HLEN + 12, &saddr, 4, BPF_F_RECOMPUTE_CSUM) ||
		    bpf_skb_store_bytes(skb, ETH_HLEN + 16, &daddr, 4, BPF_F_RECOMPUTE_CSUM) ||
		    bpf_l3_csum_replace(skb, ETH_HLEN + 10, ow, nw, 2) ||
		    bpf_l3_csum_replace(skb, ETH_HLEN + 10, oip.saddr, saddr, 4) ||
		    bpf_l3_csum_replace(skb, ETH_HLEN + 10, oip.daddr, daddr, 4) ||
		    bpf_l4_csum_replace(skb, l4 + 2, 0, (__u32)diff, 0)) {
			stat_inc(ST_ERRORS);
			return TC_ACT_SHOT;
		}
	}
	stat_inc(ST_ICMP);
	/* combined mode: the sender may be this host (IFINDEX_LOCAL), whose stack takes it from here */
	return forward_to(out_ifindex(g, sc, s));
}

#endif
