"""`python -m loadtest.gpu_vs_vllm`: on a GPU machine, `vllm serve` with 1, 4 and 8 API processes and the
fleetserve mesh (gateway HTTP -> router -> vLLM worker), the same engine flags for all, each driven by vLLM's own
client (`vllm bench serve`'s code, imported once) against its OpenAI endpoint, concurrencies and repetitions
interleaved, with the CPU of every server process over every run. JSON records.

The servers stay up between phases (each a detached process session), so one GPU lease can run the phases as
separate commands of at most a few minutes each:

    start   start every server: the first alone (it compiles), then the rest at once (they hit the compile
            cache); the KV cache is sized by --kv-cache-memory-bytes, the same for all, so that concurrent
            starts cannot skew each other's memory profiling; every start time is recorded
    bench   warm each server up once, then run the points not yet in the records file, interleaved, until
            --budget-s is spent; before each run the engine-core process of the server under test is pinned to
            the same two CPUs (the fastest of this machine, measured once, on different cores) and every other
            process of that server and this client to the rest, so that every server's engine core runs on
            the same CPUs and shares them with nothing
    stop    stop them all
    report  print the table of medians and ranges, the per-repetition (paired) ratios, per-hop TTFT and the
            legs of each closed-loop wave's first tokens from the mesh's logs, the targets met or not (and write
            the published JSON); --server names the mesh configuration judged (default mesh; e.g. mesh-embedded),
            the others are paired as variants
    pool    several published JSONs: the paired ratios of all their rounds together, and each run's mesh (or
            --server) against every `vllm serve` configuration round by round
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import os
import resource
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
# The KV cache of every server (bytes): fixed, so concurrent starts need no memory profiling (and every server has
# the same number of blocks); 8 GiB is ~260k tokens of the 1B model, 2.7x what 256 sequences of 384 need.
KV_CACHE_BYTES = 8 * 1024**3
# The targets of issue 12 (mesh against the best `vllm serve` at each concurrency).
TARGET_TOKS_RATIO = 0.97
TARGET_TTFT_P50_C1_MS = 3.0
TARGET_TTFT_P99_C256_RATIO = 1.3
# The suffix of an A/A server: a second `vllm serve` identical to vllm-apiN (start --vllm-aa N).
AA = "-aa"


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


def server_argv(name: str, args, port: int) -> list[str]:
    """The command line of one server: `vllm serve` with N API processes, or a variant of the mesh."""
    common = (
        f"--load-format dummy {ENGINE_FLAGS} --gpu-memory-utilization {args.gpu_memory_utilization}"
        f" --kv-cache-memory-bytes {args.kv_cache_bytes}"
    )
    if name.startswith("mesh"):
        argv = [sys.executable, "-m", "loadtest.gpu_vs_vllm", "serve-mesh", "--dir", args.dir, "--name", name]
        argv += ["--model-dir", args.model_dir, "--vllm-flags", common]
        workers = args.mesh_wide if name == "mesh-wide" else None
        frontends = args.mesh_fe if name == "mesh-fe" else args.mesh_frontends
        argv += ["--frontends", str(frontends)]
        argv += ["--router-workers", str(workers or args.router_workers)]
        argv += ["--gateway-workers", str(workers or args.gateway_workers)]
        if name == "mesh-pack":
            argv += ["--router-args", f"--frontend-pack {args.mesh_pack}"]
        elif args.mesh_router_args:
            argv += ["--router-args", args.mesh_router_args]
        if name == "mesh-kv":
            argv.append("--engine-args=--vllm-kv-events")  # with "=": argparse reads "--..." as a flag
        if name.startswith("mesh-embedded"):
            argv.append("--embedded-router")  # each gateway worker routes in process: no router process
        return argv
    n = int(name.removeprefix("vllm-api").removesuffix("-kv").removesuffix(AA))
    argv = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", args.model_dir]
    argv += ["--served-model-name", MODEL, "--port", str(port), "--host", "127.0.0.1"]
    if name.endswith("-kv"):
        # The KV-event publisher the mesh's engine core runs (one JSON word: the flags are split on spaces).
        kv = {
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            "endpoint": f"ipc:///tmp/gvv-kv-{port}.sock",
        }
        argv += ["--kv-events-config", json.dumps(kv, separators=(",", ":"))]
    return argv + ["--api-server-count", str(n), *common.split()]


def server_env(name: str) -> dict[str, str]:
    """What a server's environment adds: a -holdoff mesh relays with the hold of a lone chunk on a busy hop off
    (shared/relay.py; every process of the mesh inherits it)."""
    return {"FLEETSERVE_RELAY_HOLD_AFTER_S": "inf"} if name.endswith("-holdoff") else {}


def _start_one(name: str, args, port: int) -> tuple[subprocess.Popen, str, str, float]:
    """Spawn one server; (process, url, api key, start time)."""
    t0 = time.time()
    proc = _spawn(server_argv(name, args, port), Path(args.dir) / f"{name}.log", server_env(name))
    # The mesh writes its address and key to DIR/NAME.json once it is up (_wait_started reads them).
    url = "" if name.startswith("mesh") else f"http://127.0.0.1:{port}"
    return proc, url, "", t0


def _wait_started(name: str, args, proc: subprocess.Popen, url: str, t0: float) -> dict:
    d = Path(args.dir)
    if name.startswith("mesh"):
        mesh_state = d / f"{name}.json"
        while not mesh_state.exists():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}; see {d / (name + '.log')}")
            if time.time() - t0 > args.start_timeout_s:
                raise TimeoutError(f"{name} did not start")
            time.sleep(0.5)
        ms = json.loads(mesh_state.read_text())
        url = f"http://{ms['gateway_http']}"
        _wait_up(name, f"{url}/v1/models", proc, args.start_timeout_s, ms["api_key"])
        return {
            "pid": proc.pid,
            "url": url,
            "api_key": ms["api_key"],
            "start_s": round(time.time() - t0, 1),
            "engine_start_s": ms.get("engine_start_s"),
            "frontends": ms.get("frontends"),
        }
    _wait_up(name, f"{url}/v1/models", proc, args.start_timeout_s)
    return {"pid": proc.pid, "url": url, "api_key": "", "start_s": round(time.time() - t0, 1)}


def mesh_code_missing(module: str = "fleetserve.inference.v1.inference_service_pb2") -> str:
    """Why the mesh cannot start on this machine ("" if it can): its generated protobuf code must import."""
    try:
        importlib.import_module(module)
    except ImportError as e:
        return f"{e}: carry gen/ (the generated protos, `make protos`) and put it on PYTHONPATH"
    return ""


def server_order(args) -> list[str]:
    """The servers start starts, in its order: `vllm serve` with each API count, the mesh (unless --no-mesh), then
    the mesh variants and `vllm serve -kv` servers asked for."""
    order = [f"vllm-api{n}" for n in args.api_counts]
    if not args.no_mesh:
        order = ["mesh", *order] if args.mesh_first else [*order, "mesh"]
    if args.mesh_pack:
        # The same mesh with its routers packing streams onto the fewest front ends (an A/B of --frontend-pack).
        order.append("mesh-pack")
    if args.mesh_wide:
        # The same mesh with more router and gateway processes (an A/B of --workers).
        order.append("mesh-wide")
    if args.mesh_fe:
        # The same mesh with another number of engine front ends (an A/B of the engine's --frontends).
        order.append("mesh-fe")
    if args.mesh_embedded:
        # The same mesh with the router inside each gateway worker (an A/B of gateway --embedded-router).
        order.append("mesh-embedded")
    if args.mesh_embedded_holdoff:
        # The embedded mesh with the relays' hold on a busy hop off (an A/B of the hold, shared/relay.py).
        order.append("mesh-embedded-holdoff")
    if args.mesh_kv:
        # The same mesh with an engine core that publishes KV events, as kv_aware needs (an A/B of --vllm-kv-events).
        order.append("mesh-kv")
    # `vllm serve` with the KV-event publisher mesh-kv's engine core runs (the same A/B on vLLM's own server).
    order += [f"vllm-api{n}-kv" for n in args.vllm_kv]
    # A second, identical `vllm serve` (an A/A): `report --server vllm-apiN-aa` judges it against the targets as
    # the mesh is judged, which reads what one run's noise alone does to "0.97 of the best".
    order += [f"vllm-api{n}{AA}" for n in args.vllm_aa]
    return order


def start(args) -> None:
    d = Path(args.dir)
    d.mkdir(parents=True, exist_ok=True)
    state = read_state(args.dir)
    order = server_order(args)
    ports = {name: 8101 + i for i, name in enumerate(order)}
    todo = [name for name in order if name not in state["servers"]]
    # Checked before any server starts: a mesh that dies on import after vllm serve's minutes of start-up
    # leaves a run whose first rounds lack it (12-04 08:19).
    why = mesh_code_missing() if any(name.startswith("mesh") for name in todo) else ""
    if why:
        raise SystemExit(f"gpu_vs_vllm: the mesh cannot start here: {why}")
    # The first start compiles (torch.compile, CUDA graphs) into the shared cache; the others then start at once.
    waves = [todo[:1], todo[1:]] if args.stagger else [[name] for name in todo]
    for wave in waves:
        started = {name: _start_one(name, args, ports[name]) for name in wave}
        for name, (proc, *_rest) in started.items():
            # Known to `stop` at once, should a start fail.
            state["servers"][name] = {"pid": proc.pid, "starting": True}
        write_state(args.dir, state)
        for name, (proc, url, _key, t0) in started.items():
            try:
                state["servers"][name] = _wait_started(name, args, proc, url, t0)
            except (RuntimeError, TimeoutError, KeyError, ValueError) as e:
                # The others still run: benchmark those, and show why this one did not start.
                print(f"gpu_vs_vllm: {name} did not start: {e}", flush=True)
                for log in [d / f"{name}.log", *sorted((d / name / "logs").glob("*.log"))]:
                    if log.exists():
                        print(f"--- {log} (end)\n{log.read_text(errors='replace')[-2500:]}", flush=True)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                del state["servers"][name]
                write_state(args.dir, state)
                continue
            state["servers"][name]["started_with"] = len(wave)
            print(f"gpu_vs_vllm: {name} up in {state['servers'][name]['start_s']} s", flush=True)
            write_state(args.dir, state)
    if not state["servers"]:
        raise SystemExit("gpu_vs_vllm: no server started")


def serve_mesh(args) -> None:
    """The mesh as one detached process: a shared.cluster fleet until SIGTERM; its addresses in mesh.json."""
    import uvloop

    from shared.cluster import Cluster, ClusterConfig

    async def main() -> None:
        engine = ["--model", MODEL, f"--vllm-args=--model {args.model_dir} {args.vllm_flags}"]
        engine += ["--frontends", str(args.frontends), *args.engine_args.split()]
        cluster = Cluster(
            ClusterConfig(
                data_dir=Path(args.dir) / args.name,
                engines=1,
                backend="vllm",
                model=MODEL,
                start_timeout_s=600.0,
                router_workers=args.router_workers,
                gateway_workers=args.gateway_workers,
                embedded_router=args.embedded_router,
                extra_args={"engine": engine, "router": args.router_args.split()},
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
        tmp = Path(args.dir, f"{args.name}.json.tmp")
        tmp.write_text(json.dumps(st, indent=2))  # noqa: ASYNC240 - once, at start
        os.replace(tmp, tmp.with_suffix(""))  # whole, for `start`, which waits for it
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


# -- the same CPUs for every server's engine core ------------------------------------------------------------


def _cpu_speed(cpu: int, loops: int = 300_000) -> float:
    """Loops per microsecond of a fixed Python loop on one CPU (the caller's affinity is restored after)."""
    old = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {cpu})
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            x = 0
            for i in range(loops):
                x += i & 7
            best = min(best, time.perf_counter() - t0)
        return loops / best / 1e6
    finally:
        os.sched_setaffinity(0, old)


