// SPDX-License-Identifier: (GPL-2.0 OR Apache-2.0)
/* tcp-stitch: the switch's fast path. One tc clsact direct-action program (section "tc"), attached
 * on ingress of every interface of S, and on egress of the interface toward the shell, where in
 * combined mode (S is B) the core's own packets leave. Per packet (docs/datapath.md has the full
 * decision table):
 *   - a clone re-entering for the shell (skb->mark == clone mark)      -> handle_clone
 *   - at egress, a packet this host did not send; one S sent the shell -> pass untouched
 *   - an ICMP error quoting a stitched flow's translated packet        -> stitch_icmp (back to its sender)
 *   - not IPv4/TCP, fragment, truncated, bad options                   -> pass untouched
 *   - TCP not to or from the shell                                     -> pass untouched
 *   - a flow of a committed stitch, from its far end                   -> stitch_from_far (translate)
 *   - a flow of a committed stitch, from the shell                     -> stitch_from_shell (drain/silence)
 *   - any other flow of the shell                                      -> track_packet (and MSS clamp)
 * Helpers by job: parsing.h, csum.h, seq.h, tracking.h, translate.h, icmp.h; data in stitch_*.h. */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "stitch_consts.h"
#include "stitch_structs.h"
#include "stitch_maps.h"
#include "parsing.h"
#include "csum.h"
#include "seq.h"
#include "tracking.h"
#include "translate.h"
#include "icmp.h"

static __always_inline int stitch_run(struct __sk_buff *skb)
{
	struct global_cfg *g = get_cfg();
	struct scratch *s;
	struct flow_key key = {};
	struct leg_val *leg;
	struct stitch_cfg *sc;
	__u32 from_shell, to_shell, id;
	int r;

	if (!g)
		return TC_ACT_OK;
	if (g->clone_mark && skb->mark == g->clone_mark)
		return handle_clone(skb);
	/* At egress (combined mode, on the interface toward the shell) only this host's own packets
	 * are new here: anything forwarded or redirected was handled where it came in. */
	if (skb->ingress_ifindex && skb->ingress_ifindex != skb->ifindex)
		return TC_ACT_OK;
	if (g->clone_mark && skb->mark == g->clone_mark + 1) {
		skb->mark = 0;
		return TC_ACT_OK;
	}

	r = parse_packet(skb);
	if (r == PARSE_ICMP)
		return stitch_icmp(skb);
	if (r != PARSE_OK) {
		stat_inc(r == PARSE_MALFORMED ? ST_MALFORMED : ST_NOT_TCP);
		return TC_ACT_OK;
	}
	s = get_scratch();
	if (!s)
		return TC_ACT_OK;
	from_shell = is_shell(g, s->p.saddr);
	to_shell = is_shell(g, s->p.daddr);
	if (from_shell == to_shell) /* not the shell's, or the shell talking to itself */
		return TC_ACT_OK;
	flow_key_of(&key, &s->p, from_shell);

	leg = bpf_map_lookup_elem(&legs, &key);
	if (leg) {
		id = leg->id;
		sc = bpf_map_lookup_elem(&stitch_cfg, &id);
		if (sc && sc->gen == leg->gen) {
			if (from_shell)
				return stitch_from_shell(skb, id, leg->side);
			return stitch_from_far(skb, id, leg->side);
		}
		stat_inc(ST_STALE_GEN);
	}
	return track_packet(skb, from_shell ? 0 : 1);
}

/* Every run is counted when it begins and when it ends, per CPU. A flag the daemon writes (rules 9
 * and 11, docs/handover.md) is then known to be seen by every later run once each CPU's run that
 * was in progress at the write has ended: the daemon waits for that (a few microseconds) instead
 * of a timer. The begin count is an atomic add, a full barrier on x86: the run's reads of the
 * flags cannot pass it, as the daemon's read of the counts cannot pass its (locked) map write.
 * Runs on one CPU do not nest: tc runs with bottom halves off, and redirects to an ingress queue. */
SEC("tc")
int stitch_tc(struct __sk_buff *skb)
{
	__u32 k = 0;
	struct global_stats *st = bpf_map_lookup_elem(&stats, &k);
	int r;

	if (st)
		__sync_fetch_and_add(&st->c[ST_PACKETS], 1);
	r = stitch_run(skb);
	if (st)
		st->c[ST_RUNS_DONE]++;
	return r;
}

/* GPL: the kernel requires a GPL-compatible license for bpf_loop and the redirect helpers */
char _license[] SEC("license") = "GPL";
