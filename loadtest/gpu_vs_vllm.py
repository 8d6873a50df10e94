"""`python -m loadtest.gpu_vs_vllm`: on a GPU machine, `vllm serve` with 1, 4 and 8 API processes and the
fleetserve mesh (gateway HTTP -> router -> vLLM worker), the same engine flags for all, each driven by vLLM's own
client (`vllm bench serve`'s code, imported once) against its OpenAI endpoint, concurrencies and repetitions
interleaved, with the CPU of every server process over every run. JSON records.

The servers stay up between phases (each a detached process session), so one GPU lease can run the phases as
separate commands of at most a few minutes each:

    start   start every server (one after another: the first start compiles, the rest hit the compile cache;
            every start time is recorded) and wait until each answers
    bench   run the points not yet in the records file, round-robin over servers, until --budget-s is spent
    stop    stop them all
    report  print the table of medians and ranges (and write the published JSON)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

MODEL = "llama-1b"
ENGINE_FLAGS = "--max-num-seqs 256 --max-num-batched-tokens 2048 --enable-prefix-caching"
PROMPTS = {1: 16, 32: 128, 128: 512, 256: 1024}


def state_path(d: str) -> Path:
    return Path(d) / "state.json"


def read_state(d: str) -> dict:
    p = state_path(d)
    return json.loads(p.read_text()) if p.exists() else {"servers": {}}


def write_state(d: str, state: dict) -> None:
    tmp = state_path(d).with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, state_path(d))


def _http_ok(url: str, key: str = "") -> bool:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _spawn(argv: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,  # outlives this command; `stop` ends it
            env={**os.environ, **(env or {})},
        )


def _wait_up(name: str, url: str, proc: subprocess.Popen, timeout_s: float, key: str = "") -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if _http_ok(url, key):
            return time.monotonic() - t0
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode} before it answered")
        time.sleep(0.5)
    raise TimeoutError(f"{name} did not answer within {timeout_s} s")


def start(args) -> None:
    d = Path(args.dir)
    d.mkdir(parents=True, exist_ok=True)
    state = read_state(args.dir)
    common = f"--load-format dummy {ENGINE_FLAGS} --gpu-memory-utilization {args.gpu_memory_utilization}"
    port = 8100
    order = [f"vllm-api{n}" for n in args.api_counts] + ["mesh"]
    if args.mesh_first:
        order = ["mesh", *order[:-1]]
    for name in order:
        if name in state["servers"]:
            continue
        t0 = time.time()
        if name == "mesh":
            argv = [sys.executable, "-m", "loadtest.gpu_vs_vllm", "serve-mesh", "--dir", args.dir]
            argv += ["--model-dir", args.model_dir, "--vllm-flags", common]
            argv += ["--frontends", str(args.mesh_frontends), "--router-workers", str(args.router_workers)]
            argv += ["--gateway-workers", str(args.gateway_workers)]
            proc = _spawn(argv, d / "mesh.log")
            mesh_state = d / "mesh.json"
            while not mesh_state.exists():
                if proc.poll() is not None:
                    raise RuntimeError(f"mesh exited with {proc.returncode}; see {d / 'mesh.log'}")
                if time.time() - t0 > args.start_timeout_s:
                    raise TimeoutError("mesh did not start")
                time.sleep(0.5)
            ms = json.loads(mesh_state.read_text())
            url = f"http://{ms['gateway_http']}"
            up_s = _wait_up(name, f"{url}/v1/models", proc, args.start_timeout_s, ms["api_key"])
            up_s = time.time() - t0
            state["servers"][name] = {
                "pid": proc.pid,
                "url": url,
                "api_key": ms["api_key"],
                "start_s": round(up_s, 1),
                "engine_start_s": ms.get("engine_start_s"),
                "frontends": ms.get("frontends"),
            }
        else:
            n = int(name.removeprefix("vllm-api"))
            port += 1
            argv = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", args.model_dir]
            argv += ["--served-model-name", MODEL, "--port", str(port), "--host", "127.0.0.1"]
            argv += ["--api-server-count", str(n), *common.split()]
            proc = _spawn(argv, d / f"{name}.log")
            url = f"http://127.0.0.1:{port}"
            up_s = _wait_up(name, f"{url}/v1/models", proc, args.start_timeout_s)
            state["servers"][name] = {"pid": proc.pid, "url": url, "api_key": "", "start_s": round(up_s, 1)}
        print(f"gpu_vs_vllm: {name} up in {state['servers'][name]['start_s']} s", flush=True)
        write_state(args.dir, state)


def serve_mesh(args) -> None:
    """The mesh as one detached process: a shared.cluster fleet until SIGTERM; its addresses in mesh.json."""
    import uvloop

    from shared.cluster import Cluster, ClusterConfig

    async def main() -> None:
        engine = ["--model", MODEL, f"--vllm-args=--model {args.model_dir} {args.vllm_flags}"]
        engine += ["--frontends", str(args.frontends)]
        cluster = Cluster(
            ClusterConfig(
                data_dir=Path(args.dir) / "mesh",
                engines=1,
                backend="vllm",
                model=MODEL,
                start_timeout_s=600.0,
                router_workers=args.router_workers,
                gateway_workers=args.gateway_workers,
                extra_args={"engine": engine},
            )
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        await cluster.start()
        info = cluster.ready_info("engine-1")
        st = cluster.state() | {
            "engine_start_s": info.get("engine_start_s"),
            "frontends": info.get("frontends"),
            "pids": {n: p.process.pid for n, p in cluster.procs.items()},
        }
        Path(args.dir, "mesh.json").write_text(json.dumps(st, indent=2))  # noqa: ASYNC240 - once, at start
        try:
            await stop.wait()
        finally:
            await cluster.stop()

    uvloop.run(main())


# -- CPU of every process of a server -------------------------------------------------------------------------


def _label(p) -> str:
    """What a process is, from its name and command line (vLLM titles its processes)."""
    try:
        name = p.name()
        cmd = " ".join(p.cmdline())
    except Exception:  # noqa: BLE001 - gone
        return "gone"
    for key in ("EngineCore", "APIServer", "ApiServer"):
        if key in name or key in cmd:
            return key.replace("ApiServer", "APIServer")
    if "services." in cmd:
        svc = cmd.split("services.", 1)[1].split()[0]
        return f"{svc} (supervisor)" if "--workers" in cmd and "--workers 1" not in cmd else svc
    if "spawn_main" in cmd or "multiprocessing" in cmd:
        return f"child:{name}"
    if "vllm" in cmd:
        return f"vllm:{name}"
    return name


def tree(pid: int) -> list:
    import psutil

    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def cpu_snapshot(pid: int) -> dict[int, tuple[str, float]]:
    out = {}
    for p in tree(pid):
        try:
            t = p.cpu_times()
            out[p.pid] = (_label(p), t.user + t.system)
        except Exception:  # noqa: BLE001 - a process that just ended
            continue
    return out


def cpu_use(before: dict, after: dict, wall_s: float) -> list[dict]:
    """Per process: share of one core over the run (1.0 = a core busy all the time)."""
    rows = []
    for pid, (label, t1) in after.items():
        t0 = before.get(pid, (label, t1))[1]
        rows.append({"pid": pid, "process": label, "cores": round((t1 - t0) / wall_s, 3)})
    return sorted(rows, key=lambda r: -r["cores"])


# -- the benchmark ---------------------------------------------------------------------------------------------


def bench(args) -> None:
    from vllm.benchmarks import serve as vbench
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    state = read_state(args.dir)
    out = Path(args.out)
    doc = json.loads(out.read_text()) if out.exists() else {"records": []}
    done = {(r["rep"], r["server"], r["concurrency"]) for r in doc["records"]}
    parser = FlexibleArgumentParser()
    vbench.add_cli_args(parser)
    servers = [s for s in state["servers"] if s in args.servers]
    deadline = time.monotonic() + args.budget_s
    for rep in range(1, args.reps + 1):
        for c in args.concurrency:
            # Interleaved: every server at this point before the next point; the order turns each repetition.
            k = (rep - 1) % len(servers)
            for name in servers[k:] + servers[:k]:
                if (rep, name, c) in done:
                    continue
                if time.monotonic() > deadline:
                    print("gpu_vs_vllm: budget spent; run bench again to go on", flush=True)
                    return
                srv = state["servers"][name]
                os.environ["OPENAI_API_KEY"] = srv["api_key"] or "none"
                n = PROMPTS.get(c, 4 * c)
                vargs = parser.parse_args(
                    [
                        "--backend", "openai",
                        "--base-url", srv["url"],
                        "--endpoint", "/v1/completions",
                        "--model", MODEL,
                        "--tokenizer", args.model_dir,
                        "--dataset-name", "random",
                        "--random-input-len", "128",
                        "--random-output-len", "256",
                        "--ignore-eos",
                        "--num-prompts", str(n),
                        "--max-concurrency", str(c),
                        "--request-rate", "inf",
                        "--seed", str(rep * 1000 + c),
                        "--percentile-metrics", "ttft,tpot,itl,e2el",
                        "--metric-percentiles", "50,99",
                        "--disable-tqdm",
                        "--ready-check-timeout-sec", "60",
                    ]
                )  # fmt: skip
                before = cpu_snapshot(srv["pid"])
                t0 = time.monotonic()
                res = asyncio.run(vbench.main_async(vargs))
                wall = time.monotonic() - t0
                cpu = cpu_use(before, cpu_snapshot(srv["pid"]), wall)
                rec = {
                    "rep": rep,
                    "server": name,
                    "concurrency": c,
                    "num_prompts": n,
                    "completed": res.get("completed"),
                    "failed": res.get("failed"),
                    "duration_s": round(res.get("duration", 0.0), 3),
                    "output_tokens_per_s": round(res.get("output_throughput", 0.0), 1),
                    "ttft_p50_ms": round(res.get("median_ttft_ms", 0.0), 2),
                    "ttft_p99_ms": round(res.get("p99_ttft_ms", 0.0), 2),
                    "tpot_p50_ms": round(res.get("median_tpot_ms", 0.0), 3),
                    "tpot_p99_ms": round(res.get("p99_tpot_ms", 0.0), 3),
                    "cpu": cpu,
                    "cpu_by_process": _by_process(cpu),
                }
                doc["records"].append(rec)
                out.write_text(json.dumps(doc, indent=2))
                print(
                    f"gpu_vs_vllm: rep {rep} {name} c={c}: {rec['output_tokens_per_s']} tok/s, TTFT p50 "
                    f"{rec['ttft_p50_ms']} p99 {rec['ttft_p99_ms']} ms, failed {rec['failed']}; "
                    f"cpu {rec['cpu_by_process']}",
                    flush=True,
                )


def _by_process(cpu: list[dict]) -> dict[str, float]:
    out: dict[str, float] = {}
    for r in cpu:
        out[r["process"]] = round(out.get(r["process"], 0.0) + r["cores"], 2)
    return {k: v for k, v in sorted(out.items(), key=lambda kv: -kv[1]) if v >= 0.01}


def stop(args) -> None:
    state = read_state(args.dir)
    for name, srv in state["servers"].items():
        try:
            os.killpg(srv["pid"], signal.SIGTERM)
        except ProcessLookupError:
            continue
        print(f"gpu_vs_vllm: stopping {name}", flush=True)
    for srv in state["servers"].values():
        for _ in range(120):
            try:
                os.kill(srv["pid"], 0)
            except ProcessLookupError:
                break
            time.sleep(0.25)


# -- the report ----------------------------------------------------------------------------------------------


def summarize(records: list[dict]) -> list[dict]:
    """Median and range per (server, concurrency) over repetitions."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in records:
        groups.setdefault((r["server"], r["concurrency"]), []).append(r)
    rows = []
    for (server, c), rs in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        row = {"server": server, "concurrency": c, "reps": len(rs)}
        for f in ("output_tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms"):
            vals = [r[f] for r in rs]
            row[f] = round(statistics.median(vals), 2)
            row[f + "_range"] = [min(vals), max(vals)]
        cpu: dict[str, list[float]] = {}
        for r in rs:
            for k, v in r["cpu_by_process"].items():
                cpu.setdefault(k, []).append(v)
        row["cpu_cores_median"] = {k: round(statistics.median(v), 2) for k, v in cpu.items()}
        row["failed"] = sum(r.get("failed") or 0 for r in rs)
        rows.append(row)
    return rows