def _core_of(cpu: int) -> str:
    base = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
    try:
        return (base / "core_cpus_list").read_text().strip()
    except OSError:
        try:
            return (base / "thread_siblings_list").read_text().strip()
        except OSError:
            return str(cpu)


def choose_cpus(speeds: dict[int, float], cores: dict[int, str], n: int = 2) -> tuple[list[int], list[int]]:
    """The n fastest CPUs on n different cores for the engine core, and the CPUs of every other core for the rest
    (the engine core's SMT siblings stay idle)."""
    engine: list[int] = []
    taken: set[str] = set()
    for cpu in sorted(speeds, key=lambda c: (-speeds[c], c)):
        if cores[cpu] not in taken:
            engine.append(cpu)
            taken.add(cores[cpu])
        if len(engine) == n:
            break
    rest = sorted(c for c in speeds if cores[c] not in taken)
    return sorted(engine), rest


def probe_cpus(args) -> dict:
    """Measure every CPU once (a busy or throttled one is slower) and choose the engine core's."""
    cpus = sorted(os.sched_getaffinity(0))
    speeds = {c: round(_cpu_speed(c), 2) for c in cpus}
    cores = {c: _core_of(c) for c in cpus}
    engine, rest = choose_cpus(speeds, cores, args.engine_cpus)
    out = {"speeds": speeds, "cores": cores, "engine_core_cpus": engine, "other_cpus": rest}
    Path(args.dir, "cpus.json").write_text(json.dumps(out, indent=2))
    print(f"gpu_vs_vllm: CPU speeds {speeds}; engine core on {engine}", flush=True)
    return out


def _gpu_pids() -> dict[int, int]:
    """pid -> MiB of GPU memory, for every process with a CUDA context."""
    try:
        text = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=20, check=False,
        ).stdout  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return {}
    out = {}
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0].isdigit():
            out[int(parts[0])] = int(parts[1]) if parts[1].isdigit() else 0
    return out


