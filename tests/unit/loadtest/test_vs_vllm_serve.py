"""loadtest.gpu_vs_vllm's CPU-side parts: the engine core's CPUs, paired ratios, targets, per-hop TTFT."""

from __future__ import annotations

import json
import os

import psutil
import pytest

from loadtest import gpu_vs_vllm as g


def test_engine_core_gets_the_fastest_cpus_on_different_cores_and_its_siblings_stay_idle():
    speeds = {0: 9.0, 1: 9.5, 2: 10.0, 3: 8.0, 4: 10.0, 5: 7.0}
    cores = {0: "0,1", 1: "0,1", 2: "2,3", 3: "2,3", 4: "4", 5: "5"}
    engine, rest = g.choose_cpus(speeds, cores, 2)
    assert engine == [2, 4]  # 2 and 4 are fastest; never two threads of one core
    assert rest == [0, 1, 5]  # 3 is 2's sibling: left idle


def test_cpu_speed_is_measured_on_each_cpu_and_affinity_restored():
    before = os.sched_getaffinity(0)
    cpu = min(before)
    assert g._cpu_speed(cpu, loops=20_000) > 0
    assert os.sched_getaffinity(0) == before


def test_engine_core_is_the_process_with_most_gpu_memory_else_the_first_spawned():
    me = psutil.Process()
    assert g.engine_core_pids([me], {me.pid: 30_000}) == [me.pid]
    assert g.engine_core_pids([me], {}) == []  # no spawned children


def _rec(rep, server, c, toks, p50, p99, **kw):
    return {"rep": rep, "server": server, "concurrency": c, "output_tokens_per_s": toks, "ttft_p50_ms": p50,
            "ttft_p99_ms": p99, "tpot_p50_ms": 1.0, "cpu_by_process": {}, **kw}  # fmt: skip


def test_paired_ratios_and_targets():
    recs = [
        _rec(1, "vllm-api1", 1, 500, 15, 20), _rec(1, "vllm-api8", 1, 450, 16, 21), _rec(1, "mesh", 1, 490, 17, 22),
        _rec(2, "vllm-api1", 1, 400, 15, 20), _rec(2, "vllm-api8", 1, 450, 16, 21), _rec(2, "mesh", 1, 440, 19, 22),
        _rec(1, "vllm-api8", 256, 20000, 200, 500), _rec(1, "mesh", 256, 19000, 190, 700),
    ]  # fmt: skip
    pairs = g.paired(recs)
    assert [x["toks_ratio"] for x in pairs[1]["reps"]] == [0.98, 0.978]
    assert pairs[1]["reps"][1]["best"] == "vllm-api8"
    assert pairs[1]["fastest_rounds"] == [0, 2] and pairs[256]["fastest_rounds"] == [0, 1]
    faster = [*recs, _rec(3, "vllm-api1", 1, 400, 15, 20), _rec(3, "mesh", 1, 400, 15, 20)]
    assert g.paired(faster)[1]["fastest_rounds"] == [1, 3]  # a tie counts for the mesh
    met = g.targets(g.summarize(recs), pairs)
    assert met[1]["best"] == "vllm-api1" and met[1]["toks_ratio_of_medians"] == pytest.approx(
        465 / 450, abs=1e-3
    )
    assert met[1]["ttft_p50_delta_ms"] == 3.0 and met[1]["ttft_p50_met"]
    assert not met[256]["toks_met"] and met[256]["ttft_p99_ratio"] == 1.4 and not met[256]["ttft_p99_met"]


def test_best_of_noise_reads_below_one_for_equal_noisy_servers_and_one_without_noise():
    noisy = [
        _rec(i, f"vllm-api{n}", 1, 400 + 37 * ((i * 7 + n) % 5), 15, 20) for i in range(6) for n in (1, 4, 8)
    ]
    noisy += [_rec(i, "mesh", 1, 440, 17, 22) for i in range(6)]
    got = g.best_of_noise(noisy, 1, draws=500)
    # Three servers dealt from one pool: the highest median is above the pool's by chance alone.
    assert 0.85 < got["identical_server_reads"] < 1.0
    assert got["mesh_vs_pooled_median"] == round(440 / got["vllm_pooled_median"], 3)
    quiet = [_rec(i, f"vllm-api{n}", 1, 500, 15, 20) for i in range(4) for n in (1, 4)]
    assert g.best_of_noise(quiet, 1)["identical_server_reads"] == 1.0
    assert g.best_of_noise(quiet, 32) is None
    assert g.targets(g.summarize(noisy), g.paired(noisy), noisy)[1]["best_of_noise"] == g.best_of_noise(
        noisy, 1
    )


