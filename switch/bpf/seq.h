/* Sequence-space arithmetic (modulo 2^32, RFC 793 style) and lock-free "raise to at least" updates
 * of map values shared by CPUs (compare-and-swap; needs -mcpu=v3). */
#ifndef STITCH_SEQ_H
#define STITCH_SEQ_H

#include <linux/types.h>

static __always_inline int seq_before(__u32 a, __u32 b) { return (__s32)(a - b) < 0; }
static __always_inline int seq_after(__u32 a, __u32 b) { return (__s32)(a - b) > 0; }
static __always_inline __u32 seq_max(__u32 a, __u32 b) { return seq_after(a, b) ? a : b; }
static __always_inline __u32 seq_min(__u32 a, __u32 b) { return seq_before(a, b) ? a : b; }

#define READ_ONCE32(x) (*(volatile __u32 *)&(x))
#define READ_ONCE64(x) (*(volatile __u64 *)&(x))

/* Raises *p to v if v is after it (mod 2^32). Returns 1 if this call raised it. A few retries:
 * losing every race means other CPUs raised it at least as far, or nearly so. */
static __always_inline int seq_raise(__u32 *p, __u32 v)
{
#pragma clang loop unroll(full)
	for (int i = 0; i < 3; i++) {
		__u32 cur = READ_ONCE32(*p);

		if (!seq_after(v, cur))
			return 0;
		if (__sync_val_compare_and_swap(p, cur, v) == cur)
			return 1;
	}
	return 0;
}

/* Raises *p to at least v and returns the result: max(*p, v) (mod 2^32). */
static __always_inline __u32 seq_raise_get(__u32 *p, __u32 v)
{
	__u32 cur;

	seq_raise(p, v);
	cur = READ_ONCE32(*p);
	return seq_after(v, cur) ? v : cur;
}

#endif
