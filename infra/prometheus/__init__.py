"""Prometheus rules for the fleet: SLO recording rules and burn-rate alerts."""
