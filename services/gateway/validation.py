"""Checks a public GenerateRequest and turns it into the GenerationSpec every hop passes on, and counts the
prompt's tokens with the fleet's tokenizer where the context length or a token limit needs them."""

from __future__ import annotations

import asyncio
import functools
import re

from fleetserve.common.v1 import common_pb2
from fleetserve.inference.v1 import inference_service_pb2 as pb

from shared import tokenizer
from shared.errors import InvalidArgument

ROLES = frozenset({"system", "user", "assistant"})
MAX_STOP_STRINGS = 8
_PRIORITIES = frozenset(v.number for v in common_pb2.Priority.DESCRIPTOR.values)
# The request-type tag becomes a label of cost and quality reports: short, and safe in any log or URL.
FEATURE = re.compile(r"^[A-Za-z0-9._:/-]{1,64}$")
# Prompts longer than this are tokenized in a thread (milliseconds of work must not stall other streams).
_COUNT_INLINE_BYTES = 2 * 1024


def count_prompt_tokens(spec: common_pb2.GenerationSpec) -> int:
    """Prompt tokens of spec as the engine counts them (BOS included; chats rendered with the template)."""
    return len(tokenizer.load().encode_spec(spec))


# What the engine's --model-version accepts.
MODEL_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")


def to_spec(
    req: pb.GenerateRequest, *, default_max_tokens: int = 256, max_tokens_limit: int = 8192
) -> common_pb2.GenerationSpec:
    """The GenerationSpec for req, or InvalidArgument listing every field violation at once (so a client
    fixes its request in one round trip). The prompt's length in tokens is checked by check_prompt_tokens."""
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
    if req.feature and not FEATURE.match(req.feature):
        violations.append(("feature", "at most 64 characters of letters, digits and ._:/-"))
    if req.model_version and not MODEL_VERSION.match(req.model_version):
        violations.append(
            ("model_version", "a version name: letters, digits, '.', '_', '+', '-' (at most 64)")
        )

    max_tokens = req.max_tokens or default_max_tokens
    if len(req.resume_token_ids) >= max_tokens:
        # max_tokens bounds the whole generation, resumed tokens included: nothing would be left to generate.
        violations.append(
            (
                "resume_token_ids",
                f"{len(req.resume_token_ids)} ids leave no room within max_tokens {max_tokens}",
            )
        )
    if violations:
        fields = ", ".join(f for f, _ in violations)
        raise InvalidArgument(f"invalid request: {fields}", field_violations=violations)
    return _spec(req, max_tokens)


def _spec(req: pb.GenerateRequest, max_tokens: int) -> common_pb2.GenerationSpec:
    """req's GenerationSpec. Filled in place, and repeated fields copied only when set: building it from
    keyword arguments (empty lists included) took 3x as long, on every request's path to its first token."""
    spec = common_pb2.GenerationSpec(model=req.model, prompt=req.prompt, model_version=req.model_version)
    sampling = spec.sampling
    sampling.max_tokens = max_tokens
    sampling.temperature = req.temperature
    sampling.top_p = req.top_p
    sampling.ignore_eos = req.ignore_eos
    if req.stop:
        sampling.stop.extend(req.stop)
    if req.HasField("seed"):
        sampling.seed = req.seed
    if req.messages:
        spec.messages.extend(req.messages)
    if req.resume_token_ids:
        spec.resume_token_ids.extend(req.resume_token_ids)
    return spec


def prompt_text(spec: common_pb2.GenerationSpec) -> str:
    """The text the engine tokenizes: the prompt, or the chat rendered with the template."""
    return tokenizer.FleetTokenizer.render_chat(spec.messages) if spec.messages else spec.prompt


@functools.cache
def max_token_bytes() -> int:
    """Bytes in the longest token of the vocabulary (special tokens included): a prompt of n bytes has at
    least n / max_token_bytes() tokens."""
    return max(len(t.encode()) for t in tokenizer.load().raw.get_vocab(with_added_tokens=True))


async def check_prompt_tokens(
    spec: common_pb2.GenerationSpec, context_length: int | None, *, count: bool
) -> int:
    """The prompt's token count when count is set or the context needs it (else 0), or InvalidArgument when
    the prompt leaves no room for output in context_length. Tokenizing costs about 3 us per token, so a prompt
    whose byte length alone decides is not tokenized (a token is at least one byte, and at most
    max_token_bytes()), and a long one is tokenized off the event loop."""
    text = prompt_text(spec)
    n_bytes = len(text.encode())
    where = "messages" if spec.messages else "prompt"
    if context_length is not None and n_bytes // max_token_bytes() >= context_length:
        raise _too_long(where, f"at least {n_bytes // max_token_bytes()}", context_length)
    # +1: the BOS token a plain prompt gets (a rendered chat already starts with it).
    must_check = context_length is not None and n_bytes + 1 >= context_length
    if not (count or must_check):
        return 0
    if n_bytes > _COUNT_INLINE_BYTES:
        tokens = await asyncio.to_thread(count_prompt_tokens, spec)
    else:
        tokens = count_prompt_tokens(spec)
    if must_check and tokens >= context_length:  # type: ignore[operator]
        raise _too_long(where, str(tokens), context_length)  # type: ignore[arg-type]
    return tokens


def _too_long(where: str, tokens: str, context_length: int) -> InvalidArgument:
    # As the engines do (vLLM and the sim), max_tokens past the context is not an error: generation stops at
    # the context's end (finish reason length). A prompt that leaves no room for output is.
    return InvalidArgument(
        f"invalid request: {where}",
        field_violations=[
            (
                where,
                f"{tokens} tokens; the model's context is {context_length} tokens "
                f"(at most {context_length - 1}, leaving room for output)",
            )
        ],
    )
