"""`fleetserve prometheus-config`: targets from the state file, labelled by service and replica; inline or in a
file_sd targets file; a clear error for a fleet without /metrics."""

from __future__ import annotations

import json

import yaml

from shared.cli.main import main
from shared.cli.prometheus_config import scrape_config, targets
from shared.cluster import write_state

STATE = {
    "gateway": "127.0.0.1:7000",
    "metrics_addresses": {
        "gateway": "127.0.0.1:9001",
        "router": "127.0.0.1:9002",
        "engine-1": "127.0.0.1:9003",
        "engine-12": "127.0.0.1:9004",
        "registry-2": "127.0.0.1:9005",
    },
}


def test_every_process_is_a_target_labelled_by_service_and_engines_by_replica():
    """Numbered processes belong to their service; only engines get a replica label (their replica id)."""
    got = {t["targets"][0]: t["labels"] for t in targets(STATE)}
    assert got == {
        "127.0.0.1:9001": {"service": "gateway"},
        "127.0.0.1:9002": {"service": "router"},
        "127.0.0.1:9003": {"service": "engine", "replica": "engine-1"},
        "127.0.0.1:9004": {"service": "engine", "replica": "engine-12"},
        "127.0.0.1:9005": {"service": "registry"},
    }


def test_inline_or_file_sd():
    """Without a targets file the targets are inline; with one, the job reads it (and nothing is inline)."""
    inline = scrape_config(STATE, scrape_interval="2s")["scrape_configs"][0]
    assert inline["scrape_interval"] == "2s" and len(inline["static_configs"]) == 5
    file_sd = scrape_config(STATE, targets_file="/x/t.json")["scrape_configs"][0]
    assert file_sd["file_sd_configs"] == [{"files": ["/x/t.json"]}] and "static_configs" not in file_sd


def test_autoscaled_engines_are_read_from_the_provisioners_targets_file():
    """Engines an autoscaler starts come and go: the job also reads the file its local provisioner keeps,
    inline targets or not."""
    state = {**STATE, "autoscaled_targets_file": "/fleet/run/autoscaled-targets.json"}
    inline = scrape_config(state)["scrape_configs"][0]
    assert inline["file_sd_configs"] == [{"files": ["/fleet/run/autoscaled-targets.json"]}]
    assert len(inline["static_configs"]) == 5
    both = scrape_config(state, targets_file="/x/t.json")["scrape_configs"][0]
    assert both["file_sd_configs"] == [{"files": ["/x/t.json", "/fleet/run/autoscaled-targets.json"]}]


def test_command_writes_config_and_targets_file(tmp_path):
    """The command reads cluster.json from --data-dir, writes the targets file and a config pointing at it."""
    write_state(STATE, tmp_path)
    out, tfile, rules = tmp_path / "prometheus.yml", tmp_path / "targets.json", tmp_path / "alerts.yml"
    argv = ["prometheus-config", "--data-dir", str(tmp_path), "--targets-file", str(tfile), "--out", str(out)]
    assert main([*argv, "--rules", str(rules)]) == 0
    config = yaml.safe_load(out.read_text())
    assert config["scrape_configs"][0]["file_sd_configs"][0]["files"] == [str(tfile)]
    assert config["rule_files"] == [str(rules)]
    assert json.loads(tfile.read_text()) == targets(STATE)


def test_fleet_without_metrics_endpoints_is_an_error(tmp_path, capsys):
    """A state file without metrics_addresses (a fleet started with --metrics-port -1) exits 1 saying so."""
    write_state({"gateway": "127.0.0.1:7000"}, tmp_path)
    assert main(["prometheus-config", "--data-dir", str(tmp_path)]) == 1
    assert "no /metrics endpoints" in capsys.readouterr().err
