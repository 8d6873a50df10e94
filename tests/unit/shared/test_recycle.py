"""shared.recycle: a worker's Recycler asks for recycling once, at its limit (plus jitter); none without a limit or
outside a supervised worker."""

from __future__ import annotations

import asyncio
import random
from types import SimpleNamespace

from shared.recycle import Recycler, recycler


def test_the_recycle_file_is_touched_once_at_the_limit(tmp_path):
    path = tmp_path / "w.recycle"
    r = Recycler(str(path), 5, jitter=3, rng=random.Random(1))
    assert 5 <= r.limit <= 8
    for _ in range(r.limit - 1):
        r.served_one()
    assert not path.exists()
    r.served_one()
    assert path.exists() and r.triggered
    path.unlink()
    r.served_one()  # once only: the supervisor is already on it
    assert not path.exists()


def test_no_recycler_without_a_limit_or_a_supervisor(tmp_path):
    base = {"max_requests_jitter": 0, "recycle_file": str(tmp_path / "x")}
    assert recycler(SimpleNamespace(max_requests_per_worker=0, **base)) is None
    assert recycler(SimpleNamespace(max_requests_per_worker=10, **{**base, "recycle_file": ""})) is None
    assert recycler(SimpleNamespace(max_requests_per_worker=10, **base)).limit == 10


async def test_a_gated_recycler_waits_for_its_gate(tmp_path):
    """With a gate, a worker at its limit asks it (in a task, at most once per GATE_RECHECK_S) and touches the
    recycle file only once the gate allows it: an engine replica goes only while another of its model serves."""
    path = tmp_path / "w.recycle"
    answers = [False, True]
    asked = []

    async def gate() -> bool:
        asked.append(1)
        return answers[len(asked) - 1]

    r = Recycler(str(path), 2, gate=gate)
    r.served_one()
    r.served_one()  # at the limit: the gate is asked, says no
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert len(asked) == 1 and not path.exists() and not r.triggered
    r.served_one()  # within GATE_RECHECK_S of the last ask: not asked again
    await asyncio.sleep(0)
    assert len(asked) == 1
    r._next_check = 0.0  # as if GATE_RECHECK_S had passed
    r.served_one()
    for _ in range(3):
        await asyncio.sleep(0)
    assert len(asked) == 2 and path.exists() and r.triggered
