"""A local etcd (Debian's etcd-server) on loopback ports, its data in a directory: a single member (what
`fleetserve up --registry-store etcd` starts when no etcd is given, and what most tests run against) or a cluster
of several members (`--etcd-members 3`, and the tests of failing over between members)."""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path


def free_port() -> int:
    """A loopback port that was free a moment ago (the server binds it next)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EtcdMissing(RuntimeError):
    """No etcd binary on PATH."""


@dataclass
class EtcdProcess:
    """One etcd member: start() returns once its client port accepts connections; stop() reaps it."""

    data_dir: Path
    client_port: int = 0
    peer_port: int = 0
    process: subprocess.Popen | None = field(default=None, repr=False)
    name: str = "fleetserve"
    # The whole cluster's "name=peer url,..." (empty: this member alone).
    initial_cluster: str = ""

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir.parent / f"{self.data_dir.name}.log"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    def start(self, timeout_s: float = 30.0) -> None:
        self.spawn()
        self.wait_listening(timeout_s)

    def spawn(self) -> None:
        """Start the process (returns at once; a member of a cluster serves once a quorum has started)."""
        binary = shutil.which("etcd")
        if binary is None:
            raise EtcdMissing(
                "etcd is not installed (Debian package etcd-server; `make system-deps` installs it)"
            )
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        self.client_port = self.client_port or free_port()
        self.peer_port = self.peer_port or free_port()
        client, peer = f"http://127.0.0.1:{self.client_port}", f"http://127.0.0.1:{self.peer_port}"
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [
                    binary,
                    "--name",
                    self.name,
                    "--data-dir",
                    str(self.data_dir),
                    "--listen-client-urls",
                    client,
                    "--advertise-client-urls",
                    client,
                    "--listen-peer-urls",
                    peer,
                    "--initial-advertise-peer-urls",
                    peer,
                    "--initial-cluster",
                    self.initial_cluster or f"{self.name}={peer}",
                    "--log-level",
                    "warn",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )

    def wait_listening(self, timeout_s: float = 30.0) -> None:
        """Return once the client port accepts connections."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.process.returncode}; see {self.log_path}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.client_port), 0.2):
                return
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"etcd did not listen on {self.endpoint} within {timeout_s}s; see {self.log_path}")

    def stop(self) -> int | None:
        """SIGTERM, SIGKILL after 10 s; the exit code (None if never started; 0 for an exit on our SIGTERM,
        which etcd answers by re-raising the signal once its data is flushed)."""
        p = self.process
        if p is None:
            return None
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
            else:
                return 0 if p.returncode == -signal.SIGTERM else p.returncode
        return p.returncode


class EtcdCluster:
    """Several etcd members on loopback forming one cluster (what a production etcd is: three or five members,
    any minority of which may fail)."""

    def __init__(self, data_dir: Path, members: int = 3) -> None:
        if members < 1:
            raise ValueError("an etcd cluster needs at least one member")
        self.members = [
            EtcdProcess(data_dir / f"member-{i}", free_port(), free_port(), name=f"member-{i}")
            for i in range(members)
        ]
        cluster = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        for m in self.members:
            m.initial_cluster = cluster

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    @property
    def endpoint(self) -> str:
        """Every member's client endpoint, comma-separated (what --etcd-endpoint takes)."""
        return ",".join(self.endpoints)

    def start(self, timeout_s: float = 30.0) -> None:
        """Start every member at once (none serves before a quorum runs), then wait for their client ports."""
        try:
            for m in self.members:
                m.spawn()
            for m in self.members:
                m.wait_listening(timeout_s)
        except BaseException:
            self.stop()
            raise

    def kill(self, index: int) -> None:
        """SIGKILL one member (a crashed machine), reaped."""
        p = self.members[index].process
        if p is not None and p.poll() is None:
            p.kill()
            p.wait(5)

    def stop(self) -> dict[str, int | None]:
        return {m.name: m.stop() for m in self.members}
