"""`fleetserve admin`: tenants, API keys, limits, allowed models and usage in the gateway's database. Changes
apply to running gateways without a restart (within their config_poll_s)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

from services.gateway.db import DatabaseError, IntegrityError
from services.gateway.ledger import Ledger, period_start
from services.gateway.schema import open_accounts
from services.gateway.tenants import PERIODS, TIERS, KeyInfo, Limits, Tenant, TenantStore
from shared.cluster import read_state

_LIMIT_FLAGS = {
    "rps": ("--rps", float, "requests per second (0: unlimited)"),
    "tokens_per_min": ("--tokens-per-min", int, "prompt + completion tokens per minute (0: unlimited)"),
    "max_streams": ("--max-streams", int, "concurrent streams (0: unlimited)"),
    "token_budget": ("--token-budget", int, "tokens per budget period (0: unlimited)"),
    "cost_budget_usd": (
        "--cost-budget-usd",
        float,
        "USD per budget period, from model prices (0: unlimited)",
    ),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--db",
        help="the gateway's database: a SQLite file or a postgresql:// URL (default: "
        "$FLEETSERVE_GATEWAY_DB_URL, $FLEETSERVE_GATEWAY_DB_PATH, else the running cluster's)",
    )
    p.add_argument("--json", action="store_true", help="JSON output")
    sub = p.add_subparsers(dest="admin_command", required=True)

    tenant = sub.add_parser("tenant", help="create, list or show tenants").add_subparsers(
        dest="action", required=True
    )
    create = tenant.add_parser("create", help="create a tenant")
    create.add_argument("name")
    create.add_argument("--id", help="tenant id (default: a slug of the name)")
    create.add_argument("--tier", choices=TIERS, default="standard", help="highest tier it may use")
    tenant.add_parser("list", help="every tenant with its limits")
    show = tenant.add_parser("show", help="one tenant with its limits, keys and usage this period")
    show.add_argument("tenant")

    key = sub.add_parser("key", help="create, list, revoke API keys").add_subparsers(
        dest="action", required=True
    )
    kc = key.add_parser("create", help="create a key; it is printed once and stored hashed only")
    kc.add_argument("tenant")
    kc.add_argument("--name", default="", help="a label")
    kc.add_argument("--rps", type=float, help="this key's own requests per second")
    kc.add_argument("--tokens-per-min", type=int, help="this key's own tokens per minute")
    kl = key.add_parser("list", help="keys (ids and prefixes, never the keys)")
    kl.add_argument("--tenant")
    kr = key.add_parser("revoke", help="revoke a key by its id (key_...)")
    kr.add_argument("key_id")
    klim = key.add_parser("limits", help="set a key's own limits")
    klim.add_argument("key_id")
    klim.add_argument("--rps", type=float)
    klim.add_argument("--tokens-per-min", type=int)

    lim = sub.add_parser("limits", help="set a tenant's limits, tier and allowed models")
    lim.add_argument("tenant")
    for name, (flag, typ, text) in _LIMIT_FLAGS.items():
        lim.add_argument(flag, dest=name, type=typ, help=text)
    lim.add_argument("--budget-period", choices=PERIODS, help="period of the budgets (default month)")
    lim.add_argument("--tier", choices=TIERS)
    models = lim.add_mutually_exclusive_group()
    models.add_argument("--models", help="comma-separated models it may use")
    models.add_argument("--all-models", action="store_true", help="it may use every model")

    usage = sub.add_parser("usage", help="tokens and cost per tenant and model from the ledger")
    usage.add_argument("--tenant")
    usage.add_argument(
        "--period", choices=PERIODS, default="month", help="since the start of this period (default month)"
    )


def _db_path(args) -> str:
    if args.db:
        return args.db
    for env in ("FLEETSERVE_GATEWAY_DB_URL", "FLEETSERVE_GATEWAY_DB_PATH"):
        if os.environ.get(env):
            return os.environ[env]
    state = read_state()
    return state.get("db_url") or str(Path(state["data_dir"]) / "gateway.db")


def _limits_dict(limits: Limits) -> dict:
    return {k: v for k, v in asdict(limits).items() if v is not None}


def _tenant_dict(t: Tenant) -> dict:
    return {
        "id": t.id,
        "name": t.name,
        "tier": t.tier,
        "limits": _limits_dict(t.limits),
        "models": sorted(t.models) if t.models is not None else None,
    }


def _key_dict(k: KeyInfo) -> dict:
    return {
        "key_id": k.key_id,
        "tenant": k.tenant_id,
        "prefix": k.prefix,
        "name": k.name,
        "created_at": k.created_at,
        "revoked": k.revoked_at is not None,
        "limits": {
            n: v for n, v in (("rps", k.limits.rps), ("tokens_per_min", k.limits.tokens_per_min)) if v
        },
    }


def _out(args, obj, text: str) -> None:
    print(json.dumps(obj) if args.json else text)


def _fmt_limits(d: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in d.items()) or "unlimited"


async def _run(args, store: TenantStore) -> int:
    cmd, action = args.admin_command, getattr(args, "action", None)
    if cmd == "tenant" and action == "create":
        t = await store.create_tenant(args.name, tier=args.tier, tenant_id=args.id)
        _out(args, _tenant_dict(t), f"created tenant {t.id} (tier {t.tier})")
    elif cmd == "tenant" and action == "list":
        ts = [_tenant_dict(t) for t in await store.list_tenants()]
        lines = [
            f"{t['id']:<20} {t['tier']:<12} models={','.join(t['models']) if t['models'] is not None else '*'} "
            f"{_fmt_limits(t['limits'])}"
            for t in ts
        ]
        _out(args, ts, "\n".join(lines) or "no tenants")
    elif cmd == "tenant" and action == "show":
        t = await store.get_tenant(args.tenant)
        if t is None:
            return _fail(f"no tenant {args.tenant!r}")
        obj = _tenant_dict(t)
        obj["keys"] = [_key_dict(k) for k in await store.list_keys(t.id)]
        tokens, cost = await Ledger(store.db).used(t.id, t.limits.budget_period)
        obj["usage"] = {"period": t.limits.budget_period, "tokens": tokens, "cost_usd": cost}
        text = (
            f"{t.id} ({t.name}) tier={t.tier} models={','.join(obj['models']) if obj['models'] is not None else '*'}\n"
            f"limits: {_fmt_limits(obj['limits'])}\n"
            f"this {t.limits.budget_period}: {tokens} tokens, ${cost:.6f}\n"
            + "\n".join(
                f"  {k['key_id']} {k['prefix']}… {k['name']!r} {'REVOKED' if k['revoked'] else 'active'} "
                f"{_fmt_limits(k['limits'])}"
                for k in obj["keys"]
            )
        )
        _out(args, obj, text)
    elif cmd == "key" and action == "create":
        key = await store.add_key(args.tenant, name=args.name)
        info = (await store.list_keys(args.tenant))[-1]
        limits = {"rps": args.rps, "tokens_per_min": args.tokens_per_min}
        if any(v is not None for v in limits.values()):
            await store.set_key_limits(info.key_id, **{k: v for k, v in limits.items() if v is not None})
        obj = {"key_id": info.key_id, "tenant": args.tenant, "api_key": key}
        _out(args, obj, f"{key}\n(key id {info.key_id}; shown once, stored hashed only)")
    elif cmd == "key" and action == "list":
        ks = [_key_dict(k) for k in await store.list_keys(args.tenant)]
        lines = [
            f"{k['key_id']:<18} {k['tenant']:<16} {k['prefix']}… {'REVOKED' if k['revoked'] else 'active':<8} "
            f"{k['name']} {_fmt_limits(k['limits'])}"
            for k in ks
        ]
        _out(args, ks, "\n".join(lines) or "no keys")
    elif cmd == "key" and action == "revoke":
        if not await store.revoke_key_id(args.key_id):
            return _fail(f"no active key {args.key_id!r}")
        _out(args, {"key_id": args.key_id, "revoked": True}, f"revoked {args.key_id}")
    elif cmd == "key" and action == "limits":
        limits = {
            k: v for k, v in (("rps", args.rps), ("tokens_per_min", args.tokens_per_min)) if v is not None
        }
        if not await store.set_key_limits(args.key_id, **limits):
            return _fail(f"no key {args.key_id!r}")
        _out(args, {"key_id": args.key_id, "limits": limits}, f"{args.key_id}: {_fmt_limits(limits)}")
    elif cmd == "limits":
        changes = {name: getattr(args, name) for name in _LIMIT_FLAGS if getattr(args, name) is not None}
        if args.budget_period:
            changes["budget_period"] = args.budget_period
        models = [m for m in args.models.split(",")] if args.models is not None else None
        t = await store.set_tenant(
            args.tenant, tier=args.tier, models=models, all_models=args.all_models, **changes
        )
        obj = _tenant_dict(t)
        _out(args, obj, f"{t.id} tier={t.tier} {_fmt_limits(obj['limits'])}")
    elif cmd == "usage":
        since = period_start(args.period, time.time())
        rows = await Ledger(store.db).summary(args.tenant, since)
        objs = [
            {
                "tenant": r[0],
                "model": r[1],
                "requests": r[2],
                "prompt_tokens": r[3],
                "completion_tokens": r[4],
                "cost_usd": r[5],
            }
            for r in rows
        ]
        lines = [
            f"{o['tenant']:<16} {o['model']:<16} requests={o['requests']} prompt={o['prompt_tokens']} "
            f"completion={o['completion_tokens']} cost=${o['cost_usd']:.6f}"
            for o in objs
        ]
        _out(args, objs, "\n".join(lines) or "no usage this period")
    return 0


def _fail(message: str) -> int:
    print(f"fleetserve admin: {message}", file=sys.stderr)
    return 1


def run_admin(args) -> int:
    return asyncio.run(_admin(args))


async def _admin(args) -> int:
    try:
        store = TenantStore(await open_accounts(_db_path(args)))
    except DatabaseError as e:
        return _fail(f"cannot open the gateway's database: {e}")
    try:
        return await _run(args, store)
    except (KeyError, ValueError, IntegrityError) as e:
        return _fail(str(e).strip("'\""))
    except DatabaseError as e:
        return _fail(str(e))
    finally:
        await store.close()