def engine_core_pids(procs: list, gpu: dict[int, int]) -> list[int]:
    """The engine-core process of a server: the one of its processes holding the most GPU memory, or (no
    nvidia-smi pids) the first process it spawned (vLLM and our supervisor start the engine core first)."""
    on_gpu = [p.pid for p in procs if p.pid in gpu]
    if on_gpu:
        return [max(on_gpu, key=lambda pid: gpu[pid])]
    spawned = []
    for p in procs[1:]:
        try:
            if "spawn_main" in " ".join(p.cmdline()):
                spawned.append((p.create_time(), p.pid))
        except Exception:  # noqa: BLE001 - gone
            continue
    return [min(spawned)[1]] if spawned else []


def pin(server_pid: int, cpus: dict, gpu: dict[int, int]) -> dict:
    """Engine core of this server on the engine CPUs (every thread), everything else of it and this client on
    the others. Returns what was done (recorded with the run)."""
    procs = tree(server_pid)
    engine = engine_core_pids(procs, gpu)
    done = {"engine_core_pids": engine, "engine_core_cpus": cpus["engine_core_cpus"]}
    for p in procs:
        want = cpus["engine_core_cpus"] if p.pid in engine else cpus["other_cpus"]
        try:
            # Every thread: sched_setaffinity on a pid sets only its main thread.
            for t in p.threads():
                os.sched_setaffinity(t.id, want)
        except Exception:  # noqa: BLE001 - a process or thread that just ended
            continue
    os.sched_setaffinity(0, cpus["other_cpus"])
    return done


# -- the benchmark ---------------------------------------------------------------------------------------------


def _vbench_args(parser, srv: dict, model_dir: str, c: int, n: int, seed: int, ready_check_s: int):
    os.environ["OPENAI_API_KEY"] = srv["api_key"] or "none"
    return parser.parse_args(
        [
            "--backend", "openai",
            "--base-url", srv["url"],
            "--endpoint", "/v1/completions",
            "--model", MODEL,
            "--tokenizer", model_dir,
            "--dataset-name", "random",
            "--random-input-len", "128",
            "--random-output-len", "256",
            "--ignore-eos",
            "--num-prompts", str(n),
            "--max-concurrency", str(c),
            "--request-rate", "inf",
            "--seed", str(seed),
            "--percentile-metrics", "ttft,tpot,itl,e2el",
            "--metric-percentiles", "50,99",
            "--disable-tqdm",
            "--ready-check-timeout-sec", str(ready_check_s),
        ]
    )  # fmt: skip


# vLLM's own per-request timings (its Prometheus histograms at /metrics; vllm serve aggregates its API processes'):
# the _sum and _count before and after a run give each one's exact mean over the run's requests. They split a
# `vllm serve` first token the way the mesh's engine request lines split ours (the engine's own TTFT, from the
# request reaching vLLM's front end).
VLLM_TIMINGS = {
    "server_ttft": "vllm:time_to_first_token_seconds",
    "engine_queue": "vllm:request_queue_time_seconds",
    "engine_prefill": "vllm:request_prefill_time_seconds",
}


