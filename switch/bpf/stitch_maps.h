/* The maps of the stitch fast path, one line each. The daemon (switch/datapath.ts) opens them pinned
 * under <bpffs>/maps/<name> (bpftool prog load ... pinmaps). */
#ifndef STITCH_MAPS_H
#define STITCH_MAPS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "stitch_structs.h"

/* flows: every TCP flow of the shell, handshake and per-direction progress (LRU: idle flows age out). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, MAX_FLOWS);
	__type(key, struct flow_key);
	__type(value, struct flow_val);
} flows SEC(".maps");

/* legs: flow -> (stitch id, generation, side); written first at install, deleted last at removal. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_LEGS);
	__type(key, struct flow_key);
	__type(value, struct leg_val);
} legs SEC(".maps");

/* stitch_cfg: id -> translation (the commit entry): written last at install, deleted first at removal. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_STITCHES);
	__type(key, __u32);
	__type(value, struct stitch_cfg);
} stitch_cfg SEC(".maps");

/* stitch_state: id -> phase, drain progress, termination, counters (the datapath writes it). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_STITCHES);
	__type(key, __u32);
	__type(value, struct stitch_state);
} stitch_state SEC(".maps");

/* config: the shell's addresses, interfaces, MSS clamp, drop injector, clone mark (one element). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct global_cfg);
} config SEC(".maps");

/* stats: per-CPU counters of what the program did (ST_*). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct global_stats);
} stats SEC(".maps");

/* events: {id, gen} of a stitch whose phase or end bits changed (translate.h, state_changed), read by
 * the daemon as they come; 256 KiB holds 16384 (a record is 8 bytes behind an 8-byte header). */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
} events SEC(".maps");

/* scratch: per-CPU working memory (parsed packet, header copies), keeps the 512-byte stack free. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct scratch);
} scratch SEC(".maps");

#endif
