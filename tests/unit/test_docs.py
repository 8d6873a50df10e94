"""The docs stay true to the code: every `fleetserve` / `python -m` command in README.md and docs/ parses with the
real parser (flags exist, values valid, env vars named right), every pytest path exists, every relative link and
anchor resolves, and every other command a page shows is exercised somewhere: make targets and variables exist,
grpcurl calls name real methods with bodies that parse as their requests, and the rest are run by the test named
in ELSEWHERE. (tests/integration/test_cli.py runs the quick start's commands against a live fleet.)"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import tomllib
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
from tests.docs_commands import (
    LIVE_PAGES,
    ROOT,
    Command,
    all_commands,
    doc_pages,
    live_fleet_lines,
    project_invocation,
)

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


# -- commands other than fleetserve / python -m ---------------------------------------------------------------

# A documented command of another program -> the test that exercises it: (program, text the command line
# contains, test file, text that file must contain). A new kind of command in the docs needs a line here.
ELSEWHERE = [
    ("make", "", "tests/unit/test_docs.py", "def test_documented_make_targets_and_variables_exist"),
    ("grpcurl", "", "tests/unit/test_docs.py", "def test_documented_grpcurl_calls_name_real_methods"),
    ("pip", "install", "tests/unit/test_docs.py", "def test_documented_pip_installs_name_real_extras"),
    (
        "kubectl",
        "fleetserve-secrets",
        "tests/unit/test_docs.py",
        "def test_the_documented_secret_has_the_keys",
    ),
    ("promtool", "check rules", "tests/unit/infra/test_prometheus_rules.py", '"check", "rules"'),
    ("promtool", "test rules", "tests/unit/infra/test_prometheus_rules.py", '"test", "rules"'),
    ("prometheus", "--config.file=", "tests/servers.py", '"--config.file='),
    # No Docker engine here: the Dockerfiles' instructions, paths and commands are checked without one.
    (
        "docker",
        "infra/docker/Dockerfile",
        "tests/unit/infra/test_docker.py",
        '"Dockerfile", "Dockerfile.vllm"',
    ),
    ("curl", "--cacert", "tests/integration/test_tls.py", '"docs/deployment.md"'),
    ("STATE=", "", "tests/integration/test_tls.py", '"docs/deployment.md"'),
]


def _exercised_by(cmd: Command) -> str | None:
    """What exercises the command: a test or check named in words, or None."""
    if project_invocation(cmd.argv) is not None:
        return "test_documented_command_parses"
    if cmd.page in LIVE_PAGES and cmd.line in live_fleet_lines(cmd.page):
        return "tests/integration/test_cli.py (run against a live fleet)"
    for program, needle, test, marker in ELSEWHERE:
        head = cmd.line.split()[0] if program.endswith("=") else cmd.argv[0]
        if head.startswith(program) and needle in cmd.line:
            assert marker in (ROOT / test).read_text(), f"{cmd}: {test} no longer has {marker!r}"
            return test
    return None


def test_every_documented_command_is_exercised_by_a_test():
    """Each command line of README.md and docs/ is parsed, run, or checked by a test (no command a reader copies
    is left unchecked)."""
    unchecked = [str(c) for c in COMMANDS if _exercised_by(c) is None]
    assert not unchecked, "commands no test exercises (add one, and a line to ELSEWHERE):\n" + "\n".join(
        unchecked
    )


def _makefile() -> str:
    return (ROOT / "Makefile").read_text()


def test_documented_make_targets_and_variables_exist():
    """`make TARGET VAR=value ...`: the target is the Makefile's, and each VAR is one it reads."""
    text = _makefile()
    targets = set(re.findall(r"^([A-Za-z][\w-]*):", text, re.M))
    variables = set(re.findall(r"\$\((\w+)\)", text)) | set(re.findall(r"^(\w+)\s*[?:]?=", text, re.M))
    makes = [c for c in COMMANDS if c.argv[0] == "make"]
    assert makes
    for cmd in makes:
        words = cmd.argv[1:]
        assigned = [w.partition("=")[0] for w in words if "=" in w]
        named = [w for w in words if "=" not in w]
        assert named and set(named) <= targets, f"{cmd}: no such target in the Makefile"
        assert set(assigned) <= variables, f"{cmd}: the Makefile reads none of {set(assigned) - variables}"


def _grpcurl(argv: list[str]) -> tuple[str | None, list[str]]:
    """A grpcurl command line -> (its -d body, its words that are not flags: the address, then a method, `list`
    or `describe SYMBOL`)."""
    body, words, i = None, [], 1
    while i < len(argv):
        if argv[i] in ("-d", "-H"):
            body = argv[i + 1] if argv[i] == "-d" else body
            i += 2
            continue
        if not argv[i].startswith("-"):
            words.append(argv[i])
        i += 1
    return body, words


def _service(name: str):
    """The service descriptor of a full service name, its generated module imported first."""
    from google.protobuf import descriptor_pool

    package, _, service = name.rpartition(".")
    snake = re.sub(r"(?<!^)(?=[A-Z])", "_", service).lower()
    module = f"{package}.{snake}_pb2" if package.startswith("fleetserve.") else "grpc_health.v1.health_pb2"
    importlib.import_module(module)
    return descriptor_pool.Default().FindServiceByName(name)


def test_documented_grpcurl_calls_name_real_methods():
    """grpcurl is not packaged for Debian, so the pages' calls are checked against the protos: each method exists
    and each -d body parses as its request (field names and types; placeholder ids are strings). The calls
    themselves are made over gRPC by the integration tests."""
    from google.protobuf import json_format, message_factory

    calls = [c for c in COMMANDS if c.argv[0] == "grpcurl"]
    assert len(calls) >= 10
    for cmd in calls:
        body, words = _grpcurl(cmd.argv)
        if words[-1] == "list":
            continue
        if words[-2] == "describe":
            assert _service(words[-1]) is not None, cmd
            continue
        service, _, method = words[-1].partition("/")
        m = _service(service).methods_by_name.get(method)
        assert m is not None, f"{cmd}: {service} has no method {method}"
        if body is not None:
            json_format.Parse(body, message_factory.GetMessageClass(m.input_type)())


def test_documented_pip_installs_name_real_extras():
    """`pip install -e '.[extra]'`: the project declares that extra."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    pips = [c for c in COMMANDS if c.argv[0] == "pip"]
    assert pips
    for cmd in pips:
        for word in cmd.argv[2:]:
            m = re.fullmatch(r"\.\[([\w,-]+)\]", word)
            if m:
                assert set(m.group(1).split(",")) <= set(extras), cmd


def test_the_documented_secret_has_the_keys_the_production_overlay_reads():
    """`kubectl create secret generic fleetserve-secrets --from-literal=KEY=...`: exactly the keys the production
    overlay's containers take from that Secret."""
    from tests.unit.infra.test_k8s import containers, rendered

    (cmd,) = [c for c in COMMANDS if c.argv[0] == "kubectl" and "fleetserve-secrets" in c.argv]
    documented = {
        a.removeprefix("--from-literal=").partition("=")[0]
        for a in cmd.argv
        if a.startswith("--from-literal=")
    }
    read = set()
    for _, _, c in containers(rendered("production")):
        for e in c.get("env", []):
            ref = e.get("valueFrom", {}).get("secretKeyRef", {})
            if ref.get("name") == "fleetserve-secrets":
                read.add(ref["key"])
    assert documented == read
