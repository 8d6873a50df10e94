"""Render infra/k8s kustomizations in Python: the subset of kustomize these manifests use (resources, namespace,
strategic-merge patches with `$patch: delete` and null, images), so `make test` renders and validates them on a
machine without kustomize. Hand-written because no kustomize is packaged for PyPI or Debian (Debian's
kubernetes-client bundles kustomize 2.0, which predates these features); tests/unit/infra/test_k8s.py checks
that the output equals `kubectl kustomize` wherever kubectl is installed. Anything else in a kustomization.yaml
is refused rather than ignored.

    python -m infra.k8s.render infra/k8s/overlays/dev     # YAML on stdout, like `kubectl kustomize`
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import yaml

SUPPORTED = {"apiVersion", "kind", "resources", "namespace", "patches", "images"}
# Kinds that live outside namespaces (the namespace transformer leaves them alone).
CLUSTER_SCOPED = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "ClusterIssuer",
}
# Strategic-merge keys of the lists these manifests patch (Kubernetes' patchMergeKey); other lists are replaced.
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "imagePullSecrets": "name",
    "ports": "containerPort",
}


class RenderError(ValueError):
    """A kustomization using something this renderer does not do, or a patch that matches nothing."""


def object_id(obj: dict) -> tuple[str, str, str]:
    """(apiVersion's group, kind, name): how patches find their object (kustomize ignores the version)."""
    group = obj.get("apiVersion", "").rpartition("/")[0]
    return group, obj.get("kind", ""), (obj.get("metadata") or {}).get("name", "")


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def merge(base: Any, patch: Any, field: str = "") -> Any:
    """Strategic merge of patch into base (a new value): maps merge key by key (null deletes the key), lists of
    maps with a merge key merge item by item, other lists and scalars are replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            if v is None:
                out.pop(k, None)
            elif k in out:
                out[k] = merge(out[k], v, k)
            else:
                out[k] = copy.deepcopy(v)
        return out
    key = MERGE_KEYS.get(field)
    if (
        isinstance(base, list)
        and isinstance(patch, list)
        and key
        and all(isinstance(i, dict) for i in base + patch)
    ):
        # As kustomize orders them: items only in the patch first (in patch order), then the base's, merged.
        patched = {item.get(key): item for item in patch}
        known = {b.get(key) for b in base}
        fresh = [copy.deepcopy(item) for item in patch if item.get(key) not in known]
        return fresh + [
            merge(b, patched[b.get(key)]) if b.get(key) in patched else copy.deepcopy(b) for b in base
        ]
    return copy.deepcopy(patch)


def _apply_patch(objects: list[dict], patch: dict, where: Path) -> list[dict]:
    target = object_id(patch)
    hits = [i for i, o in enumerate(objects) if object_id(o) == target]
    if len(hits) != 1:
        raise RenderError(f"{where}: patch for {target} matches {len(hits)} objects")
    (i,) = hits
    if patch.get("$patch") == "delete":
        return objects[:i] + objects[i + 1 :]
    objects = list(objects)
    objects[i] = merge(objects[i], patch)
    return objects


def _set_image(container: dict, images: list[dict]) -> None:
    image = container.get("image", "")
    name, tag = image, ""
    if ":" in image.rsplit("/", 1)[-1]:
        name, _, tag = image.rpartition(":")
    for rule in images:
        if rule["name"] == name:
            tag = rule.get("newTag", tag)
            container["image"] = rule.get("newName", name) + (f":{tag}" if tag else "")


def _pod_specs(obj: dict):
    spec = obj.get("spec") or {}
    template = spec.get("template") or {}
    if "spec" in template:
        yield template["spec"]


def render(directory: Path) -> list[dict]:
    """The objects the kustomization in `directory` produces, in resource order."""
    directory = Path(directory)
    kust = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kust) - SUPPORTED
    if unknown:
        raise RenderError(f"{directory}/kustomization.yaml: not supported here: {sorted(unknown)}")
    objects: list[dict] = []
    for res in kust.get("resources", []):
        path = directory / res
        objects += render(path) if path.is_dir() else _docs(path)
    for p in kust.get("patches", []):
        if set(p) != {"path"}:
            raise RenderError(f"{directory}: only file patches (path:) are supported, got {sorted(p)}")
        for patch in _docs(directory / p["path"]):
            objects = _apply_patch(objects, patch, directory / p["path"])
    for obj in objects:
        for pod in _pod_specs(obj):
            for c in pod.get("containers", []) + pod.get("initContainers", []):
                _set_image(c, kust.get("images", []))
    if "namespace" in kust:
        for obj in objects:
            if obj.get("kind") not in CLUSTER_SCOPED:
                obj.setdefault("metadata", {})["namespace"] = kust["namespace"]
    return objects


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    yaml.safe_dump_all(render(Path(args[0])), sys.stdout, sort_keys=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
