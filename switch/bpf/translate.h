/* The stitched path: translation between the legs, the handover drain, the silencing of the shell,
 * termination. Names: a stitch has two sides, s = SIDE_CLIENT (far end C, client leg) and
 * s = SIDE_CORE (far end B, core leg); o = s ^ 1 is the other side. "Stream s" is the byte stream
 * far end s sends. Spaces: on leg s, "far->A" numbers stream s, "A->far" numbers stream o as the
 * shell relayed it. side[s].seq_delta maps far s's seq (leg s far->A) to leg o's A->far space.
 * docs/handover.md explains every rule; docs/datapath.md has the decision table. */
#ifndef STITCH_TRANSLATE_H
#define STITCH_TRANSLATE_H

#include "tracking.h"

static __always_inline struct flow_val *leg_flow(const struct stitch_cfg *sc, __u32 s)
{
	const struct stitch_side *sd = &sc->side[s & 1];
	struct flow_key k = {
		.shell_addr = sd->shell_addr, .peer_addr = sd->far_addr,
		.shell_port = sd->shell_port, .peer_port = sd->far_port,
	};
	return bpf_map_lookup_elem(&flows, &k);
}

static __always_inline __u32 clamp_win(__u32 edge, __u32 ack, __u32 shift)
{
	__u32 w;

	if (!seq_after(edge, ack))
		return 0;
	w = (edge - ack) >> (shift & 15);
	return w > 65535 ? 65535 : w;
}

/* The right edge advertised to a sender while the shell drains its stream (rule 5): at least the
 * boundary (the shell promised that much), and not past it until the receiver acknowledged
 * everything up to it. A byte beyond would wait at the receiver, out of order and SACKed, for the
 * shell's backlog, while the sender's cumulative ack stood still: a retransmission timeout whenever
 * the drain outlasts the sender's RTO. */
static __always_inline __u32 drain_edge(__u32 edge, __u32 boundary, __u32 acked)
{
	return seq_before(acked, boundary) ? boundary : seq_max(edge, boundary);
}

/* The sequence number for an ACK S makes up for an end: the highest byte anyone sent it, kept
 * within [its last ack, its right edge] as S last saw them. A receiver discards a segment whose seq
 * lies below its rcv_wup (the ack it last sent) with the ACK it carries; its last ack as seen at S
 * is older whenever a newer one is still on the wire. What anyone sent it is at or above its
 * rcv_nxt, and inside its window. */
static __always_inline __u32 made_up_seq(__u32 sent, __u32 ack, __u32 edge)
{
	if (seq_after(sent, edge))
		sent = edge;
	return seq_before(sent, ack) ? ack : sent;
}

/* Shrinks the SACK option to its first `kept` blocks: the rest become NOPs; with none kept, the
 * whole option does. */
static __always_inline void sack_keep(struct scratch *s, __u32 kept)
{
	__u32 off = s->p.sack_off, n = s->p.sack_n;

#pragma clang loop unroll(full)
	for (int i = 0; i < 2 + 8 * SACK_MAX_BLOCKS; i++) {
		if (i < 2 + 8 * n && (kept == 0 || i >= 2 + 8 * kept))
			s->hdr[HB(off + i)] = TCPOPT_NOP;
	}
	if (kept)
		s->hdr[HB(off + 1)] = 2 + 8 * kept;
}

/* Rewrites the SACK option: every block edge becomes edge - delta; when `lo_on`, blocks that end at
 * or below `lo` are dropped and starts below it raised to it (a far end must never see a block
 * below an ack it was given: it counts it as invalid); when `hi_on`, blocks ending after `hi` are
 * dropped. Kept blocks move to the front, the option shrinks, freed bytes become NOPs.
 * Returns the number of blocks kept. */
