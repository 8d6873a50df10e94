"""Model routing: a model alias (e.g. `auto`) resolved per request to a small or a large model by a difficulty
rule (prompt length, requested output, keywords) or a pluggable classifier, with the decision recorded."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from services.router.policies import RouteRequest

# A classifier says whether a request is hard (True -> the large model) and why.
Classifier = Callable[[RouteRequest], "tuple[bool, str]"]

DEFAULT_KEYWORDS = (
    "prove",
    "step by step",
    "analyze",
    "analyse",
    "derive",
    "explain why",
    "debug",
    "refactor",
    "optimize",
    "theorem",
)


@dataclass(frozen=True)
class AliasRoute:
    """alias -> the small model for easy requests, the large one for hard ones."""

    alias: str
    small: str
    large: str


@dataclass(frozen=True)
class ModelDecision:
    """How an alias was resolved: which model, which pool and why (a span attribute and a log field)."""

    alias: str
    model: str
    pool: str
    reason: str

    def attributes(self) -> dict[str, str]:
        return {
            "fleetserve.model_alias": self.alias,
            "fleetserve.model_pool": self.pool,
            "fleetserve.model_route_reason": self.reason,
        }


@dataclass(frozen=True)
class DifficultyRule:
    """Hard when the prompt is long, the requested output is long, or the text has a keyword of hard work."""

    max_small_prompt_tokens: int = 1024
    max_small_output_tokens: int = 512
    keywords: tuple[str, ...] = DEFAULT_KEYWORDS

    def __call__(self, request: RouteRequest) -> tuple[bool, str]:
        prompt = len(request.token_ids)
        if prompt > self.max_small_prompt_tokens:
            return True, f"prompt_tokens={prompt}>{self.max_small_prompt_tokens}"
        asked = request.spec.sampling.max_tokens
        if asked > self.max_small_output_tokens:
            return True, f"max_tokens={asked}>{self.max_small_output_tokens}"
        spec = request.spec
        text = (spec.prompt or " ".join(m.content for m in spec.messages if m.role == "user")).lower()
        for word in self.keywords:
            if word in text:
                return True, f"keyword={word!r}"
        return False, "short_and_simple"


def load_classifier(path: str) -> Classifier:
    """A classifier from "package.module:function" (a callable taking a RouteRequest, returning (hard, why))."""
    module, _, attr = path.partition(":")
    if not module or not attr:
        raise ValueError(f"classifier must be 'module:function', got {path!r}")
    fn = getattr(importlib.import_module(module), attr)
    if not callable(fn):
        raise ValueError(f"classifier {path!r} is not callable")
    return fn


def parse_aliases(text: str) -> dict[str, AliasRoute]:
    """ "auto=small-model|large-model,alias2=a|b" -> routes by alias; ValueError on a malformed entry."""
    routes: dict[str, AliasRoute] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        alias, eq, pools = item.partition("=")
        small, bar, large = pools.partition("|")
        if not eq or not bar or not alias.strip() or not small.strip() or not large.strip():
            raise ValueError(f"model alias must be 'alias=small|large', got {item!r}")
        routes[alias.strip()] = AliasRoute(alias.strip(), small.strip(), large.strip())
    return routes


class ModelRouter:
    """Resolves aliases; a request naming a real model passes through untouched."""

    def __init__(self, aliases: dict[str, AliasRoute], classifier: Classifier | None = None) -> None:
        self.aliases = aliases
        self.classifier: Classifier = classifier or DifficultyRule()

    def resolve(self, request: RouteRequest) -> ModelDecision | None:
        """The decision for an alias (None when request.model is no alias)."""
        route = self.aliases.get(request.model)
        if route is None:
            return None
        hard, why = self.classifier(request)
        model, pool = (route.large, "large") if hard else (route.small, "small")
        return ModelDecision(route.alias, model, pool, why)
