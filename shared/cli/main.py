"""`fleetserve`: start a local fleet, stream generations, show status, benchmark."""

from __future__ import annotations

import argparse
import os
import signal
import sys

from loadtest.experiments import EXERCISES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fleetserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start a local fleet and show its status until Ctrl-C")
    up.add_argument("--engines", type=int, default=2, help="engine replicas (default 2)")
    up.add_argument(
        "--backend",
        choices=["sim", "vllm"],
        default="sim",
        help="engine backend (default sim; vllm needs a GPU)",
    )
    up.add_argument(
        "--vllm-args",
        default="",
        help="with --backend vllm: vLLM engine flags for every engine, e.g. --vllm-args='--model DIR "
        "--load-format dummy'",
    )
    up.add_argument("--model", default="sim-1b", help="model the engines serve (default sim-1b)")
    up.add_argument(
        "--speed-factor", type=float, default=1.0, help="sim engine speed-up (default 1 = real time)"
    )
    up.add_argument(
        "--data-dir",
        help="where databases, logs and the state file go (default $FLEETSERVE_HOME "
        "or ~/.local/state/fleetserve)",
    )
    up.add_argument("--no-live", action="store_true", help="print status lines instead of a live table")
    up.add_argument(
        "--gateways", type=int, default=1, help="gateway processes, each on its own port (default 1)"
    )
    up.add_argument(
        "--routers",
        type=int,
        default=1,
        help="router processes (default 1); gateways spread requests over them and fail over",
    )
    up.add_argument(
        "--embedded-router",
        action="store_true",
        default=os.environ.get("FLEETSERVE_EMBEDDED_ROUTER", "") not in ("", "0"),
        help="no router processes: each gateway builds its router in process (gateway --embedded-router; one "
        "hop fewer); default from FLEETSERVE_EMBEDDED_ROUTER=1",
    )
    up.add_argument(
        "--registry-store",
        choices=["sqlite", "etcd"],
        default="sqlite",
        help="where the registry keeps membership: sqlite (default, one registry) or etcd (shared, "
        "redundant registries)",
    )
    up.add_argument(
        "--etcd-endpoint",
        default="",
        help="with --registry-store etcd: host:port of an etcd to use, or of every member of an etcd cluster "
        "(a,b,c: the registry moves to another member when one fails); default: start one in the data dir",
    )
    up.add_argument(
        "--etcd-members",
        type=int,
        default=1,
        help="with --registry-store etcd and no --etcd-endpoint: members of the etcd cluster to start on "
        "loopback (3 survives one member's death; default 1)",
    )
    up.add_argument(
        "--registries",
        type=int,
        default=1,
        help="registry processes (more than 1 needs --registry-store etcd)",
    )
    up.add_argument(
        "--autoscale",
        action="store_true",
        help="run the autoscaler: it starts and drains the engines (from min_replicas; --engines is ignored)",
    )
    up.add_argument(
        "--autoscale-models",
        default="",
        help="with --autoscale: per-model scaling as JSON or a .json file (docs/autoscaling.md); default: the "
        "--model between 1 and 4 replicas on the reactive policy",
    )
    up.add_argument(
        "--tls",
        action="store_true",
        help="TLS on every port: a local CA (in the data dir's tls/) issues each service a certificate, services "
        "accept only each other (mTLS), clients verify against tls/ca.pem; fleetserve commands use it",
    )
    up.add_argument(
        "--startup-s",
        type=float,
        default=None,
        help="sim engines' modelled cold start in seconds (default: 0, or the GPU profile's with --autoscale)",
    )

    gen = sub.add_parser("generate", help="stream a generation through the gateway")
    gen.add_argument("prompt", nargs="?", help="the prompt text (or give --message instead)")
    gen.add_argument(
        "--message",
        "-m",
        action="append",
        metavar="ROLE:CONTENT",
        help="a chat message, e.g. -m 'system:be brief' -m 'user:hi' (repeatable; uses the Chat RPC)",
    )
    gen.add_argument("--model", default="sim-1b")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--feature", help="request-type tag for cost and quality reports, e.g. summarize")
    gen.add_argument("--timeout", type=float, default=60.0, help="deadline in seconds (default 60)")
    gen.add_argument(
        "--json", action="store_true", help="one JSON object per chunk; the last has usage and ttft_ms"
    )
    gen.add_argument("--gateway", help="gateway host:port (default: the running cluster's)")
    gen.add_argument(
        "--api-key", help="API key (default: $FLEETSERVE_API_KEY or the running cluster's dev key)"
    )

    st = sub.add_parser("status", help="replicas with health and load, and the SLO alerts firing")
    st.add_argument("--registry", help="registry host:port (default: the running cluster's)")
    st.add_argument("--router", help="router host:port for breaker state (default: the running cluster's)")
    st.add_argument(
        "--metrics", help="metrics service host:port for SLO alerts (default: the running cluster's)"
    )
    st.add_argument("--json", action="store_true")

    met = sub.add_parser("metrics", help="latency percentiles and error rate per model")
    met.add_argument("--model", help="only this model")
    met.add_argument("--window", type=float, default=300.0, help="look back this many seconds (0 = all kept)")
    met.add_argument("--metrics", help="metrics service host:port (default: the running cluster's)")
    met.add_argument("--json", action="store_true")

    cost = sub.add_parser(
        "cost", help="what the fleet cost, by tenant, model, request type, ...; the biggest driver"
    )
    cost.add_argument(
        "--window", type=float, default=3600.0, help="look back this many seconds (default 3600)"
    )
    cost.add_argument("--since", type=float, help="window start, Unix seconds (instead of --window)")
    cost.add_argument("--until", type=float, help="window end, Unix seconds (default now)")
    cost.add_argument(
        "--by",
        default="",
        help="dimensions, comma-separated: tenant, model, version, feature, prompt_class, output_class, "
        "replica_type, tier (default all)",
    )
    cost.add_argument("--top", type=int, default=10, help="lines per dimension (default 10)")
    cost.add_argument("--metrics", help="metrics service host:port (default: the running cluster's)")
    cost.add_argument("--json", action="store_true")

    pc = sub.add_parser(
        "prometheus-config",
        help="a Prometheus scrape configuration for the running fleet's /metrics endpoints",
    )
    from shared.cli import prometheus_config

    prometheus_config.add_arguments(pc)

    qual = sub.add_parser("quality", help="quality signals per version of a model; shift tests between two")
    qual.add_argument("model", help="model name")
    qual.add_argument("--baseline", help="with --candidate: the baseline version")
    qual.add_argument("--candidate", help="compare this version against --baseline (CompareVersions)")
    qual.add_argument(
        "--window", type=float, default=3600.0, help="look back this many seconds (default 3600)"
    )
    qual.add_argument("--alpha", type=float, default=0.01, help="significance of each test (default 0.01)")
    qual.add_argument("--metrics", help="metrics service host:port (default: the running cluster's)")
    qual.add_argument("--json", action="store_true")

    rep = sub.add_parser("report", help="PNG charts of a benchmark result JSON (matplotlib)")
    rep.add_argument(
        "result", help="result JSON: latency_timeline, policy_comparison, autoscale_timeline, bench"
    )
    rep.add_argument("--out", help="directory for the PNGs (default: beside the JSON)")

    dash = sub.add_parser("dashboard", help="print (and with --open, open) the live dashboard's URL")
    dash.add_argument("--open", action="store_true", help="open it in the default browser")
    dash.add_argument("--refresh", type=float, default=3.0, help="seconds between updates (default 3)")
    dash.add_argument("--address", help="dashboard host:port (default: the running cluster's)")

    admin = sub.add_parser("admin", help="tenants, API keys, limits and usage in the gateway's database")
    from shared.cli import admin as admin_mod

    admin_mod.add_arguments(admin)

    from shared.cli import rollout as rollout_mod

    rollout_mod.add_rollout_arguments(
        sub.add_parser("rollout", help="move a model's traffic to a new version under guardrails")
    )
    experiment_verbs = rollout_mod.add_experiment_arguments(
        sub.add_parser(
            "experiment",
            help="A/B experiments (create, status, analyze, list, stop) and the book's exercises as experiments",
        )
    )
    from loadtest import experiments

    experiments.add_arguments(experiment_verbs)
    rollout_mod.add_flag_arguments(
        sub.add_parser("flag", help="feature flags: a version or policy for a cohort")
    )

    from loadtest import demo

    demo.add_arguments(sub.add_parser("demo", help="demos: `fleetserve demo capstone` (make demo)"))

    bench = sub.add_parser("bench", help="load the fleet (or one engine) and print a JSON summary")
    from loadtest import bench as bench_mod

    bench_mod.add_arguments(bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args, argv)
    except BrokenPipeError:
        # Whoever read our output went away (`fleetserve generate ... | head`): stop quietly with the shell's
        # status for it (128 + SIGPIPE) instead of a traceback. Python ignores SIGPIPE, so the write raised; the
        # interpreter's last flush of stdout would raise again, so stdout goes to /dev/null first. A stream
        # being read ends with its `with` block, which cancels the request.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


