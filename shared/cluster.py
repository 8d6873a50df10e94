"""A local fleet as separate processes: start registry, metrics, engines, router and gateway in order,
learn their port-0 addresses from ready files, wait until healthy, and stop them in reverse order."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from shared.etcd_process import EtcdCluster
from shared.health import wait_healthy
from shared.server import PARENT_PID_ENV
from shared.tls import Tls

log = structlog.get_logger(__name__)


@dataclass
class Proc:
    """One service process of the fleet."""

    name: str
    service: str
    process: subprocess.Popen
    ready_file: Path
    log_file: Path
    address: str = ""
    # Its Prometheus /metrics endpoint ("" when off).
    metrics_address: str = ""
    # The flags it was started with (a restart uses them again, on the same port), and its own environment
    # (secrets: never flags).
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    async def wait(self, timeout_s: float) -> int:
        """Wait (without blocking the loop) for the process to exit; its exit code. TimeoutError after timeout_s."""
        deadline = time.monotonic() + timeout_s
        while self.process.poll() is None:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{self.name} still running after {timeout_s}s")
            await asyncio.sleep(0.02)
        return self.process.returncode


@dataclass
class ClusterConfig:
    """What fleet to start."""

    data_dir: Path
    engines: int = 2
    backend: str = "sim"
    model: str = "sim-1b"
    speed_factor: float = 1.0
    grace_period_s: float = 10.0
    lease_ttl_s: float = 3.0
    heartbeat_interval_s: float = 1.0
    metrics_export_interval_s: float = 5.0
    # Every service's Prometheus /metrics port: 0 a free one each, -1 none.
    metrics_port: int = 0
    start_timeout_s: float = 60.0
    # The registry's store: "sqlite" (one registry, a file in data_dir) or "etcd" (etcd_endpoint: one or several
    # comma-separated members of an etcd cluster; or, when empty, an etcd of etcd_members members this launcher
    # starts in data_dir); with etcd, `registries` registry processes share it.
    registry_store: str = "sqlite"
    etcd_endpoint: str = ""
    etcd_members: int = 1
    registries: int = 1
    # Gateways and routers: each its own process and port; every gateway knows every router (and discovers
    # routers through the registry), and they share the gateway database.
    gateways: int = 1
    routers: int = 1
    # Sim engines' modelled start-up (weights, compilation) before they serve, in modelled seconds (divided
    # by speed_factor); None: the GPU profile's. 0 keeps `fleetserve up` and the tests quick.
    engine_startup_s: float | None = 0.0
    # Autoscaling (services/autoscaler): per-model JSON spec as `--models` takes it; empty: no autoscaler. The
    # autoscaler then starts and drains its own engines; `engines` (usually 0) count toward its desired count but
    # are never drained by it.
    autoscale_models: str = ""
    autoscale_interval_s: float = 10.0
    # Each gateway builds its router in process (gateway --embedded-router): no router processes (routers is
    # unused); the router's extra_args go to the gateways' --router-flags.
    embedded_router: bool = False
    # Worker processes of the router and the gateway (--workers; shared/workers.py).
    router_workers: int = 1
    gateway_workers: int = 1
    # Model version of each engine, in start order (cycled); empty: the engines' default.
    model_versions: tuple[str, ...] = ()
    # TLS on every port (`fleetserve up --tls`): a local CA in data_dir/tls issues each process a certificate
    # (mTLS between services); the state file tells clients the CA and the CLI's client certificate.
    tls: bool = False
    # Extra flags per service name ("registry", "engine", ...), appended last so they win.
    extra_args: dict[str, list[str]] = field(default_factory=dict)


class Cluster:
    """Starts and stops a local fleet; `addresses` and `api_key` tell clients where and how to call it."""

    def __init__(self, config: ClusterConfig) -> None:
        self.config = config
        self.procs: dict[str, Proc] = {}
        self.api_key = ""
        self._engine_seq = 0
        self._engine_versions: dict[str, str] = {}
        self.etcd: EtcdCluster | None = None
        # The launcher's own client TLS (health probes, `fleetserve` commands): the "cli" certificate.
        self.client_tls: Tls | None = None
        self._pki = None

    # -- addresses -------------------------------------------------------------------------------

    @property
    def gateway(self) -> str:
        return self.procs["gateway"].address

    @property
    def router(self) -> str:
        """The router's address; with embedded routers, the first gateway's router port (it serves
        RouterService: status, GetStatus)."""
        if self.config.embedded_router:
            return next(iter(self.router_endpoints()), "")
        return self.procs["router"].address

    def gateway_names(self) -> list[str]:
        return sorted((n for n in self.procs if n == "gateway" or n.startswith("gateway-")), key=len)

    def router_endpoints(self) -> list[str]:
        """Every router worker's own address (a router without workers: its address); with embedded routers,
        each gateway worker's router port."""
        if self.config.embedded_router:
            infos = [self.ready_info(n) for n in self.gateway_names()]
            return [a for i in infos for a in (i.get("router_addresses") or [i.get("router_address")]) if a]
        return [
            a
            for n in self.router_names()
            for a in (self.ready_info(n).get("worker_addresses") or [self.procs[n].address])
        ]

    def router_names(self) -> list[str]:
        return sorted((n for n in self.procs if n == "router" or n.startswith("router-")), key=len)

    @staticmethod
    def _nth(service: str, i: int) -> str:
        """Process names: "router", "router-2", ... (the first keeps the plain name)."""
        return service if i == 0 else f"{service}-{i + 1}"

    @property
    def registry(self) -> str:
        """The registry address clients use: with several registries a gRPC target listing all of them
        (pick_first: the next one is used when one dies)."""
        names = self.registry_names()
        if len(names) == 1:
            return self.procs[names[0]].address
        return "ipv4:" + ",".join(self.procs[n].address for n in names)

    def registry_names(self) -> list[str]:
        return sorted((n for n in self.procs if n == "registry" or n.startswith("registry-")), key=len)

    @property
    def metrics(self) -> str:
        return self.procs["metrics"].address

    def engine_names(self) -> list[str]:
        return sorted(n for n in self.procs if n.startswith("engine-"))

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start every service and return once all report SERVING; on failure, stop what started."""
        cfg = self.config
        # Only its user may read the state directory: it holds the dev key, the databases and TLS keys.
        cfg.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        (cfg.data_dir / "run").mkdir(exist_ok=True)
        (cfg.data_dir / "logs").mkdir(exist_ok=True)
        self.api_key = self._dev_key()
        if cfg.tls:
            from shared.pki import LocalPki  # the cryptography package, only when TLS is asked for

            self._pki = LocalPki(cfg.data_dir / "tls")
            self.client_tls = await asyncio.to_thread(self._pki.issue, "cli")
        try:
            # Metrics first so every other service can export its spans and metrics to it.
            await self._spawn("metrics", "metrics", [])
            await self._start_registries()
            await asyncio.gather(
                *(self.add_engine() for _ in range(cfg.engines)),
                *(
                    self._spawn(
                        self._nth("router", i),
                        "router",
                        [
                            "--registry-address",
                            self.registry,
                            "--router-id",
                            self._nth("router", i),
                            "--workers",
                            str(cfg.router_workers),
                            *self._wake_args(),
                        ],
                    )
                    for i in range(0 if cfg.embedded_router else cfg.routers)
                ),
            )
            if cfg.autoscale_models:
                # Its rounds count the registered replicas (and those it started itself): once these engines are
                # listed it starts none in their place. Embedded routers, started with the gateways below, are
                # found through the registry (--router-discovery) in later rounds.
                await self._await_registered(self.engine_names())
                await self._spawn("autoscaler", "autoscaler", self.autoscaler_args())
            if cfg.embedded_router:
                # One argument: a value that starts with -- would be taken for a flag of the gateway's own.
                router = ["--embedded-router", f"--router-flags={shlex.join(self._router_flags())}"]
            else:
                # A router with several workers: one connection to each (the gateway balances over them).
                router = ["--router-address", ",".join(self.router_endpoints())]
            for i in range(cfg.gateways):
                await self._spawn(
                    self._nth("gateway", i),
                    "gateway",
                    [
                        *router,
                        "--registry-address",
                        self.registry,
                        "--workers",
                        str(cfg.gateway_workers),
                        "--db-path",
                        str(cfg.data_dir / "gateway.db"),
                    ],
                    # A secret: in the environment (readable by this user only), never on the command line.
                    env={"FLEETSERVE_GATEWAY_BOOTSTRAP_API_KEY": self.api_key},
                )
        except BaseException:
            await self.stop()
            raise

    async def _await_registered(self, names: list[str]) -> None:
        """Until the registry lists each of these engines: an engine serves (its ready file) a moment before its
        registration, which runs in the background, lands."""
        import grpc
        from fleetserve.registry.v1 import registry_service_pb2 as reg_pb
        from fleetserve.registry.v1 import registry_service_pb2_grpc as reg_grpc

        from shared.channels import open_channel

        want = set(names)
        if not want:
            return
        deadline = time.monotonic() + self.config.start_timeout_s
        channel = open_channel(self.registry, self.client_tls)
        try:
            stub = reg_grpc.RegistryServiceStub(channel)
            missing = want
            while True:
                try:
                    resp = await stub.ListReplicas(reg_pb.ListReplicasRequest(), timeout=5)
                    missing = want - {r.replica_id for r in resp.replicas}
                except grpc.aio.AioRpcError as e:  # a registry slow to answer on a loaded box: ask again
                    log.info("cluster.registry_list_failed", code=e.code().name)
                if not missing:
                    return
                if time.monotonic() >= deadline:
                    raise TimeoutError(
                        f"engines not registered within {self.config.start_timeout_s}s: {sorted(missing)}"
                    )
                await asyncio.sleep(0.05)
        finally:
            await channel.close(grace=None)

    def _router_flags(self) -> list[str]:
        """An embedded router's flags (the gateways' --router-flags): what a router process would get."""
        return [*self._wake_args(), *self.config.extra_args.get("router", [])]

    async def _start_registries(self) -> None:
        cfg = self.config
        args = [
            "--lease-ttl-s",
            str(cfg.lease_ttl_s),
            "--heartbeat-interval-s",
            str(cfg.heartbeat_interval_s),
            "--metrics-address",
            self.metrics,
        ]
        if cfg.registry_store == "etcd":
            endpoint = cfg.etcd_endpoint
            if not endpoint:
                self.etcd = EtcdCluster(cfg.data_dir / "etcd", cfg.etcd_members)
                await asyncio.to_thread(self.etcd.start)
                endpoint = self.etcd.endpoint
                log.info("cluster.etcd_started", endpoint=endpoint, data_dir=str(cfg.data_dir / "etcd"))
            args += ["--store", "etcd", "--etcd-endpoint", endpoint]
        elif cfg.registries != 1:
            raise ValueError("several registries need a shared store: registry_store='etcd'")
        else:
            args += ["--db-path", str(cfg.data_dir / "registry.db")]
        for i in range(cfg.registries):
            await self._spawn("registry" if i == 0 else f"registry-{i + 1}", "registry", args)

    def engine_args(self, name: str, model: str = "") -> list[str]:
        """The flags of engine `name` (also used by the autoscaler's local provisioner); model: default the
        fleet's."""
        cfg = self.config
        args = [
            "--registry-address",
            self.registry,
            "--replica-id",
            name,
            "--model",
            model or cfg.model,
            "--backend",
            cfg.backend,
            "--speed-factor",
            str(cfg.speed_factor),
        ]
        if cfg.engine_startup_s is not None and cfg.backend == "sim":
            args += ["--startup-s", str(cfg.engine_startup_s)]
        args += self.kv_event_args()
        version = self._engine_versions.get(name)
        if version:
            args += ["--model-version", version]
        return args

    def kv_event_args(self) -> list[str]:
        """--vllm-kv-events for vLLM engines when the fleet's routers route any model with kv_aware (their
        --policy or --model-policies, as extra_args or FLEETSERVE_ROUTER_* env give them): vLLM engines publish
        no KV events by default (the publisher costs the engine core throughput), and kv_aware needs them."""
        if self.config.backend != "vllm":
            return []  # the sim always publishes
        from services.router.config import RouterSettings
        from services.router.policy_set import parse_mapping
        from shared.settings import load_settings

        try:
            router = load_settings(RouterSettings, list(self.config.extra_args.get("router", [])))
        except SystemExit:
            return []  # bad router flags: the router itself fails to start and says why
        policies = {router.policy, *parse_mapping(router.model_policies).values()}
        return ["--vllm-kv-events"] if "kv_aware" in policies else []

    def _wake_args(self) -> list[str]:
        """Autoscaled models wake on demand: a request waits in the router while the autoscaler starts a replica
        (from zero, or while the first ones cold start) instead of failing."""
        if not self.config.autoscale_models:
            return []
        from services.autoscaler.spec import parse_models

        return ["--wake-models", ",".join(s.model for s in parse_models(self.config.autoscale_models))]

    def autoscaler_args(self) -> list[str]:
        """The autoscaler's flags: the fleet's addresses, the models, and the flags of the engines it starts."""
        cfg = self.config
        engine = ["--backend", cfg.backend, "--speed-factor", str(cfg.speed_factor)]
        # Telemetry as the launcher's own engines have it: spans and OTLP gauges (uptime: cost) to the metrics
        # service, and a /metrics endpoint (the provisioner's file_sd targets list it).
        engine += [
            "--otlp-endpoint",
            self.metrics,
            "--metrics-export-interval-s",
            str(cfg.metrics_export_interval_s),
            "--metrics-port",
            str(cfg.metrics_port),
        ]
        if cfg.engine_startup_s is not None and cfg.backend == "sim":
            engine += ["--startup-s", str(cfg.engine_startup_s)]
        engine += self.kv_event_args()
        engine += self.tls_args("engine")
        engine += cfg.extra_args.get("engine", [])
        # Each router worker answers GetStatus for itself (its queue, its admitted requests): ask every one. Embedded
        # routers are looked up in the registry each round instead: a restarted gateway worker's comes back on a
        # new port.
        routers = (
            ["--router-discovery"]
            if cfg.embedded_router
            else ["--router-addresses", ",".join(self.router_endpoints())]
        )
        return [
            "--registry-address",
            self.registry,
            *routers,
            "--metrics-address",
            self.metrics,
            "--models",
            cfg.autoscale_models,
            "--interval-s",
            str(cfg.autoscale_interval_s),
            "--data-dir",
            str(cfg.data_dir),
            "--engine-args",
            shlex.join(engine),
        ]

    async def add_engine(self, model: str = "", args: Sequence[str] = (), model_version: str = "") -> str:
        """Start one more engine replica (of `model`, default the fleet's, at model_version, default the next of
        config.model_versions, with extra flags `args`, e.g. another --profile); returns its process name."""
        self._engine_seq += 1
        name = f"engine-{self._engine_seq}"
        versions = self.config.model_versions
        version = model_version or (versions[(self._engine_seq - 1) % len(versions)] if versions else "")
        if version:
            self._engine_versions[name] = version
        await self._spawn(name, "engine", [*self.engine_args(name, model), *args])
        return name

    async def restart(self, name: str) -> Proc:
        """Start an exited service again with its flags, on the port it had (peers keep its address)."""
        old = self.procs[name]
        port = old.address.rsplit(":", 1)[1] if old.address else ""
        return await self._spawn(name, old.service, old.args, port=port, env=old.env)

    def tls_args(self, identity: str) -> list[str]:
        """--tls-* flags of a process with this identity (a certificate issued now), or none without TLS."""
        if self._pki is None:
            return []
        tls = self._pki.issue(identity)
        return ["--tls-cert", tls.cert, "--tls-key", tls.key, "--tls-ca", tls.ca]

    def _env(self, service: str, name: str) -> dict[str, str]:
        """A service's environment: the launcher's (OTEL_* included), with OTEL_SERVICE_NAME, when set, taken as
        the fleet's name (each process reports as NAME-<service>) and the process name as service.instance.id."""
        env = dict(os.environ)
        if env.get("OTEL_SERVICE_NAME"):
            env["OTEL_SERVICE_NAME"] = f"{env['OTEL_SERVICE_NAME']}-{service}"
        instance = f"service.instance.id={name}"
        attrs = env.get("OTEL_RESOURCE_ATTRIBUTES", "")
        env["OTEL_RESOURCE_ATTRIBUTES"] = f"{attrs},{instance}" if attrs else instance
        return env

    async def _spawn(
        self, name: str, service: str, args: list[str], port: str = "", env: dict[str, str] | None = None
    ) -> Proc:
        cfg = self.config
        ready = cfg.data_dir / "run" / f"{name}.json"
        ready.unlink(missing_ok=True)
        log_file = cfg.data_dir / "logs" / f"{name}.log"
        common = [
            "--ready-file",
            str(ready),
            "--grace-period-s",
            str(cfg.grace_period_s),
            "--metrics-export-interval-s",
            str(cfg.metrics_export_interval_s),
            "--log-json",
        ]
        common += ["--metrics-port", str(cfg.metrics_port)]
        if service != "metrics" and "metrics" in self.procs:
            common += ["--otlp-endpoint", self.metrics]
        common += self.tls_args(name)
        argv = [sys.executable, "-m", f"services.{service}", *common, *args, *cfg.extra_args.get(service, [])]
        if port:
            argv += ["--port", port]
        with open(log_file, "ab") as out:  # noqa: ASYNC230 - once per process start, not on a hot path
            # subprocess.Popen rather than the event loop's subprocess support: Popen forks with vfork and runs
            # no fork handlers, while uvloop's fork() runs gRPC's, which can crash the child when gRPC threads
            # are busy in this process (health probes of the services already started).
            # A session of its own: Ctrl-C in the terminal reaches only the launcher, which then stops the
            # fleet in order (gateway first, registry last) instead of every process dying at once.
            process = subprocess.Popen(  # noqa: ASYNC220 - returns at once; exits are polled without blocking
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
                env={
                    **self._env(service, name),
                    **(env or {}),
                    "PYTHONUNBUFFERED": "1",
                    PARENT_PID_ENV: str(os.getpid()),
                },
            )
        proc = Proc(name, service, process, ready, log_file, args=list(args), env=dict(env or {}))
        self.procs[name] = proc
        ready_info = await self._await_ready(proc)
        proc.address = ready_info["address"]
        proc.metrics_address = ready_info.get("metrics_address", "")
        await wait_healthy(proc.address, timeout_s=cfg.start_timeout_s, tls=self.client_tls)
        log.info("cluster.service_ready", name=name, address=proc.address, pid=process.pid)
        return proc

    async def _await_ready(self, proc: Proc) -> dict:
        deadline = time.monotonic() + self.config.start_timeout_s
        while time.monotonic() < deadline:
            if proc.ready_file.exists():
                return json.loads(proc.ready_file.read_text())
            if not proc.alive:
                raise RuntimeError(
                    f"{proc.name} exited with {proc.process.returncode} before it was ready; "
                    f"last log lines:\n{tail(proc.log_file)}"
                )
            await asyncio.sleep(0.05)
        raise TimeoutError(
            f"{proc.name} not ready within {self.config.start_timeout_s}s:\n{tail(proc.log_file)}"
        )

    def _dev_key(self) -> str:
        # The gateway stores keys hashed only, so the launcher keeps the dev key it bootstrapped with
        # (mode 0600) to show it again on every start with the same data dir.
        path = self.config.data_dir / "dev_api_key"
        if path.exists():
            path.chmod(0o600)  # written 0644 by older versions
            return path.read_text().strip()
        key = "fsk-dev-" + secrets.token_urlsafe(18)
        with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            f.write(key + "\n")
        return key

    def ready_info(self, name: str) -> dict:
        """What a running service wrote to its ready file (address, pid, and e.g. the gateway's http_address)."""
        try:
            return json.loads(self.procs[name].ready_file.read_text())
        except (KeyError, OSError, ValueError):
            return {}

    def signal(self, name: str, sig: int = signal.SIGTERM) -> None:
        """Send sig to one service (SIGKILL to simulate a crash)."""
        proc = self.procs[name]
        if proc.alive:
            proc.process.send_signal(sig)

    async def wait_exit(self, name: str, timeout_s: float) -> int:
        """Wait for one service to exit; its exit code."""
        return await self.procs[name].wait(timeout_s)

    async def stop(self) -> dict[str, int | None]:
        """SIGTERM in reverse dependency order (gateway, router, engines, registry, then metrics), each
        tier allowed its grace period plus a margin, SIGKILL after that. Returns exit codes."""
        # Metrics goes last: every other service flushes its spans and metrics to it on exit, and an OTLP
        # exporter whose collector is gone retries for seconds (the registry was being SIGKILLed).
        # The autoscaler drains and stops the engines it started before the registry goes.
        tiers = [
            self.gateway_names(),
            self.router_names(),
            ["autoscaler"],
            self.engine_names(),
            self.registry_names(),
            ["metrics"],
        ]
        for tier in tiers:
            procs = [self.procs[n] for n in tier if n in self.procs]
            for p in procs:
                if p.alive:
                    p.process.send_signal(signal.SIGTERM)
            for p in procs:
                try:
                    await p.wait(self.config.grace_period_s + 5)
                except TimeoutError:
                    log.warning("cluster.kill", name=p.name)
                    p.process.kill()
                    await p.wait(5)
        codes: dict[str, int | None] = {n: p.process.returncode for n, p in self.procs.items()}
        if self.etcd is not None:
            for name, code in (await asyncio.to_thread(self.etcd.stop)).items():
                codes["etcd" if len(self.etcd.members) == 1 else f"etcd-{name}"] = code
        return codes

    def state(self) -> dict:
        """What other commands need to find this fleet."""
        from services.autoscaler.provisioner import TARGETS_FILE

        return {
            "gateway": self.gateway,
            "gateway_http": self.ready_info("gateway").get("http_address", ""),
            # Every gateway and router (an L4 balancer in front of the gateways is the production shape).
            "gateways": [self.procs[n].address for n in self.gateway_names()],
            "gateways_http": [self.ready_info(n).get("http_address", "") for n in self.gateway_names()],
            "router": self.router,
            "routers": (
                self.router_endpoints()
                if self.config.embedded_router
                else [self.procs[n].address for n in self.router_names()]
            ),
            "registry": self.registry,
            "registries": [self.procs[n].address for n in self.registry_names()],
            # Every process: address and pid (the launcher adds restarts and last exit codes).
            "services": {
                n: {"service": p.service, "address": p.address, "pid": p.process.pid}
                for n, p in self.procs.items()
            },
            "metrics": self.metrics,
            "dashboard": self.ready_info("metrics").get("dashboard_address", ""),
            "engines": {n: self.procs[n].address for n in self.engine_names()},
            # Prometheus /metrics of every process, by process name (what `fleetserve prometheus-config` reads).
            "metrics_addresses": {n: p.metrics_address for n, p in self.procs.items() if p.metrics_address},
            "autoscaler": self.procs["autoscaler"].address if "autoscaler" in self.procs else "",
            # The engines the autoscaler starts, as Prometheus file_sd targets (its local provisioner keeps it).
            "autoscaled_targets_file": (
                str(self.config.data_dir / "run" / TARGETS_FILE) if "autoscaler" in self.procs else ""
            ),
            "api_key": self.api_key,
            # With TLS: the CA to verify the fleet with and the CLI's client certificate (Tls.for_tools).
            "tls": self.client_tls.as_state() if self.client_tls is not None else None,
            "data_dir": str(self.config.data_dir),
            "pid": os.getpid(),
        }


def tail(path: Path, lines: int = 20) -> str:
    """The last lines of a log file (for error messages)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def default_state_dir() -> Path:
    """Where `fleetserve up` keeps data and its state file: $FLEETSERVE_HOME, else ~/.local/state/fleetserve."""
    env = os.environ.get("FLEETSERVE_HOME")
    if env:
        return Path(env)
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "fleetserve"


def state_file(data_dir: Path | None = None) -> Path:
    return (data_dir or default_state_dir()) / "cluster.json"


def read_state(data_dir: Path | None = None) -> dict:
    """The running cluster's state, or a clear error telling the user to start one."""
    path = state_file(data_dir)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise SystemExit(
            f"no running cluster found ({path} missing): start one with `fleetserve up`"
        ) from None


def write_state(state: dict, data_dir: Path | None = None) -> Path:
    """Write the state file atomically, mode 0600 from its first byte: it holds the dev API key."""
    path = state_file(data_dir)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
        f.write(json.dumps(state, indent=2))
    os.replace(tmp, path)
    return path