static __always_inline __u32 sack_rewrite(struct scratch *s, __u32 delta, __u32 lo, int lo_on, __u32 hi, int hi_on)
{
	__u32 off = s->p.sack_off, n = s->p.sack_n, kept = 0;

#pragma clang loop unroll(full)
	for (int i = 0; i < SACK_MAX_BLOCKS; i++) {
		if (i < n) {
			__u32 a = rd32(s->old_hdr, off + 2 + 8 * i) - delta;
			__u32 b = rd32(s->old_hdr, off + 2 + 8 * i + 4) - delta;

			if (lo_on && !seq_after(b, lo))
				continue;
			if (hi_on && seq_after(b, hi))
				continue;
			if (lo_on && seq_before(a, lo))
				a = lo;
			wr32(s->hdr, off + 2 + 8 * kept, a);
			wr32(s->hdr, off + 2 + 8 * kept + 4, b);
			kept++;
		}
	}
	if (kept != n)
		sack_keep(s, kept);
	return kept;
}

/* A stitch's phase and end bits change only through phase_cas and term_or, which count every
 * change (ST_STATE_CHANGES) and tell the daemon which stitch changed (the events ring), after the
 * change: what it reads then is at least as new. A change the ring has no room for is counted
 * (ST_EVENTS_LOST), and the daemon then reads the whole table. */
static __always_inline void state_changed(const struct stitch_state *st)
{
	__u32 ev[2] = { st->id, st->gen };

	stat_inc(ST_STATE_CHANGES);
	if (bpf_ringbuf_output(&events, ev, sizeof(ev), 0))
		stat_inc(ST_EVENTS_LOST);
}

static __always_inline int phase_cas(struct stitch_state *st, __u32 from, __u32 to)
{
	if (__sync_val_compare_and_swap(&st->phase, from, to) != from)
		return 0;
	state_changed(st);
	return 1;
}

static __always_inline void term_or(struct stitch_state *st, __u32 bits)
{
	if ((__sync_fetch_and_or(&st->term, bits) & bits) != bits)
		state_changed(st);
}

/* Stream s (far s's bytes): the other far end acknowledged everything the shell was handed of it. */
static __always_inline int stream_delivered(const struct stitch_cfg *sc, const struct stitch_state *st, __u32 s)
{
	s &= 1;
	return !seq_before(st->side[s ^ 1].ack_far - sc->side[s].seq_delta, st->side[s].handed);
}

/* Stream s: the other far end's window covers the boundary, everything far s may have been told it
 * could send. Edges are ack + (win << scale): the shell's in its units toward far s, the other far
 * end's in its own. Short by less than the coarser unit is rounding, and a far end that receives
 * nothing (one-way bulk) never moves its edge to close it. */
static __always_inline int stream_covered(const struct stitch_cfg *sc, const struct stitch_state *st, __u32 s)
{
	__u32 ws, wo, slack;

	s &= 1;
	ws = sc->side[s].ws_shell & 15;
	wo = sc->side[s ^ 1].ws_far & 15;
	slack = 1u << (ws > wo ? ws : wo);
	return !seq_before(st->side[s ^ 1].edge_far - sc->side[s].seq_delta + slack, st->side[s].boundary);
}

/* The first half of the drain condition (drain_check): for both streams s, the other far end
 * acknowledged everything the shell was handed of stream s, so the shell holds nothing. */
static __always_inline int shell_holds_nothing(const struct stitch_cfg *sc, const struct stitch_state *st)
{
	return stream_delivered(sc, st, 0) && stream_delivered(sc, st, 1);
}

/* The first packet after the commit takes the snapshot the drain works from: the boundaries, what
 * the shell was handed, what each far end acked and saw. Boundary of stream s: far s's bytes below
 * it go to the shell; see docs/handover.md, rule 1. */
