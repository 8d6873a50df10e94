"""The fleetserve command-line interface."""
