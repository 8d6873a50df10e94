"""The Locust user stays optional: locust is imported only by loadtest/locustfile.py, which at least compiles."""

from __future__ import annotations

import ast
from pathlib import Path

LOADTEST = Path(__file__).resolve().parents[3] / "loadtest"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_only_the_locustfile_imports_locust():
    """Every other loadtest module works without the optional `loadtest` extra."""
    modules = sorted(LOADTEST.glob("*.py"))
    assert any(p.name == "locustfile.py" for p in modules)
    for path in modules:
        if path.name != "locustfile.py":
            assert "locust" not in _imports(path), f"{path.name} imports locust"
    assert {"locust", "grpc"} <= _imports(LOADTEST / "locustfile.py")