def test_vllm_serve_variants_are_compared_with_the_best_plain_vllm_serve_never_the_best():
    recs = [
        _rec(1, "vllm-api8", 128, 30000, 100, 200), _rec(1, "vllm-api8-kv", 128, 33000, 90, 180),
        _rec(1, "mesh", 128, 29000, 110, 210),
    ]  # fmt: skip
    assert g.paired(recs)[128]["reps"][0]["best"] == "vllm-api8"
    assert g.targets(g.summarize(recs), g.paired(recs))[128]["best"] == "vllm-api8"
    assert g.paired(recs, "vllm-api8-kv")[128]["toks_ratio_median"] == 1.1


def test_hop_ttft_reads_the_mesh_logs_within_each_run(tmp_path):
    lines = [
        {"event": "gateway.request", "timestamp": "2026-12-02T13:00:01.000000Z", "ttft_ms": 20.0},
        {"event": "gateway.request", "timestamp": "2026-12-02T13:00:02.000000Z", "ttft_ms": 22.0},
        {
            "event": "engine.request",
            "timestamp": "2026-12-02T13:00:01.500000Z",
            "ttft_ms": 14.0,
            "duration_ms": 524.0,
            "output_tokens": 256,
        },
        {
            "event": "gateway.request",
            "timestamp": "2026-12-02T13:10:00.000000Z",
            "ttft_ms": 99.0,
        },  # another run
    ]
    (tmp_path / "gateway.log").write_text(
        "\n".join(json.dumps(x) for x in lines[:2] + lines[3:]) + "\nnot json\n"
    )
    (tmp_path / "engine-1.log").write_text(json.dumps(lines[2]) + "\n")
    t0 = 1796216400.0  # 2026-12-02T13:00:00Z
    recs = [_rec(1, "mesh", 1, 400, 21, 25, started_at=t0, ended_at=t0 + 3)]
    hop = g.hop_ttft(recs, str(tmp_path))
    assert hop[1]["requests"] == {"gateway": 2, "engine": 1}
    assert hop[1]["engine_p50_ms"] == 14.0 and hop[1]["gateway_p99_ms"] == 22.0
    assert hop[1]["gateway_mean_ms"] == 21.0 and hop[1]["engine_mean_ms"] == 14.0
    # TPOT where the line has the duration and 2+ tokens: (524 - 14) / 255 at the engine, none at the gateway.
    assert hop[1]["engine_tpot_p50_ms"] == 2.0 and "gateway_tpot_p50_ms" not in hop[1]
    assert hop[1]["client_tpot_p50_ms_median"] == 1.0


def test_wave_legs_splits_each_wave_of_c_arrivals_into_quarters_by_arrival_order(tmp_path):
    from datetime import UTC, datetime

    t0 = 1796216400.0  # 2026-12-02T13:00:00Z

    def line(event, rid, start, ttft, dur=500.0):
        end = datetime.fromtimestamp(start + dur / 1000, UTC).isoformat().replace("+00:00", "Z")
        return json.dumps(
            {"event": event, "request_id": rid, "timestamp": end, "ttft_ms": ttft, "duration_ms": dur}
        )

    gw, en = [], []
    # Two waves of c = 4 (request i of a wave reaches the gateway 2i ms after the first and the engine 1 + i ms
    # later), a 1 s pause between them, and a lone straggler that is no wave of ~c.
    for w in range(2):
        for i in range(4):
            rid, at = f"w{w}r{i}", t0 + w + 0.002 * i
            gw.append(line("gateway.request", rid, at, 30.0 + i))
            en.append(line("engine.request", rid, at + (1 + i) / 1000, 20.0 + i))
    gw.append(line("gateway.request", "late", t0 + 2.5, 99.0))
    en.append(line("engine.request", "late", t0 + 2.501, 99.0))
    (tmp_path / "gateway.log").write_text("\n".join(gw) + "\n")
    (tmp_path / "engine-1.log").write_text("\n".join(en) + "\n")
    recs = [
        _rec(1, "mesh", 4, 400, 21, 25, started_at=t0 - 1, ended_at=t0 + 3),
        _rec(1, "vllm-api4", 4, 1, 1, 1),
    ]
    legs = g.wave_legs(recs, str(tmp_path))
    assert legs[4]["waves"] == 2
    q = legs[4]["quarters"]
    assert [x["requests"] for x in q] == [2, 2, 2, 2]
    assert [x["arrival_ms"] for x in q] == [0.0, 2.0, 4.0, 6.0]
    assert [x["gateway_to_engine_ms"] for x in q] == [1.0, 2.0, 3.0, 4.0]
    assert [x["engine_ttft_ms"] for x in q] == [20.0, 21.0, 22.0, 23.0]
    assert [x["gateway_ttft_ms"] for x in q] == [30.0, 31.0, 32.0, 33.0]
    assert g.wave_legs(recs, str(tmp_path), "mesh-wide") == {}


