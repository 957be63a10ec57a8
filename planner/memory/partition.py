"""Which parameters a ZeRO-1/2 partition touches.

DeepSpeed flattens a rank's parameters in model order, pads to a multiple of 2N and gives rank r
the slice [r P, (r+1) P). Its gradient partition buffer (stage_1_and_2.py grads_in_partition) is
sized by every parameter that overlaps the slice, counted whole: P_in >= P.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from functools import lru_cache
from itertools import accumulate


@lru_cache(maxsize=4096)
def partition_span(sizes: tuple[int, ...], n: int) -> int:
    """Largest P_in over the n ranks, elements."""
    total = sum(sizes)
    if n <= 1 or total == 0:
        return total
    align = 2 * n
    part = (-(-total // align) * align) // n
    ends = list(accumulate(sizes))
    starts = [e - s for e, s in zip(ends, sizes)]
    best = 0
    for r in range(n):
        lo, hi = r * part, min((r + 1) * part, total)
        if lo >= total:
            break
        first = bisect_right(ends, lo)  # first tensor ending after lo
        last = bisect_left(starts, hi) - 1  # last tensor starting before hi
        best = max(best, ends[last] - starts[first])
    return best


def first_bucket(sizes: tuple[int, ...], bucket: int) -> int:
    """Elements of the leading parameters that fill the first ZeRO-1/2 reduce bucket, B_1.

    DeepSpeed reduces a full bucket before adding a parameter that would overflow it
    (stage_1_and_2.py reduce_independent_p_g_buckets_and_remove_grads: ``elements + numel >
    reduce_bucket_size``); a parameter larger than the bucket bypasses it (extra_large_param_to_reduce)
    and is not freed by the copy, so a first parameter larger than the bucket gives B_1 = 0."""
    filled = 0
    for size in sizes:
        if filled + size > bucket:
            break
        filled += size
    return filled