static __always_inline __u32 take_snapshot(const struct stitch_cfg *sc, struct stitch_state *st, __u64 now)
{
	__u32 ph = READ_ONCE32(st->phase), next;
	struct flow_val *f0, *f1;

	/* FORCE_STITCHED waives the window half and the hold, never the first half: a packet a run
	 * with the flags before it handed to the shell (the daemon decided on an older read) is
	 * relayed first. */
	if (ph == PHASE_DRAINING && (sc->flags & STITCH_FORCE_STITCHED) && shell_holds_nothing(sc, st)) {
		if (phase_cas(st, PHASE_DRAINING, PHASE_STITCHED))
			st->stitched_ns = now;
		return PHASE_STITCHED;
	}
	if (ph != PHASE_INSTALLED)
		return ph;
	f0 = leg_flow(sc, 0);
	f1 = leg_flow(sc, 1);
	if (!f0 || !f1) {
		phase_cas(st, PHASE_INSTALLED, PHASE_FAILED);
		return READ_ONCE32(st->phase);
	}
#pragma clang loop unroll(full)
	for (int s = 0; s < 2; s++) {
		struct flow_val *f = s ? f1 : f0, *fo = s ? f0 : f1;
		struct stitch_state_side *ss = &st->side[s];
		/* the shell's advertised edge, the other far end's edge mapped onto this leg, and what
		 * the other far end acknowledged of what the shell was handed */
		__u32 e_shell = f->dir[0].edge_hi, e_other = fo->dir[1].edge_hi - sc->side[s].seq_delta;
		__u32 acked = fo->dir[1].ack_hi - sc->side[s].seq_delta;

		/* Far s may send up to e_shell. If the other far end can take all of that and the shell
		 * holds nothing of the stream, every byte the shell was not handed yet goes there;
		 * otherwise the shell keeps what it promised (a byte sent past a shell that still relays
		 * would wait at the other far end, out of order, for the shell's backlog). */
		ss->boundary = seq_before(e_other, e_shell) || seq_before(acked, f->dir[1].seq_hi) ?
			       seq_max(e_shell, f->dir[1].seq_hi) : f->dir[1].seq_hi;
		ss->handed = f->dir[1].seq_hi;
		ss->ack_far = f->dir[1].ack_hi;
		ss->edge_far = f->dir[1].edge_hi;
		ss->ack_to_shell = f->dir[1].ack_hi;
		ss->edge_to_shell = f->dir[1].edge_hi;
		ss->ack_sent = f->dir[0].ack_hi;
		ss->ts_seen = f->dir[0].tsval_hi;
		ss->seq_sent = f->dir[0].seq_hi;
		/* Far s's FIN or RST reached only the shell before the commit (the agent saw the
		 * connection open, the kernel had the end): the end is recorded here, and the shell's FIN
		 * or RST relaying it to far o passes (stitch_from_shell). */
		if (f->dir[1].flags & FLOW_RST)
			term_or(st, TERM_RST << s);
		if (f->dir[1].flags & FLOW_FIN) {
			ss->fin_seq = f->dir[1].fin_seq;
			term_or(st, TERM_FIN << s);
			if ((fo->dir[1].flags & FLOW_ACKED) && seq_after(fo->dir[1].ack_hi, ss->fin_seq + sc->side[s].seq_delta))
				term_or(st, TERM_FIN_ACKED << s);
		}
	}
	st->first_ns = now;
	next = (sc->flags & STITCH_START_STITCHED) ? PHASE_STITCHED : PHASE_DRAINING;
	if (next == PHASE_STITCHED)
		st->stitched_ns = now;
	phase_cas(st, PHASE_INSTALLED, next);
	return READ_ONCE32(st->phase);
}

/* Drain complete, per stream s: the other far end acknowledged everything the shell was handed of
 * stream s (so nothing the shell holds, and nothing far s was told is acknowledged, is missing
 * there), and its window covers the edge the shell had advertised to far s (no shrinking window
 * once the shell's edge is no longer honoured). Held DRAIN_HOLD_NS, then the shell is silenced.
 * Whether the shell acknowledged its copies is not asked: bytes nobody acknowledged to far s are
 * retransmitted by far s (and reach the shell again if they lie below the boundary). */
