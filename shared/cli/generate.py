"""`fleetserve generate`: stream tokens from the gateway to stdout as they arrive (through fleetserve.client)."""

from __future__ import annotations

import json
import os
import sys

from fleetserve.common.v1 import common_pb2

from fleetserve.client import Client, ErrorDetails, FleetServeError, Stream
from fleetserve.client.messages import FINISH_REASONS
from shared.cluster import read_state
from shared.tls import Tls


def _target(args) -> tuple[str, str, Tls | None]:
    gateway, key = args.gateway, args.api_key or os.environ.get("FLEETSERVE_API_KEY")
    state = None
    if not gateway or not key:
        state = read_state()
        gateway, key = gateway or state["gateway"], key or state["api_key"]
    return gateway, key, Tls.for_tools(state)


def parse_messages(values: list[str]) -> list[common_pb2.ChatMessage]:
    """ChatMessages from "role:content" strings; ValueError naming the first without a role."""
    out = []
    for v in values:
        role, sep, content = v.partition(":")
        if not sep or not role.strip():
            raise ValueError(f"--message {v!r}: expected ROLE:CONTENT, e.g. 'user:hello'")
        out.append(common_pb2.ChatMessage(role=role.strip(), content=content))
    return out


def _generate(args) -> int:
    messages = getattr(args, "message", None) or []
    if bool(args.prompt) == bool(messages):
        print("error: give a prompt or --message ROLE:CONTENT (not both)", file=sys.stderr)
        return 2
    try:
        chat = parse_messages(messages)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    gateway, key, tls = _target(args)
    fields = {
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "seed": args.seed,
        "feature": args.feature or None,
    }
    out = sys.stdout
    with Client(
        gateway,
        key,
        model=args.model,
        timeout_s=args.timeout,
        credentials=tls.channel_credentials() if tls is not None else None,
        options=tls.channel_options(gateway) if tls is not None else (),
    ) as client:
        stream = client.chat(chat, **fields) if chat else client.generate(args.prompt, **fields)
        try:
            with stream:
                for c in stream:
                    if args.json:
                        out.write(json.dumps(_chunk_json(c, stream)) + "\n")
                    else:
                        out.write(c.text)
                    out.flush()
        except FleetServeError as e:
            if not args.json:
                out.write("\n")
            _print_error(e.details, args.json)
            return 1
    if not args.json:
        out.write("\n")
    return 0


def _chunk_json(c, stream: Stream) -> dict:
    obj = {"text": c.text}
    if c.HasField("served_by"):
        obj["served_by"] = {"model": c.served_by.model, "replica_id": c.served_by.replica_id}
    if c.finish_reason:
        obj["finish_reason"] = FINISH_REASONS.get(c.finish_reason, str(c.finish_reason))
        obj["usage"] = {
            "prompt_tokens": c.usage.prompt_tokens,
            "completion_tokens": c.usage.completion_tokens,
            "cached_tokens": c.usage.cached_tokens,
        }
        obj["ttft_ms"] = round(stream.ttft_s * 1000, 3) if stream.ttft_s is not None else None
        obj["request_id"] = stream.request_id
    return obj


def _print_error(d: ErrorDetails, as_json: bool) -> None:
    if as_json:
        msg = {"error": d.code.name, "reason": d.reason, "message": d.message}
        if d.retry_after_s is not None:
            msg["retry_after_s"] = d.retry_after_s
        if d.field_violations:
            msg["field_violations"] = [{"field": f, "description": s} for f, s in d.field_violations]
        sys.stdout.write(json.dumps(msg) + "\n")
        return
    hint = (
        f"; retry after {d.retry_after_s:g}s" if d.retry_after_s is not None else "; do not retry unchanged"
    )
    fields = "".join(f"\n  {f}: {s}" for f, s in d.field_violations)
    print(f"error: {d.code.name} {d.reason or ''}: {d.message}{hint}{fields}", file=sys.stderr)


def run_generate(args) -> int:
    try:
        return _generate(args)
    except KeyboardInterrupt:
        return 130
