"""`fleetserve up`: start a local fleet, show its live status, stop it cleanly on Ctrl-C or SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

from shared.cli.status import fetch_replicas, probe_services, services_table, table
from shared.cluster import Cluster, ClusterConfig, default_state_dir, state_file, write_state
from shared.supervisor import LauncherLock, StateDirBusy, Supervisor
from shared.telemetry import configure_logging
from shared.tls import scheme


async def _up(args) -> int:
    console = _Console()
    try:
        autoscale = _autoscale(args)
    except ValueError as e:
        Console(stderr=True).print(f"[red]bad --autoscale-models:[/] {e}")
        return 2
    data_dir = Path(args.data_dir) if args.data_dir else default_state_dir()
    cluster = Cluster(
        ClusterConfig(
            data_dir=data_dir,
            engines=0 if args.autoscale else args.engines,
            backend=args.backend,
            model=args.model,
            speed_factor=args.speed_factor,
            registry_store=args.registry_store,
            etcd_endpoint=args.etcd_endpoint,
            etcd_members=args.etcd_members,
            registries=args.registries,
            gateways=args.gateways,
            routers=args.routers,
            embedded_router=args.embedded_router,
            tls=args.tls,
            **autoscale,
            # vLLM engines compile for a minute before they serve.
            **(
                {"extra_args": {"engine": [f"--vllm-args={args.vllm_args}"]}, "start_timeout_s": 300.0}
                if args.backend == "vllm"
                else {}
            ),
        )
    )
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if args.registries > 1 and args.registry_store != "etcd":
        Console(stderr=True).print("[red]--registries > 1 needs --registry-store etcd[/] (a shared store)")
        return 2
    if args.gateways < 1 or args.routers < 1:
        Console(stderr=True).print("[red]--gateways and --routers must be at least 1[/]")
        return 2
    lock = LauncherLock(data_dir)
    try:
        lock.acquire()
    except StateDirBusy as e:
        Console(stderr=True).print(f"[red]{e}[/]")
        return 1
    try:
        return await _run(cluster, data_dir, args, stop, console)
    finally:
        lock.release()


async def _run(cluster: Cluster, data_dir: Path, args, stop: asyncio.Event, console: Console) -> int:
    console.print(f"starting a fleet of {args.engines} {args.backend} engine(s) in {data_dir} ...")
    try:
        await cluster.start()
    except Exception as e:  # show the cause, not a traceback, then exit non-zero
        Console(stderr=True).print(f"[red]failed to start the fleet:[/] {e}")
        return 1
    supervisor = Supervisor(
        lambda: cluster.procs,
        cluster.restart,
        on_change=lambda: write_state(_state(cluster, supervisor), data_dir),
    )
    watching = asyncio.create_task(supervisor.run(), name="supervisor")
    try:
        await _serve(cluster, supervisor, data_dir, args, stop, console)
    finally:
        supervisor.stopping = True
        watching.cancel()
        await asyncio.gather(watching, return_exceptions=True)
        console.print("stopping the fleet (draining in-flight requests) ...")
        codes = await cluster.stop()
        state_file(data_dir).unlink(missing_ok=True)
        bad = {n: c for n, c in codes.items() if c not in (0, None)}
        console.print("stopped" + (f"; non-zero exits: {bad}" if bad else " cleanly"))
    return 0


def _state(cluster: Cluster, supervisor: Supervisor) -> dict:
    """The state file: the cluster's addresses plus, per service, restarts and the last exit code."""
    state = cluster.state()
    for name, info in supervisor.summary().items():
        state["services"].setdefault(name, {}).update(info)
    return state