def roles_from_ps(ps_text: str) -> dict[int, str]:
    """pid -> role, from `ps -eo pid,ppid,pcpu,rss,comm,args` taken while the servers ran: spawned children
    in start order (vLLM and our engine supervisor start the engine core before the front ends)."""
    procs = {}
    for line in ps_text.splitlines()[1:]:
        parts = line.split(None, 5)
        if len(parts) == 6 and parts[0].isdigit():
            procs[int(parts[0])] = (int(parts[1]), parts[5])
    kids: dict[int, list[int]] = {}
    for pid, (ppid, _) in procs.items():
        kids.setdefault(ppid, []).append(pid)
    roles: dict[int, str] = {}
    for pid, (_, cmd) in procs.items():
        spawned = sorted(k for k in kids.get(pid, []) if "spawn_main" in procs[k][1])
        if "vllm.entrypoints.cli.main serve" in cmd:
            if len(spawned) == 1:
                roles[pid], roles[spawned[0]] = "vllm APIServer", "vllm EngineCore"
            elif spawned:
                roles[pid] = "vllm serve (supervisor)"
                roles[spawned[0]] = "vllm EngineCore"
                roles.update({k: "vllm APIServer" for k in spawned[1:]})
        elif "-m services." in cmd:
            svc = cmd.split("-m services.", 1)[1].split()[0]
            if svc == "engine" and spawned:
                roles[pid] = "engine (supervisor)"
                roles[spawned[0]] = "vllm EngineCore"
                roles.update({k: "engine front end" for k in spawned[1:]})
            elif spawned:
                roles[pid] = f"{svc} (supervisor)"
                roles.update({k: f"{svc} worker" for k in spawned})
            else:
                roles[pid] = svc
    return roles


