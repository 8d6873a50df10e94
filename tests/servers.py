"""Real external servers for tests (never mocks): each starts on free loopback ports in a tmp dir and is
stopped and reaped afterwards; a server that is not installed skips its tests with the reason."""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
import yaml

from shared.etcd_process import EtcdCluster, EtcdMissing, EtcdProcess, free_port

__all__ = [
    "free_port",
    "etcd_server",
    "etcd",
    "etcd_cluster",
    "EtcdPrefix",
    "prometheus",
    "PrometheusServer",
    "redis_server",
    "RedisServer",
    "postgres_server",
    "postgres_url",
    "db_url",
    "PostgresServer",
]


@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory):
    """One etcd (Debian's etcd-server) for the whole test run; tests isolate themselves with a key prefix."""
    server = EtcdProcess(tmp_path_factory.mktemp("etcd") / "data")
    try:
        server.start()
    except EtcdMissing as e:
        pytest.skip(str(e))
    try:
        yield server
    finally:
        server.stop()


@dataclass(frozen=True)
class EtcdPrefix:
    """Where a test's keys go: the shared server's endpoint and a prefix no other test uses."""

    endpoint: str
    prefix: str


@pytest.fixture
def etcd(etcd_server) -> EtcdPrefix:
    return EtcdPrefix(etcd_server.endpoint, f"/test-{uuid.uuid4().hex[:12]}/")


@pytest.fixture
def etcd_cluster(tmp_path_factory):
    """A three-member etcd cluster of the test's own (its members may be killed); skips if etcd is missing."""
    cluster = EtcdCluster(tmp_path_factory.mktemp("etcd-cluster"), members=3)
    try:
        cluster.start()
    except EtcdMissing as e:
        pytest.skip(str(e))
    try:
        yield cluster
    finally:
        cluster.stop()


class PrometheusServer:
    """A Prometheus server of a test's own: its config file, TSDB and log in a tmp dir, on loopback."""

    def __init__(self, exe: str, workdir: Path) -> None:
        self.exe = exe
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self._session: aiohttp.ClientSession | None = None

    @property
    def log(self) -> str:
        try:
            return (self.workdir / "prometheus.log").read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    async def start(self, config: dict[str, Any], timeout_s: float = 30.0, attempts: int = 3) -> None:
        """Write config (a prometheus.yml as a dict) and start serving it; returns once /-/ready answers."""
        config_file = self.workdir / "prometheus.yml"
        config_file.write_text(yaml.safe_dump(config, sort_keys=False))
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        for _ in range(attempts):  # the free port may be taken before Prometheus binds it
            port = free_port()
            self.url = f"http://127.0.0.1:{port}"
            with open(self.workdir / "prometheus.log", "ab") as log:  # noqa: ASYNC230 - once per start
                # Popen as the fleet's launcher spawns (vfork, safe under uvloop); it returns at once.
                self.proc = subprocess.Popen(  # noqa: ASYNC220
                    [
                        self.exe,
                        f"--config.file={config_file}",
                        f"--storage.tsdb.path={self.workdir / 'data'}",
                        f"--web.listen-address=127.0.0.1:{port}",
                        "--web.enable-lifecycle",
                        "--storage.tsdb.retention.time=1h",
                        "--log.level=info",
                    ],
                    cwd=self.workdir,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                )
            if await self._ready(timeout_s):
                return
            self.stop()
        raise RuntimeError(f"prometheus did not become ready; log:\n{self.log}")

    async def _ready(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                async with self._session.get(f"{self.url}/-/ready") as r:
                    if r.status == 200:
                        return True
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
        return False

    async def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/<path> with params; the `data` of a successful answer (AssertionError otherwise)."""
        async with self._session.get(f"{self.url}/api/v1/{path}", params=params) as r:
            body = await r.json()
        assert body.get("status") == "success", f"{path} {params}: {body}"
        return body["data"]

    async def query(self, promql: str) -> list[dict]:
        """An instant query's result vector (or matrix) as Prometheus returns it."""
        return (await self.api("query", query=promql))["result"]

    async def scalar(self, promql: str) -> float | None:
        """The value of a query that yields one sample (None when it yields none)."""
        result = await self.query(promql)
        if not result:
            return None
        assert len(result) == 1, f"{promql} gave {len(result)} series: {result}"
        return float(result[0]["value"][1])

    async def targets_up(self) -> dict[str, str]:
        """scrape url -> health of every active target."""
        data = await self.api("targets", state="active")
        return {t["scrapeUrl"]: t["health"] for t in data["activeTargets"]}

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)

    async def close(self) -> None:
        self.stop()
        if self._session is not None:
            await self._session.close()


@pytest_asyncio.fixture
async def prometheus(tmp_path_factory):
    """A Prometheus server, not yet started: `await prometheus.start(config)`; stopped after the test. Skips
    where Debian's prometheus package is not installed."""
    exe = shutil.which("prometheus")
    if exe is None:
        pytest.skip(
            "prometheus is not installed and could not be: `make test` installs it (apt-get install "
            "prometheus); the Prometheus scrape test does not run here"
        )
    server = PrometheusServer(exe, tmp_path_factory.mktemp("prometheus"))
    try:
        yield server
    finally:
        await server.close()


