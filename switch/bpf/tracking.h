/* Tracking the shell's TCP flows: handshakes (ISN, MSS, window scale, SACK-permitted, timestamps)
 * and, per direction, the highest sequence end, ack, right window edge and TSval. MSS clamping of
 * the shell's SYNs lives here too. The daemon reads `flows` to compute a stitch's translation. */
#ifndef STITCH_TRACKING_H
#define STITCH_TRACKING_H

#include "csum.h"
#include "seq.h"

static __always_inline struct global_cfg *get_cfg(void)
{
	__u32 k = 0;
	return bpf_map_lookup_elem(&config, &k);
}

/* Is `a` (network order) one of the shell's addresses? */
static __always_inline int is_shell(const struct global_cfg *g, __u32 a)
{
	if (a == g->self_addr) /* in the shell's prefix, but this host (combined mode: B itself) */
		return 0;
#pragma clang loop unroll(full)
	for (int i = 0; i < MAX_SHELL_ADDRS; i++) {
		if (g->shell_mask[i] && (a & g->shell_mask[i]) == g->shell_addr[i])
			return 1;
	}
	return 0;
}

/* The interface a packet came from: IFINDEX_LOCAL for one this host sent (seen at egress). */
static __always_inline __u32 arrival_ifindex(const struct __sk_buff *skb)
{
	return skb->ingress_ifindex ? skb->ifindex : IFINDEX_LOCAL;
}

static __always_inline __u32 now_ms(__u64 now)
{
	return (__u32)(now / 1000000);
}

/* The shift that applies to windows sent in direction d (0 unless both SYNs carried the option). */
static __always_inline __u32 dir_scale(const struct flow_val *fv, __u32 d)
{
	const struct flow_dir *a = &fv->dir[d & 1], *b = &fv->dir[(d ^ 1) & 1];

	if ((a->flags & FLOW_WS_OK) && (b->flags & FLOW_WS_OK))
		return a->wscale > 14 ? 14 : a->wscale;
	return 0;
}

/* Records one direction's SYN or SYN-ACK. */
static __always_inline void record_syn(struct flow_dir *fd, const struct pkt *p, __u16 mss, __u64 now)
{
	fd->isn = p->seq;
	fd->seq_hi = p->seq + 1 + p->payload;
	fd->mss = mss;
	fd->wscale = p->ws;
	fd->flags = FLOW_SYN | (p->sack_ok ? FLOW_SACK_OK : 0) | (p->ts_off ? FLOW_TS_OK : 0) |
		    (p->ws_off ? FLOW_WS_OK : 0);
	if (p->ts_off) {
		fd->tsval_hi = p->tsval;
		fd->ts_base = p->tsval - now_ms(now);
		fd->tsecr_last = p->tsecr;
		fd->flags |= FLOW_TSVAL;
	}
	if (p->flags & TCP_ACK) { /* SYN-ACK: its window is never scaled */
		fd->ack_hi = p->ack;
		fd->edge_hi = p->ack + p->win;
		fd->flags |= FLOW_ACKED;
	}
	fd->win_last = p->win;
	fd->last_ns = now;
}

/* Folds one established-state packet into direction d of a flow. */
static __always_inline void track_dir(struct flow_val *fv, __u32 d, const struct pkt *p, __u64 now)
{
	struct flow_dir *fd = &fv->dir[d & 1];
	__u32 end = p->seq + p->payload + !!(p->flags & TCP_SYN) + !!(p->flags & TCP_FIN);

	seq_raise(&fd->seq_hi, end);
	if (p->flags & TCP_ACK) {
		__u32 edge = p->ack + ((__u32)p->win << dir_scale(fv, d));

		if (!(fd->flags & FLOW_ACKED)) {
			fd->ack_hi = p->ack;
			fd->edge_hi = edge;
			fd->flags |= FLOW_ACKED;
		} else {
			seq_raise(&fd->ack_hi, p->ack);
			seq_raise(&fd->edge_hi, edge);
		}
	}
	if (p->ts_off) {
		__u32 base = p->tsval - now_ms(now);

		if (!(fd->flags & FLOW_TSVAL)) {
			fd->tsval_hi = p->tsval;
			fd->ts_base = base;
			fd->flags |= FLOW_TSVAL;
		} else {
			seq_raise(&fd->tsval_hi, p->tsval);
			seq_raise(&fd->ts_base, base);
		}
		fd->tsecr_last = p->tsecr;
	}
	if (p->flags & TCP_FIN) {
		fd->fin_seq = p->seq + p->payload;
		fd->flags |= FLOW_FIN;
	}
	if (p->flags & TCP_RST)
		fd->flags |= FLOW_RST;
	fd->win_last = p->win;
	fd->last_ns = now;
}

