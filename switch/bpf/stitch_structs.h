/* Map key and value structs. The TypeScript side (switch/bpf/layout.ts) packs and unpacks these
 * byte for byte, so every struct is naturally aligned with explicit padding, its size is asserted
 * below, and each field's offset is written next to it.
 *
 * Byte order: addresses and ports are in network order (as on the wire); every other field is in
 * host order (little-endian on x86-64 and arm64). Sequence, ack and TSval fields are host-order
 * 32-bit numbers compared modulo 2^32. */
#ifndef STITCH_STRUCTS_H
#define STITCH_STRUCTS_H

#include <linux/types.h>
#include "stitch_consts.h"

/* A TCP flow of the shell, oriented from the shell: key of `flows` and `legs`. 12 bytes. */
struct flow_key {
	__u32 shell_addr;   /*  0 the shell's address (A), network order */
	__u32 peer_addr;    /*  4 the far end (C or B), network order */
	__u16 shell_port;   /*  8 network order */
	__u16 peer_port;    /* 10 network order */
};

/* One direction of a tracked flow. 48 bytes. */
struct flow_dir {
	__u32 isn;          /*  0 initial sequence number (valid with FLOW_SYN) */
	__u32 seq_hi;       /*  4 highest sequence end sent (seq + payload + SYN + FIN) */
	__u32 ack_hi;       /*  8 highest ack sent (valid with FLOW_ACKED) */
	__u32 edge_hi;      /* 12 highest right window edge advertised: ack + (win << scale) */
	__u32 tsval_hi;     /* 16 highest TSval sent (valid with FLOW_TSVAL) */
	__u32 tsecr_last;   /* 20 last TSecr sent */
	__u32 ts_base;      /* 24 highest (TSval - now_ms): the sender's TS clock minus ktime in ms */
	__u32 fin_seq;      /* 28 sequence number of the FIN (valid with FLOW_FIN) */
	__u64 last_ns;      /* 32 bpf_ktime_get_ns() of the last packet */
	__u16 mss;          /* 40 MSS option of the SYN after clamping (0: none) */
	__u16 win_last;     /* 42 raw window field of the last packet */
	__u8  wscale;       /* 44 window-scale shift of the SYN (valid with FLOW_WS_OK) */
	__u8  flags;        /* 45 FLOW_* */
	__u16 pad;          /* 46 */
};

/* Value of `flows`. 112 bytes. */
struct flow_val {
	struct flow_dir dir[2]; /*   0 dir[0]: shell -> peer, dir[1]: peer -> shell (48 each) */
	__u32 peer_ifindex;     /*  96 interface the peer's packets arrive on */
	__u32 shell_ifindex;    /* 100 interface the shell's packets arrive on */
	__u64 created_ns;       /* 104 ktime of the first SYN */
};

/* Value of `config` (array, one element). 64 bytes. */
struct global_cfg {
	__u32 shell_addr[MAX_SHELL_ADDRS]; /*  0 the shell's addresses/prefixes, network order */
	__u32 shell_mask[MAX_SHELL_ADDRS]; /* 16 masks, network order; 0: slot unused */
	__u32 shell_ifindex;  /* 32 interface toward A, for clones (0: learned per flow) */
	__u32 client_ifindex; /* 36 interface toward the client side (0: learned per flow) */
	__u32 core_ifindex;   /* 40 interface toward the core side (0: learned per flow) */
	__u32 drop_ppm;       /* 44 drop injector: translated packets dropped per million */
	__u32 clone_mark;     /* 48 skb->mark tagging clones re-entering for the shell (0: no clones) */
	__u16 mss_clamp;      /* 52 MSS clamp for SYNs of the shell's flows (0: off) */
	__u16 flags;          /* 54 CFG_* */
	__u32 self_addr;      /* 56 this host's address toward the shell, network order: never the shell's */
	__u32 reserved;       /* 60 */
};

/* Value of `legs`: which stitch a flow belongs to. 12 bytes. */
struct leg_val {
	__u32 id;           /*  0 stitch id */
	__u32 gen;          /*  4 generation: must equal stitch_cfg.gen */
	__u8  side;         /*  8 SIDE_CLIENT (this is the client leg) or SIDE_CORE */
	__u8  pad[3];       /*  9 */
};

/* One side of a stitch as the daemon computed it at install. 32 bytes. */
struct stitch_side {
	__u32 far_addr;     /*  0 C (client side) or B (core side), network order */
	__u32 shell_addr;   /*  4 A's address on this leg, network order */
	__u16 far_port;     /*  8 p1 or v2, network order */
	__u16 shell_port;   /* 10 p2 or v1, network order */
	__u32 seq_delta;    /* 12 added to this far end's seq gives the other leg's seq */
	__u32 ts_delta;     /* 16 added to this far end's TSval gives the other leg's TSval */
	__u32 far_ifindex;  /* 20 interface toward this far end */
	__u8  ws_far;       /* 24 shift of the windows this far end sends (0: no scaling) */
	__u8  ws_shell;     /* 25 shift this far end applies to windows it receives */
	__u8  opts;         /* 26 SIDE_TS | SIDE_SACK as negotiated on this leg */
	__u8  pad;          /* 27 */
	__u32 pad2;         /* 28 */
};

