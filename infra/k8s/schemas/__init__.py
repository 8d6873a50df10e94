"""JSON schemas of the custom resources in infra/k8s (generated; see generate.py)."""