def test_vllm_timings_are_means_over_a_run_from_a_real_metrics_endpoint():
    from prometheus_client import CollectorRegistry, Histogram, start_http_server

    reg = CollectorRegistry()
    labels = ["model_name", "engine"]
    ttft = Histogram("vllm:time_to_first_token_seconds", "ttft", labels, buckets=[0.01, 0.1], registry=reg)
    queue = Histogram("vllm:request_queue_time_seconds", "queue", labels, buckets=[0.01, 0.1], registry=reg)
    Histogram("vllm:e2e_request_latency_seconds", "not read", labels, registry=reg).labels("m", "0").observe(
        9.0
    )
    ttft.labels("m", "0").observe(1.0)  # before the run: left out of its mean
    server, thread = start_http_server(0, addr="127.0.0.1", registry=reg)
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        before = g.vllm_timings(url)
        assert before == {"server_ttft": (1.0, 1.0), "engine_queue": (0.0, 0.0)}
        # The run: two API processes' worth of labels, summed.
        ttft.labels("m", "0").observe(0.030)
        ttft.labels("m", "1").observe(0.050)
        queue.labels("m", "1").observe(0.002)
        means = g.timing_means(before, g.vllm_timings(url))
        assert means == {"server_ttft_mean_ms": 40.0, "engine_queue_mean_ms": 2.0}
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    assert g.vllm_timings(url) == {}  # nothing listens there now
    recs = [
        _rec(1, "vllm-api4", 32, 1, 1, 1, server_ttft_mean_ms=30.0),
        _rec(2, "vllm-api4", 32, 1, 1, 1, server_ttft_mean_ms=50.0),
        _rec(1, "mesh", 32, 1, 1, 1),
    ]
    rows = {r["server"]: r for r in g.summarize(recs)}
    assert rows["vllm-api4"]["server_ttft_mean_ms_median"] == 40.0
    assert "server_ttft_mean_ms_median" not in rows["mesh"]


@pytest.mark.parametrize("kind", [g.BURN, g.MEM])
def test_a_burn_variant_runs_its_server_beside_busy_processes_and_is_never_the_best_vllm_serve(kind):
    assert g.burn_variant(f"vllm-api8{kind}3") == ("vllm-api8", 3, kind)
    assert g.burn_variant("mesh") == ("mesh", 0, "")
    assert not g.is_plain_vllm(f"vllm-api8{kind}3") and g.is_plain_vllm("vllm-api8")
    cpu = min(os.sched_getaffinity(0))
    with g.burning(2, [cpu], kind) as procs:
        assert len(procs) == 2
        for p in procs:
            ps = psutil.Process(p.pid)
            deadline = 50
            while ps.cpu_affinity() != [cpu] and deadline:  # the child sets its own affinity first thing
                deadline -= 1
                psutil.wait_procs([ps], timeout=0.1)
            assert ps.cpu_affinity() == [cpu]
            assert p.poll() is None, "a burner that failed to start would have exited"
    assert all(p.poll() is not None for p in procs)


def test_flame_summary_of_py_spy_raw_stacks():
    raw = "\n".join(
        [
            "main (a.py:1);_write (grpc/_cython/aio.pyx:3) 6",
            "main (a.py:1);process_outputs (vllm/v1/engine/output_processor.py:9);decode (tokenizers/x.py:2) 3",
            "main (a.py:1);info (structlog/_log.py:5) 1",
            "garbage",
        ]
    )
    s = g.flame_summary(raw)
    assert s["samples"] == 10
    assert s["top_self"][0] == ["_write (aio.pyx)", 0.6]
    assert s["areas"] == {"grpc": 0.6, "vllm output processing / detokenize": 0.3, "logging (structlog)": 0.1}


