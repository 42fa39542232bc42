"""Fixed latency histogram buckets: the form in which percentiles stay correct when buckets are merged.

Bucket ``i`` holds latencies in ``(upper(i - 1), upper(i)]`` milliseconds, with ``upper(i) = 0.1 * 2 ** (i / 8)``:
geometric, eight buckets per doubling, so any percentile read back from merged counts is within
``RESOLUTION`` (about 4.4%) of the exact value. Bucket 0 holds everything up to 0.1 ms, the last everything
above ``upper(MAX_BUCKET - 1)`` (about 55 minutes). Each ledger row stores its bucket index
(``UsageRecord.latency_bucket``), so rollups count buckets with a GROUP BY and merging is adding counts.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

BASE_MS = 0.1
PER_DOUBLING = 8
MAX_BUCKET = 200
_FACTOR = 2 ** (1 / PER_DOUBLING)
_LOG_FACTOR = math.log(_FACTOR)
# Reading a bucket back as its geometric midpoint is off by at most half a bucket's ratio.
RESOLUTION = math.sqrt(_FACTOR) - 1


def bucket_of(latency_ms: float) -> int:
    """The bucket index of one latency in milliseconds."""
    if latency_ms <= BASE_MS:
        return 0
    index = math.ceil(math.log(latency_ms / BASE_MS) / _LOG_FACTOR - 1e-9)
    return min(index, MAX_BUCKET)


def bucket_upper(index: int) -> float:
    """The upper bound (ms) of bucket ``index``."""
    return BASE_MS * _FACTOR**index


def bucket_value(index: int) -> float:
    """The value a bucket stands for when a percentile falls in it: its geometric midpoint (0 for bucket 0's)."""
    if index <= 0:
        return BASE_MS / 2
    return BASE_MS * _FACTOR ** (index - 0.5)


def histogram_merge(histograms: Iterable[Mapping[str, int] | Mapping[int, int]]) -> dict[int, int]:
    """Add bucket counts (keys may be ints or the strings JSON turns them into)."""
    merged: dict[int, int] = {}
    for histogram in histograms:
        for index, count in histogram.items():
            merged[int(index)] = merged.get(int(index), 0) + int(count)
    return merged


def percentiles(histogram: Mapping[int, int], quantiles: Iterable[float]) -> list[float | None]:
    """The latency (ms) at each quantile (0..1) of a histogram; ``None`` for each when it is empty."""
    ordered = sorted((index, count) for index, count in histogram.items() if count > 0)
    total = sum(count for _, count in ordered)
    result: list[float | None] = []
    for quantile in quantiles:
        if total == 0:
            result.append(None)
            continue
        # The nearest-rank definition: the smallest value with at least q of the observations at or below it.
        rank = max(1, math.ceil(quantile * total))
        seen = 0
        for index, count in ordered:
            seen += count
            if seen >= rank:
                result.append(round(bucket_value(index), 3))
                break
    return result
