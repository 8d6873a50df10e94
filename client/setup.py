"""Build of the client-only distribution: fleetserve.client (the sources of the repository's fleetserve/client)
and the Python generated from the repository's protos/, so the wheel needs no protoc step on install."""

import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from build_protos import compile_protos  # noqa: E402


class BuildClient(build_py):
    """build_py (the client package), then the generated modules into the build directory."""

    def run(self) -> None:
        super().run()
        compile_protos(Path(self.build_lib))


setup(
    packages=["fleetserve.client"],
    package_dir={"fleetserve.client": "../fleetserve/client"},
    cmdclass={"build_py": BuildClient},
)