def vllm_timings(url: str) -> dict[str, tuple[float, float]]:
    """key -> (sum of seconds, count) of each VLLM_TIMINGS histogram over all its labels, read from url/metrics;
    {} when it cannot be read."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(url + "/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return {}
    wanted = {name: key for key, name in VLLM_TIMINGS.items()}
    out: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(text):
        key = wanted.get(family.name)
        if key is None:
            continue
        acc = out.setdefault(key, [0.0, 0.0])
        for sample in family.samples:
            if sample.name == family.name + "_sum":
                acc[0] += sample.value
            elif sample.name == family.name + "_count":
                acc[1] += sample.value
    return {k: (v[0], v[1]) for k, v in out.items()}


def timing_means(before: dict, after: dict) -> dict[str, float]:
    """`KEY_mean_ms` over what was observed between two vllm_timings readings (keys with no new request left out)."""
    out = {}
    for key, (s1, n1) in after.items():
        s0, n0 = before.get(key, (0.0, 0.0))
        if n1 > n0:
            out[f"{key}_mean_ms"] = round((s1 - s0) / (n1 - n0) * 1000, 2)
    return out


def bench(args) -> None:
    from vllm.benchmarks import serve as vbench
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    state = read_state(args.dir)
    out = Path(args.out)
    doc = json.loads(out.read_text()) if out.exists() else {"records": [], "warmups": []}
    done = {(r["rep"], r["server"], r["concurrency"]) for r in doc["records"]}
    parser = FlexibleArgumentParser()
    vbench.add_cli_args(parser)
    servers = [s for s in state["servers"] if s in args.servers]
    servers += [s for s in args.servers if burn_variant(s)[1] and burn_variant(s)[0] in state["servers"]]
    cpus_file = Path(args.dir, "cpus.json")
    cpus = None
    if args.pin:
        cpus = json.loads(cpus_file.read_text()) if cpus_file.exists() else probe_cpus(args)
        doc["cpus"] = cpus
        if len(cpus["other_cpus"]) < 2:  # a small machine: nothing to set apart
            cpus = None
    deadline = time.monotonic() + args.budget_s

    def run(
        name: str, c: int, n: int, seed: int, ready_check_s: int
    ) -> tuple[dict, dict, float, float, dict]:
        base, burn, kind = burn_variant(name)
        srv = state["servers"][base]
        pinned = pin(srv["pid"], cpus, _gpu_pids()) if cpus else {}
        vargs = _vbench_args(parser, srv, args.model_dir, c, n, seed, ready_check_s)
        before = cpu_snapshot(srv["pid"])
        timings0 = vllm_timings(srv["url"]) if base.startswith("vllm-") else {}
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        with burning(burn, cpus["other_cpus"] if cpus else None, kind):
            t0, wall0 = time.monotonic(), time.time()
            res = asyncio.run(vbench.main_async(vargs))
            wall = time.monotonic() - t0
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        client = (ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime) / wall
        cpu = cpu_use(before, cpu_snapshot(srv["pid"]), wall)
        timings = timing_means(timings0, vllm_timings(srv["url"])) if timings0 else {}
        return (
            res,
            {"cpu": cpu, "client_cores": round(client, 3), "timings": timings},
            wall0,
            time.time(),
            pinned,
        )

    # Warm-up, once per server and not recorded: the first runs at a new batch size were 10-25% slower than
    # later ones in the previous run (rep 1 slowest for every server at c = 32 and 128).
    warmed = {w["server"] for w in doc.get("warmups", [])}
    for name in servers:
        if name in warmed or burn_variant(name)[1] or args.warmup_prompts <= 0:
            continue
        try:
            res, _cpu, w0, w1, _ = run(name, 256, args.warmup_prompts, 7, 60)
        except Exception as e:  # noqa: BLE001 - as below
            print(f"gpu_vs_vllm: warm-up of {name} failed: {e!r}", flush=True)
            continue
        doc.setdefault("warmups", []).append(
            {"server": name, "concurrency": 256, "num_prompts": args.warmup_prompts, "failed": res.get("failed"),
             "output_tokens_per_s": round(res.get("output_throughput", 0.0), 1), "wall_s": round(w1 - w0, 1)}
        )  # fmt: skip
        out.write_text(json.dumps(doc, indent=2))
        print(f"gpu_vs_vllm: warmed {name}: {doc['warmups'][-1]}", flush=True)

    for rep in range(1, args.reps + 1):
        for c in args.concurrency:
            # Interleaved: every server at this point before the next point; the order turns each repetition.
            k = (rep - 1) % len(servers)
            for name in servers[k:] + servers[:k]:
                if (rep, name, c) in done or c not in args.only.get(name, {c}):
                    continue
                if time.monotonic() > deadline:
                    print("gpu_vs_vllm: budget spent; run bench again to go on", flush=True)
                    return
                n = args.prompts.get(c, PROMPTS.get(c, 4 * c))
                try:
                    res, used, w0, w1, pinned = run(name, c, n, rep * 1000 + c, 0)
                except Exception as e:  # noqa: BLE001 - one server's failure must not end the others' runs
                    print(f"gpu_vs_vllm: rep {rep} {name} c={c} failed: {e!r}", flush=True)
                    continue
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
                    "itl_p50_ms": round(res.get("median_itl_ms", 0.0), 3),
                    # With the duration: what a request costs beyond its tokens (the gap to the next request).
                    "e2el_p50_ms": round(res.get("median_e2el_ms", 0.0), 2),
                    "e2el_mean_ms": round(res.get("mean_e2el_ms", 0.0), 2),
                    "started_at": w0,
                    "ended_at": w1,
                    "client_cores": used["client_cores"],
                    "pinned": pinned,
                    "cpu": used["cpu"],
                    "cpu_by_process": _by_process(used["cpu"]),
                    **used["timings"],
                }
                doc["records"].append(rec)
                out.write_text(json.dumps(doc, indent=2))
                print(
                    f"gpu_vs_vllm: rep {rep} {name} c={c}: {rec['output_tokens_per_s']} tok/s, TTFT p50 "
                    f"{rec['ttft_p50_ms']} p99 {rec['ttft_p99_ms']} ms, TPOT {rec['tpot_p50_ms']}, failed "
                    f"{rec['failed']}; client {rec['client_cores']}; cpu {rec['cpu_by_process']}",
                    flush=True,
                )


def _leaf(frame: str) -> str:
    """A py-spy frame "func (path/file.py:line)" as "func (file.py)"."""
    if " (" not in frame:
        return frame
    func, _, where = frame.partition(" (")
    return f"{func} ({where.rsplit('/', 1)[-1].split(':')[0]})"


def flame_summary(raw: str, top: int = 12) -> dict:
    """py-spy raw (collapsed) stacks -> samples, the top self-time frames, and where the time went by area."""
    leaves: dict[str, int] = {}
    areas: dict[str, int] = {}
    total = 0
    for line in raw.splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit() or not stack:
            continue
        k = int(n)
        total += k
        frames = stack.split(";")
        leaf = _leaf(frames[-1])
        leaves[leaf] = leaves.get(leaf, 0) + k
        text = stack.lower()
        area = next(
            (a for a, keys in FLAME_AREAS if any(key in text for key in keys)),
            "other",
        )
        areas[area] = areas.get(area, 0) + k
    if not total:
        return {"samples": 0}
    return {
        "samples": total,
        "top_self": [
            [f, round(v / total, 3)] for f, v in sorted(leaves.items(), key=lambda kv: -kv[1])[:top]
        ],
        "areas": {a: round(v / total, 3) for a, v in sorted(areas.items(), key=lambda kv: -kv[1])},
    }


# Where a sample's time went, by the first area its stack mentions (order matters: the most specific first).
FLAME_AREAS = (
    ("idle (waiting for events)", ("select (selectors", "_run_once", "poll (", "epoll")),
    ("logging (structlog)", ("structlog",)),
    ("tracing (opentelemetry)", ("opentelemetry",)),
    ("gc", ("gc_collect", "<gc>")),
    ("vllm output processing / detokenize", ("vllm/v1/engine/output_processor", "detokenizer", "tokenizers")),
    ("vllm client (zmq, msgpack)", ("vllm/v1/engine/core_client", "msgpack", "zmq")),
    ("vllm", ("vllm/",)),
    ("http / sse (gateway)", ("aiohttp", "httptools", "uvicorn", "starlette", "sse")),
    ("grpc", ("grpc",)),
    ("protobuf", ("protobuf", "_pb2")),
    ("fleetserve services", ("services/", "shared/")),
)


def profile(args) -> None:
    """py-spy every process of one server (non-blocking) while vLLM's client drives it at --concurrency; writes
    the flame summaries by process role (JSON) and keeps the raw stacks."""
    import shutil

    from vllm.benchmarks import serve as vbench
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    state = read_state(args.dir)
    srv = state["servers"][args.server]
    spy = shutil.which("py-spy")
    if spy is None:
        raise SystemExit("py-spy is not on PATH")
    ps = subprocess.run(["ps", "-eo", "pid,ppid,pcpu,rss,comm,args"], capture_output=True, text=True).stdout
    roles = roles_from_ps(ps)
    pids = [p.pid for p in tree(srv["pid"]) if p.pid in roles]
    out_dir = Path(args.dir, "flames", args.server)
    out_dir.mkdir(parents=True, exist_ok=True)
    spies = []
    for pid in pids:
        f = out_dir / f"{roles[pid].replace(' ', '_')}-{pid}.txt"
        argv = [
            spy,
            "record",
            "-p",
            str(pid),
            "-d",
            str(int(args.seconds)),
            "-r",
            "100",
            "-f",
            "raw",
            "-o",
            str(f),
        ]
        spies.append((pid, f, subprocess.Popen([*argv, "--nonblocking"], stdout=subprocess.DEVNULL,
                                               stderr=subprocess.DEVNULL)))  # fmt: skip
    parser = FlexibleArgumentParser()
    vbench.add_cli_args(parser)
    n = int(args.streams * 4)
    vargs = _vbench_args(parser, srv, args.model_dir, args.streams, n, 99, 0)
    res = asyncio.run(vbench.main_async(vargs))
    by_role: dict[str, list[dict]] = {}
    for pid, f, proc in spies:
        try:
            proc.wait(args.seconds + 60)
        except subprocess.TimeoutExpired:
            proc.kill()
        summary = flame_summary(f.read_text()) if f.exists() else {"samples": 0}
        by_role.setdefault(roles[pid], []).append({"pid": pid, **summary})
    doc = {
        "server": args.server,
        "concurrency": args.streams,
        "seconds": args.seconds,
        "rate_hz": 100,
        "load": {
            "output_tokens_per_s": round(res.get("output_throughput", 0.0), 1),
            "failed": res.get("failed"),
        },
        "processes": by_role,
    }
    Path(args.dir, f"flames-{args.server}.json").write_text(json.dumps(doc, indent=2))
    for role, rows in by_role.items():
        print(f"gpu_vs_vllm: flame {args.server} {role}: {[r.get('areas') for r in rows][:1]}", flush=True)


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
        client = [r["client_cores"] for r in rs if "client_cores" in r]
        row["client_cores"] = round(statistics.median(client), 2) if client else None
        row["failed"] = sum(r.get("failed") or 0 for r in rs)
        for key in VLLM_TIMINGS:  # vllm serve's own timings, where the runs read them
            vals = [r[f"{key}_mean_ms"] for r in rs if f"{key}_mean_ms" in r]
            if vals:
                row[f"{key}_mean_ms_median"] = round(statistics.median(vals), 2)
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


def is_plain_vllm(name: str) -> bool:
    """`vllm serve` as the issue's targets mean it (its variants, as vllm-api8-kv, vllm-api8+burn3 or the A/A copy
    vllm-api4-aa, are compared, not the best)."""
    return name.startswith("vllm-") and not name.endswith(("-kv", AA)) and not burn_variant(name)[1]


BURN = "+burn"
MEM = "+mem"
# A burner's loop: "burn" spins on the CPU alone; "mem" copies 64 KiB slices of a 64 MiB buffer (two copies per
# turn), so it also takes the last-level cache and memory bandwidth the host's cores share with the engine core.
_BURNERS = {
    BURN: "while True: pass",
    MEM: "b = bytearray(64 << 20)\ni = 0\nwhile True:\n    i = (i * 1103515245 + 12345) % ((64 << 20) - 65536)\n"
    "    bytes(b[i:i + 65536])",
}


def burn_variant(name: str) -> tuple[str, int, str]:
    """`NAME+burnK` / `NAME+memK`: server NAME run while K busy processes (spinning, or copying memory) share the
    CPUs the server's own processes (all but its engine core) run on, the CPU the mesh's relays use beyond
    `vllm serve`'s; `NAME`: (NAME, 0, "")."""
    for kind in (BURN, MEM):
        base, sep, k = name.partition(kind)
        if sep:
            return base, int(k or 1), kind
    return name, 0, ""


