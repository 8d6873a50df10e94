"""`fleetserve generate`: stream tokens from the gateway to stdout as they arrive."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time

import grpc
from fleetserve.common.v1 import common_pb2
from fleetserve.inference.v1 import inference_service_pb2 as pb
from fleetserve.inference.v1 import inference_service_pb2_grpc as pb_grpc

from shared.cluster import read_state
from shared.errors import details_of

_FINISH = {
    v.number: v.name.removeprefix("FINISH_REASON_").lower() for v in common_pb2.FinishReason.DESCRIPTOR.values
}


def _target(args) -> tuple[str, str]:
    gateway, key = args.gateway, args.api_key or os.environ.get("FLEETSERVE_API_KEY")
    if not gateway or not key:
        state = read_state()
        gateway, key = gateway or state["gateway"], key or state["api_key"]
    return gateway, key


def parse_messages(values: list[str]) -> list[common_pb2.ChatMessage]:
    """ChatMessages from "role:content" strings; ValueError naming the first without a role."""
    out = []
    for v in values:
        role, sep, content = v.partition(":")
        if not sep or not role.strip():
            raise ValueError(f"--message {v!r}: expected ROLE:CONTENT, e.g. 'user:hello'")
        out.append(common_pb2.ChatMessage(role=role.strip(), content=content))
    return out


async def _generate(args) -> int:
    messages = getattr(args, "message", None) or []
    if bool(args.prompt) == bool(messages):
        print("error: give a prompt or --message ROLE:CONTENT (not both)", file=sys.stderr)
        return 2
    try:
        chat = parse_messages(messages)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    gateway, key = _target(args)
    kind = pb.ChatRequest if chat else pb.GenerateRequest
    req = kind(
        model=args.model,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        feature=args.feature or "",
    )
    if chat:
        req.messages.extend(chat)
    else:
        req.prompt = args.prompt
    if args.seed is not None:
        req.seed = args.seed
    out = sys.stdout
    async with grpc.aio.insecure_channel(gateway) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        start = time.perf_counter()
        ttft_ms = None
        rpc = stub.Chat if chat else stub.Generate
        call = rpc(req, metadata=(("authorization", f"Bearer {key}"),), timeout=args.timeout)
        try:
            async for resp in call:
                c = resp.chunk
                if ttft_ms is None and (c.text or c.token_ids):
                    ttft_ms = (time.perf_counter() - start) * 1000
                if args.json:
                    obj = {"text": c.text}
                    if c.HasField("served_by"):
                        obj["served_by"] = {"model": c.served_by.model, "replica_id": c.served_by.replica_id}
                    if c.finish_reason:
                        obj["finish_reason"] = _FINISH.get(c.finish_reason, str(c.finish_reason))
                        obj["usage"] = {
                            "prompt_tokens": c.usage.prompt_tokens,
                            "completion_tokens": c.usage.completion_tokens,
                            "cached_tokens": c.usage.cached_tokens,
                        }
                        obj["ttft_ms"] = round(ttft_ms, 3) if ttft_ms is not None else None
                        obj["request_id"] = dict(await call.initial_metadata()).get("x-request-id", "")
                    out.write(json.dumps(obj) + "\n")
                else:
                    out.write(c.text)
                out.flush()
        except grpc.aio.AioRpcError as e:
            d = details_of(e)
            if not args.json:
                out.write("\n")
            msg = {"error": d.code.name, "reason": d.reason, "message": d.message}
            if d.retry_after_s is not None:
                msg["retry_after_s"] = d.retry_after_s
            if d.field_violations:
                msg["field_violations"] = [{"field": f, "description": s} for f, s in d.field_violations]
            if args.json:
                out.write(json.dumps(msg) + "\n")
            else:
                hint = (
                    f"; retry after {d.retry_after_s:g}s"
                    if d.retry_after_s is not None
                    else "; do not retry unchanged"
                )
                fields = "".join(f"\n  {f}: {s}" for f, s in d.field_violations)
                print(f"error: {d.code.name} {d.reason or ''}: {d.message}{hint}{fields}", file=sys.stderr)
            return 1
    if not args.json:
        out.write("\n")
    return 0


def run_generate(args) -> int:
    try:
        return asyncio.run(_generate(args))
    except KeyboardInterrupt:
        return 130
