"""The common code library of fleetserve: settings, errors, deadlines, telemetry, servers, channels."""