@contextlib.contextmanager
def burning(k: int, cpus: list[int] | None, kind: str = BURN):
    """K processes each running `kind`'s loop on `cpus` (the OS places them among those) while inside."""
    spin = "import os,sys\nif sys.argv[1:]: os.sched_setaffinity(0, {int(c) for c in sys.argv[1:]})\n"
    spin += _BURNERS[kind or BURN]
    procs = [
        subprocess.Popen([sys.executable, "-c", spin, *map(str, cpus or [])], stdin=subprocess.DEVNULL)
        for _ in range(k)
    ]
    try:
        yield procs
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


def paired(records: list[dict], server: str = "mesh") -> dict[int, dict]:
    """Per concurrency: in each repetition the mesh against that repetition's best `vllm serve` (the servers of
    one repetition ran back to back, so drift between repetitions cancels), the median over repetitions, and in
    how many repetitions the mesh was the fastest server (fastest_rounds: [k, n])."""
    by: dict[tuple[int, int], dict[str, dict]] = {}
    for r in records:
        by.setdefault((r["concurrency"], r["rep"]), {})[r["server"]] = r
    out: dict[int, dict] = {}
    for (c, rep), rs in sorted(by.items()):
        mesh = rs.get(server)
        vl = [r for name, r in rs.items() if is_plain_vllm(name)]
        if mesh is None or not vl:
            continue
        best = max(vl, key=lambda r: r["output_tokens_per_s"])
        row = out.setdefault(c, {"reps": []})
        row["reps"].append(
            {
                "rep": rep,
                "best": best["server"],
                "toks_ratio": round(mesh["output_tokens_per_s"] / best["output_tokens_per_s"], 3),
                "ttft_p50_delta_ms": round(mesh["ttft_p50_ms"] - best["ttft_p50_ms"], 2),
                "ttft_p99_ratio": round(mesh["ttft_p99_ms"] / max(best["ttft_p99_ms"], 1e-9), 3),
            }
        )
    for row in out.values():
        for k in ("toks_ratio", "ttft_p50_delta_ms", "ttft_p99_ratio"):
            vals = [x[k] for x in row["reps"]]
            row[k + "_median"] = round(statistics.median(vals), 3)
            row[k + "_range"] = [min(vals), max(vals)]
        # On a machine that drifts within a run, how often the mesh led its own round says more than a ratio of
        # medians taken over rounds that ran at different speeds.
        row["fastest_rounds"] = [sum(x["toks_ratio"] >= 1.0 for x in row["reps"]), len(row["reps"])]
    return out


def against_each(records: list[dict], server: str = "mesh") -> dict[int, dict[str, dict]]:
    """Per concurrency and per plain `vllm serve`: the mesh against that one server, round by round (tokens/s and
    TPOT ratios, medians and the number of rounds). Unlike paired(), no best-of-three: a deficit against one
    configuration that repeats over rounds and runs is the mesh's, not the noise's."""
    by: dict[tuple[int, int], dict[str, dict]] = {}
    for r in records:
        by.setdefault((r["concurrency"], r["rep"]), {})[r["server"]] = r
    ratios: dict[int, dict[str, dict[str, list[float]]]] = {}
    for (c, _), rs in sorted(by.items()):
        mesh = rs.get(server)
        if mesh is None:
            continue
        for name, r in rs.items():
            if not is_plain_vllm(name):
                continue
            row = ratios.setdefault(c, {}).setdefault(name, {"toks": [], "tpot": []})
            row["toks"].append(mesh["output_tokens_per_s"] / r["output_tokens_per_s"])
            row["tpot"].append(mesh["tpot_p50_ms"] / max(r["tpot_p50_ms"], 1e-9))
    return {
        c: {
            name: {
                "rounds": len(v["toks"]),
                "toks_ratio_median": round(statistics.median(v["toks"]), 3),
                "tpot_ratio_median": round(statistics.median(v["tpot"]), 3),
                # With rounds, a sign test: ahead in few of many rounds is a deficit, not the noise.
                "mesh_ahead": sum(x > 1.0 for x in v["toks"]),
            }
            for name, v in sorted(per.items())
        }
        for c, per in sorted(ratios.items())
    }


def pooled(docs: list[dict], server: str = "mesh") -> dict[int, dict]:
    """Several runs' published JSON together: per concurrency the paired ratios (mesh / best of its round) of
    every round of every run, their median, and the rounds the mesh was fastest in. Pools ratios, never
    tokens/s: the runs had different machines, whose speeds differ by more than the servers do."""
    rounds: dict[int, list[float]] = {}
    for doc in docs:
        for c, row in paired(doc["records"], server).items():
            rounds.setdefault(c, []).extend(x["toks_ratio"] for x in row["reps"])
    return {
        c: {
            "rounds": len(v),
            "toks_ratio_median": round(statistics.median(v), 3),
            "fastest_rounds": sum(x >= 1.0 for x in v),
        }
        for c, v in sorted(rounds.items())
    }


