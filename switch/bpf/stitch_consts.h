/* Constants of the stitch fast path: return codes, protocol numbers, map sizes, flag bits.
 * Every value the TypeScript side relies on is mirrored in switch/bpf/layout.ts. */
#ifndef STITCH_CONSTS_H
#define STITCH_CONSTS_H

/* tc actions (linux/pkt_cls.h) */
#define TC_ACT_OK        0
#define TC_ACT_SHOT      2
#define TC_ACT_REDIRECT  7

#define ETH_HLEN         14
#define ETH_P_IP         0x0800
#define IPPROTO_ICMP     1
#define IPPROTO_TCP      6
#define ICMP_DEST_UNREACH  3
#define ICMP_TIME_EXCEEDED 11
#define IP_MF            0x2000
#define IP_OFFSET        0x1fff

/* TCP flags (byte 13 of the header) */
#define TCP_FIN  0x01
#define TCP_SYN  0x02
#define TCP_RST  0x04
#define TCP_PSH  0x08
#define TCP_ACK  0x10
#define TCP_URG  0x20

/* TCP option kinds */
#define TCPOPT_EOL        0
#define TCPOPT_NOP        1
#define TCPOPT_MSS        2
#define TCPOPT_WINDOW     3
#define TCPOPT_SACK_PERM  4
#define TCPOPT_SACK       5
#define TCPOPT_TIMESTAMP  8

#define TCP_MAX_HDR      60   /* doff 15 */
#define TCP_MAX_OPTS     40
#define HDR_BUF          64   /* scratch header copies: a power of two >= TCP_MAX_HDR */
#define SACK_MAX_BLOCKS  4

/* Map sizes */
#define MAX_FLOWS        65536  /* tracked TCP flows of the shell (LRU) */
#define MAX_STITCHES     4096
#define MAX_LEGS         (2 * MAX_STITCHES)
#define MAX_SHELL_ADDRS  4

/* flow_dir.flags */
#define FLOW_SYN      0x01  /* this direction's SYN (or SYN-ACK) was seen: isn and options valid */
#define FLOW_SACK_OK  0x02  /* SYN carried SACK-permitted */
#define FLOW_TS_OK    0x04  /* SYN carried a timestamp option */
#define FLOW_WS_OK    0x08  /* SYN carried a window-scale option */
#define FLOW_FIN      0x10
#define FLOW_RST      0x20
#define FLOW_ACKED    0x40  /* ack_hi / edge_hi hold a value */
#define FLOW_TSVAL    0x80  /* tsval_hi / ts_base hold a value */

/* A far end on this very host (combined mode: the core's own packets, seen at egress): what is
 * translated toward it is delivered here (TC_ACT_OK after the rewrite), not redirected. */
#define IFINDEX_LOCAL 0xffffffffu

/* global_cfg.flags */
#define CFG_NO_CLONE      0x0001  /* never call bpf_clone_redirect (BPF_PROG_TEST_RUN vectors) */

/* stitch_cfg.flags */
#define STITCH_START_STITCHED 0x0001  /* skip the drain: the shell is known to hold nothing */
#define STITCH_FORCE_STITCHED 0x0002  /* drain done once the shell holds nothing (rules 8, 11) */

/* stitch_cfg.side[].opts */
#define SIDE_TS    0x01  /* timestamps negotiated on this leg */
#define SIDE_SACK  0x02  /* SACK negotiated on this leg */

/* Sides of a stitch: the far end of the client leg (C) and of the core leg (B). */
#define SIDE_CLIENT 0
#define SIDE_CORE   1

/* stitch_state.phase */
#define PHASE_INSTALLED   0  /* committed, no packet seen yet */
#define PHASE_DRAINING    1  /* translating; the shell's legs still drain */
#define PHASE_STITCHED    2  /* the shell fully silenced */
#define PHASE_FAILED      3  /* a leg's tracking vanished before the first packet: pass untouched */

/* stitch_state.term bits; (x << side) */
#define TERM_FIN        0x01  /* FIN from the far end of side s: 0x01 << s */
#define TERM_FIN_ACKED  0x04  /* that FIN acknowledged by the other far end: 0x04 << s */
#define TERM_RST        0x10  /* RST from the far end of side s: 0x10 << s */

/* How long the drain condition must hold before the shell is silenced. */
#define DRAIN_HOLD_NS   1000000ULL

/* global_stats.c[] indexes (per CPU) */
#define ST_PACKETS       0   /* program runs begun (packets seen); atomic: see stitch_tc */
#define ST_NOT_TCP       1   /* passed: not IPv4/TCP, fragments */
#define ST_MALFORMED     2   /* passed: truncated, bad lengths, bad options */
#define ST_TRACKED       3   /* packets of the shell's flows tracked */
#define ST_SYN           4   /* SYN / SYN-ACK recorded */
#define ST_MSS_CLAMPED   5
#define ST_TRANSLATED    6
#define ST_SHELL_DROPPED 7
#define ST_SHELL_PASSED  8
#define ST_CLONES        9
#define ST_CLONE_FAILED  10
#define ST_INJECTED_DROP 11
#define ST_STALE_GEN     12  /* leg without a matching commit entry */
#define ST_ERRORS        13  /* helper failures */
#define ST_ICMP          14  /* ICMP errors about a stitched flow translated back */
#define ST_SHELL_ANSWERED 15 /* S answered the shell for a far end: it missed an ack or window (rule 10) */
#define ST_STATE_CHANGES 16  /* a stitch's phase or end bits changed: the daemon re-reads settled ones */
#define ST_RUNS_DONE     17  /* program runs finished: ST_PACKETS - ST_RUNS_DONE is the run in progress */
#define ST_EVENTS_LOST   18  /* a state change the events ring had no room for: the daemon sweeps the table */
#define ST_COUNT         32  /* a power of two (stat_inc masks with it) */

#endif
