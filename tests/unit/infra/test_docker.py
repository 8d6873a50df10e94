"""The Dockerfiles (infra/docker) hold together without a Docker engine (there is none here, so the images are not
built): base images are pinned (the vLLM one to the version the project pins), every COPY source exists and is
not excluded by .dockerignore, the commands they run parse with the real CLI and service settings, and every
FLEETSERVE_* variable they set is a real setting."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from services.engine.config import EngineSettings
from services.gateway.config import GatewaySettings
from shared.cli.main import build_parser
from shared.settings import load_settings

ROOT = Path(__file__).resolve().parents[3]
DOCKER = ROOT / "infra" / "docker"
FILES = sorted(DOCKER.glob("Dockerfile*"))


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _exec_form(args: str) -> list[str]:
    return json.loads(args) if args.startswith("[") else shlex.split(args)


def test_there_are_a_cpu_and_a_gpu_image():
    assert {f.name for f in FILES} == {"Dockerfile", "Dockerfile.vllm"}


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_base_images_are_pinned(path):
    """No :latest or untagged base; the GPU image starts from the official vLLM image of the pinned version."""
    bases = [args.split()[0] for word, args in instructions(path) if word == "FROM"]
    for base in bases:
        assert ":" in base and not base.endswith(":latest"), base
    if path.name == "Dockerfile.vllm":
        pinned = re.search(r'"vllm==([^"]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
        assert bases == [f"vllm/vllm-openai:v{pinned}"]


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_every_copied_path_exists_and_reaches_the_build(path):
    ignored = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines() if p.strip()]
    for word, args in instructions(path):
        if word != "COPY" or "--from=" in args:
            continue
        *sources, _dest = args.split()
        for src in sources:
            assert (ROOT / src).exists(), f"{path.name}: COPY {src}: no such path"
            assert src not in ignored, f"{path.name}: COPY {src} is excluded by .dockerignore"
    # What the wheel build needs (pyproject's packages and setup.py's proto generation) is copied.
    copied = {
        s
        for word, args in instructions(path)
        if word == "COPY" and "--from=" not in args
        for s in args.split()[:-1]
    }
    assert {
        "pyproject.toml",
        "setup.py",
        "build_protos.py",
        "protos",
        "services",
        "shared",
        "fleetserve",
    } <= copied


def test_the_cpu_image_runs_a_sim_fleet_reachable_from_outside():
    """Its CMD is a `fleetserve up` the real CLI parses; its FLEETSERVE_* variables are gateway settings that
    put the gateway on 0.0.0.0 at the ports it EXPOSEs."""
    steps = instructions(DOCKER / "Dockerfile")
    (cmd,) = [_exec_form(a) for w, a in steps if w == "CMD"]
    assert cmd[0] == "fleetserve"
    args = build_parser().parse_args(cmd[1:])
    assert args.command == "up" and args.backend == "sim"
    env = dict(shlex.split(pair)[0].split("=", 1) for w, a in steps if w == "ENV" for pair in shlex.split(a))
    gateway = {k: v for k, v in env.items() if k.startswith("FLEETSERVE_GATEWAY_")}
    for name in gateway:
        assert name.removeprefix("FLEETSERVE_GATEWAY_").lower() in GatewaySettings.model_fields, name
    exposed = {int(p) for w, a in steps if w == "EXPOSE" for p in a.split()}
    assert gateway["FLEETSERVE_GATEWAY_HOST"] == "0.0.0.0"
    assert {int(gateway["FLEETSERVE_GATEWAY_PORT"]), int(gateway["FLEETSERVE_GATEWAY_HTTP_PORT"])} == exposed


def test_the_gpu_image_runs_a_vllm_engine():
    """It clears vLLM's own entrypoint and runs services.engine with --backend vllm, flags the engine parses."""
    steps = instructions(DOCKER / "Dockerfile.vllm")
    assert ("ENTRYPOINT", "[]") in steps
    (cmd,) = [_exec_form(a) for w, a in steps if w == "CMD"]
    assert cmd[:3] == ["python3", "-m", "services.engine"]
    settings = load_settings(EngineSettings, cmd[3:])
    assert settings.backend == "vllm" and settings.host == "0.0.0.0"
    exposed = {int(p) for w, a in steps if w == "EXPOSE" for p in a.split()}
    assert exposed == {settings.port}