static __always_inline void drain_check(const struct stitch_cfg *sc, struct stitch_state *st, __u64 now)
{
	int ok = shell_holds_nothing(sc, st) && stream_covered(sc, st, 0) && stream_covered(sc, st, 1);
	__u64 t = READ_ONCE64(st->drain_ok_ns);

	if (!ok) {
		if (t)
			st->drain_ok_ns = 0;
		return;
	}
	if (!t) {
		__sync_val_compare_and_swap(&st->drain_ok_ns, 0, now);
		return;
	}
	if (now - t >= DRAIN_HOLD_NS && phase_cas(st, PHASE_DRAINING, PHASE_STITCHED))
		st->stitched_ns = now;
}

static __always_inline void note_termination(const struct stitch_cfg *sc, struct stitch_state *st,
					     const struct pkt *p, __u32 s)
{
	__u32 o = s ^ 1, term;

	if (p->flags & TCP_RST)
		term_or(st, TERM_RST << s);
	if (p->flags & TCP_FIN) {
		st->side[s].fin_seq = p->seq + p->payload;
		term_or(st, TERM_FIN << s);
	}
	term = READ_ONCE32(st->term);
	/* does this packet acknowledge the other far end's FIN? (its seq in our A->far space) */
	if ((p->flags & TCP_ACK) && (term & (TERM_FIN << o)) && !(term & (TERM_FIN_ACKED << o)) &&
	    seq_after(p->ack, st->side[o].fin_seq + sc->side[o].seq_delta))
		term_or(st, TERM_FIN_ACKED << o);
}

static __always_inline __u32 out_ifindex(const struct global_cfg *g, const struct stitch_cfg *sc, __u32 side)
{
	if (side == SIDE_CLIENT && g->client_ifindex)
		return g->client_ifindex;
	if (side == SIDE_CORE && g->core_ifindex)
		return g->core_ifindex;
	return sc->side[side & 1].far_ifindex;
}

/* Sends a rewritten packet on toward a far end: out of its interface, or up this host's own stack
 * when the far end is here (combined mode; the rewrite made it a packet for this host). */
static __always_inline int forward_to(__u32 ifindex)
{
	return ifindex == IFINDEX_LOCAL ? TC_ACT_OK : bpf_redirect_neigh(ifindex, 0, 0, 0);
}

/* Sends a packet S wrote for the shell out of `ifindex`, marked so that the program attached at
 * that interface's egress (combined mode) lets it pass: it is no packet of this host's. */
static __always_inline int to_shell(struct __sk_buff *skb, const struct global_cfg *g, __u32 ifindex)
{
	if (g && g->clone_mark)
		skb->mark = g->clone_mark + 1;
	return bpf_redirect_neigh(ifindex, 0, 0, 0);
}

/* A packet from far end s of a committed stitch: translate it to far end o; while draining, clone
 * it first to the shell when the shell needs its data or its ack (see handle_clone), and send far o
 * only the ACK of data that belongs to the shell. */
