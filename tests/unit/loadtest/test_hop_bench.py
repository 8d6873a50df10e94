"""hop_bench's bookkeeping (no processes): medians over repeats, the one-stream table's A/B pairing."""

from __future__ import annotations

from loadtest import hop_bench


def _run(mode: str, ttft: float, cpu: float) -> dict:
    return {
        "mode": mode,
        "hops": ["router", "gateway"],
        "c1": {
            "ttft_p50_ms": ttft,
            "requests": 100,
            "hop_cpu_ms_per_request": {"router": cpu, "gateway": cpu},
        },
    }


def test_the_one_stream_table_pairs_each_mode_with_its_base_run_by_run():
    runs = {
        "mesh@base": [_run("mesh@base", 5.0, 2.0), _run("mesh@base", 7.0, 2.2)],
        "mesh": [_run("mesh", 4.5, 1.8), _run("mesh", 6.0, 2.0)],
        "mesh@base#2": [_run("mesh@base#2", 5.2, 2.1), _run("mesh@base#2", 6.8, 2.1)],
    }
    doc = {"streams": 0, "records": [hop_bench.median_record(r) for r in runs.values()]}
    table = hop_bench.markdown(doc)
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()[2:]}
    assert "6.000 [5.000-7.000]" in rows["mesh@base"]
    # mesh against mesh@base in the same repeat: -0.5 and -1.0 ms.
    assert "-0.750 [-1.000--0.500] ms" in rows["mesh"]
    # The A/A label pairs with the same base: +0.2 and -0.2.
    assert "+0.000 [-0.200-+0.200] ms" in rows["mesh@base#2"]
    # CPU per request: both hops summed.
    assert "3.800 [3.600-4.000]" in rows["mesh"]


def test_a_label_after_hash_runs_the_same_mode():
    class Args:
        base_tree = ""

    try:
        hop_bench.start_mode("mesh@base#2", None, Args())  # type: ignore[arg-type]
    except SystemExit as e:
        assert "--base-tree" in str(e)
    else:
        raise AssertionError("a @base mode without --base-tree must be refused")


def test_the_closed_loop_keeps_each_stream_on_its_own_requests_until_the_time_is_up():
    """Both clients' loop: stream k sends requests k, k + streams, ... one after the other until duration_s has
    passed; a request that starts before the end is finished."""
    import asyncio

    sent: list[int] = []
    in_flight = 0

    async def one_request(i: int) -> None:
        nonlocal in_flight
        in_flight += 1
        assert in_flight <= 3  # never more than one request per stream
        sent.append(i)
        await asyncio.sleep(0.01)
        in_flight -= 1

    wall = asyncio.run(hop_bench.closed_loop(3, 0.05, 0.0, one_request))
    assert wall >= 0.05 and in_flight == 0
    for k in range(3):
        mine = [i for i in sent if i % 3 == k]
        assert mine[0] == k and mine == list(range(k, k + 3 * len(mine), 3)) and len(mine) >= 2
    n = len(sent)
    asyncio.run(hop_bench.closed_loop(2, 0.0, 0.0, one_request))
    assert len(sent) == n  # no time left: no request


def test_request_ids_are_unique_within_and_across_runs():
    """Each engine and router request of a run has its own id (not r0-r63 again), another run's ids differ."""
    from fleetserve.engine.v1 import engine_service_pb2 as engine_pb
    from fleetserve.router.v1 import router_service_pb2 as router_pb

    for kind, parse in (("engine", engine_pb.GenerateRequest), ("router", router_pb.GenerateRequest)):
        reqs = [hop_bench.request_bytes(kind, i) for i in range(64)]
        seen = set()
        for ids in (hop_bench.unique_ids(kind), hop_bench.unique_ids(kind)):
            for i in range(200):
                r = parse.FromString(reqs[i % 64] + ids(i))
                assert r.spec.prompt.startswith(f"request {i % 64} ") and r.spec.sampling.max_tokens == 64
                seen.add(r.request_id)
        assert len(seen) == 400
    assert hop_bench.unique_ids("gateway")(5) == b""
