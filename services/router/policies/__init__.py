"""Routing policies behind one small interface, chosen by name (`--policy least_load`)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from services.router.membership import ReplicaInfo


class Policy(ABC):
    """Picks a replica for each request. The router calls select() once per attempt and on_complete() once
    when that attempt ends (however it ends), so a policy may keep its own in-flight accounting."""

    name: str = ""

    @abstractmethod
    def select(self, candidates: Sequence[ReplicaInfo], request: Any) -> ReplicaInfo:
        """One of candidates (never empty: the router raises NoHealthyReplica itself) for request (the
        router's GenerateRequest, for policies that route on tenant, session or prompt)."""

    def on_complete(self, replica_id: str) -> None:  # noqa: B027 - optional hook
        """An attempt that select() sent to replica_id ended."""

    def on_load_update(self, replica: ReplicaInfo) -> None:  # noqa: B027 - optional hook
        """The registry reported new state or load for replica (also called when it joins)."""

    def remove(self, replica_id: str) -> None:  # noqa: B027 - optional hook
        """replica_id left the fleet; forget what is kept about it."""


_REGISTRY: dict[str, Callable[..., Policy]] = {}


def register(name: str) -> Callable[[type[Policy]], type[Policy]]:
    """Class decorator: make a policy available under name."""

    def deco(cls: type[Policy]) -> type[Policy]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def available() -> list[str]:
    """Names of the registered policies."""
    return sorted(_REGISTRY)


def create(name: str, **kwargs: Any) -> Policy:
    """A new policy by name; ValueError naming the available ones otherwise."""
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown routing policy {name!r}; available: {', '.join(available())}") from None
    return factory(**kwargs)


# Built-in policies register themselves on import.
from services.router.policies import least_load  # noqa: E402, F401
