"""`fleetserve admin` as a subprocess against a running gateway's database: a new tenant's key works at once,
and model access, limits and revocation change what the running gateway does without a restart."""

from __future__ import annotations

import asyncio
import json
import sys

import grpc
import pytest
import pytest_asyncio

from tests.integration.test_gateway_admission import gateway
from tests.integration.test_router import MODEL, in_process_fleet
from tests.support import assert_eventually

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fleet(tmp_path_factory):
    async with in_process_fleet(tmp_path_factory.mktemp("admin"), engines=1) as f:
        yield f


async def admin(db: str, *args: str, ok: bool = True):
    """Run `fleetserve admin --db db --json args...`; its parsed JSON output (or stderr when it fails)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "shared.cli.main",
        "admin",
        "--db",
        db,
        "--json",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert (proc.returncode == 0) == ok, (proc.returncode, out, err)
    return json.loads(out) if ok else err.decode()


async def _code(gw, key: str) -> str:
    try:
        await gw.generate(key)
    except grpc.aio.AioRpcError as e:
        return e.code().name
    return "OK"


async def _is(gw, key: str, code: str) -> bool:
    return await _code(gw, key) == code


async def test_admin_cli_manages_tenants_keys_and_limits_of_a_running_gateway(fleet, tmp_path):
    """Tenant and key created by the CLI authenticate at once; restricting models gives PERMISSION_DENIED, an rps
    limit RESOURCE_EXHAUSTED, and revoking the key UNAUTHENTICATED, each while the gateway runs; usage lists the
    served tokens; the key itself is printed once and never listed."""
    async with gateway(fleet, tmp_path) as gw:
        db = gw.app.tenants.db_path
        t = await admin(db, "tenant", "create", "Beta Co", "--tier", "batch")
        assert (t["id"], t["tier"]) == ("beta-co", "batch")
        created = await admin(db, "key", "create", "beta-co", "--name", "ci")
        key, key_id = created["api_key"], created["key_id"]
        chunks, _ = await gw.generate(key)

        await admin(db, "limits", "beta-co", "--models", "other-model")
        await assert_eventually(lambda: _is(gw, key, "PERMISSION_DENIED"), timeout_s=5)

        await admin(db, "limits", "beta-co", "--all-models", "--rps", "0.05")
        await assert_eventually(lambda: _is(gw, key, "OK"), timeout_s=5)
        assert await _code(gw, key) == "RESOURCE_EXHAUSTED"

        listed = await admin(db, "key", "list", "--tenant", "beta-co")
        assert [(k["key_id"], k["name"], k["revoked"]) for k in listed] == [(key_id, "ci", False)]
        assert key not in json.dumps(listed)
        await admin(db, "key", "revoke", key_id)
        await assert_eventually(lambda: _is(gw, key, "UNAUTHENTICATED"), timeout_s=5)
        assert "no active key" in await admin(db, "key", "revoke", key_id, ok=False)

        await gw.ledger.flush()
        usage = await admin(db, "usage", "--tenant", "beta-co")
        assert [(u["model"], u["requests"]) for u in usage] == [(MODEL, 2)]
        assert usage[0]["completion_tokens"] >= chunks[-1].usage.completion_tokens
        shown = await admin(db, "tenant", "show", "beta-co")
        assert shown["limits"]["rps"] == 0.05 and shown["models"] is None and shown["keys"][0]["revoked"]
