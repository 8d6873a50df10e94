"""Gateway settings fail loudly on admission settings that cannot work."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from services.gateway.config import GatewaySettings


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"shed_batch_queue_depth": 8, "shed_standard_queue_depth": 4}, "batch must be shed first"),
        ({"safety_input_patterns": ["(unclosed"]}, "not a regular expression"),
        ({"model_prices": {"m": (-1.0, 0.0)}}, "prices must be >= 0"),
    ],
)
def test_bad_admission_settings_are_refused(fields, message):
    """Standard shed before batch, a pattern that does not compile, negative prices: each a clear error."""
    with pytest.raises(ValidationError, match=message):
        GatewaySettings(**fields)


def test_admission_settings_from_env_json(monkeypatch):
    """Prices, context lengths and degradation targets come as JSON in FLEETSERVE_GATEWAY_* variables."""
    monkeypatch.setenv("FLEETSERVE_GATEWAY_MODEL_PRICES", '{"sim-1b": [0.1, 0.4]}')
    monkeypatch.setenv("FLEETSERVE_GATEWAY_DEGRADE_MODELS", '{"big": "small"}')
    s = GatewaySettings()
    assert s.model_prices == {"sim-1b": (0.1, 0.4)} and s.degrade_models == {"big": "small"}
