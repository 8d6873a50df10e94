"""setuptools hook (the project's metadata is in pyproject.toml): a built wheel carries the Python generated
from protos/, so `pip install .` needs no protoc step of its own. Editable installs (`make install`) get it from
`make protos` (gen/ on the venv's path) instead."""

import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_protos import compile_protos  # noqa: E402


class BuildPyWithProtos(build_py):
    """build_py, then the generated fleetserve.<area>.v1 modules into the build directory."""

    def run(self) -> None:
        super().run()
        if not self.editable_mode:
            compile_protos(Path(self.build_lib))


setup(cmdclass={"build_py": BuildPyWithProtos})