def best_of_noise(
    records: list[dict], c: int, draws: int = 2000, seed: int = 0, server: str = "mesh"
) -> dict | None:
    """What "mesh / best `vllm serve`" would read for a server as fast as `vllm serve`, from the noise alone: the
    `vllm serve` runs at c pooled and dealt at random into as many servers of as many runs as they had; the mean
    of the pool's median over the highest dealt median (1.0 on a quiet machine). And the mesh against that pooled
    median. None without plain `vllm serve` runs."""
    import random

    runs = [r for r in records if r["concurrency"] == c and is_plain_vllm(r["server"])]
    if not runs:
        return None
    sizes = [sum(1 for r in runs if r["server"] == n) for n in sorted({r["server"] for r in runs})]
    pool = [r["output_tokens_per_s"] for r in runs]
    pooled = statistics.median(pool)
    rng = random.Random(seed)
    reads = []
    for _ in range(draws):
        rng.shuffle(pool)
        cuts = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
        best = max(statistics.median(pool[a:b]) for a, b in zip(cuts, cuts[1:], strict=False))
        reads.append(pooled / best)
    out = {"identical_server_reads": round(statistics.mean(reads), 3), "vllm_pooled_median": round(pooled, 1)}
    mesh = [r["output_tokens_per_s"] for r in records if r["concurrency"] == c and r["server"] == server]
    if mesh:
        out["mesh_vs_pooled_median"] = round(statistics.median(mesh) / pooled, 3)
    return out


def targets(
    rows: list[dict], pairs: dict[int, dict], records: list[dict] | None = None, server: str = "mesh"
) -> dict[int, dict]:
    """Each concurrency against issue 12's targets for server (a mesh configuration), on medians (best = the
    `vllm serve` with the highest median tokens/s) and on the paired per-repetition ratios."""
    out = {}
    for c in sorted({r["concurrency"] for r in rows}):
        rs = [r for r in rows if r["concurrency"] == c]
        mesh = next((r for r in rs if r["server"] == server), None)
        vl = [r for r in rs if is_plain_vllm(r["server"])]
        if mesh is None or not vl:
            continue
        best = max(vl, key=lambda r: r["output_tokens_per_s"])
        ratio = mesh["output_tokens_per_s"] / best["output_tokens_per_s"]
        t = {
            "best": best["server"],
            "toks_ratio_of_medians": round(ratio, 3),
            "toks_ratio_paired_median": pairs.get(c, {}).get("toks_ratio_median"),
            "toks_met": ratio >= TARGET_TOKS_RATIO,
            "ttft_p50_delta_ms": round(mesh["ttft_p50_ms"] - best["ttft_p50_ms"], 2),
            "ttft_p99_ratio": round(mesh["ttft_p99_ms"] / max(best["ttft_p99_ms"], 1e-9), 3),
        }
        if records is not None:
            # The target's statistic takes the highest of three noisy medians: how high it reads by chance.
            t["best_of_noise"] = best_of_noise(records, c, server=server)
        if c == 1:
            best_ttft = min(vl, key=lambda r: r["ttft_p50_ms"])
            t["ttft_p50_delta_vs_lowest_ms"] = round(mesh["ttft_p50_ms"] - best_ttft["ttft_p50_ms"], 2)
            t["ttft_p50_met"] = t["ttft_p50_delta_ms"] <= TARGET_TTFT_P50_C1_MS
        if c == 256:
            t["ttft_p99_met"] = t["ttft_p99_ratio"] <= TARGET_TTFT_P99_C256_RATIO
        out[c] = t
    return out


def _pct(vals: list[float], q: float) -> float:
    vals = sorted(vals)
    return vals[min(len(vals) - 1, max(0, round(q * (len(vals) - 1))))]


def _hop_tpot(e: dict) -> float | None:
    """Time per output token after the first at one hop, from its request log line (None under two tokens)."""
    n, ttft, dur = e.get("output_tokens") or 0, e.get("ttft_ms"), e.get("duration_ms")
    return (float(dur) - float(ttft)) / (n - 1) if n > 1 and dur is not None else None


def _request_lines(log_dir: str) -> dict[str, list[dict]]:
    """The gateway's and engines' request log lines under log_dir with a first token: event -> lines, each with
    `end` (its timestamp, epoch seconds) and `start` (end less its duration, when it has one)."""
    from datetime import datetime

    events: dict[str, list[dict]] = {"gateway.request": [], "engine.request": []}
    for f in sorted(Path(log_dir).glob("*.log")):
        with open(f, errors="replace") as fh:
            for line in fh:
                if not line.startswith("{") or ".request" not in line:
                    continue
                try:
                    e = json.loads(line)
                except ValueError:
                    continue
                if e.get("event") in events and e.get("ttft_ms") is not None and e.get("timestamp"):
                    e["end"] = datetime.fromisoformat(e["timestamp"].replace("Z", "+00:00")).timestamp()
                    if e.get("duration_ms") is not None:
                        e["start"] = e["end"] - float(e["duration_ms"]) / 1000
                    events[e["event"]].append(e)
    return events


def hop_ttft(records: list[dict], log_dir: str, server: str = "mesh") -> dict[int, dict]:
    """TTFT and TPOT at each hop of the mesh, from its services' request log lines (gateway: from the HTTP request
    to the first token, and to its end; engine: from Generate to vLLM's first output, and to the last), per
    concurrency over the mesh's runs. TPOT by hop says whether a slower token rate at the client was the engine's
    or was added on the way."""
    lines = _request_lines(log_dir)
    events = {ev: [(e["end"], float(e["ttft_ms"]), _hop_tpot(e)) for e in es] for ev, es in lines.items()}
    out: dict[int, dict] = {}
    hops = (("gateway.request", "gateway"), ("engine.request", "engine"))
    for r in records:
        if r["server"] != server or "started_at" not in r:
            continue
        row = out.setdefault(r["concurrency"], {"client_p50": [], "client_p99": [], "client_tpot": []})
        for ev, key in hops:
            mine = [(v, t) for ts, v, t in events[ev] if r["started_at"] <= ts <= r["ended_at"] + 1.0]
            row.setdefault(key, []).extend(v for v, _ in mine)
            row.setdefault(key + "_tpot", []).extend(t for _, t in mine if t is not None)
        row["client_p50"].append(r["ttft_p50_ms"])
        row["client_p99"].append(r["ttft_p99_ms"])
        row["client_tpot"].append(r["tpot_p50_ms"])
    summary = {}
    for c, row in sorted(out.items()):
        s = {"requests": {key: len(row[key]) for _, key in hops}}
        for _, key in hops:
            if row[key]:
                s[f"{key}_p50_ms"] = round(_pct(row[key], 0.5), 2)
                s[f"{key}_p99_ms"] = round(_pct(row[key], 0.99), 2)
                # The mean: what vllm serve's own server_ttft_mean_ms is compared with.
                s[f"{key}_mean_ms"] = round(statistics.fmean(row[key]), 2)
            if row[key + "_tpot"]:
                s[f"{key}_tpot_p50_ms"] = round(_pct(row[key + "_tpot"], 0.5), 3)
        s["client_p50_ms_median"] = round(statistics.median(row["client_p50"]), 2)
        s["client_p99_ms_median"] = round(statistics.median(row["client_p99"]), 2)
        s["client_tpot_p50_ms_median"] = round(statistics.median(row["client_tpot"]), 3)
        summary[c] = s
    return summary


