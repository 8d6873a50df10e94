"""Where replicas come from, behind one small interface: `local` starts and stops engine processes on this
machine (what `fleetserve up --autoscale` uses), and keeps a Prometheus file_sd targets file of them so they are
scraped like the launcher's processes; `external` only exports the desired count for an orchestrator
(Kubernetes: a KEDA ScaledObject in infra/k8s/ scales a Deployment on it). No home-made cluster scheduler."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from shared.server import PARENT_PID_ENV

log = structlog.get_logger(__name__)

# A drain waits for the replica to report nothing running or waiting in this many consecutive heartbeats.
DRAIN_QUIET_POLLS = 3
# The local provisioner's Prometheus targets (file_sd), in <data_dir>/run/: `fleetserve prometheus-config` points
# the scrape configuration at it, and Prometheus re-reads it as replicas come and go.
TARGETS_FILE = "autoscaled-targets.json"


@dataclass
class Owned:
    """A replica this provisioner started."""

    replica_id: str
    model: str
    process: subprocess.Popen | None = None
    version: str = ""
    started_at: float = field(default_factory=time.time)
    draining: bool = False
    #: Wall time the autoscaler last found it in the registry (None: never yet, it is still cold starting).
    listed_at: float | None = None

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


class Provisioner(ABC):
    """Starts and stops replicas of a model. The autoscaler decides; this only acts."""

    name: str = ""

    @abstractmethod
    async def start(self, model: str, version: str = "", extra_args: str = "") -> str:
        """Begin starting one replica of model at version (empty: the engine's default version), with the
        version's own engine flags; returns at once, before its cold start ends, with its replica id."""

    @abstractmethod
    async def stop(self, replica_id: str, drain: Callable[[str], Awaitable[None]]) -> None:
        """Stop one replica: `drain(replica_id)` first (out of the routable set, in-flight streams finished),
        then the process."""

    @abstractmethod
    def owned(self, model: str, version: str | None = None) -> list[Owned]:
        """Replicas of model (of one version, when given) this provisioner runs (starting, serving or
        draining)."""

    async def close(self, drain: Callable[[str], Awaitable[None]]) -> None:
        """Stop every owned replica (the autoscaler is shutting down)."""
        return None

    def refresh_targets(self) -> None:
        """Bring the Prometheus targets of the replicas it runs up to date (nothing to do by default)."""
        return None


class ExternalProvisioner(Provisioner):
    """An orchestrator owns the replicas (Kubernetes + KEDA on fleetserve:autoscaler_desired_replicas)."""

    name = "external"

    async def start(self, model: str, version: str = "", extra_args: str = "") -> str:
        return ""

    async def stop(self, replica_id: str, drain: Callable[[str], Awaitable[None]]) -> None:
        return None

    def owned(self, model: str, version: str | None = None) -> list[Owned]:
        return []


class LocalProvisioner(Provisioner):
    """Engine processes on this machine, as `fleetserve up` starts them: `python -m services.engine` with the
    registry address, a replica id, the model, its version and the configured extra flags; each process stops
    itself when the autoscaler dies (it is the engines' parent)."""

    name = "local"

    def __init__(self, registry_address: str, data_dir: str, engine_args: str, grace_period_s: float) -> None:
        self.registry_address = registry_address
        self.dir = Path(data_dir)
        self.engine_args = shlex.split(engine_args)
        self.grace_period_s = grace_period_s
        self._replicas: dict[str, Owned] = {}
        self._seq = itertools.count(1)
        self._stopping: set[asyncio.Task] = set()
        self.targets_file = self.dir / "run" / TARGETS_FILE
        self._targets: list[dict] | None = None

    def owned(self, model: str, version: str | None = None) -> list[Owned]:
        self._reap()
        return [
            o
            for o in self._replicas.values()
            if o.model == model and (version is None or o.version == version)
        ]

    def _reap(self) -> None:
        for rid, o in list(self._replicas.items()):
            if not o.alive and not o.draining:
                code = o.process.returncode if o.process else None
                log.warning("autoscaler.replica_exited", replica_id=rid, model=o.model, code=code)
                del self._replicas[rid]

    async def start(self, model: str, version: str = "", extra_args: str = "") -> str:
        rid = f"{model}-{version + '-' if version else ''}as{next(self._seq)}-{os.getpid()}"
        (self.dir / "run").mkdir(parents=True, exist_ok=True)
        (self.dir / "logs").mkdir(parents=True, exist_ok=True)
        argv = [
            sys.executable,
            "-m",
            "services.engine",
            "--ready-file",
            str(self.dir / "run" / f"{rid}.json"),
            "--registry-address",
            self.registry_address,
            "--replica-id",
            rid,
            "--model",
            model,
            *(["--model-version", version] if version else []),
            "--grace-period-s",
            str(self.grace_period_s),
            "--log-json",
            *self.engine_args,
            *shlex.split(extra_args),
        ]
        with open(self.dir / "logs" / f"{rid}.log", "ab") as out:  # noqa: ASYNC230 - once per replica start
            # Popen (vfork, no fork handlers) rather than the loop's subprocess support: see shared/cluster.py.
            process = subprocess.Popen(  # noqa: ASYNC220 - returns at once
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1", PARENT_PID_ENV: str(os.getpid())},
            )
        self._replicas[rid] = Owned(rid, model, process, version)
        log.info("autoscaler.replica_starting", replica_id=rid, model=model, version=version, pid=process.pid)
        return rid

    async def stop(self, replica_id: str, drain: Callable[[str], Awaitable[None]]) -> None:
        o = self._replicas.get(replica_id)
        if o is None or o.draining:
            return
        o.draining = True
        task = asyncio.get_running_loop().create_task(
            self._stop(o, drain), name=f"autoscaler.stop.{replica_id}"
        )
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    async def _stop(self, o: Owned, drain: Callable[[str], Awaitable[None]]) -> None:
        t0 = time.monotonic()
        try:
            await drain(o.replica_id)
        except Exception:  # a failed drain still ends in SIGTERM, which drains again inside the engine
            log.exception("autoscaler.drain_failed", replica_id=o.replica_id)
        if o.alive:
            o.process.send_signal(signal.SIGTERM)  # the engine drains again and exits within its grace period
            try:
                await asyncio.to_thread(o.process.wait, self.grace_period_s + 5)
            except subprocess.TimeoutExpired:
                log.warning("autoscaler.replica_kill", replica_id=o.replica_id)
                o.process.kill()
                await asyncio.to_thread(o.process.wait, 5)
        self._replicas.pop(o.replica_id, None)
        log.info(
            "autoscaler.replica_stopped",
            replica_id=o.replica_id,
            model=o.model,
            code=o.process.returncode if o.process else None,
            took_s=round(time.monotonic() - t0, 3),
        )

    async def close(self, drain: Callable[[str], Awaitable[None]]) -> None:
        for o in list(self._replicas.values()):
            await self.stop(o.replica_id, drain)
        if self._stopping:
            await asyncio.gather(*self._stopping, return_exceptions=True)
        self.refresh_targets()  # none left: Prometheus stops scraping them

    def ready_info(self, replica_id: str) -> dict:
        try:
            return json.loads((self.dir / "run" / f"{replica_id}.json").read_text())
        except (OSError, ValueError):
            return {}

    def targets(self) -> list[dict]:
        """Prometheus file_sd entries of the replicas running now (draining ones too: their last numbers
        matter), labelled as `fleetserve prometheus-config` labels the launcher's engines."""
        self._reap()
        out = []
        for o in sorted(self._replicas.values(), key=lambda o: o.replica_id):
            address = self.ready_info(o.replica_id).get("metrics_address") if o.alive else None
            if address:
                out.append({"targets": [address], "labels": {"service": "engine", "replica": o.replica_id}})
        return out

    def refresh_targets(self) -> None:
        """Rewrite the targets file when the replicas changed (atomically: Prometheus never reads half a file)."""
        targets = self.targets()
        if targets == self._targets:
            return
        self.targets_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.targets_file.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(targets, indent=2))
        tmp.replace(self.targets_file)
        self._targets = targets


def make_provisioner(
    kind: str, *, registry_address: str, data_dir: str, engine_args: str, grace_s: float
) -> Provisioner:
    if kind == "local":
        return LocalProvisioner(registry_address, data_dir, engine_args, grace_s)
    return ExternalProvisioner()