__attribute__((noinline)) int stitch_from_far(struct __sk_buff *skb, __u32 id, __u32 s)
{
	struct scratch *scr = get_scratch();
	struct global_cfg *g = get_cfg();
	struct stitch_cfg *sc = bpf_map_lookup_elem(&stitch_cfg, &id);
	struct stitch_state *st = bpf_map_lookup_elem(&stitch_state, &id);
	struct flow_val *fs = 0, *fo = 0;
	__u64 now = bpf_ktime_get_ns();
	__u32 o, phase, nseq, nack = 0, edge, nwin;
	int draining, shell_data = 0;
	struct pkt *p;

	if (!skb || !scr || !g || !sc || !st || st->gen != sc->gen)
		return TC_ACT_OK;
	s &= 1;
	o = s ^ 1;
	p = &scr->p;
	if (p->flags & TCP_SYN) /* a new connection reusing the tuple: not ours to translate */
		return TC_ACT_OK;
	phase = take_snapshot(sc, st, now);
	if (phase == PHASE_FAILED)
		return TC_ACT_OK;
	draining = phase == PHASE_DRAINING;
	note_termination(sc, st, p, s);

	if (p->flags & TCP_ACK) {
		seq_raise(&st->side[s].ack_far, p->ack);
		seq_raise(&st->side[s].edge_far, p->ack + ((__u32)p->win << (sc->side[s].ws_far & 15)));
	}

	if (draining) {
		fs = leg_flow(sc, s);
		fo = leg_flow(sc, o);
	}
	if (draining && fs && fo) {
		struct stitch_state_side *ss = &st->side[s];
		__u32 snd_nxt = fs->dir[0].seq_hi;
		int want;

		/* Rule 1 again (rule 12): the shell holds nothing of this stream any more and far o can
		 * take all far s may send: the boundary drops to what the shell was handed. A stream
		 * that never reaches the shell's old edge (requests and answers) stops passing the
		 * shell, and the drain can hold. */
		if (p->payload && seq_before(p->seq, ss->boundary) && stream_delivered(sc, st, s) && stream_covered(sc, st, s))
			ss->boundary = READ_ONCE32(ss->handed);
		/* Data below the boundary belongs to the shell (rule 1): it gets the data, far o gets
		 * only the ACK (far o may have no room for those bytes; a segment beyond its window
		 * would be dropped together with the ACK it carries). A FIN stays on the data. */
		shell_data = p->payload && seq_before(p->seq, ss->boundary);
		want = shell_data;
		if (shell_data) {
			seq_raise(&ss->handed, p->seq + p->payload);
		} else if ((p->flags & TCP_ACK) && !(p->flags & TCP_RST)) {
			/* an ACK the shell has not had yet: the ack it may take, or a wider window */
			want = seq_raise(&ss->ack_to_shell, seq_min(p->ack, snd_nxt));
			if (seq_raise(&ss->edge_to_shell, p->ack + ((__u32)p->win << (sc->side[s].ws_far & 15))))
				want = 1;
		}
		if (want && !(p->flags & TCP_RST)) {
			__sync_fetch_and_add(&ss->clones, 1);
			stat_inc(ST_CLONES);
			if (g->clone_mark && !(g->flags & CFG_NO_CLONE)) {
				__u32 mark = skb->mark;

				skb->mark = g->clone_mark;
				if (bpf_clone_redirect(skb, skb->ifindex, BPF_F_INGRESS))
					stat_inc(ST_CLONE_FAILED);
				skb->mark = mark;
			}
		}
		if (shell_data && (p->flags & TCP_FIN))
			shell_data = 0;
		drain_check(sc, st, now);
	}

	if (g->drop_ppm && bpf_get_prandom_u32() % 1000000 < g->drop_ppm) {
		__sync_fetch_and_add(&st->injected_drops, 1);
		stat_inc(ST_INJECTED_DROP);
		return TC_ACT_SHOT;
	}
	if (p->ttl <= 1) /* let the kernel answer "time exceeded" to the sender */
		return TC_ACT_OK;

	nseq = p->seq + sc->side[s].seq_delta; /* sequence space of leg o */
	if (draining) {
		struct stitch_state_side *to = &st->side[o];

		if (!shell_data && p->payload)
			seq_raise(&to->seq_sent, nseq + p->payload);
		/* Made-up seqs far o accepts (rule 2): the ACK of shell data, and a pure ACK of far s,
		 * which may sit beyond far o's window (far s may have sent up to the shell's old edge,
		 * rule 5, and those bytes went to the shell). */
		if (shell_data || (!p->payload && !(p->flags & (TCP_FIN | TCP_RST))))
			nseq = made_up_seq(shell_data ? READ_ONCE32(to->seq_sent) : nseq,
					   READ_ONCE32(to->ack_far), READ_ONCE32(to->edge_far));
	}
	wr32(scr->hdr, 4, nseq);
	if (shell_data)
		scr->hdr[13] = p->flags & ~(TCP_PSH | TCP_URG);
	wr16(scr->hdr, 0, bpf_ntohs(sc->side[o].shell_port));
	wr16(scr->hdr, 2, bpf_ntohs(sc->side[o].far_port));
	if (p->flags & TCP_ACK) {
		nack = p->ack - sc->side[o].seq_delta;
		edge = nack + ((__u32)p->win << (sc->side[s].ws_far & 15));
		if (draining && fo) {
			/* acks never below what the shell already acknowledged to far o; the edge never
			 * below what the shell advertised (those bytes still go to the shell), and not past
			 * it until far s has acknowledged up to it (drain_edge) */
			if (fo->dir[0].flags & FLOW_ACKED)
				nack = seq_max(nack, fo->dir[0].ack_hi);
			edge = drain_edge(edge, st->side[o].boundary, READ_ONCE32(st->side[s].ack_far) - sc->side[o].seq_delta);
		}
		nwin = clamp_win(edge, nack, sc->side[o].ws_shell);
		wr32(scr->hdr, 8, nack);
		wr16(scr->hdr, 14, nwin);
		if (draining) /* read only by stitch_from_shell while draining */
			seq_raise(&st->side[o].ack_sent, nack);
	} else {
		__u32 w = ((__u32)p->win << (sc->side[s].ws_far & 15)) >> (sc->side[o].ws_shell & 15);

		wr16(scr->hdr, 14, w > 65535 ? 65535 : w);
	}
	if (p->ts_off) {
		__u32 tsv = p->tsval + sc->side[s].ts_delta;
		__u32 tse = p->tsecr ? p->tsecr - sc->side[o].ts_delta : 0;

		if (sc->side[o].opts & SIDE_TS) /* PAWS: never below what far o has seen */
			tsv = seq_raise_get(&st->side[o].ts_seen, tsv);
		wr32(scr->hdr, p->ts_off + 2, tsv);
		wr32(scr->hdr, p->ts_off + 6, tse);
	}
	if (p->sack_off) /* while draining the ack may be raised: no block may lie below it */
		sack_rewrite(scr, sc->side[o].seq_delta, nack, draining && (p->flags & TCP_ACK), 0, 0);

	__sync_fetch_and_add(&st->side[s].packets, 1);
	if (!shell_data && p->payload)
		__sync_fetch_and_add(&st->side[s].bytes, p->payload);
	stat_inc(ST_TRANSLATED);
	if (apply_rewrite(skb, sc->side[o].shell_addr, sc->side[o].far_addr, RW_TTL | (shell_data ? RW_TRIM : 0))) {
		stat_inc(ST_ERRORS);
		return TC_ACT_SHOT;
	}
	return forward_to(out_ifindex(g, sc, o));
}

