"""Registry settings: flags map onto fields, and a heartbeat interval that does not fit the lease fails loudly."""

from __future__ import annotations

import pytest

from services.registry.config import RegistrySettings
from shared.settings import load_settings


def test_flags_set_lease_terms():
    """--lease-ttl-s and --heartbeat-interval-s set the lease terms; the reaper runs four times per lease."""
    s = load_settings(
        RegistrySettings, ["--lease-ttl-s", "2", "--heartbeat-interval-s", "0.5", "--db-path", "x.db"]
    )
    assert (s.lease_ttl_s, s.heartbeat_interval_s, s.db_path) == (2.0, 0.5, "x.db")
    assert s.reaper_interval_s == 0.5


@pytest.mark.parametrize("interval", ["3", "4"])
def test_heartbeat_interval_not_below_ttl_exits_2(interval, capsys):
    """A heartbeat interval >= the lease TTL is refused at start with exit 2 and an explanation."""
    with pytest.raises(SystemExit) as exc:
        load_settings(RegistrySettings, ["--lease-ttl-s", "3", "--heartbeat-interval-s", interval])
    assert exc.value.code == 2
    assert "heartbeat_interval_s" in capsys.readouterr().err
