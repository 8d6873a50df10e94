"""Checks a public GenerateRequest and turns it into the GenerationSpec every hop passes on, counting the
prompt's tokens with the fleet's tokenizer so that the context length (and token limits) can be enforced."""

from __future__ import annotations

from fleetserve.common.v1 import common_pb2
from fleetserve.inference.v1 import inference_service_pb2 as pb

from shared import tokenizer
from shared.errors import InvalidArgument

ROLES = frozenset({"system", "user", "assistant"})
MAX_STOP_STRINGS = 8
_PRIORITIES = frozenset(v.number for v in common_pb2.Priority.DESCRIPTOR.values)


def count_prompt_tokens(spec: common_pb2.GenerationSpec) -> int:
    """Prompt tokens of spec as the engine counts them (BOS included; chats rendered with the template)."""
    tok = tokenizer.load()
    return len(tok.encode_chat(spec.messages) if spec.messages else tok.encode(spec.prompt))


def to_spec(
    req: pb.GenerateRequest, *, default_max_tokens: int = 256, max_tokens_limit: int = 8192
) -> common_pb2.GenerationSpec:
    """The GenerationSpec for req, or InvalidArgument listing every field violation at once (so a client
    fixes its request in one round trip)."""
    return validate(req, default_max_tokens=default_max_tokens, max_tokens_limit=max_tokens_limit)[0]


def validate(
    req: pb.GenerateRequest,
    *,
    default_max_tokens: int = 256,
    max_tokens_limit: int = 8192,
    context_length: int | None = None,
) -> tuple[common_pb2.GenerationSpec, int]:
    """(spec, prompt tokens) for req, or InvalidArgument with every field violation. With context_length,
    the prompt is tokenized and must leave room for output in it; otherwise the token count is 0."""
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
    for i, s in enumerate(req.stop):
        if not s:
            violations.append((f"stop[{i}]", "must not be empty"))
    if req.priority not in _PRIORITIES:
        violations.append(("priority", f"unknown priority {req.priority}"))

    max_tokens = req.max_tokens or default_max_tokens
    sampling = common_pb2.SamplingParams(
        max_tokens=max_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        stop=req.stop,
        ignore_eos=req.ignore_eos,
    )
    if req.HasField("seed"):
        sampling.seed = req.seed
    spec = common_pb2.GenerationSpec(
        model=req.model, prompt=req.prompt, messages=req.messages, sampling=sampling
    )
    prompt_tokens = 0
    has_prompt = bool(req.prompt) != bool(req.messages)
    if context_length is not None and has_prompt:
        prompt_tokens = count_prompt_tokens(spec)
        where = "messages" if req.messages else "prompt"
        # As the engines do (vLLM and the sim), max_tokens past the context is not an error: generation
        # stops at the context's end (finish reason length). A prompt that leaves no room for output is.
        if prompt_tokens >= context_length:
            violations.append(
                (
                    where,
                    f"{prompt_tokens} tokens; the model's context is {context_length} tokens "
                    f"(at most {context_length - 1}, leaving room for output)",
                )
            )
    if violations:
        fields = ", ".join(f for f, _ in violations)
        raise InvalidArgument(f"invalid request: {fields}", field_violations=violations)
    return spec, prompt_tokens
