"""`make clean` removes what the build and the tools make, and only that: nothing of a fleet's state (which lives
in $FLEETSERVE_HOME, outside the checkout), and no path that nothing creates."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# What `make install`/`make protos` and the test and lint tools create in the checkout.
BUILD_OUTPUTS = {".venv", "gen", "build", "dist", "*.egg-info", ".pytest_cache", ".ruff_cache"}


def _removed() -> set[str]:
    out = subprocess.run(["make", "-n", "clean"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    (rm,) = [line for line in out.splitlines() if line.startswith("rm ")]
    return {a for a in shlex.split(rm)[1:] if not a.startswith("-")}


def test_make_clean_removes_build_outputs_only():
    """Every path it removes is a build or tool output (ignored by git), and .fleetserve, which nothing
    creates, is no longer among them."""
    removed = _removed()
    assert removed == BUILD_OUTPUTS
    ignored = (ROOT / ".gitignore").read_text().split()
    assert all(any(p.rstrip("/") == r for p in ignored) for r in removed), ignored


def test_nothing_uses_a_fleetserve_directory_in_the_checkout():
    """The local fleet's state is $FLEETSERVE_HOME or ~/.local/state/fleetserve (shared.cluster), not ./.fleetserve."""
    code = [
        p
        for d in ("shared", "services", "loadtest", "infra", "tests", "fleetserve")
        for p in (ROOT / d).rglob("*.py")
    ]
    users = [p for p in code if p != Path(__file__) and '".fleetserve"' in p.read_text(errors="replace")]
    assert users == []
