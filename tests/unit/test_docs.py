"""The docs stay true to the code: every `fleetserve` / `python -m` command in README.md and docs/ parses with the
real parser (flags exist, values valid, env vars named right), every pytest path exists, every relative link and
anchor resolves. (tests/integration/test_cli.py runs the quick start's commands against a live fleet.)"""

from __future__ import annotations

import argparse
import importlib
import os
import re
from pathlib import Path

import pytest

from services.autoscaler.config import AutoscalerSettings
from services.engine.config import EngineSettings
from services.gateway.config import GatewaySettings
from services.metrics.config import MetricsSettings
from services.registry.config import RegistrySettings
from services.router.config import RouterSettings
from shared.cli.main import build_parser
from shared.settings import load_settings
from tests.docs_commands import ROOT, Command, all_commands, doc_pages, project_invocation

SERVICES = {
    "services.gateway": GatewaySettings,
    "services.router": RouterSettings,
    "services.engine": EngineSettings,
    "services.registry": RegistrySettings,
    "services.metrics": MetricsSettings,
    "services.autoscaler": AutoscalerSettings,
}
SETTINGS_BY_ENV = {f"FLEETSERVE_{m.split('.')[1].upper()}_": cls for m, cls in SERVICES.items()}

COMMANDS = all_commands()
PROJECT = [c for c in COMMANDS if project_invocation(c.argv) is not None]


class _Parsed(Exception):
    """Raised in place of running a command once its arguments parsed."""


def _args(args: list[str]) -> list[str]:
    # A trailing "..." stands for "and your other flags".
    return args[:-1] if args and args[-1] == "..." else args


def _check_env(cmd: Command, monkeypatch) -> None:
    """FLEETSERVE_<SERVICE>_<FIELD> assignments are valid settings of that service."""
    for name, value in cmd.env.items():
        if not name.startswith("FLEETSERVE_") or name in ("FLEETSERVE_HOME", "FLEETSERVE_API_KEY"):
            continue
        prefix = next((p for p in SETTINGS_BY_ENV if name.startswith(p)), None)
        assert prefix is not None, f"{cmd}: {name} names no service"
        cls = SETTINGS_BY_ENV[prefix]
        field = name.removeprefix(prefix).lower()
        assert field in cls.model_fields, f"{cmd}: {cls.__name__} has no field {field!r} ({name})"
        monkeypatch.setenv(name, value)
        load_settings(cls, [])


def _parse_module(module: str, args: list[str], monkeypatch) -> None:
    """Run `python -m module args` (its main(argv)) up to the point where argparse has parsed the arguments."""
    # parse_known_args too (parse_args calls it): a module may take options it passes on (loadtest.distributed).
    real = argparse.ArgumentParser.parse_known_args

    def parse_then_stop(self, args=None, namespace=None):
        real(self, args, namespace)
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", parse_then_stop)
    main = importlib.import_module(module).main  # what the module's __main__ block calls
    with pytest.raises(_Parsed):
        main(args)


@pytest.mark.parametrize("cmd", PROJECT, ids=str)
def test_documented_command_parses(cmd: Command, monkeypatch):
    """The command's program exists and accepts its flags and values."""
    for name in [n for n in os.environ if n.startswith("FLEETSERVE_")]:
        monkeypatch.delenv(name)
    _check_env(cmd, monkeypatch)
    program, args = project_invocation(cmd.argv)
    args = _args(args)
    if program == "fleetserve":
        if "--help" in args or "-h" in args:
            with pytest.raises(SystemExit) as exc:  # the help of an existing (sub)command
                build_parser().parse_args(args)
            assert exc.value.code == 0, cmd
            return
        build_parser().parse_args(args)
    elif program in SERVICES:
        load_settings(SERVICES[program], args)
    elif program == "pytest":
        paths = [a for a in args if not a.startswith("-") and "/" in a]
        assert paths and all((ROOT / p.split("::")[0]).exists() for p in paths), cmd
    else:
        _parse_module(program, args, monkeypatch)


def test_docs_show_the_commands_we_check():
    """The extraction finds the commands (guards against a parser change that silently checks nothing)."""
    programs = {project_invocation(c.argv)[0] for c in PROJECT}
    assert {"fleetserve", "services.gateway", "services.router", "services.engine", "pytest"} <= programs
    assert len(PROJECT) >= 40


def _slug(header: str) -> str:
    """GitHub's anchor for a header: lower case, punctuation dropped, spaces to dashes."""
    text = re.sub(r"[`*_]", "", header.strip().lower())
    return re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", text))


def _anchors(page: Path) -> set[str]:
    text = page.read_text()
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)  # a '#' in a code block is no header
    return {_slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, re.M)}


@pytest.mark.parametrize("page", doc_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_anchors_resolve(page: Path):
    """Every relative link points at a file that exists, and every #anchor at a header of that page."""
    broken = []
    for m in re.finditer(r"\]\(([^)\s]*)\)", page.read_text()):
        target = m.group(1)
        if re.match(r"^[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path) if path else page
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)}: {broken}"
