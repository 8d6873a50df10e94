"""The wheels hold what an install needs: the main one the generated stubs, the client, the tokenizer and the
sim profiles (test_cli runs `fleetserve up` from it); the client-only one the client and the stubs, and nothing of
the servers."""

from __future__ import annotations

import zipfile

import pytest

pytestmark = pytest.mark.slow


def test_main_wheel_carries_generated_code_client_and_data_files(installed):
    """Built from a fresh clone (no gen/): the generated modules of every .proto, fleetserve.client, the bundled
    tokenizer and the GPU profiles are in the wheel."""
    names = set(zipfile.ZipFile(installed["server"].wheel).namelist())
    for needed in (
        "fleetserve/common/v1/common_pb2.py",
        "fleetserve/inference/v1/inference_service_pb2_grpc.py",
        "fleetserve/router/v1/router_service_pb2.pyi",
        "fleetserve/client/aio.py",
        "infra/models/tokenizer.json.gz",
        "infra/profiles/h100-llama-1b.toml",
    ):
        assert needed in names, f"{needed} not in {installed['server'].wheel.name}"


def test_client_wheel_is_the_client_and_the_stubs_only(installed):
    """The client-only wheel: fleetserve.client and the generated stubs, no server package."""
    names = set(zipfile.ZipFile(installed["client"].wheel).namelist())
    assert {"fleetserve/client/sync.py", "fleetserve/inference/v1/inference_service_pb2_grpc.py"} <= names
    assert not any(n.startswith(("services/", "shared/", "infra/", "loadtest/")) for n in names)