@dataclass
class RedisServer:
    """A redis-server process of a test's own: its URL, and faults to inject (hang, resume, kill, restart)."""

    url: str
    port: int
    workdir: Path
    process: subprocess.Popen

    def hang(self) -> None:
        """SIGSTOP: the port stays open and accepts connections, nothing answers (a hung Redis)."""
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.process.pid, signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL and reap: connections are refused (a Redis that is down)."""
        self.resume()
        self.process.kill()
        self.process.wait(10)

    def restart(self) -> None:
        """A fresh redis-server on the same port (empty: no persistence), answering when this returns."""
        if self.process.poll() is None:
            self.kill()
        self.process = _spawn_redis(self.port, self.workdir)
        _wait_answering(self.port)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.resume()
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def _spawn_redis(port: int, workdir: Path) -> subprocess.Popen:
    exe = shutil.which("redis-server")
    return subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _wait_answering(port: int, timeout_s: float = 20.0) -> None:
    """Block until redis-server answers PING on port (a plain socket: fixtures run outside the event loop)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return
        except OSError:
            pass
        if time.monotonic() >= deadline:
            raise RuntimeError(f"redis-server on port {port} did not answer within {timeout_s}s")
        time.sleep(0.05)


@pytest.fixture
def redis_server(tmp_path) -> Iterator[RedisServer]:
    """A redis-server of this test's own on loopback, without persistence (the test may hang or kill it)."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed and could not be (`make system-deps` installs it)")
    port = free_port()
    workdir = tmp_path / "redis"
    workdir.mkdir()
    server = RedisServer(f"redis://127.0.0.1:{port}/0", port, workdir, _spawn_redis(port, workdir))
    try:
        _wait_answering(port)
        yield server
    finally:
        server.stop()


# -- PostgreSQL ----------------------------------------------------------------------------------------------


def _postgres_bindir() -> str | None:
    found = shutil.which("pg_ctl")
    if found:
        return os.path.dirname(os.path.realpath(found))
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return os.path.dirname(candidates[-1]) if candidates else None


@dataclass(frozen=True)
class PostgresServer:
    """A running postgres: trust authentication for `user` on 127.0.0.1:port."""

    port: int
    user: str
    bindir: str

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{dbname}"

    def _tool(self, name: str, *args: str) -> None:
        subprocess.run(
            [
                os.path.join(self.bindir, name),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                self.user,
                *args,
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )

    def create_database(self) -> str:
        """A new empty database; its URL."""
        name = "t_" + uuid.uuid4().hex[:12]
        self._tool("createdb", name)
        return self.url(name)

    def drop_database(self, url: str) -> None:
        self._tool("dropdb", "--if-exists", "--force", url.rsplit("/", 1)[1])


def _run_as() -> tuple[list[str], pwd.struct_passwd | None]:
    """postgres refuses to run as root: as root, run it as the `postgres` user (Debian's package creates it).
    Through runuser rather than Popen(user=...): that makes Python fork() instead of vfork(), and a fork of a
    process with gRPC's threads runs gRPC's fork handlers, which can crash the child before it execs."""
    if os.geteuid() != 0:
        return [], None
    try:
        pw = pwd.getpwnam("postgres")
    except KeyError:
        pw = pwd.getpwnam("nobody")
    runuser = shutil.which("runuser") or "/usr/sbin/runuser"
    return [runuser, "-u", pw.pw_name, "--"], pw


@pytest.fixture(scope="session")
def postgres_server():
    """One PostgreSQL server for the test session (fsync off: test data needs no durability)."""
    bindir = _postgres_bindir()
    if bindir is None:
        pytest.skip(
            "postgresql is not installed and could not be: `make test` installs it (apt-get install "
            "postgresql); the PostgreSQL-backed gateway state is untested here"
        )
    run_as, pw = _run_as()
    # Not under pytest's tmp dir: that is mode 0700 for root, and the server runs as another user.
    base = tempfile.mkdtemp(prefix="fleetserve-pg-")
    if pw is not None:
        os.chown(base, pw.pw_uid, pw.pw_gid)
    data, log_file = os.path.join(base, "data"), os.path.join(base, "server.log")
    pg_ctl = os.path.join(bindir, "pg_ctl")
    user = "fleetserve"
    try:
        initdb = [os.path.join(bindir, "initdb"), "-D", data, "-U", user, "--auth=trust", "-E", "UTF8"]
        subprocess.run([*run_as, *initdb, "--no-sync"], check=True, capture_output=True, timeout=120)
        port = free_port()
        options = (
            f"-p {port} -c listen_addresses=127.0.0.1 -k {base} -c fsync=off -c synchronous_commit=off "
            "-c full_page_writes=off -c max_connections=200"
        )
        started = subprocess.run(
            [*run_as, pg_ctl, "-D", data, "-o", options, "-l", log_file, "-w", "-t", "60", "start"],
            capture_output=True,
            timeout=90,
        )
        if started.returncode != 0:
            tail = ""
            with contextlib.suppress(OSError), open(log_file) as f:
                tail = f.read()[-2000:]
            raise RuntimeError(
                f"postgres did not start: {started.stdout.decode()} {started.stderr.decode()}\n{tail}"
            )
        yield PostgresServer(port, user, bindir)
    finally:
        # Stopped whatever happened above (a no-op when it never started), and its files removed.
        subprocess.run(
            [*run_as, pg_ctl, "-D", data, "-m", "immediate", "-w", "stop"], capture_output=True, timeout=60
        )
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server):
    """A fresh database of its own on the session's server; dropped afterwards."""
    url = postgres_server.create_database()
    try:
        yield url
    finally:
        postgres_server.drop_database(url)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    """The gateway's database URL, once per backend: a SQLite file, then a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'gateway.db'}"
        return
    yield request.getfixturevalue("postgres_url")
