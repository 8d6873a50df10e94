#!/usr/bin/env bash
# Stages what a GPU machine without network needs to run the vllm backend, `vllm serve` and `vllm bench serve`
# (vLLM 0.25.0 + fleetserve's runtime packages the GPU image lacks) as xz chunks that each fit one transfer.
# The GPU image already has torch 2.11.0+cu130, which vLLM 0.25.0 pins, so torch is not staged.
# Usage (on a machine with the package registries, repository root):
#   infra/gpu/stage.sh DIR [CHUNK_BYTES]     # DIR ignored by git, e.g. .gpu; -> DIR/vsite.part00, part01, ...
#   XZ_LEVEL (default 6): 2 compresses ~4x faster on a busy box for ~10% more bytes.
# On the GPU machine (see infra/gpu/README.md):
#   mkdir -p /tmp/site && cat DIR/vsite.part* | xz -d -T8 | tar -x -C /tmp/site
set -euo pipefail
out=${1:?usage: infra/gpu/stage.sh DIR [CHUNK_BYTES]}
# 54 MB: a chunk plus the repository's tree (~10 MB of tracked files in Dec 2026, and gen/) fit one 64 MiB
# transfer; lower it as the tree grows (57 MB stopped fitting at ~9.7 MB of tree).
chunk=${2:-54000000}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_31_x86_64 -d "$work/whl" \
  -r "$here/requirements-vllm.txt" -r "$here/requirements-runtime.txt"
mkdir -p "$work/site"
for w in "$work"/whl/*.whl; do python3 -m zipfile -e "$w" "$work/site"; done
# py-spy's wheel carries its binary as a data script: put it where PATH=/tmp/site/bin finds it.
mkdir -p "$work/site/bin"
find "$work/site" -path '*.data/scripts/py-spy' -exec mv {} "$work/site/bin/py-spy" \; 2>/dev/null || true
chmod +x "$work/site/bin/"* 2>/dev/null || true
# Not needed on Hopper for dense models, and large: FlashAttention 2 (FA3 is used), the MoE kernels, the Rust
# front end, and deep_gemm builds for other Pythons.
rm -f "$work"/site/vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so "$work"/site/vllm/vllm-rs \
  "$work"/site/vllm/_moe_C_stable_libtorch.abi3.so
rm -f "$work"/site/vllm/third_party/deep_gemm/_C.cpython-3{10,11,13,14}-*.so
# xgrammar's static library (62 MB) is for linking against it, not for importing it.
rm -rf "$work"/site/xgrammar/lib
tar -cf - -C "$work/site" . | xz -T0 "-${XZ_LEVEL:-6}" > "$work/vsite.tar.xz"
rm -f "$out"/vsite.part*
split -b "$chunk" -d "$work/vsite.tar.xz" "$out/vsite.part"
ls -l "$out"/vsite.part*
