"""`fleetserve metrics`, `cost` and `quality` report a metrics service that does not answer the same way."""

from __future__ import annotations

import socket

from shared.cli.main import main


def test_metrics_commands_report_an_unreachable_metrics_service(capsys):
    """Each exits 1 with one line on stderr naming the address and the gRPC status, and prints nothing else."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"  # released at the end of the block: nothing listens there
    for command in (["metrics"], ["cost"], ["quality", "m1"]):
        for fmt in ([], ["--json"]):
            assert main([*command, *fmt, "--metrics", address]) == 1
            out, err = capsys.readouterr()
            assert out == "" and err.startswith(f"error: metrics service at {address}: UNAVAILABLE "), err
            assert err.count("\n") == 1, err