def relabel(records: list[dict], roles: dict[int, str]) -> None:
    """Replace each record's per-process labels by roles (cpu_by_process: cores summed per role)."""
    for r in records:
        for row in r["cpu"]:
            row["process"] = roles.get(row["pid"], row["process"])
        r["cpu_by_process"] = _by_process(r["cpu"])


def report(args) -> None:
    doc = json.loads(Path(args.records).read_text())
    if args.ps:
        relabel(doc["records"], roles_from_ps(Path(args.ps).read_text()))
    rows = summarize(doc["records"])
    by_c: dict[int, list[dict]] = {}
    for r in rows:
        by_c.setdefault(r["concurrency"], []).append(r)
    lines = [
        "| c | server | tok/s median [range] | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | mesh / best vllm serve |",
        "|---|---|---|---|---|---|---|",
    ]
    for c, rs in sorted(by_c.items()):
        vl = [r for r in rs if r["server"] != "mesh"]
        best = max(vl, key=lambda r: r["output_tokens_per_s"]) if vl else None
        for r in rs:
            rng = r["output_tokens_per_s_range"]
            vs = ""
            if r["server"] == "mesh" and best:
                vs = (
                    f"{r['output_tokens_per_s'] / best['output_tokens_per_s']:.3f} tok/s ({best['server']}); "
                    f"TTFT p50 {r['ttft_p50_ms'] - best['ttft_p50_ms']:+.1f} ms; "
                    f"TTFT p99 x{r['ttft_p99_ms'] / max(best['ttft_p99_ms'], 1e-9):.2f}"
                )
            lines.append(
                f"| {c} | {r['server']} | {r['output_tokens_per_s']:,.0f} [{rng[0]:,.0f}-{rng[1]:,.0f}] "
                f"| {r['ttft_p50_ms']} | {r['ttft_p99_ms']} | {r['tpot_p50_ms']} | {vs} |"
            )
    print("\n".join(lines))
    if args.out:
        doc["summary"] = rows
        Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtest.gpu_vs_vllm", description=__doc__)
    sub = p.add_subparsers(dest="phase", required=True)
    s = sub.add_parser("start")
    s.add_argument("--dir", required=True)
    s.add_argument("--model-dir", required=True)
    s.add_argument("--api-counts", default="1,4,8")
    s.add_argument("--gpu-memory-utilization", default="0.2")
    s.add_argument("--mesh-frontends", type=int, default=0, help="engine --frontends (0: auto)")
    s.add_argument("--router-workers", type=int, default=2)
    s.add_argument("--gateway-workers", type=int, default=2)
    s.add_argument("--mesh-first", action="store_true")
    s.add_argument("--start-timeout-s", type=float, default=400.0)
    m = sub.add_parser("serve-mesh")
    m.add_argument("--dir", required=True)
    m.add_argument("--model-dir", required=True)
    m.add_argument("--vllm-flags", required=True)
    m.add_argument("--frontends", type=int, default=0)
    m.add_argument("--router-workers", type=int, default=2)
    m.add_argument("--gateway-workers", type=int, default=2)
    b = sub.add_parser("bench")
    b.add_argument("--dir", required=True)
    b.add_argument("--model-dir", required=True)
    b.add_argument("--out", required=True)
    b.add_argument("--reps", type=int, default=3)
    b.add_argument("--concurrency", default="1,32,128,256")
    b.add_argument("--servers", default="vllm-api1,vllm-api4,vllm-api8,mesh")
    b.add_argument("--budget-s", type=float, default=480.0)
    t = sub.add_parser("stop")
    t.add_argument("--dir", required=True)
    r = sub.add_parser("report")
    r.add_argument("--records", required=True)
    r.add_argument("--out", default="")
    r.add_argument("--ps", default="", help="ps listing taken during the run, to name every process's role")
    args = p.parse_args(argv)
    if hasattr(args, "api_counts"):
        args.api_counts = [int(x) for x in args.api_counts.split(",") if x]
    if hasattr(args, "concurrency"):
        args.concurrency = [int(x) for x in args.concurrency.split(",") if x]
    if hasattr(args, "servers"):
        args.servers = [x for x in args.servers.split(",") if x]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    {"start": start, "serve-mesh": serve_mesh, "bench": bench, "stop": stop, "report": report}[args.phase](
        args
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