def test_mesh_variants_differ_from_the_mesh_only_in_their_flags():
    argv = [
        "start",
        "--dir",
        "d",
        "--model-dir",
        "m",
        "--mesh-wide",
        "4",
        "--mesh-pack",
        "32",
        "--mesh-fe",
        "8",
    ]
    args = g.parse_args(argv)
    mesh, wide, pack, fe = (
        g.server_argv(n, args, 8101) for n in ("mesh", "mesh-wide", "mesh-pack", "mesh-fe")
    )

    def flag(argv: list[str], name: str) -> str:
        return argv[argv.index(name) + 1]

    assert [flag(mesh, "--router-workers"), flag(mesh, "--gateway-workers")] == ["2", "2"]
    assert [flag(wide, "--router-workers"), flag(wide, "--gateway-workers")] == ["4", "4"]
    assert flag(pack, "--router-args") == "--frontend-pack 32" and "--router-args" not in mesh
    assert flag(mesh, "--vllm-flags") == flag(wide, "--vllm-flags") == flag(fe, "--vllm-flags")
    assert flag(mesh, "--frontends") == "0" and flag(fe, "--frontends") == "8"  # 0: the engine's own choice
    assert flag(fe, "--router-workers") == flag(mesh, "--router-workers")
    vllm = g.server_argv("vllm-api4", args, 8102)
    assert flag(vllm, "--api-server-count") == "4" and flag(vllm, "--port") == "8102"
    assert "--kv-events-config" not in vllm and "--engine-args" not in mesh


def test_the_embedded_mesh_differs_from_the_mesh_only_in_its_gateways_routing_in_process():
    args = g.parse_args(["start", "--dir", "d", "--model-dir", "m", "--mesh-embedded"])
    mesh, embedded = g.server_argv("mesh", args, 8101), g.server_argv("mesh-embedded", args, 8105)
    assert [a for a in embedded if a not in mesh] == ["mesh-embedded", "--embedded-router"]
    served = g.parse_args(embedded[embedded.index("serve-mesh") :])
    assert served.embedded_router and served.name == "mesh-embedded"
    assert not g.parse_args(mesh[mesh.index("serve-mesh") :]).embedded_router


def test_the_holdoff_mesh_is_the_embedded_mesh_with_only_the_relay_hold_off():
    args = g.parse_args(
        ["start", "--dir", "d", "--model-dir", "m", "--mesh-embedded", "--mesh-embedded-holdoff"]
    )
    embedded = g.server_argv("mesh-embedded", args, 8105)
    holdoff = g.server_argv("mesh-embedded-holdoff", args, 8106)
    assert [a if a != "mesh-embedded-holdoff" else "mesh-embedded" for a in holdoff] == embedded
    assert g.server_env("mesh-embedded-holdoff") == {"FLEETSERVE_RELAY_HOLD_AFTER_S": "inf"}
    assert g.server_env("mesh-embedded") == {} and g.server_env("vllm-api4") == {}
    assert g.server_order(args)[-2:] == ["mesh-embedded", "mesh-embedded-holdoff"]


def test_start_orders_its_servers_and_can_leave_out_the_plain_mesh():
    def order(*flags):
        return g.server_order(g.parse_args(["start", "--dir", "d", "--model-dir", "m", *flags]))

    assert order("--api-counts", "1,4") == ["vllm-api1", "vllm-api4", "mesh"]
    assert order("--api-counts", "1,4", "--mesh-first") == ["mesh", "vllm-api1", "vllm-api4"]
    assert order("--api-counts", "1,4,8", "--mesh-embedded", "--no-mesh") == [
        "vllm-api1", "vllm-api4", "vllm-api8", "mesh-embedded"
    ]  # fmt: skip


