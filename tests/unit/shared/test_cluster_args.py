"""The flags a local fleet (shared.cluster) gives its engines: vLLM engines publish KV events only for kv_aware."""

from __future__ import annotations

import pytest

from shared.cluster import Cluster, ClusterConfig


@pytest.fixture(autouse=True)
def _no_router_env(monkeypatch):
    monkeypatch.delenv("FLEETSERVE_ROUTER_POLICY", raising=False)
    monkeypatch.delenv("FLEETSERVE_ROUTER_MODEL_POLICIES", raising=False)


def kv_args(tmp_path, backend: str = "vllm", router: tuple[str, ...] = ()) -> list[str]:
    return Cluster(
        ClusterConfig(tmp_path, backend=backend, extra_args={"router": list(router)})
    ).kv_event_args()


def test_vllm_engines_get_kv_events_when_a_router_policy_is_kv_aware(tmp_path):
    """--policy kv_aware or a model's kv_aware (flags in either form) turn --vllm-kv-events on for vLLM engines."""
    assert kv_args(tmp_path, router=("--policy", "kv_aware")) == ["--vllm-kv-events"]
    assert kv_args(tmp_path, router=("--policy=kv_aware",)) == ["--vllm-kv-events"]
    assert kv_args(tmp_path, router=("--model-policies", "a=least_load,b=kv_aware")) == ["--vllm-kv-events"]


def test_router_policies_from_the_environment_count(tmp_path, monkeypatch):
    """The launched routers read FLEETSERVE_ROUTER_* from the launcher's environment (routing.md's example)."""
    monkeypatch.setenv("FLEETSERVE_ROUTER_POLICY", "least_load")
    monkeypatch.setenv("FLEETSERVE_ROUTER_MODEL_POLICIES", "sim-1b=kv_aware")
    assert kv_args(tmp_path) == ["--vllm-kv-events"]


def test_no_kv_events_for_other_policies_or_the_sim(tmp_path):
    """Other policies leave the publisher off (the default); the sim always publishes, so it gets no flag."""
    assert kv_args(tmp_path) == []
    assert kv_args(tmp_path, router=("--policy", "cache_aware", "--model-policies", "a=session")) == []
    assert kv_args(tmp_path, backend="sim", router=("--policy", "kv_aware")) == []
