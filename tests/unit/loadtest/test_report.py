"""`fleetserve report`: every result shape it knows becomes PNGs; unknown shapes are a clear error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loadtest.report import ReportError, render
from shared.cli.main import main

REPO = Path(__file__).resolve().parents[3]
PNG = b"\x89PNG\r\n\x1a\n"


def write(tmp_path: Path, name: str, doc) -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return path


def is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == PNG and path.stat().st_size > 5_000


def lat(p50, p99):
    return {"p50": p50, "p95": (p50 + p99) / 2, "p99": p99, "mean": p50 * 1.2}


def test_latency_timeline_policy_comparison_and_autoscale_timeline(tmp_path):
    """The three agreed kinds (NOTES.md) each draw their PNG."""
    timeline = {
        "kind": "latency_timeline",
        "title": "ramp",
        "series": [{"t_s": t, "ttft_ms": lat(10 + t, 50 + 3 * t), "tpot_ms": lat(2, 5)} for t in range(30)],
    }
    policies = {
        "kind": "policy_comparison",
        "policies": {
            n: {"ttft_ms": lat(20, 90), "tpot_ms": lat(3, 9), "throughput_tok_s": 900} for n in "ab"
        },
    }
    scaling = {
        "kind": "autoscale_timeline",
        "series": [
            {
                "t_s": t,
                "desired": 1 + t // 10,
                "actual": 1 + max(0, t - 5) // 10,
                "load": t,
                "ttft_p99_ms": 80,
            }
            for t in range(40)
        ],
        "events": [{"t_s": 10, "what": "scale up"}],
    }
    outs = []
    for name, doc in (("t.json", timeline), ("p.json", policies), ("a.json", scaling)):
        outs += render(write(tmp_path, name, doc))
    assert [p.name for p in outs] == ["t-latency.png", "p-policies.png", "a-autoscale.png"]
    assert all(is_png(p) for p in outs)


def test_committed_benchmark_results_render(tmp_path):
    """docs/benchmarks' routing-policy records (one chart per workload) and bench runs (direct vs mesh)."""
    routing = render(REPO / "docs/benchmarks/routing_policies.json", tmp_path)
    assert len(routing) >= 2 and all(is_png(p) for p in routing)
    bench = render(REPO / "docs/benchmarks/cpu_mesh_overhead.json", tmp_path)
    assert bench and all(is_png(p) for p in bench)


def test_bad_inputs_are_clear_errors(tmp_path, capsys):
    """Unknown kinds, empty series and non-JSON are ReportError naming the problem; the CLI exits 1."""
    with pytest.raises(ReportError, match="unknown kind"):
        render(write(tmp_path, "x.json", {"kind": "pie"}))
    with pytest.raises(ReportError, match="series"):
        render(write(tmp_path, "y.json", {"kind": "latency_timeline", "series": []}))
    bad = tmp_path / "z.json"
    bad.write_text("{nope")
    assert main(["report", str(bad)]) == 1
    assert "error:" in capsys.readouterr().err