static __always_inline void flow_key_of(struct flow_key *k, const struct pkt *p, __u32 from_shell)
{
	if (from_shell) {
		k->shell_addr = p->saddr; k->peer_addr = p->daddr;
		k->shell_port = p->sport; k->peer_port = p->dport;
	} else {
		k->shell_addr = p->daddr; k->peer_addr = p->saddr;
		k->shell_port = p->dport; k->peer_port = p->sport;
	}
}

/* A packet of the shell's flows that no stitch claims: track it, clamp the MSS of SYNs, pass it.
 * dir: 0 from the shell, 1 to the shell. */
__attribute__((noinline)) int track_packet(struct __sk_buff *skb, __u32 dir)
{
	struct scratch *s = get_scratch();
	struct global_cfg *g = get_cfg();
	struct flow_key key = {};
	struct flow_val *fv;
	__u64 now = bpf_ktime_get_ns();
	struct pkt *p;

	if (!skb || !s || !g)
		return TC_ACT_OK;
	p = &s->p;
	dir &= 1;
	flow_key_of(&key, p, dir == 0);
	stat_inc(ST_TRACKED);

	if (p->flags & TCP_SYN) {
		__u16 mss = p->mss;
		int clamped = 0;

		if (p->flags & TCP_RST)
			return TC_ACT_OK;
		if (g->mss_clamp && p->mss_off && p->mss > g->mss_clamp) {
			mss = g->mss_clamp;
			wr16(s->hdr, p->mss_off + 2, mss);
			clamped = 1;
		}
		if (!(p->flags & TCP_ACK)) {
			/* A SYN opens a new flow: whatever the key held before is history. */
			struct flow_val v = {};

			record_syn(&v.dir[dir], p, mss, now);
			v.created_ns = now;
			if (dir)
				v.peer_ifindex = arrival_ifindex(skb);
			else
				v.shell_ifindex = skb->ifindex;
			bpf_map_update_elem(&flows, &key, &v, BPF_ANY);
		} else {
			fv = bpf_map_lookup_elem(&flows, &key);
			if (!fv) {
				struct flow_val v = {};

				v.created_ns = now;
				bpf_map_update_elem(&flows, &key, &v, BPF_NOEXIST);
				fv = bpf_map_lookup_elem(&flows, &key);
			}
			if (fv) {
				record_syn(&fv->dir[dir], p, mss, now);
				if (dir)
					fv->peer_ifindex = arrival_ifindex(skb);
				else
					fv->shell_ifindex = skb->ifindex;
			}
		}
		stat_inc(ST_SYN);
		if (clamped) {
			stat_inc(ST_MSS_CLAMPED);
			if (apply_rewrite(skb, p->saddr, p->daddr, 0))
				stat_inc(ST_ERRORS);
		}
		return TC_ACT_OK;
	}

	fv = bpf_map_lookup_elem(&flows, &key);
	if (!fv)
		return TC_ACT_OK;
	track_dir(fv, dir, p, now);
	if (dir)
		fv->peer_ifindex = arrival_ifindex(skb);
	else
		fv->shell_ifindex = skb->ifindex;
	return TC_ACT_OK;
}

#endif