def _run(args: argparse.Namespace, argv: list[str] | None) -> int:
    """The command's own entry point; argv as main() got it (bench re-parses its arguments)."""
    if args.command == "up":
        from shared.cli.up import run_up

        return run_up(args)
    if args.command == "generate":
        from shared.cli.generate import run_generate

        return run_generate(args)
    if args.command == "status":
        from shared.cli.status import run_status

        return run_status(args)
    if args.command == "metrics":
        from shared.cli.metrics import run_metrics

        return run_metrics(args)
    if args.command == "cost":
        from shared.cli.cost import run_cost

        return run_cost(args)

    if args.command == "prometheus-config":
        from shared.cli.prometheus_config import run_prometheus_config

        return run_prometheus_config(args)
    if args.command == "quality":
        from shared.cli.quality import run_quality

        return run_quality(args)
    if args.command == "report":
        from pathlib import Path

        from loadtest.report import ReportError, render

        try:
            for png in render(Path(args.result), Path(args.out) if args.out else None):
                print(png)
        except ReportError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        return 0
    if args.command == "dashboard":
        from shared.cli.dashboard import run_dashboard

        return run_dashboard(args)
    if args.command == "admin":
        from shared.cli.admin import run_admin

        return run_admin(args)
    if args.command == "experiment" and args.experiment_command in EXERCISES:
        from loadtest import experiments

        return experiments.run(args, args.experiment_command)
    if args.command in ("rollout", "experiment", "flag"):
        from shared.cli.rollout import run

        return run(args, args.command)
    if args.command == "demo":
        from loadtest import demo

        return demo.run(args)
    if args.command == "bench":
        from loadtest import bench as bench_mod

        return bench_mod.main(sys.argv[2:] if argv is None else argv[1:])
    return 2


if __name__ == "__main__":
    sys.exit(main())