/* Value of `stitch_cfg`, key u32 id: the commit entry. Written by the daemon only. 80 bytes. */
struct stitch_cfg {
	__u32 id;             /*  0 */
	__u32 gen;            /*  4 */
	__u32 shell_ifindex;  /*  8 interface toward A (clones) */
	__u32 flags;          /* 12 STITCH_* */
	struct stitch_side side[2]; /* 16 [SIDE_CLIENT], 48 [SIDE_CORE] */
};

/* Per far end s: the stream it sends ("stream s") and what it has seen. 80 bytes. */
struct stitch_state_side {
	__u32 boundary;       /*  0 far s's bytes below this went to the shell (its advertised edge) */
	__u32 handed;         /*  4 highest sequence end of far s's bytes handed to the shell */
	__u32 ack_far;        /*  8 highest ack far s sent (its leg's A->far space) */
	__u32 edge_far;       /* 12 highest right edge far s advertised (same space) */
	__u32 ack_sent;       /* 16 highest ack sent to far s (its leg's far->A space) */
	__u32 ts_seen;        /* 20 highest TSval sent to far s (PAWS floor) */
	__u32 ack_to_shell;   /* 24 highest ack cloned to the shell on leg s */
	__u32 edge_to_shell;  /* 28 highest edge cloned to the shell on leg s */
	__u32 fin_seq;        /* 32 sequence number of far s's FIN (TERM_FIN << s) */
	__u32 seq_sent;       /* 36 highest sequence end sent to far s, by the shell or translated */
	__u64 packets;        /* 40 packets from far s translated */
	__u64 bytes;          /* 48 payload bytes from far s translated */
	__u64 clones;         /* 56 clones of far s's packets sent to the shell */
	__u64 shell_dropped;  /* 64 the shell's packets on leg s dropped */
	__u64 shell_passed;   /* 72 the shell's packets on leg s passed (rewritten) while draining */
};

/* Value of `stitch_state`, key u32 id. Created zeroed by the daemon (id, gen), then written by the
 * datapath only. 224 bytes. */
struct stitch_state {
	__u32 id;             /*  0 */
	__u32 gen;            /*  4 */
	__u32 phase;          /*  8 PHASE_* */
	__u32 term;           /* 12 TERM_* bits */
	__u64 first_ns;       /* 16 ktime of the first packet after the commit (the snapshot) */
	__u64 drain_ok_ns;    /* 24 ktime since when the drain condition holds (0: it does not) */
	__u64 stitched_ns;    /* 32 ktime of the switch to PHASE_STITCHED */
	__u64 reserved0;      /* 40 (was the last packet's ktime: written per packet by both directions,
	                       *     it bounced the line phase is read from between CPUs, and nothing read it) */
	__u64 injected_drops; /* 48 drop injector */
	__u64 reserved1;      /* 56 */
	struct stitch_state_side side[2]; /* 64 [SIDE_CLIENT], 144 [SIDE_CORE] */
};

/* Per-CPU scratch: the parsed packet and two copies of its TCP header. */
struct pkt {
	__u32 saddr, daddr;   /* network order */
	__u16 sport, dport;   /* network order */
	__u32 seq, ack;       /* host order */
	__u32 l4_off;         /* TCP header offset from the start of the frame */
	__u32 tcp_len;        /* TCP header length (doff * 4) */
	__u32 ip_len;         /* IP total length */
	__u32 payload;        /* TCP payload bytes */
	__u32 ihl;            /* IP header bytes */
	__u32 tsval, tsecr;   /* host order, valid when ts_off */
	__u16 win;            /* host order, unscaled */
	__u16 mss;            /* MSS option value */
	__u8  flags;          /* TCP flags */
	__u8  ttl;
	__u8  ws;             /* window-scale option value */
	__u8  sack_ok;        /* SACK-permitted option present */
	__u8  mss_off;        /* offset of the option's kind byte in the TCP header, 0: absent */
	__u8  ws_off;
	__u8  ts_off;
	__u8  sack_off;
	__u8  sack_n;         /* SACK blocks */
	__u8  bad;            /* malformed options */
	__u8  pad[2];
};

struct scratch {
	__u8 old_hdr[HDR_BUF];  /* the TCP header as received */
	__u8 hdr[HDR_BUF];      /* the TCP header as it will be sent */
	__u8 chunk[256];        /* payload chunk (checksum of trimmed bytes) */
	struct pkt p;
};

struct global_stats {
	__u64 c[ST_COUNT];
};

_Static_assert(sizeof(struct flow_key) == 12, "flow_key layout");
_Static_assert(sizeof(struct flow_dir) == 48, "flow_dir layout");
_Static_assert(sizeof(struct flow_val) == 112, "flow_val layout");
_Static_assert(sizeof(struct global_cfg) == 64, "global_cfg layout");
_Static_assert(sizeof(struct leg_val) == 12, "leg_val layout");
_Static_assert(sizeof(struct stitch_side) == 32, "stitch_side layout");
_Static_assert(sizeof(struct stitch_cfg) == 80, "stitch_cfg layout");
_Static_assert(sizeof(struct stitch_state_side) == 80, "stitch_state_side layout");
_Static_assert(sizeof(struct stitch_state) == 224, "stitch_state layout");

#endif
