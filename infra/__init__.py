"""Tooling for running a fleet."""
