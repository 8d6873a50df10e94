"""Compile protos/ into Python (messages, .pyi stubs, gRPC stubs) with grpc_tools: the one build step both
distributions (setup.py, client/setup.py) run so that a wheel ships its generated code; `make protos` runs the
same compiler into gen/ for development."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parent
PROTOS = ROOT / "protos"


def compile_protos(out_dir: Path, protos_dir: Path = PROTOS) -> list[Path]:
    """Generate fleetserve.<area>.v1 modules for every .proto under protos_dir into out_dir; the files written."""
    from grpc_tools import protoc  # a build requirement, not a runtime one

    sources = sorted(protos_dir.rglob("*.proto"))
    if not sources:
        raise RuntimeError(f"no .proto files under {protos_dir}")
    out_dir.mkdir(parents=True, exist_ok=True)
    well_known = resources.files("grpc_tools") / "_proto"  # google/protobuf/*.proto
    args = [
        "grpc_tools.protoc",
        f"-I{protos_dir}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(str(s) for s in sources),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {protos_dir}")
    return sorted(p for p in out_dir.rglob("*_pb2*.py*") if p.is_file())