def test_kv_event_variants_turn_only_kv_events_off_or_on():
    args = g.parse_args(["start", "--dir", "d", "--model-dir", "m", "--mesh-kv", "--vllm-kv", "8"])
    assert args.vllm_kv == [8]
    mesh, kv_mesh = g.server_argv("mesh", args, 8101), g.server_argv("mesh-kv", args, 8105)
    assert [a for a in kv_mesh if a not in mesh] == ["mesh-kv", "--engine-args=--vllm-kv-events"]
    # What serve-mesh makes of it (a value starting with "--" must follow "=", or argparse takes it for a flag).
    served = g.parse_args(kv_mesh[kv_mesh.index("serve-mesh") :])
    assert served.engine_args == "--vllm-kv-events" and served.name == "mesh-kv"
    plain, kv = g.server_argv("vllm-api8", args, 8103), g.server_argv("vllm-api8-kv", args, 8106)
    config = json.loads(kv[kv.index("--kv-events-config") + 1])
    assert config["enable_kv_cache_events"] and config["publisher"] == "zmq"
    assert kv[kv.index("--api-server-count") + 1] == "8"
    assert [a for a in kv if a not in plain] == [
        "8106",
        "--kv-events-config",
        kv[kv.index("--kv-events-config") + 1],
    ]


def test_bench_prompts_override_the_defaults_per_concurrency():
    args = g.parse_args(["bench", "--dir", "d", "--model-dir", "m", "--out", "o", "--prompts", "32=384,1=24"])
    assert args.prompts == {32: 384, 1: 24}
    assert g.parse_args(["bench", "--dir", "d", "--model-dir", "m", "--out", "o"]).prompts == {}


def test_against_each_compares_the_mesh_with_every_vllm_serve_round_by_round():
    recs = [
        _rec(1, "vllm-api1", 32, 100, 1, 1, tpot_p50_ms=2.0), _rec(1, "vllm-api8", 32, 110, 1, 1, tpot_p50_ms=2.0),
        _rec(1, "mesh", 32, 99, 1, 1, tpot_p50_ms=2.2), _rec(1, "vllm-api8-kv", 32, 50, 1, 1),
        _rec(2, "vllm-api1", 32, 90, 1, 1, tpot_p50_ms=2.0), _rec(2, "vllm-api8", 32, 100, 1, 1, tpot_p50_ms=2.0),
        _rec(2, "mesh", 32, 99, 1, 1, tpot_p50_ms=2.0), _rec(3, "vllm-api8", 32, 100, 1, 1),
    ]  # fmt: skip
    each = g.against_each(recs)
    # -kv variants are not `vllm serve` as the targets mean it; round 3 (no mesh) is skipped.
    assert set(each[32]) == {"vllm-api1", "vllm-api8"}
    assert each[32]["vllm-api8"] == {
        "rounds": 2, "toks_ratio_median": 0.945, "tpot_ratio_median": 1.05, "mesh_ahead": 0
    }  # fmt: skip
    assert each[32]["vllm-api1"]["toks_ratio_median"] == 1.045  # (0.99 + 1.1) / 2