/* Rule 10: S answers the shell's segment p on leg s itself, for far s, with what far s has
 * acknowledged of the shell's bytes and its window edge, and drops what p carried (far s has it
 * all). The answer goes back out of the interface p came in on: a pure ACK from far s at the
 * shell's own rcv_nxt (always acceptable), TSval the shell's own TSecr (its ts_recent: never a
 * PAWS reject), no SACK. */
static __always_inline int answer_shell(struct __sk_buff *skb, struct scratch *scr, const struct stitch_cfg *sc,
					struct stitch_state_side *ss, const struct flow_val *fs, __u32 s)
{
	struct pkt *p = &scr->p;
	__u32 ack = seq_min(READ_ONCE32(ss->ack_far), fs->dir[0].seq_hi);
	__u32 edge = READ_ONCE32(ss->edge_far);

	if (!(p->flags & TCP_ACK) || (p->flags & (TCP_SYN | TCP_FIN | TCP_RST)))
		return TC_ACT_SHOT;
	wr16(scr->hdr, 0, bpf_ntohs(p->dport));
	wr16(scr->hdr, 2, bpf_ntohs(p->sport));
	wr32(scr->hdr, 4, p->ack);
	wr32(scr->hdr, 8, ack);
	scr->hdr[13] = TCP_ACK;
	wr16(scr->hdr, 14, clamp_win(edge, ack, sc->side[s & 1].ws_far));
	if (p->ts_off) {
		wr32(scr->hdr, p->ts_off + 2, p->tsecr);
		wr32(scr->hdr, p->ts_off + 6, p->tsval);
	}
	if (p->sack_off)
		sack_keep(scr, 0);
	seq_raise(&ss->ack_to_shell, ack);
	seq_raise(&ss->edge_to_shell, edge);
	stat_inc(ST_SHELL_ANSWERED);
	if (apply_rewrite(skb, p->daddr, p->saddr, RW_TRIM)) {
		stat_inc(ST_ERRORS);
		return TC_ACT_SHOT;
	}
	return to_shell(skb, get_cfg(), skb->ifindex);
}

