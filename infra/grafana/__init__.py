"""Grafana dashboards for the fleet."""
