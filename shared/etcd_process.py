"""A local single-member etcd (Debian's etcd-server) on loopback ports, its data in a directory: what
`fleetserve up --registry-store etcd` starts when no etcd is given, and what the tests run against."""

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

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir.parent / f"{self.data_dir.name}.log"

    def start(self, timeout_s: float = 30.0) -> None:
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
                    "fleetserve",
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
                    f"fleetserve={peer}",
                    "--log-level",
                    "warn",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
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