WAVE_GAP_S = 0.05


def _waves(lines: list[dict]) -> list[list[dict]]:
    """Request lines grouped by start time: a new group after a pause of more than WAVE_GAP_S."""
    waves: list[list[dict]] = []
    for e in sorted(lines, key=lambda e: e["start"]):
        if not waves or e["start"] - waves[-1][-1]["start"] > WAVE_GAP_S:
            waves.append([])
        waves[-1].append(e)
    return waves


def wave_legs(records: list[dict], log_dir: str, server: str = "mesh") -> dict[int, dict]:
    """Where a closed-loop wave's first tokens go, per concurrency c. `vllm bench serve` at c streams starts c
    requests at once and each next one when one ends; with equal lengths they end together, so requests reach the
    gateway in waves of about c (a new wave after a WAVE_GAP_S pause). Per quarter of a wave, by arrival order:
    its arrival after the wave's first request (the client's and the gateway's spread), gateway to engine (the
    forward relays), the engine's TTFT (Generate to vLLM's first output) and the gateway's (medians, ms). Every
    ms of a slot's first token is a ms that slot makes no tokens: at c = 32 a request lasts ~550 ms, so +1 ms of
    TTFT is ~-0.2% tokens/s."""
    lines = _request_lines(log_dir)
    engine = {e.get("request_id"): e for e in lines["engine.request"] if "start" in e}
    gateway = [e for e in lines["gateway.request"] if "start" in e and e.get("request_id") in engine]
    out: dict[int, dict] = {}
    for r in records:
        if r["server"] != server or "started_at" not in r:
            continue
        c = r["concurrency"]
        row = out.setdefault(c, {"waves": 0, "quarters": [[] for _ in range(4)]})
        for w in _waves([e for e in gateway if r["started_at"] <= e["start"] <= r["ended_at"]]):
            if not 0.75 * c <= len(w) <= 1.25 * c:  # the run's first and last waves, or waves that merged
                continue
            row["waves"] += 1
            for i, e in enumerate(w):
                en = engine[e["request_id"]]
                row["quarters"][i * 4 // len(w)].append(
                    (
                        (e["start"] - w[0]["start"]) * 1000,
                        (en["start"] - e["start"]) * 1000,
                        float(en["ttft_ms"]),
                        float(e["ttft_ms"]),
                    )
                )
    keys = ("arrival_ms", "gateway_to_engine_ms", "engine_ttft_ms", "gateway_ttft_ms")
    return {
        c: {
            "waves": row["waves"],
            "quarters": [
                {k: round(statistics.median(x[j] for x in q), 2) for j, k in enumerate(keys)}
                | {"requests": len(q)}
                for q in row["quarters"]
                if q
            ],
        }
        for c, row in sorted(out.items())
        if c > 1 and row["waves"]
    }