/* A packet of the shell's own socket on leg s (toward far end s). Silenced once stitched; while
 * draining, its data and the acks that raise what far s has seen go on, rewritten. */
__attribute__((noinline)) int stitch_from_shell(struct __sk_buff *skb, __u32 id, __u32 s)
{
	struct scratch *scr = get_scratch();
	struct stitch_cfg *sc = bpf_map_lookup_elem(&stitch_cfg, &id);
	struct stitch_state *st = bpf_map_lookup_elem(&stitch_state, &id);
	struct stitch_state_side *ss, *so;
	struct flow_val *fs, *fo;
	__u64 now = bpf_ktime_get_ns();
	__u32 o, phase, d, nack, edge, term, fin;
	struct pkt *p;

	if (!skb || !scr || !sc || !st || st->gen != sc->gen)
		return TC_ACT_OK;
	s &= 1;
	o = s ^ 1;
	p = &scr->p;
	ss = &st->side[s];
	so = &st->side[o];
	phase = take_snapshot(sc, st, now);
	if (phase == PHASE_FAILED)
		return TC_ACT_OK;
	/* The shell's FIN goes on only as the relay of far o's FIN that reached the shell alone,
	 * before the commit: without it far s never gets that end, and the drain never completes.
	 * Its RST likewise, as the relay of far o's RST: far s would wait forever. */
	term = READ_ONCE32(st->term);
	fin = (p->flags & TCP_FIN) && (term & (TERM_FIN << o)) &&
	      p->seq + p->payload == so->fin_seq + sc->side[o].seq_delta;
	if ((p->flags & TCP_RST) && (term & (TERM_RST << o)) && phase == PHASE_DRAINING) {
		__sync_fetch_and_add(&ss->shell_passed, 1);
		stat_inc(ST_SHELL_PASSED);
		return TC_ACT_OK;
	}
	if (phase != PHASE_DRAINING || (p->flags & (TCP_SYN | TCP_RST)) || ((p->flags & TCP_FIN) && !fin))
		goto drop;
	fs = leg_flow(sc, s);
	fo = leg_flow(sc, o);
	if (!fs || !fo)
		goto drop;
	track_dir(fs, 0, p, now);

	/* A segment below what far s acknowledged to the shell (a retransmission, or a window probe
	 * at snd_una - 1): the shell never got that ack or window, its clone was lost, and rule 4
	 * clones only news, so nothing would repeat it. S answers for far s (rule 10). */
	if (seq_before(p->seq, READ_ONCE32(ss->ack_to_shell)))
		return answer_shell(skb, scr, sc, ss, fs, s);
	d = sc->side[s].seq_delta;
	/* ack: at least what far o acknowledged of stream s (mapped back to leg s) */
	nack = seq_max(p->ack, so->ack_far - d);
	if (!p->payload && !fin) {
		if (!seq_raise(&ss->ack_sent, nack))
			goto drop; /* a pure ACK that raises nothing: far s has seen better */
	} else {
		seq_raise(&ss->ack_sent, nack);
	}
	edge = drain_edge(so->edge_far - d, ss->boundary, READ_ONCE32(so->ack_far) - d);
	wr32(scr->hdr, 8, nack);
	wr16(scr->hdr, 14, clamp_win(edge, nack, sc->side[s].ws_shell));
	if (p->ts_off && (sc->side[s].opts & SIDE_TS))
		wr32(scr->hdr, p->ts_off + 2, seq_raise_get(&ss->ts_seen, p->tsval));
	/* the shell's SACK blocks above its old edge describe bytes it will never relay */
	if (p->sack_off)
		sack_rewrite(scr, 0, nack, 1, ss->boundary, 1);

	if (p->payload || fin)
		seq_raise(&ss->seq_sent, p->seq + p->payload + fin);
	__sync_fetch_and_add(&ss->shell_passed, 1);
	stat_inc(ST_SHELL_PASSED);
	drain_check(sc, st, now);
	if (apply_rewrite(skb, p->saddr, p->daddr, 0)) {
		stat_inc(ST_ERRORS);
		goto drop;
	}
	return TC_ACT_OK;
drop:
	__sync_fetch_and_add(&ss->shell_dropped, 1);
	stat_inc(ST_SHELL_DROPPED);
	return TC_ACT_SHOT;
}

