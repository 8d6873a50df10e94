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


def test_a_secret_setting_is_refused_as_a_flag_and_read_from_the_environment(monkeypatch, capsys):
    """--bootstrap-api-key would sit in `ps` for every user to read: it exits 2 naming the variable to use;
    FLEETSERVE_GATEWAY_BOOTSTRAP_API_KEY sets it."""
    from services.gateway.config import GatewaySettings

    for argv in (["--bootstrap-api-key", "fsk-secret"], ["--bootstrap-api-key=fsk-secret"]):
        with pytest.raises(SystemExit) as exc:
            load_settings(GatewaySettings, argv)
        assert exc.value.code == 2
        assert "FLEETSERVE_GATEWAY_BOOTSTRAP_API_KEY" in capsys.readouterr().err
    monkeypatch.setenv("FLEETSERVE_GATEWAY_BOOTSTRAP_API_KEY", "fsk-from-env")
    assert load_settings(GatewaySettings, []).bootstrap_api_key == "fsk-from-env"


def test_tls_flags_go_together():
    """A certificate needs its key, and mTLS (a CA) needs the service's own certificate."""
    from services.router.config import RouterSettings

    for argv in (["--tls-cert", "c.pem"], ["--tls-key", "k.pem"], ["--tls-ca", "ca.pem"]):
        with pytest.raises(SystemExit):
            load_settings(RouterSettings, argv)
    s = load_settings(RouterSettings, ["--tls-cert", "c.pem", "--tls-key", "k.pem", "--tls-ca", "ca.pem"])
    assert (s.tls_cert, s.tls_key, s.tls_ca) == ("c.pem", "k.pem", "ca.pem")
