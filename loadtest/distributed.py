"""`python -m loadtest.distributed --workers N [locust options]`: Locust's distributed mode on one machine, for
rates one Python process cannot drive: a master (which takes the given options: --headless, --users, --html,
--csv, ...) and N worker processes, started together, waited for, and every one reaped (also on Ctrl-C). On
several machines, start the master with --master and each worker with
`locust -f loadtest/locustfile.py --worker --master-host MASTER`."""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
from pathlib import Path

LOCUSTFILE = Path(__file__).with_name("locustfile.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    ap.add_argument("--stop-timeout-s", type=float, default=30.0, help="how long workers may take to exit")
    args, locust_args = ap.parse_known_args(argv)
    if args.workers < 1:
        ap.error("--workers must be at least 1")
    port = _free_port()
    locust = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE)]
    master = subprocess.Popen(
        [
            *locust,
            "--master",
            "--master-bind-host",
            "127.0.0.1",
            "--master-bind-port",
            str(port),
            "--expect-workers",
            str(args.workers),
            *locust_args,
        ]
    )
    workers = [
        subprocess.Popen([*locust, "--worker", "--master-host", "127.0.0.1", "--master-port", str(port)])
        for _ in range(args.workers)
    ]
    try:
        code = master.wait()
    finally:
        for p in [master, *workers]:
            if p.poll() is None:
                p.terminate()
        for p in [master, *workers]:
            try:
                p.wait(args.stop_timeout_s)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    return code


if __name__ == "__main__":
    sys.exit(main())