/* A clone of far s's packet, re-entering with the clone mark, on its way to the shell's socket on
 * leg s: its ack clamped to what the shell sent, its window edge kept, SACK blocks the shell cannot
 * know dropped; data the shell needs (below its old edge) kept, otherwise trimmed to a pure ACK
 * at a made-up seq the shell accepts. FIN/RST never reach the shell. */
__attribute__((noinline)) int handle_clone(struct __sk_buff *skb)
{
	struct scratch *scr = get_scratch();
	struct global_cfg *g = get_cfg();
	struct flow_key key = {};
	struct leg_val *leg;
	struct stitch_cfg *sc;
	struct stitch_state *st;
	struct flow_val *fs;
	__u32 id, s, snd_nxt, nack, edge, shift, ifx;
	int data;
	struct pkt *p;

	if (!skb || !scr || !g)
		return TC_ACT_SHOT;
	skb->mark = 0;
	if (parse_packet(skb) != PARSE_OK)
		return TC_ACT_SHOT;
	p = &scr->p;
	flow_key_of(&key, p, 0);
	leg = bpf_map_lookup_elem(&legs, &key);
	if (!leg)
		return TC_ACT_SHOT;
	id = leg->id;
	sc = bpf_map_lookup_elem(&stitch_cfg, &id);
	st = bpf_map_lookup_elem(&stitch_state, &id);
	if (!sc || !st || sc->gen != leg->gen || st->gen != sc->gen ||
	    READ_ONCE32(st->phase) != PHASE_DRAINING)
		return TC_ACT_SHOT;
	s = leg->side & 1;
	fs = leg_flow(sc, s);
	if (!fs)
		return TC_ACT_SHOT;

	snd_nxt = fs->dir[0].seq_hi;
	shift = sc->side[s].ws_far & 15;
	data = p->payload && seq_before(p->seq, st->side[s].boundary);
	nack = seq_min(p->ack, snd_nxt);
	edge = p->ack + ((__u32)p->win << shift);
	wr32(scr->hdr, 8, nack);
	wr16(scr->hdr, 14, clamp_win(edge, nack, shift));
	scr->hdr[13] = p->flags & ~(TCP_FIN | TCP_RST | TCP_SYN | TCP_URG | (data ? 0 : TCP_PSH));
	if (p->sack_off) /* blocks about bytes the shell never sent would be invalid to it */
		sack_rewrite(scr, 0, nack, 1, snd_nxt, 1);
	if (!data) /* the shell has had (at most) what S handed it */
		wr32(scr->hdr, 4, made_up_seq(READ_ONCE32(st->side[s].handed), fs->dir[0].ack_hi, fs->dir[0].edge_hi));
	ifx = sc->shell_ifindex ? sc->shell_ifindex : g->shell_ifindex;
	if (apply_rewrite(skb, p->saddr, p->daddr, data ? 0 : RW_TRIM)) {
		stat_inc(ST_ERRORS);
		return TC_ACT_SHOT;
	}
	return to_shell(skb, g, ifx);
}

#endif
