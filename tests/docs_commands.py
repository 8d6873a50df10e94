"""The commands the docs show: shell lines of README.md and docs/**/*.md code blocks (and inline `fleetserve ...` /
`python -m ...` spans), split into environment assignments and argv, for tests that parse or run them."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHELL_LANGS = {"sh", "bash", "shell", "console"}
_FENCE = re.compile(r"^```(\S*)")
_INLINE = re.compile(r"`((?:\.venv/bin/)?(?:fleetserve|python -m) [^`]+)`")
_INDENTED = re.compile(r"^    (?:\.venv/bin/)?(?:fleetserve|python3? -m) (?:.*\\\n)*.*$", re.M)
_ENV = re.compile(r"^[A-Z_][A-Z0-9_]*=")


@dataclass(frozen=True)
class Command:
    """One shell command a page shows."""

    page: str  # path relative to the repository root
    line: str  # the command as written (continuations joined)
    env: dict[str, str]  # leading VAR=value assignments
    argv: list[str]  # the words after them, comments and a trailing '&' dropped

    def __str__(self) -> str:
        return f"{self.page}: {self.line}"


def doc_pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def code_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced block."""
    blocks, lang, body = [], None, []
    for line in text.split("\n"):
        m = _FENCE.match(line)
        if m and lang is None:
            lang, body = m.group(1), []
        elif line.startswith("```") and lang is not None:
            blocks.append((lang, "\n".join(body)))
            lang = None
        elif lang is not None:
            body.append(line)
    return blocks


def logical_lines(body: str) -> list[str]:
    """A shell block's commands: backslash continuations joined, and lines joined while a quote is open (a JSON
    body spread over lines)."""
    out, pending = [], ""
    for line in body.replace("\\\n", " ").split("\n"):
        pending = f"{pending}\n{line}" if pending else line.strip()
        try:
            shlex.split(pending, comments=True)
        except ValueError:
            continue
        if pending:
            out.append(pending)
        pending = ""
    return out


def _split(page: str, line: str) -> Command | None:
    try:
        words = shlex.split(line, comments=True)
    except ValueError:  # an unbalanced quote: a JSON body spread over lines, not a command line
        return None
    if words and words[-1] == "&":
        words = words[:-1]
    env = {}
    while words and _ENV.match(words[0]):
        name, _, value = words.pop(0).partition("=")
        env[name] = value
    if not words:
        return None
    return Command(page, line, env, words)


def shell_commands(page: Path) -> list[Command]:
    """Every command line of the page's shell code blocks, and its inline `fleetserve ...` / `python -m ...`
    spans that are whole commands (with flags; not synopses with [optional] parts, alternatives or <placeholders>)."""
    rel = str(page.relative_to(ROOT))
    text = page.read_text()
    out = []
    for lang, body in code_blocks(text):
        if lang not in SHELL_LANGS:
            continue
        for line in logical_lines(body):
            cmd = _split(rel, line)
            if cmd is not None:
                out.append(cmd)
    # Indented (4-space) code blocks of the benchmark pages: their command lines.
    for m in _INDENTED.finditer(text):
        cmd = _split(rel, " ".join(m.group(0).replace("\\\n", " ").split()))
        if cmd is not None:
            out.append(cmd)
    for m in _INLINE.finditer(text):
        span = " ".join(m.group(1).split())
        # A span without flags names a command ("see `fleetserve admin`"); one with [, |, <> is a synopsis.
        if any(c in span for c in "[]|<>"):
            continue
        cmd = _split(rel, span)
        invocation = project_invocation(cmd.argv) if cmd is not None else None
        if invocation is not None and any(a.startswith("-") for a in invocation[1]):
            out.append(cmd)
    return out


def all_commands() -> list[Command]:
    return [c for page in doc_pages() for c in shell_commands(page)]


def project_invocation(argv: list[str]) -> tuple[str, list[str]] | None:
    """("fleetserve", args) or (module, args) for `python -m module`; None for anything else (curl, make...)."""
    head = argv[0].removeprefix(".venv/bin/")
    if head == "fleetserve":
        return "fleetserve", argv[1:]
    if head in ("python", "python3") and len(argv) > 2 and argv[1] == "-m":
        return argv[2], argv[3:]
    return None


# What tests/integration/test_cli.py runs of README.md and docs/protocols.md against a live fleet: the CLI, curl and
# the variables they set; `make`, `fleetserve up` (the fleet is up already) and grpcurl (not packaged for Debian;
# tests/unit/test_docs.py checks its methods and bodies against the protos) are left out.
LIVE_PAGES = ("README.md", "docs/protocols.md")
_LIVE_PROGRAMS = ("fleetserve", ".venv/bin/fleetserve", "curl", "STATE=", "export ", "HTTP=")


def live_fleet_lines(page: str) -> list[str]:
    """The command lines of the page's sh/bash blocks that call a live fleet (or set the variables they use)."""
    lines = []
    for lang, body in code_blocks((ROOT / page).read_text()):
        if lang not in ("sh", "bash"):
            continue
        for line in logical_lines(body):
            if line.startswith(_LIVE_PROGRAMS) and not line.startswith(("fleetserve up", "make ")):
                lines.append(line)
    return lines