def report(args) -> None:
    doc = json.loads(Path(args.records).read_text())
    if args.ps:
        relabel(doc["records"], roles_from_ps(Path(args.ps).read_text()))
    rows = summarize(doc["records"])
    server = args.server  # the mesh configuration judged against the targets
    pairs = paired(doc["records"], server)
    met = targets(rows, pairs, doc["records"], server)
    names = {r["server"] for r in doc["records"]}
    # Each against the best plain `vllm serve`: the other mesh configurations, and vllm serve's own (-kv).
    variants = sorted(n for n in names if n != server and not is_plain_vllm(n))
    others = {v: paired(doc["records"], v) for v in variants}
    by_c: dict[int, list[dict]] = {}
    for r in rows:
        by_c.setdefault(r["concurrency"], []).append(r)
    lines = [
        "| c | server | tok/s median [range] | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | client cores | "
        "mesh / best vllm serve |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c, rs in sorted(by_c.items()):
        for r in rs:
            rng = r["output_tokens_per_s_range"]
            vs = ""
            if r["server"] in others and c in others[r["server"]]:
                o = others[r["server"]][c]
                vs = f"paired {o['toks_ratio_median']} {o['toks_ratio_range']}"
            if r["server"] == server and c in met:
                t = met[c]
                vs = (
                    f"{t['toks_ratio_of_medians']:.3f} ({t['best']}), paired "
                    f"{pairs.get(c, {}).get('toks_ratio_median')} {pairs.get(c, {}).get('toks_ratio_range')}; "
                    f"TTFT p50 {t['ttft_p50_delta_ms']:+.1f} ms; TTFT p99 x{t['ttft_p99_ratio']:.2f}"
                )
            lines.append(
                f"| {c} | {r['server']} | {r['output_tokens_per_s']:,.0f} [{rng[0]:,.0f}-{rng[1]:,.0f}] "
                f"| {r['ttft_p50_ms']} | {r['ttft_p99_ms']} | {r['tpot_p50_ms']} | {r.get('client_cores')} | {vs} |"
            )
    print("\n".join(lines))
    print(json.dumps({"targets": met, "target_server": server}, indent=1))
    if args.mesh_logs:
        logs = str(Path(args.mesh_logs) / server / "logs")
        doc["hop_ttft"] = hop_ttft(doc["records"], logs, server)
        doc["wave_legs"] = wave_legs(doc["records"], logs, server)
        for v in (v for v in variants if v.startswith("mesh")):
            logs = str(Path(args.mesh_logs) / v / "logs")
            doc.setdefault("hop_ttft_variants", {})[v] = hop_ttft(doc["records"], logs, v)
            doc.setdefault("wave_legs_variants", {})[v] = wave_legs(doc["records"], logs, v)
        print(json.dumps({"hop_ttft": doc["hop_ttft"], "wave_legs": doc["wave_legs"]}, indent=1))
    if others:
        print(json.dumps({"paired_variants": others}, indent=1))
    each = against_each(doc["records"], server)
    print(json.dumps({"against_each": each}, indent=1))
    if args.mesh_logs:
        for f in sorted(Path(args.mesh_logs).glob("flames-*.json")):
            flames = json.loads(f.read_text())
            doc.setdefault("flames", {})[flames["server"]] = flames
    if args.out:
        doc["summary"] = rows
        doc["paired"] = pairs
        doc["paired_variants"] = others
        doc["targets"] = met
        doc["target_server"] = server
        doc["against_each"] = each
        Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")


def pool(args) -> None:
    """Print several runs' pooled paired ratios and the mesh against every `vllm serve`, run by run and pooled
    (JSON)."""
    docs = {f: json.loads(Path(f).read_text()) for f in args.files}
    server = args.server
    out = {
        "server": server,
        "pooled": pooled(list(docs.values()), server),
        "against_each": {Path(f).name: against_each(d["records"], server) for f, d in docs.items()},
        # Every run's rounds together (a round is (run, rep): reps repeat from one run to the next).
        "pooled_against_each": against_each(
            [{**r, "rep": (i, r["rep"])} for i, d in enumerate(docs.values()) for r in d["records"]], server
        ),
    }
    print(json.dumps(out, indent=1))


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
    s.add_argument(
        "--mesh-pack", type=int, default=0, help="also a mesh-pack server: routers --frontend-pack N"
    )
    s.add_argument(
        "--mesh-wide", type=int, default=0, help="also a mesh-wide server: router and gateway --workers N"
    )
    s.add_argument(
        "--mesh-fe", type=int, default=0, help="also a mesh-fe server: the engine with --frontends N"
    )
    s.add_argument("--mesh-router-args", default="", help="extra router flags of the mesh server")
    s.add_argument(
        "--no-mesh",
        action="store_true",
        help="no plain mesh server (a run of a variant alone, e.g. --mesh-embedded with 1, 4 and 8 API processes: "
        "five servers at the default --gpu-memory-utilization 0.2 would not fit)",
    )
    s.add_argument(
        "--mesh-embedded",
        action="store_true",
        help="also a mesh-embedded server: the same mesh with gateway --embedded-router (no router process)",
    )
    s.add_argument(
        "--mesh-embedded-holdoff",
        action="store_true",
        help="also a mesh-embedded-holdoff server: mesh-embedded with the relays' hold of a lone chunk on a busy "
        "hop off (FLEETSERVE_RELAY_HOLD_AFTER_S=inf)",
    )
    s.add_argument(
        "--mesh-kv", action="store_true", help="also a mesh-kv server: engine --vllm-kv-events (kv_aware's)"
    )
    s.add_argument(
        "--vllm-kv",
        default="",
        help="also vllm-apiN-kv servers (vllm serve publishing KV events) for N in this list",
    )
    s.add_argument(
        "--vllm-aa",
        default="",
        help="also vllm-apiN-aa servers (a second, identical vllm serve with N API processes: an A/A) for N in this "
        "list",
    )
    s.add_argument("--start-timeout-s", type=float, default=400.0)
    s.add_argument("--kv-cache-bytes", type=int, default=KV_CACHE_BYTES)
    s.add_argument(
        "--no-stagger",
        dest="stagger",
        action="store_false",
        help="start one server at a time (default: the first alone, then the rest at once)",
    )
    m = sub.add_parser("serve-mesh")
    m.add_argument("--dir", required=True)
    m.add_argument("--model-dir", required=True)
    m.add_argument("--vllm-flags", required=True)
    m.add_argument("--frontends", type=int, default=0)
    m.add_argument("--router-workers", type=int, default=2)
    m.add_argument("--gateway-workers", type=int, default=2)
    m.add_argument("--name", default="mesh")
    m.add_argument("--router-args", default="")
    m.add_argument("--engine-args", default="")
    m.add_argument("--embedded-router", action="store_true", help="gateways route in process: no router")
    b = sub.add_parser("bench")
    b.add_argument("--dir", required=True)
    b.add_argument("--model-dir", required=True)
    b.add_argument("--out", required=True)
    b.add_argument("--reps", type=int, default=5)
    b.add_argument("--concurrency", default="1,32,128,256")
    b.add_argument("--servers", default="vllm-api1,vllm-api4,vllm-api8,mesh,mesh-pack")
    b.add_argument(
        "--only", default="mesh-pack=32,128", help="servers run at some concurrencies only: NAME=C,C;NAME=C"
    )
    b.add_argument("--budget-s", type=float, default=480.0)
    b.add_argument(
        "--prompts",
        default="",
        help="prompts per run at a concurrency, C=N,C=N (default 1=16,32=128,128=512,256=1024); more prompts, "
        "longer runs: at c=32 the default's 128 prompts run ~3 s, short enough for the machine's noise to show",
    )
    b.add_argument(
        "--warmup-prompts", type=int, default=256, help="one unrecorded c=256 run per server first"
    )
    b.add_argument(
        "--no-pin", dest="pin", action="store_false", help="leave processes where the OS puts them"
    )
    b.add_argument("--engine-cpus", type=int, default=2, help="CPUs (on different cores) for the engine core")
    f = sub.add_parser("profile")
    f.add_argument("--dir", required=True)
    f.add_argument("--model-dir", required=True)
    f.add_argument("--server", default="mesh")
    f.add_argument("--streams", type=int, default=256, help="concurrency of the load while sampling")
    f.add_argument("--seconds", type=float, default=8.0)
    t = sub.add_parser("stop")
    t.add_argument("--dir", required=True)
    r = sub.add_parser("report")
    r.add_argument("--records", required=True)
    r.add_argument("--out", default="")
    r.add_argument("--ps", default="", help="ps listing taken during the run, to name every process's role")
    r.add_argument("--mesh-logs", default="", help="the bench's --dir (per-hop TTFT from DIR/mesh*/logs)")
    r.add_argument(
        "--server",
        default="mesh",
        help="the mesh configuration judged against the targets (e.g. mesh-embedded); the others are variants",
    )
    o = sub.add_parser(
        "pool", help="several runs' published JSON: pooled paired ratios, and against each server"
    )
    o.add_argument("files", nargs="+")
    o.add_argument(
        "--server", default="mesh", help="the mesh configuration pooled (runs without it add nothing)"
    )
    args = p.parse_args(argv)
    try:
        _parse_lists(args)
    except ValueError as e:
        p.error(f"a list of numbers has a non-number in it: {e}")  # exits 2 with the usage, as argparse does
    return args


def _parse_lists(args: argparse.Namespace) -> None:
    """The comma- and semicolon-separated flags as lists and mappings of numbers (ValueError on a non-number)."""
    if hasattr(args, "api_counts"):
        args.api_counts = [int(x) for x in args.api_counts.split(",") if x]
        args.vllm_kv = [int(x) for x in args.vllm_kv.split(",") if x]
        args.vllm_aa = [int(x) for x in args.vllm_aa.split(",") if x]
    if hasattr(args, "concurrency"):
        args.concurrency = [int(x) for x in args.concurrency.split(",") if x]
    if hasattr(args, "servers"):
        args.servers = [x for x in args.servers.split(",") if x]
    if hasattr(args, "only"):
        args.only = {
            k: {int(c) for c in v.split(",") if c}
            for k, _, v in (x.partition("=") for x in args.only.split(";") if x)
        }
    if hasattr(args, "prompts"):
        args.prompts = {
            int(c): int(n) for c, _, n in (x.partition("=") for x in args.prompts.split(",") if x)
        }


def main(argv=None) -> int:
    args = parse_args(argv)
    {
        "start": start,
        "serve-mesh": serve_mesh,
        "bench": bench,
        "profile": profile,
        "stop": stop,
        "report": report,
        "pool": pool,
    }[args.phase](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
