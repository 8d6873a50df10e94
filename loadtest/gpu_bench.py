"""`python -m loadtest.gpu_bench`: on a GPU machine, in one run, the same closed-loop load on (a) vLLM's AsyncLLM
in this process, (b) one engine worker over gRPC and (c) the full mesh gateway -> router -> engine, with the
same engine flags; optionally the sim-fidelity workloads on vLLM and on the sim engine. JSON records out."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from loadtest import fidelity
from loadtest.bench import Target, _one
from loadtest.fleet import structlog_to_stderr
from loadtest.summary import RequestResult, summarize
from loadtest.workload import Workload
from shared.channels import open_channel

MODEL = "llama-1b"
FIELDS = ("output_tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms")


def record(summary: dict, **extra) -> dict:
    """The published record of a loadtest.summary summary: tok/s and TTFT/TPOT p50/p99 (plus counts)."""
    return {
        **extra,
        "mode": summary["mode"],
        "concurrency": summary["concurrency"],
        "output_tokens_per_s": summary["output_tokens_per_s"],
        "ttft_p50_ms": summary["ttft_ms"]["p50"],
        "ttft_p99_ms": summary["ttft_ms"]["p99"],
        "tpot_p50_ms": summary["tpot_ms"]["p50"],
        "tpot_p99_ms": summary["tpot_ms"]["p99"],
        "requests": summary["requests"],
        "errors": summary["errors"],
        "first_error": summary["first_error"],
        "duration_s": summary["duration_s"],
    }


def requests_for(c: int, waves: int, minimum: int) -> int:
    return max(minimum, waves * c)


# -- (a) AsyncLLM in this process ----------------------------------------------------------------------------


async def inproc_runs(args, workload: Workload, out: list[dict], save) -> str:
    """Start AsyncLLM here (the worker's engine flags), run every concurrency, stop it; vLLM's version."""
    from services.engine.vllm_backend import engine_argv, load_vllm_api
    from shared import tokenizer as fleet_tokenizer

    api = load_vllm_api()
    tok = fleet_tokenizer.load(args.model_dir)
    kv = f"ipc://{tempfile.gettempdir()}/gpu-bench-kv-{os.getpid()}.sock"
    argv = engine_argv(
        f"--model {args.model_dir} {args.vllm_flags}",
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
    )
    t0 = time.perf_counter()
    llm = api.create_engine(argv, kv, [])
    print(f"gpu_bench: AsyncLLM started in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    clock = time.perf_counter

    async def one(prompt: str, max_tokens: int) -> RequestResult:
        start = clock()
        ttft = None
        n = 0
        try:
            # Tokenized here as the worker does (the fleet tokenizer, token ids into vLLM).
            params = api.sampling_params(
                max_tokens=max_tokens,
                ignore_eos=True,
                output_kind=api.output_kind_delta,
                detokenize=args.detokenize,
            )
            async for o in llm.generate(api.tokens_input(tok.encode(prompt)), params, uuid.uuid4().hex):
                k = len(o.outputs[0].token_ids)
                if ttft is None and k:
                    ttft = clock() - start
                n += k
        except Exception as e:  # counted, not fatal: the record says how many failed
            return RequestResult(ttft, clock() - start, n, error=type(e).__name__, message=str(e))
        return RequestResult(ttft, clock() - start, n)

    async def closed_loop(c: int, total: int, stream: str, max_tokens: int) -> dict:
        results: list[RequestResult] = []
        indices = iter(range(total))

        async def worker():
            for i in indices:
                results.append(await one(workload.prompt(i, stream), max_tokens))

        start = clock()
        await asyncio.gather(*(worker() for _ in range(min(c, total))))
        return summarize(results, clock() - start, mode="inproc", concurrency=c)

    try:
        await closed_loop(32, 64, "inproc-warmup", 16)
        for c in args.concurrency:
            s = await closed_loop(
                c, requests_for(c, args.waves, args.min_requests), f"inproc-{c}", workload.max_tokens
            )
            out.append(record(s))
            save()
            print(f"gpu_bench: {json.dumps(out[-1])}", file=sys.stderr, flush=True)
    finally:
        llm.shutdown()
        await asyncio.sleep(
            3
        )  # the engine-core process gives its GPU memory back before the next engine starts
    return api.version


# -- (b) and (c): one engine worker, directly and through the mesh, loaded from client processes ---------------


def _client_proc(
    target: tuple[str, str, str], workload: Workload, c: int, total: int, stream: str, start_at: float
) -> tuple[list[tuple], float]:
    """One client process's share of a closed loop (its own channel and event loop), started at start_at."""
    import uvloop

    return uvloop.run(_client(Target(*target), workload, c, total, stream, start_at))


async def _client(target: Target, workload: Workload, c: int, total: int, stream: str, start_at: float):

    channel = open_channel(target.address)
    call = target.stub(channel)
    results: list[RequestResult] = []
    indices = iter(range(total))

    async def worker():
        for i in indices:
            results.append(await _one(call, target, target.request(workload, i, stream), 600.0))

    await asyncio.sleep(max(0.0, start_at - time.time()))
    try:
        await asyncio.gather(*(worker() for _ in range(min(c, total))))
    finally:
        end = time.time()
        await channel.close(grace=None)
    return [(r.ttft_s, r.e2e_s, r.output_tokens, r.error, r.reason, r.message) for r in results], end


def spread_load(
    pool: ProcessPoolExecutor, procs: int, target: Target, workload: Workload, c: int, total: int, stream: str
) -> dict:
    """A closed loop of c streams split over up to `procs` client processes (one Python client process tops out
    near the engine's rate), summarized as one run."""
    n = max(1, min(procs, c))
    shares = [(c // n + (k < c % n), total // n + (k < total % n)) for k in range(n)]
    start_at = time.time() + 1.0
    futures = [
        pool.submit(
            _client_proc,
            (target.mode, target.address, target.api_key),
            workload,
            ck,
            tk,
            f"{stream}-{k}",
            start_at,
        )
        for k, (ck, tk) in enumerate(shares)
    ]
    results: list[RequestResult] = []
    end = start_at
    for f in futures:
        rows, e = f.result()
        results.extend(RequestResult(*row) for row in rows)
        end = max(end, e)
    return summarize(results, end - start_at, mode=target.mode, concurrency=c)


@contextlib.asynccontextmanager
async def fleet(args, backend: str):
    """A fleet of one engine of `backend` (vllm: the bench's engine flags; sim: the H100 profile)."""
    from shared.cluster import Cluster, ClusterConfig

    engine_args = ["--model", MODEL, "--max-num-seqs", str(args.max_num_seqs)]
    engine_args += ["--max-num-batched-tokens", str(args.max_num_batched_tokens)]
    if backend == "vllm":
        engine_args.append(f"--vllm-args=--model {args.model_dir} {args.vllm_flags}")
        if not args.detokenize:
            engine_args.append("--no-vllm-detokenize")
    else:
        engine_args += ["--profile", args.sim_profile]
    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as tmp:
        cluster = Cluster(
            ClusterConfig(
                data_dir=Path(tmp),
                engines=1,
                backend=backend,
                model=MODEL,
                speed_factor=args.sim_speed_factor if backend == "sim" else 1.0,
                start_timeout_s=300.0,
                extra_args={"engine": engine_args},
            )
        )
        t0 = time.perf_counter()
        await cluster.start()
        print(
            f"gpu_bench: {backend} fleet up in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True
        )
        try:
            yield cluster
        finally:
            await cluster.stop()
            if args.logs_dir:
                shutil.make_archive(f"{args.logs_dir}/fleet-{backend}-logs", "gztar", Path(tmp) / "logs")


async def fleet_runs(args, workload: Workload, out: list[dict], fid: list[dict], save, pool) -> None:
    loop = asyncio.get_running_loop()

    def run(target, wl, c, total, stream) -> dict:
        return spread_load(pool, args.client_procs, target, wl, c, total, stream)

    for backend in ("vllm", "sim"):
        if backend == "vllm" and not ({"direct", "mesh"} & set(args.modes) or args.fidelity):
            continue
        if backend == "sim" and not args.fidelity_sim:
            continue
        async with fleet(args, backend) as cluster:
            direct = Target("direct", cluster.procs["engine-1"].address)
            mesh = Target("mesh", cluster.gateway, cluster.api_key)
            warm = Workload(model=MODEL, prompt_tokens=workload.prompt_tokens, max_tokens=16, seed=1)
            await loop.run_in_executor(None, run, mesh, warm, 32, 64, f"warm-{backend}")
            if backend == "vllm":
                for c in args.concurrency:
                    total = requests_for(c, args.waves, args.min_requests)
                    for target in [t for t in (direct, mesh) if t.mode in args.modes]:
                        s = await loop.run_in_executor(
                            None, run, target, workload, c, total, f"{target.mode}-{c}"
                        )
                        out.append(record(s))
                        save()
                        print(f"gpu_bench: {json.dumps(out[-1])}", file=sys.stderr, flush=True)
            if (backend == "vllm" and args.fidelity) or backend == "sim":
                for name, cs in (
                    ("mixed", args.concurrency),
                    ("shared_prefix", args.shared_prefix_concurrency),
                ):
                    wl = fidelity.workload(name, model=MODEL, max_tokens=workload.max_tokens, seed=args.seed)
                    for c in cs:
                        total = requests_for(c, args.waves, args.min_requests)
                        s = await loop.run_in_executor(None, run, direct, wl, c, total, f"fid-{name}-{c}")
                        rec = record(s, workload=name) | {"mode": backend}
                        if backend == "sim":
                            rec = fidelity.rescale(rec, args.sim_speed_factor)
                        fid.append(rec)
                        save()
                        print(f"gpu_bench: {json.dumps(fid[-1])}", file=sys.stderr, flush=True)


# -- the run -------------------------------------------------------------------------------------------------


def device_name() -> str:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip().replace(", ", " driver ")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def overhead_markdown(records: list[dict]) -> str:
    """Table of (a)/(b)/(c) per concurrency, with (c)/(a) throughput and TTFT p50 added."""
    by = {(r["mode"], r["concurrency"]): r for r in records}
    lines = [
        "| c | mode | tok/s | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | TPOT p99 ms | vs in-process |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in sorted({r["concurrency"] for r in records}):
        base = by.get(("inproc", c))
        for mode in ("inproc", "direct", "mesh"):
            r = by.get((mode, c))
            if r is None:
                continue
            vs = ""
            if base and mode != "inproc" and base["output_tokens_per_s"]:
                ratio = r["output_tokens_per_s"] / base["output_tokens_per_s"]
                added = (r["ttft_p50_ms"] or 0) - (base["ttft_p50_ms"] or 0)
                vs = f"{ratio * 100:.1f}% tok/s, TTFT p50 {added:+.1f} ms"
            lines.append(
                f"| {c} | {mode} | {r['output_tokens_per_s']:,.0f} | {r['ttft_p50_ms']} | {r['ttft_p99_ms']} "
                f"| {r['tpot_p50_ms']} | {r['tpot_p99_ms']} | {vs} |"
            )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtest.gpu_bench", description=__doc__)
    p.add_argument("--model-dir", required=True, help="vLLM model directory (infra.models.generate)")
    p.add_argument("--vllm-flags", default="--load-format dummy", help="extra vLLM engine flags")
    p.add_argument("--modes", default="inproc,direct,mesh", help="of inproc,direct,mesh (default all)")
    p.add_argument("--concurrency", default="1,32,128,256", help="comma-separated (default 1,32,128,256)")
    p.add_argument("--waves", type=int, default=4, help="requests per run = waves x concurrency (default 4)")
    p.add_argument("--min-requests", type=int, default=8, help="at least this many requests per run")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--no-detokenize",
        dest="detokenize",
        action="store_false",
        help="token ids only: vLLM does not detokenize (in-process and the worker's --no-vllm-detokenize)",
    )
    p.add_argument("--client-procs", type=int, default=4, help="client processes for gRPC modes (default 4)")
    p.add_argument("--fidelity", action="store_true", help="also run the fidelity workloads on vLLM (direct)")
    p.add_argument("--fidelity-sim", action="store_true", help="and on a sim engine (--sim-profile)")
    p.add_argument("--sim-profile", default="h100-llama-1b")
    p.add_argument(
        "--sim-speed-factor",
        type=float,
        default=1.0,
        help="run the sim engine at this speed (below 1 where the CPU cannot keep up in real time); its "
        "records are rescaled to modelled time (times x factor, tok/s / factor), the raw values kept",
    )
    p.add_argument("--shared-prefix-concurrency", default="1,32", help="fidelity's shared-prefix case (1,32)")
    p.add_argument("--out", required=True, help="JSON file for the (a)/(b)/(c) records")
    p.add_argument("--fidelity-out", help="JSON file for the fidelity records")
    p.add_argument("--logs-dir", help="archive each fleet's service logs here")
    args = p.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.shared_prefix_concurrency = [int(c) for c in args.shared_prefix_concurrency.split(",")]
    return args


async def main_async(args) -> None:
    workload = Workload(
        model=MODEL, prompt_tokens=args.prompt_tokens, max_tokens=args.max_tokens, seed=args.seed
    )
    meta = {
        "device": device_name(),
        "vllm_version": None,
        "command": "python -m loadtest.gpu_bench " + " ".join(sys.argv[1:]),
        "workload": {
            "prompt": f"{args.prompt_tokens} random words (~1 token each), unique per request",
            "max_tokens": args.max_tokens,
            "ignore_eos": True,
            "closed_loop_requests": f"max({args.min_requests}, {args.waves} x concurrency)",
        },
        "engine": f"--max-num-seqs {args.max_num_seqs} --max-num-batched-tokens {args.max_num_batched_tokens} "
        f"{args.vllm_flags} (prefix caching and KV events on)",
        "detokenize": args.detokenize,
        "client_procs_for_grpc_modes": args.client_procs,
    }
    out: list[dict] = []
    fid: list[dict] = []

    def save() -> None:
        Path(args.out).write_text(json.dumps({**meta, "records": out}, indent=2) + "\n")
        if args.fidelity_out:
            rows = fidelity.compare(fid)
            doc = {**meta, "targets": fidelity.TARGETS, "records": fid, "comparison": rows}
            Path(args.fidelity_out).write_text(json.dumps(doc, indent=2) + "\n")

    if "inproc" in args.modes:
        meta["vllm_version"] = await inproc_runs(args, workload, out, save)
    else:
        with contextlib.suppress(ImportError):  # a sim-only run needs no vLLM
            import vllm

            meta["vllm_version"] = vllm.__version__
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=args.client_procs, mp_context=ctx) as pool:
        await fleet_runs(args, workload, out, fid, save, pool)
    save()
    print(overhead_markdown(out))
    if fid:
        print(fidelity.markdown(fid, fidelity.compare(fid)))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import uvloop

    with structlog_to_stderr():
        uvloop.run(main_async(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
