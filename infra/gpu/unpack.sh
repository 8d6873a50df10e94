#!/usr/bin/env bash
# On the GPU machine: unpack the chunks infra/gpu/stage.sh made into /tmp/site (or $2) and check the result.
# Usage: infra/gpu/unpack.sh DIR_WITH_vsite.part* [SITE_DIR]
# Then: export PYTHONPATH=SITE_DIR:$PWD:$PWD/gen PATH=SITE_DIR/bin:$PATH VLLM_USE_FLASHINFER_SAMPLER=0
set -euo pipefail
src=${1:?usage: infra/gpu/unpack.sh DIR [SITE_DIR]}
site=${2:-/tmp/site}
mkdir -p "$site"
cat "$src"/vsite.part* | xz -d -T0 | tar -x -C "$site"
chmod +x "$site"/bin/* 2>/dev/null || true
PYTHONPATH="$site" python3 -c 'import vllm, grpc, structlog; print("vllm", vllm.__version__, "grpc", grpc.__version__)'
