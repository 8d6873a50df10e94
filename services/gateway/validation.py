"""Checks a public GenerateRequest and turns it into the GenerationSpec every hop passes on."""

from __future__ import annotations

from fleetserve.common.v1 import common_pb2
from fleetserve.inference.v1 import inference_service_pb2 as pb

from shared.errors import InvalidArgument

ROLES = frozenset({"system", "user", "assistant"})
MAX_STOP_STRINGS = 8
_PRIORITIES = frozenset(v.number for v in common_pb2.Priority.DESCRIPTOR.values)


def to_spec(
    req: pb.GenerateRequest, *, default_max_tokens: int = 256, max_tokens_limit: int = 8192
) -> common_pb2.GenerationSpec:
    """The GenerationSpec for req, or InvalidArgument listing every field violation at once (so a client
    fixes its request in one round trip)."""
    violations: list[tuple[str, str]] = []
    if not req.model:
        violations.append(("model", "required: the name of a model (see ListModels)"))
    if not req.prompt and not req.messages:
        violations.append(("prompt", "required: set prompt or messages"))
    elif req.prompt and req.messages:
        violations.append(("messages", "set prompt or messages, not both"))
    for i, m in enumerate(req.messages):
        if m.role not in ROLES:
            violations.append(
                (f"messages[{i}].role", f"must be one of {', '.join(sorted(ROLES))}; got {m.role!r}")
            )
        if not m.content:
            violations.append((f"messages[{i}].content", "must not be empty"))
    if req.max_tokens > max_tokens_limit:
        violations.append(("max_tokens", f"must be at most {max_tokens_limit}; got {req.max_tokens}"))
    # Written as "not within" so that NaN, which fails every comparison, is rejected too.
    if not 0.0 <= req.temperature <= 2.0:
        violations.append(("temperature", f"must be in [0, 2]; got {req.temperature}"))
    if not 0.0 <= req.top_p <= 1.0:
        violations.append(("top_p", f"must be in [0, 1] (0 means 1); got {req.top_p}"))
    if len(req.stop) > MAX_STOP_STRINGS:
        violations.append(("stop", f"at most {MAX_STOP_STRINGS} stop strings; got {len(req.stop)}"))
    if req.priority not in _PRIORITIES:
        violations.append(("priority", f"unknown priority {req.priority}"))
    if violations:
        fields = ", ".join(f for f, _ in violations)
        raise InvalidArgument(f"invalid request: {fields}", field_violations=violations)

    sampling = common_pb2.SamplingParams(
        max_tokens=req.max_tokens or default_max_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        stop=req.stop,
        ignore_eos=req.ignore_eos,
    )
    if req.HasField("seed"):
        sampling.seed = req.seed
    return common_pb2.GenerationSpec(
        model=req.model, prompt=req.prompt, messages=req.messages, sampling=sampling
    )
