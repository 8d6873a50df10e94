"""The embedded router's settings: the router's flags, with cache_aware's wider ties unless those flags set them."""

from __future__ import annotations

from services.gateway.config import GatewaySettings
from services.gateway.embedded_router import router_settings
from services.router.policy_set import parse_policy_options
from shared.settings import load_settings


def _options(*gateway_args: str) -> dict[str, dict[str, float]]:
    gateway = load_settings(GatewaySettings, ["--embedded-router", *gateway_args])
    return parse_policy_options(router_settings(gateway).policy_options)


def test_embedded_routers_widen_cache_aware_ties_by_default():
    """With no policy options given, cache_aware's ties span one request's worth (256 tokens, load score 1)."""
    assert _options("--router-flags=--policy cache_aware") == {
        "cache_aware": {"tie_tokens": 256.0, "tie_load": 1.0}
    }


def test_router_flags_win_over_the_embedded_defaults():
    """An option the router flags set keeps its value; the others stay as given, the missing default is added."""
    options = _options("--router-flags=--policy-options cache_aware.tie_tokens=0,load.kv_usage=2")
    assert options == {"cache_aware": {"tie_tokens": 0.0, "tie_load": 1.0}, "load": {"kv_usage": 2.0}}
