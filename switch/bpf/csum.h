/* Checksums and the one place a rewritten packet is written back.
 *
 * Order (DATAPATH-FACTS): the new TCP header (built in the scratch copy) and the IP fields are
 * written first with bpf_skb_store_bytes, the header's difference is taken with bpf_csum_diff, and
 * the checksum helpers run last — bpf_l3_csum_replace for the IP header, bpf_l4_csum_replace by
 * difference for TCP header fields and with BPF_F_PSEUDO_HDR for the addresses and length. The
 * helpers know the skb's checksum state: with CHECKSUM_PARTIAL (veth, GSO) only pseudo-header
 * changes go into the TCP checksum field (the rest is summed when the checksum is completed, e.g.
 * by skb_checksum_help when S's tx offload is off); otherwise every change is folded in. */
#ifndef STITCH_CSUM_H
#define STITCH_CSUM_H

#include "parsing.h"

#define RW_TTL   0x1  /* decrement the TTL: we route this packet ourselves */
#define RW_TRIM  0x2  /* drop the payload: a pure ACK for the shell */

#define CHUNK 256

static __always_inline __u32 csum_add32(__u32 a, __u32 b)
{
	__u32 r = a + b;
	return r + (r < a);
}

struct sumwalk {
	struct __sk_buff *skb;
	struct scratch *s;
	__u32 off;    /* next payload byte (frame offset) */
	__u32 left;   /* payload bytes still to sum */
	__u32 csum;   /* running difference that removes them */
	__u32 err;
};

/* Adds to w->csum the difference that removes one chunk of payload from a checksum. */
static long sum_step(__u32 i, void *vctx)
{
	struct sumwalk *w = vctx;
	struct scratch *s = w->s;
	__u32 n = w->left, n4;
	__s64 r;

	if (!s || !n)
		return 1;
	if (n > CHUNK)
		n = CHUNK;
	n4 = (n + 3) & ~3U;
	if (n4 > CHUNK)
		return 1;
	if (n < CHUNK) { /* zero-pad to a multiple of 4: zero bytes add nothing */
		s->chunk[n & (CHUNK - 1)] = 0;
		s->chunk[(n + 1) & (CHUNK - 1)] = 0;
		s->chunk[(n + 2) & (CHUNK - 1)] = 0;
	}
	if (bpf_skb_load_bytes(w->skb, w->off, s->chunk, n)) {
		w->err = 1;
		return 1;
	}
	r = bpf_csum_diff((__be32 *)s->chunk, n4, 0, 0, w->csum);
	if (r < 0) {
		w->err = 1;
		return 1;
	}
	w->csum = (__u32)r;
	w->off += n;
	w->left -= n;
	return 0;
}

/* Writes the scratch's new TCP header back, with new addresses (network order) and `how`
 * (RW_*), and fixes the checksums. Packet pointers are invalid afterwards. Returns 0 or -1. */
__attribute__((noinline)) int apply_rewrite(struct __sk_buff *skb, __u32 saddr, __u32 daddr, __u32 how)
{
	struct scratch *s = get_scratch();
	__u32 l4, tl, csum_off, diff;
	__s64 hdiff;

	if (!skb || !s)
		return -1;
	l4 = s->p.l4_off;
	tl = s->p.tcp_len;
	if (tl < 20 || tl > TCP_MAX_HDR || l4 > 200)
		return -1;
	csum_off = l4 + 16;
	hdiff = bpf_csum_diff((__be32 *)s->old_hdr, tl, (__be32 *)s->hdr, tl, 0);
	if (hdiff < 0)
		return -1;
	diff = (__u32)hdiff;

	if ((how & RW_TRIM) && s->p.payload) {
		struct sumwalk w = { .skb = skb, .s = s, .off = l4 + tl, .left = s->p.payload };

		bpf_loop(65536 / CHUNK + 1, sum_step, &w, 0);
		if (w.err || w.left)
			return -1;
		diff = csum_add32(diff, w.csum);
		if (bpf_skb_change_tail(skb, l4 + tl, 0))
			return -1;
	}

	if (bpf_skb_store_bytes(skb, l4, s->hdr, tl, BPF_F_RECOMPUTE_CSUM))
		return -1;

	if (saddr != s->p.saddr) {
		if (bpf_skb_store_bytes(skb, ETH_HLEN + 12, &saddr, 4, BPF_F_RECOMPUTE_CSUM) ||
		    bpf_l3_csum_replace(skb, ETH_HLEN + 10, s->p.saddr, saddr, 4) ||
		    bpf_l4_csum_replace(skb, csum_off, s->p.saddr, saddr, BPF_F_PSEUDO_HDR | 4))
			return -1;
	}
	if (daddr != s->p.daddr) {
		if (bpf_skb_store_bytes(skb, ETH_HLEN + 16, &daddr, 4, BPF_F_RECOMPUTE_CSUM) ||
		    bpf_l3_csum_replace(skb, ETH_HLEN + 10, s->p.daddr, daddr, 4) ||
		    bpf_l4_csum_replace(skb, csum_off, s->p.daddr, daddr, BPF_F_PSEUDO_HDR | 4))
			return -1;
	}
	if ((how & RW_TTL) && s->p.ttl > 1) {
		__u8 ttl = s->p.ttl - 1;
		/* TTL and protocol share one 16-bit word of the header checksum */
		__u16 ow = bpf_htons(((__u16)s->p.ttl << 8) | IPPROTO_TCP);
		__u16 nw = bpf_htons(((__u16)ttl << 8) | IPPROTO_TCP);

		if (bpf_skb_store_bytes(skb, ETH_HLEN + 8, &ttl, 1, BPF_F_RECOMPUTE_CSUM) ||
		    bpf_l3_csum_replace(skb, ETH_HLEN + 10, ow, nw, 2))
			return -1;
	}
	if ((how & RW_TRIM) && s->p.payload) {
		__u16 olen = bpf_htons(s->p.ip_len), nlen = bpf_htons(s->p.ihl + tl);
		__u16 otl = bpf_htons(s->p.ip_len - s->p.ihl), ntl = bpf_htons(tl);

		if (bpf_skb_store_bytes(skb, ETH_HLEN + 2, &nlen, 2, BPF_F_RECOMPUTE_CSUM) ||
		    bpf_l3_csum_replace(skb, ETH_HLEN + 10, olen, nlen, 2) ||
		    bpf_l4_csum_replace(skb, csum_off, otl, ntl, BPF_F_PSEUDO_HDR | 2))
			return -1;
	}
	if (diff && bpf_l4_csum_replace(skb, csum_off, 0, diff, 0))
		return -1;
	return 0;
}

#endif
