"""RouterSettings: per-model hedge delays parsed, and malformed routing tables refused at start naming the field."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from services.router.config import RouterSettings


def test_hedge_delays_parse_into_model_seconds_pairs():
    """'model=seconds,...' (spaces and empty entries tolerated) gives one (model, seconds) pair per model."""
    s = RouterSettings(hedge_delays=" sim-1b=0.25, ,sim-8b=0 ")
    assert s.hedge_delay_by_model() == (("sim-1b", 0.25), ("sim-8b", 0.0))
    assert RouterSettings().hedge_delay_by_model() == ()


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("sim-1b", "expected 'key=value'"),
        ("=0.5", "expected 'key=value'"),
        ("sim-1b=", "expected 'key=value'"),
        ("sim-1b=soon", "must be a number"),
        ("sim-1b=-1", "must be >= 0"),
    ],
)
def test_malformed_hedge_delays_fail_at_start_naming_the_field(text, why):
    """A malformed --hedge-delays entry is refused when the settings load, with the field and the reason."""
    with pytest.raises(ValidationError) as err:
        RouterSettings(hedge_delays=text)
    assert "hedge_delays" in str(err.value) and why in str(err.value)


def test_malformed_model_policies_and_aliases_fail_at_start():
    """An unknown policy for a model, or an alias without both pools, is refused when the settings load."""
    with pytest.raises(ValidationError, match="unknown policy 'nope'"):
        RouterSettings(model_policies="sim-1b=nope")
    with pytest.raises(ValidationError, match="alias=small\\|large"):
        RouterSettings(model_aliases="auto=only-one")


def test_a_router_bound_to_every_interface_registers_an_address_others_can_dial():
    """0.0.0.0 is no address to dial: a router bound there registers --advertise-host (the pod IP on Kubernetes)
    or, without it, this machine's hostname; bound to one interface, that one."""
    import socket

    assert RouterSettings(host="127.0.0.1").advertised_address(7003) == "127.0.0.1:7003"
    assert (
        RouterSettings(host="0.0.0.0", advertise_host="10.1.2.3").advertised_address(7003) == "10.1.2.3:7003"
    )
    assert RouterSettings(host="0.0.0.0").advertised_address(7003) == f"{socket.gethostname()}:7003"
