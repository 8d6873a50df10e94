"""Service settings come from flags over FLEETSERVE_<SERVICE>_* env vars over defaults, and bad values fail loudly."""

from __future__ import annotations

import pytest
from pydantic import Field

from shared.settings import ServiceSettings, load_settings, service_config


class DemoSettings(ServiceSettings):
    """A demo service."""

    model_config = service_config("demo")
    speed_factor: float = Field(1.0, gt=0, description="How fast.")


def test_env_then_flags(monkeypatch):
    """An env var sets a field; a flag overrides it."""
    monkeypatch.setenv("FLEETSERVE_DEMO_SPEED_FACTOR", "3")
    monkeypatch.setenv("FLEETSERVE_DEMO_PORT", "7001")
    s = load_settings(DemoSettings, ["--speed-factor", "5"])
    assert s.speed_factor == 5
    assert s.port == 7001


def test_bad_value_exits_2_naming_the_field(capsys):
    """A value out of range stops the service with exit 2 and names the field."""
    with pytest.raises(SystemExit) as exc:
        load_settings(DemoSettings, ["--speed-factor", "-1"])
    assert exc.value.code == 2
    assert "speed_factor" in capsys.readouterr().err


def test_settings_are_frozen():
    """Settings cannot be changed after start."""
    s = load_settings(DemoSettings, [])
    with pytest.raises(Exception):  # noqa: B017 - pydantic raises ValidationError for frozen models
        s.port = 1
