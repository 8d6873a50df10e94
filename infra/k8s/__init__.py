"""Kubernetes manifests (kustomize base and overlays) and their renderer."""