def test_pooled_ratios_come_from_every_round_of_every_run(tmp_path, capsys):
    one = [_rec(1, "vllm-api8", 1, 100, 1, 1), _rec(1, "mesh", 1, 90, 1, 1)]
    two = [_rec(1, "vllm-api8", 1, 200, 1, 1), _rec(1, "mesh", 1, 210, 1, 1),
           _rec(2, "vllm-api8", 1, 200, 1, 1), _rec(2, "mesh", 1, 190, 1, 1)]  # fmt: skip
    assert g.pooled([{"records": one}, {"records": two}]) == {
        1: {"rounds": 3, "toks_ratio_median": 0.95, "fastest_rounds": 1}
    }
    files = []
    for name, recs in (("a.json", one), ("b.json", two)):
        (tmp_path / name).write_text(json.dumps({"records": recs}))
        files.append(str(tmp_path / name))
    assert g.main(["pool", *files]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["pooled"]["1"]["rounds"] == 3
    assert out["against_each"]["b.json"]["1"]["vllm-api8"]["rounds"] == 2
    # Pooled: a.json's round 1 and b.json's round 1 are two rounds, not one.
    assert out["pooled_against_each"]["1"]["vllm-api8"] == {
        "rounds": 3, "toks_ratio_median": 0.95, "tpot_ratio_median": 1.0, "mesh_ahead": 1
    }  # fmt: skip


def test_report_and_pool_judge_the_mesh_configuration_named_by_server(tmp_path, capsys):
    recs = [
        _rec(1, "vllm-api4", 32, 100, 60, 80), _rec(1, "mesh", 32, 96, 57, 81),
        _rec(1, "mesh-embedded", 32, 104, 52, 76),
        _rec(2, "vllm-api4", 32, 110, 60, 80), _rec(2, "mesh", 32, 99, 57, 81),
        _rec(2, "mesh-embedded", 32, 110, 52, 76),
    ]  # fmt: skip
    path, out = tmp_path / "records.json", tmp_path / "report.json"
    path.write_text(json.dumps({"records": recs}))
    assert g.main(["report", "--records", str(path), "--out", str(out), "--server", "mesh-embedded"]) == 0
    doc = json.loads(out.read_text())
    assert doc["target_server"] == "mesh-embedded"
    assert doc["targets"]["32"]["toks_ratio_paired_median"] == 1.02  # (1.04 + 1.0) / 2
    assert doc["targets"]["32"]["ttft_p50_delta_ms"] == -8.0
    assert doc["against_each"]["32"]["vllm-api4"]["mesh_ahead"] == 1  # a tie is not ahead
    # The mesh with its router process is now a variant, paired against vllm serve like any other.
    assert doc["paired_variants"]["mesh"]["32"]["toks_ratio_median"] == 0.93  # (0.96 + 0.9) / 2
    capsys.readouterr()
    assert g.main(["pool", str(path), "--server", "mesh-embedded"]) == 0
    pooled = json.loads(capsys.readouterr().out)
    assert pooled["server"] == "mesh-embedded" and pooled["pooled"]["32"]["toks_ratio_median"] == 1.02
    assert g.main(["pool", str(path)]) == 0
    assert json.loads(capsys.readouterr().out)["pooled"]["32"]["toks_ratio_median"] == 0.93


def test_start_refuses_a_mesh_whose_generated_code_does_not_import(tmp_path, monkeypatch):
    assert g.mesh_code_missing() == ""
    assert "carry gen/" in g.mesh_code_missing("fleetserve.no_such_generated_module_pb2")
    args = g.parse_args(["start", "--dir", str(tmp_path), "--model-dir", str(tmp_path), "--api-counts", ""])
    # As on a GPU machine without gen/: refused before any server starts (none is in the state afterwards).
    monkeypatch.setattr(g, "mesh_code_missing", lambda module="": "No module named 'fleetserve.inference'")
    with pytest.raises(SystemExit, match="the mesh cannot start here"):
        g.start(args)
    assert g.read_state(str(tmp_path))["servers"] == {}


def test_an_aa_server_is_a_second_identical_vllm_serve_judged_like_the_mesh_never_the_best(tmp_path):
    args = g.parse_args(["start", "--dir", "d", "--model-dir", "m", "--api-counts", "4", "--vllm-aa", "4"])
    assert g.server_order(args) == ["vllm-api4", "mesh", "vllm-api4-aa"]
    plain, aa = g.server_argv("vllm-api4", args, 8101), g.server_argv("vllm-api4-aa", args, 8103)
    assert [a for a in aa if a not in plain] == ["8103"]  # only its port differs
    recs = [
        _rec(1, "vllm-api4", 32, 100, 60, 80), _rec(1, "vllm-api4-aa", 32, 104, 61, 80),
        _rec(2, "vllm-api4", 32, 100, 60, 80), _rec(2, "vllm-api4-aa", 32, 110, 61, 80),
    ]  # fmt: skip
    path, out = tmp_path / "records.json", tmp_path / "report.json"
    path.write_text(json.dumps({"records": recs}))
    assert g.main(["report", "--records", str(path), "--out", str(out), "--server", "vllm-api4-aa"]) == 0
    t = json.loads(out.read_text())["targets"]["32"]
    # The copy is judged against vllm-api4 (the best although the copy's median is higher: the copy is never a
    # candidate itself), round by round.
    assert t["best"] == "vllm-api4" and t["toks_ratio_paired_median"] == 1.07  # (1.04 + 1.1) / 2


@pytest.mark.parametrize(
    "argv",
    [
        ["start", "--dir", "d", "--model-dir", "m", "--vllm-aa", "four"],
        ["bench", "--dir", "d", "--model-dir", "m", "--out", "o", "--prompts", "32=many"],
    ],
)
def test_a_list_flag_with_a_non_number_is_a_usage_error_not_a_traceback(argv, capsys):
    with pytest.raises(SystemExit) as e:
        g.parse_args(argv)
    assert e.value.code == 2
    assert "a list of numbers has a non-number in it" in capsys.readouterr().err
