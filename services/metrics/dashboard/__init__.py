"""The metrics service's live dashboard: a page with charts (uPlot, vendored) and the JSON behind it."""
