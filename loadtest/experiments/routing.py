"""Two routing exercises on the policy bench (loadtest/policy_bench.py: a fresh sim fleet per policy, the same
workload straight to its router): least-load vs round-robin under requests of very different sizes
(least-load-tail), and cache-aware routing vs blind routing for multi-turn chats (cache-aware-ttft)."""

from __future__ import annotations

from loadtest.experiments import Outcome, progress
from loadtest.policy_bench import DEFAULT_ENGINE_ARGS, DEFAULT_SPEED_FACTOR, compare_policies
from loadtest.workload import policy_workload

SETUPS = {
    # workload, policies (the baseline first), the metric the exercise is about
    "least-load-tail": ("mixed", ["round_robin", "least_load"], "ttft_p99_ms"),
    "cache-aware-ttft": ("multiturn", ["round_robin", "cache_aware", "kv_aware"], "ttft_p50_ms"),
}


async def run(args, name: str) -> Outcome:
    workload_name, policies, metric = SETUPS[name]
    requests = 24 if args.quick else args.requests
    replicas = 2 if args.quick else args.replicas
    speed = DEFAULT_SPEED_FACTOR * (4 if args.quick else 1)
    workload = policy_workload(workload_name, requests, args.seed, speed)
    progress(f"{name}: {', '.join(policies)} on {workload_name}, {requests} requests, {replicas} replicas")
    records = await compare_policies(
        policies,
        workload,
        replicas=replicas,
        speed_factor=speed,
        seed=args.seed,
        engine_args=(*DEFAULT_ENGINE_ARGS, "--profile", args.profile),
    )
    base = records[0]
    by_policy = {r["policy"]: r for r in records}
    for r in records:
        for m in ("ttft_p50_ms", "ttft_p99_ms", "output_tokens_per_s"):
            r[f"{m}_vs_{base['policy']}"] = round(r[m] / base[m], 3) if base[m] else None
    best = min(records[1:], key=lambda r: r[metric] or float("inf"))
    gain = best[f"{metric}_vs_{base['policy']}"]
    record = {
        "settings": {
            "workload": workload_name,
            "requests": requests,
            "replicas": replicas,
            "speed_factor": speed,
            "profile": args.profile,
            "note": f"times are modelled GPU ms x {1 / speed:g} (speed factor {speed:g})",
        },
        # In the shape `fleetserve report` draws (kind policy_comparison); every measured field in "records".
        "kind": "policy_comparison",
        "title": f"{name}: {workload_name} workload, {replicas} replicas (ms x {1 / speed:g})",
        "policies": {
            r["policy"]: {
                "ttft_ms": {"p50": r["ttft_p50_ms"], "p95": r["ttft_p95_ms"], "p99": r["ttft_p99_ms"]},
                "tpot_ms": {"p99": r["tpot_p99_ms"]},
                "throughput_tok_s": r["output_tokens_per_s"],
            }
            for r in records
        },
        "records": by_policy,
        "metric": metric,
        "verdict": (
            f"{best['policy']}: {metric} {best[metric]} ms vs {base[metric]} ms with {base['policy']} "
            f"({gain}x), errors {sum(r['errors'] for r in records)}"
        ),
    }

    def plot(path):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.5, 3.5))
        xs = range(len(records))
        width = 0.38
        ax.bar([x - width / 2 for x in xs], [r["ttft_p50_ms"] for r in records], width, label="TTFT p50")
        ax.bar([x + width / 2 for x in xs], [r["ttft_p99_ms"] for r in records], width, label="TTFT p99")
        ax.set_xticks(list(xs), [r["policy"] for r in records])
        ax.set_ylabel(f"ms (modelled x {1 / speed:g})")
        ax.set_title(f"{name}: {workload_name} workload, {replicas} replicas")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)

    return Outcome(record, {"ttft": plot})
