"""SplitLimits: N gateway workers without Redis each hold an exact share of every limit, so together they admit
exactly the limit; refusals name the tenant's whole limit."""

from __future__ import annotations

from services.gateway.limits import LocalLimits, Rate, SplitLimits
from shared.workers import share


def test_shares_add_up_to_the_cap():
    """Integer caps split over workers sum to the cap exactly, the remainder going to the first workers."""
    for cap in range(0, 12):
        for n in range(1, 5):
            parts = [share(cap, i, n) for i in range(n)]
            assert sum(parts) == cap and max(parts) - min(parts) <= 1


async def test_workers_together_admit_exactly_the_stream_cap():
    """Three workers, a cap of 5 streams: 5 opens succeed in all, whatever worker they reach."""
    workers = [SplitLimits(LocalLimits(), i, 3) for i in range(3)]
    opened = 0
    for k in range(30):
        opened += await workers[k % 3].open_stream("tenant:t", 5, f"s{k}", 60.0)
    assert opened == 5


async def test_rate_buckets_split_and_refusals_name_the_whole_limit():
    """Two workers over a 10-request burst: each takes 5; a refusal reports the tenant's own 10/s limit."""
    rate = Rate("t:rps", 10.0, 1.0, "tenant:t", "10 requests per second")
    workers = [SplitLimits(LocalLimits(), i, 2) for i in range(2)]
    taken = [0, 0]
    refused = None
    for w, lim in enumerate(workers):
        for _ in range(8):
            r = await lim.take([(rate, 1.0)])
            if r:
                refused = r
            else:
                taken[w] += 1
    assert taken == [5, 5]
    assert refused is not None and refused[0][0] is rate and refused[0][1] > 0
