"""The project as `pip install` gives it: wheels built from a copy of the repository as a fresh clone holds it
(no .venv, no gen/, no `make protos`), each installed into a fresh venv.

By default the wheels are built without build isolation and installed with --no-deps, their dependencies taken
from the running environment's site-packages (seconds, for the CI budget). FLEETSERVE_WHEEL_FULL=1
(`make check-wheel`) does it as a user would: isolated builds (setuptools and grpcio-tools fetched for the build)
and every dependency installed from the package index into the fresh venvs (minutes)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from tests.docs_commands import ROOT

FULL = os.environ.get("FLEETSERVE_WHEEL_FULL") == "1"
# What a fresh clone does not hold: a venv, generated code, build output, caches.
_NOT_IN_A_CLONE = shutil.ignore_patterns(
    ".git",
    ".venv",
    "gen",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
)


@dataclass(frozen=True)
class Installed:
    """A wheel installed in its own venv: the wheel, the venv's python, and the environment to run it in."""

    wheel: Path
    python: Path
    env: dict[str, str]

    def script(self, name: str) -> str:
        return str(self.python.parent / name)


def _pip(*args: str, python: Path | None = None, timeout: float = 900) -> None:
    # Away from the repository and its PYTHONPATH: pip must not take a checkout's fleetserve.egg-info for an
    # installed fleetserve.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    target = ["--python", str(python)] if python is not None else []
    done = subprocess.run(
        [sys.executable, "-m", "pip", *target, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=python.parent if python is not None else None,
    )
    assert done.returncode == 0, f"pip {' '.join(args)}:\n{done.stdout}\n{done.stderr}"


def fresh_clone(dest: Path) -> Path:
    shutil.copytree(ROOT, dest, ignore=_NOT_IN_A_CLONE)
    return dest


def build_wheel(source: Path, out: Path) -> Path:
    isolation = [] if FULL else ["--no-build-isolation"]
    _pip("wheel", "-q", "--no-deps", *isolation, str(source), "-w", str(out))
    (wheel,) = out.glob("*.whl")
    return wheel


def install(wheel: Path, venv: Path) -> Installed:
    """A fresh venv with the wheel installed (see the module docstring for where its dependencies come from)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLEETSERVE_", "PYTHON"))}
    if FULL:
        _pip("install", "-q", str(wheel), python=python)
    else:
        _pip("install", "-q", "--no-deps", "--no-index", str(wheel), python=python)
        # This environment's site-packages for the dependencies (its .pth files, which would put a checkout's
        # sources and gen/ on the path, are not read for PYTHONPATH entries).
        env["PYTHONPATH"] = os.pathsep.join(
            dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
        )
    return Installed(wheel, python, env)