async def _serve(
    cluster: Cluster, supervisor: Supervisor, data_dir: Path, args, stop: asyncio.Event, console: Console
) -> None:
    """Announce the running fleet and show its status until stop is set."""
    write_state(_state(cluster, supervisor), data_dir)
    http = cluster.ready_info("gateway").get("http_address", "")  # empty when the gateway's HTTP is off
    web = scheme(cluster.client_tls)
    tls = cluster.client_tls
    header = Text.assemble(
        ("fleetserve is up\n", "bold green"),
        ("  gateway   ", "bold"),
        f"{', '.join(cluster.state()['gateways'])}   (gRPC{' over TLS' if tls else ''})\n",
        *((("  http      ", "bold"), f"{web}://{http}/v1   (OpenAI-compatible)\n") if http else ()),
        *((("  tls       ", "bold"), f"CA {tls.ca}; mTLS between services\n") if tls else ()),
        ("  api key   ", "bold"),
        # A secret goes to a terminal only: output redirected to a file (a log) names where to find it.
        f"{cluster.api_key}\n"
        if sys.stdout.isatty()
        else f"in {state_file(data_dir)} (mode 0600): jq -r .api_key\n",
        ("  metrics   ", "bold"),
        f"{cluster.metrics}\n",
        *((("  dashboard ", "bold"), f"{web}://{dash}/\n") if (dash := cluster.state()["dashboard"]) else ()),
        *(
            (("  /metrics  ", "bold"), f"{n} Prometheus endpoints: fleetserve prometheus-config\n")
            if (n := len(cluster.state()["metrics_addresses"]))
            else ()
        ),
        ("  logs      ", "bold"),
        f"{data_dir / 'logs'}\n",
        ("  try       ", "bold"),
        'fleetserve generate "hello"   (in another terminal)\n',
        ("  stop      ", "bold"),
        "Ctrl-C\n",
    )
    console.print(header)
    if args.no_live or not sys.stdout.isatty():
        await _status_lines(cluster, supervisor, stop, console)
    else:
        with Live(console=console, refresh_per_second=2) as live:
            while not stop.is_set():
                live.update(Group(await _status_table(cluster, supervisor)))
                await _wait(stop, 1.0)


class _Console(Console):
    """A console that falls silent when its reader goes away (`fleetserve up | head`, or `make cluster | tee`
    after Ctrl-C killed tee): the fleet then runs on until a signal and still stops in order. Rich's own
    reaction to a broken pipe is SystemExit, which would leave the fleet to its services' watchdogs."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        # Python's recipe (signal docs): stdout to /dev/null, so later writes and the exit flush do not fail.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


async def _status_table(cluster: Cluster, supervisor: Supervisor):
    services = services_table(
        await probe_services(_state(cluster, supervisor)["services"], cluster.client_tls)
    )
    try:
        rows = await fetch_replicas(cluster.registry, cluster.router, cluster.client_tls)
        t = table(rows, title=f"replicas ({len(rows)})")
    except Exception as e:  # the registry may be restarting; keep the display alive
        t = Text(f"registry unreachable: {e}", style="red")
    return Group(services, t)


async def _status_lines(
    cluster: Cluster, supervisor: Supervisor, stop: asyncio.Event, console: Console
) -> None:
    # Without a TTY (e.g. output piped to a file), a compact line every few seconds.
    while not stop.is_set():
        services = await probe_services(_state(cluster, supervisor)["services"], cluster.client_tls)
        console.print(
            "services "
            + " ".join(
                f"{s['name']}:{'up' if s['healthy'] else 'DOWN'}"
                + (f"/restarts={s['restarts']}/last_exit={s['last_exit']}" if s.get("restarts") else "")
                for s in services
            )
        )
        try:
            rows = await fetch_replicas(cluster.registry, cluster.router, cluster.client_tls)
            summary = " ".join(
                f"{r['replica_id']}:{'up' if r['healthy'] else 'down'}/run={r['running']}/wait={r['waiting']}"
                for r in rows
            )
            console.print(f"status replicas={len(rows)} {summary}")
        except Exception as e:  # keep reporting while the registry restarts
            console.print(f"status registry unreachable: {e}")
        await _wait(stop, 5.0)


async def _wait(event: asyncio.Event, timeout_s: float) -> None:
    try:
        await asyncio.wait_for(event.wait(), timeout_s)
    except TimeoutError:
        pass


def _autoscale(args) -> dict:
    """ClusterConfig fields for --autoscale (and --startup-s): the autoscaler starts the engines, each with the
    GPU profile's cold start unless --startup-s says otherwise."""
    out: dict = {}
    if args.startup_s is not None:
        out["engine_startup_s"] = args.startup_s
    if not args.autoscale:
        return out
    models = args.autoscale_models or json.dumps(
        {args.model: {"min_replicas": 1, "max_replicas": 4, "policies": {"reactive": {}}}}
    )
    from services.autoscaler.spec import parse_models

    parse_models(models)  # refused here, naming the field, rather than by the autoscaler process
    out["autoscale_models"] = models
    out.setdefault("engine_startup_s", None)  # the profile's cold start: what autoscaling has to hide
    return out


def run_up(args) -> int:
    # The launcher's own log lines go to stderr like every service's; stdout is the status display.
    configure_logging("cli")
    return asyncio.run(_up(args))
