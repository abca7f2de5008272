/* Parsing: Ethernet / IPv4 / TCP and the TCP options, into the per-CPU scratch (struct pkt plus a
 * copy of the TCP header). Every read goes through bpf_skb_load_bytes, which checks it against the
 * packet's length (and works on non-linear skbs). Options are walked in a bpf_loop callback: the
 * verifier checks one step instead of 40 unrolled ones (unrolled loops hit "program too large"). */
#ifndef STITCH_PARSING_H
#define STITCH_PARSING_H

#include <linux/bpf.h>
#include <linux/ip.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "stitch_maps.h"

#define PARSE_OK        0
#define PARSE_NOT_TCP   1  /* not IPv4/TCP, or a fragment: pass untouched */
#define PARSE_MALFORMED 2  /* truncated, bad lengths or options: pass untouched */
#define PARSE_ICMP      3  /* an unfragmented ICMP message: icmp.h may translate it */

#define HB(i) ((i) & (HDR_BUF - 1))

static __always_inline struct scratch *get_scratch(void)
{
	__u32 k = 0;
	return bpf_map_lookup_elem(&scratch, &k);
}

static __always_inline void stat_inc(__u32 idx)
{
	__u32 k = 0;
	struct global_stats *st = bpf_map_lookup_elem(&stats, &k);
	if (st && idx < ST_COUNT)
		st->c[idx & (ST_COUNT - 1)]++;
}

/* Big-endian reads and writes in a header copy at a (bounded) variable offset. */
static __always_inline __u32 rd16(const __u8 *b, __u32 off)
{
	return ((__u32)b[HB(off)] << 8) | b[HB(off + 1)];
}

static __always_inline __u32 rd32(const __u8 *b, __u32 off)
{
	return ((__u32)b[HB(off)] << 24) | ((__u32)b[HB(off + 1)] << 16) |
	       ((__u32)b[HB(off + 2)] << 8) | b[HB(off + 3)];
}

static __always_inline void wr16(__u8 *b, __u32 off, __u32 v)
{
	b[HB(off)] = v >> 8;
	b[HB(off + 1)] = v;
}

static __always_inline void wr32(__u8 *b, __u32 off, __u32 v)
{
	b[HB(off)] = v >> 24;
	b[HB(off + 1)] = v >> 16;
	b[HB(off + 2)] = v >> 8;
	b[HB(off + 3)] = v;
}

struct optwalk {
	struct scratch *s;
	__u32 off;   /* offset of the next option in the TCP header */
	__u32 end;   /* TCP header length */
};

/* One TCP option per call: records the offsets of the options we translate, flags malformed ones. */
static long opt_step(__u32 i, void *vctx)
{
	struct optwalk *w = vctx;
	struct scratch *s = w->s;
	__u32 off = w->off, end = w->end, len;
	__u8 kind;

	if (!s || off >= end || off >= TCP_MAX_HDR)
		return 1;
	kind = s->old_hdr[HB(off)];
	if (kind == TCPOPT_EOL)
		return 1;
	if (kind == TCPOPT_NOP) {
		w->off = off + 1;
		return 0;
	}
	if (off + 1 >= end)
		goto bad;
	len = s->old_hdr[HB(off + 1)];
	if (len < 2 || off + len > end)
		goto bad;
	switch (kind) {
	case TCPOPT_MSS:
		if (len != 4)
			goto bad;
		s->p.mss_off = off;
		s->p.mss = rd16(s->old_hdr, off + 2);
		break;
	case TCPOPT_WINDOW:
		if (len != 3)
			goto bad;
		s->p.ws_off = off;
		s->p.ws = s->old_hdr[HB(off + 2)];
		break;
	case TCPOPT_SACK_PERM:
		if (len != 2)
			goto bad;
		s->p.sack_ok = 1;
		break;
	case TCPOPT_SACK:
		if (len < 10 || ((len - 2) & 7) || len > 2 + 8 * SACK_MAX_BLOCKS)
			goto bad;
		s->p.sack_off = off;
		s->p.sack_n = (len - 2) >> 3;
		break;
	case TCPOPT_TIMESTAMP:
		if (len != 10)
			goto bad;
		s->p.ts_off = off;
		s->p.tsval = rd32(s->old_hdr, off + 2);
		s->p.tsecr = rd32(s->old_hdr, off + 6);
		break;
	default:
		break;
	}
	w->off = off + len;
	return 0;
bad:
	s->p.bad = 1;
	return 1;
}

/* Parses the frame into the scratch. Returns PARSE_*. */
__attribute__((noinline)) int parse_packet(struct __sk_buff *skb)
{
	struct scratch *s = get_scratch();
	struct iphdr iph;
	__u16 proto;
	__u32 ihl, ip_len, tcp_len, l4;

	if (!skb || !s)
		return PARSE_NOT_TCP;
	__builtin_memset(&s->p, 0, sizeof(s->p));
	if (bpf_skb_load_bytes(skb, 12, &proto, 2) || proto != bpf_htons(ETH_P_IP))
		return PARSE_NOT_TCP;
	if (bpf_skb_load_bytes(skb, ETH_HLEN, &iph, sizeof(iph)))
		return PARSE_MALFORMED;
	if (iph.version != 4)
		return PARSE_NOT_TCP;
	if (iph.frag_off & bpf_htons(IP_MF | IP_OFFSET))
		return PARSE_NOT_TCP;
	if (iph.protocol == IPPROTO_ICMP)
		return PARSE_ICMP;
	if (iph.protocol != IPPROTO_TCP)
		return PARSE_NOT_TCP;
	ihl = iph.ihl * 4;
	ip_len = bpf_ntohs(iph.tot_len);
	if (ihl < 20 || ip_len < ihl + 20 || ETH_HLEN + ip_len > skb->len)
		return PARSE_MALFORMED;
	l4 = ETH_HLEN + ihl;
	if (bpf_skb_load_bytes(skb, l4, s->old_hdr, 20))
		return PARSE_MALFORMED;
	tcp_len = (s->old_hdr[12] >> 4) * 4;
	if (tcp_len < 20 || ihl + tcp_len > ip_len)
		return PARSE_MALFORMED;
	if (tcp_len > 20 && bpf_skb_load_bytes(skb, l4, s->old_hdr, tcp_len & 63))
		return PARSE_MALFORMED;

	s->p.saddr = iph.saddr;
	s->p.daddr = iph.daddr;
	s->p.ttl = iph.ttl;
	s->p.ihl = ihl;
	s->p.ip_len = ip_len;
	s->p.l4_off = l4;
	s->p.tcp_len = tcp_len;
	s->p.payload = ip_len - ihl - tcp_len;
	__builtin_memcpy(&s->p.sport, &s->old_hdr[0], 2); /* ports stay in network order */
	__builtin_memcpy(&s->p.dport, &s->old_hdr[2], 2);
	s->p.seq = rd32(s->old_hdr, 4);
	s->p.ack = rd32(s->old_hdr, 8);
	s->p.flags = s->old_hdr[13];
	s->p.win = rd16(s->old_hdr, 14);

	if (tcp_len > 20) {
		struct optwalk w = { .s = s, .off = 20, .end = tcp_len };
		bpf_loop(TCP_MAX_OPTS, opt_step, &w, 0);
		if (s->p.bad)
			return PARSE_MALFORMED;
	}
	__builtin_memcpy(s->hdr, s->old_hdr, HDR_BUF);
	return PARSE_OK;
}

#endif
