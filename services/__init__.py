"""Services of the fleetserve mesh, one package each."""
