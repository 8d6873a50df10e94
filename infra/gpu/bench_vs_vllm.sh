#!/usr/bin/env bash
# The GPU comparison of issue 12 (mesh against `vllm serve` with 1, 4 and 8 API processes) in phases that each fit
# one command of a time-limited GPU lease; the servers stay up between phases (loadtest/gpu_vs_vllm.py).
# Usage, repository root, on the GPU machine (staged with infra/gpu/stage.sh; chunks copied to STAGE):
#   infra/gpu/bench_vs_vllm.sh first   # unpack, model, start every server, bench until FIRST_END s after launch
#   infra/gpu/bench_vs_vllm.sh more    # bench for BUDGET s more (points not yet recorded)
#   infra/gpu/bench_vs_vllm.sh last    # bench for BUDGET s more, then the report, then stop every server
# Environment (defaults in brackets): STAGE [/tmp/stage], SITE [/tmp/site], DIR [/tmp/gvv], MODEL [/tmp/model],
# OUT [DIR/out]: records, ps listing and the report are copied there after every phase;
# START_ARGS [--api-counts 1,4,8 --mesh-embedded --no-mesh], SERVERS [every server started],
# JUDGE [mesh-embedded], CONC [1,32,128,256], ONLY [vllm-api1=1,32,128] and PROMPTS [1=16,32=256] (set empty for
# none and the defaults of gpu_vs_vllm), REPS [40],
# FIRST_END [540], BUDGET [420].
set -uo pipefail
phase=${1:?usage: infra/gpu/bench_vs_vllm.sh first|more|last}
STAGE=${STAGE:-/tmp/stage} SITE=${SITE:-/tmp/site} DIR=${DIR:-/tmp/gvv} MODEL=${MODEL:-/tmp/model}
OUT=${OUT:-$DIR/out}
export PYTHONPATH=$SITE:$PWD:$PWD/gen PATH=$SITE/bin:$PATH VLLM_USE_FLASHINFER_SAMPLER=0
gvv() { python3 -m loadtest.gpu_vs_vllm "$@"; }
save() {
  mkdir -p "$OUT"
  ps -eo pid,ppid,pcpu,rss,comm,args > "$DIR/ps.txt"
  cp -f "$DIR/records.json" "$DIR/state.json" "$DIR/ps.txt" "$OUT/" 2>/dev/null
}
case $phase in
  first)
    if [ ! -d "$SITE/vllm" ]; then infra/gpu/unpack.sh "$STAGE" "$SITE" || exit 3; fi
    [ -d "$MODEL" ] || python3 -m infra.models.generate "$MODEL" --size 1b || exit 4
    if [ ! -f "$DIR/state.json" ]; then
      # shellcheck disable=SC2086  # START_ARGS is a list of flags
      gvv start --dir "$DIR" --model-dir "$MODEL" ${START_ARGS:---api-counts 1,4,8 --mesh-embedded --no-mesh} || exit 5
    fi
    budget=$(( ${FIRST_END:-540} - SECONDS ))
    [ "$budget" -lt 60 ] && budget=60 ;;
  more | last) budget=${BUDGET:-420} ;;
  *) echo "unknown phase $phase" >&2; exit 2 ;;
esac
# Every server start started, unless SERVERS names some.
servers=${SERVERS:-$(python3 -c 'import json, sys; print(",".join(json.load(open(sys.argv[1]))["servers"]))' "$DIR/state.json")}
gvv bench --dir "$DIR" --model-dir "$MODEL" --out "$DIR/records.json" \
  --servers "$servers" --concurrency "${CONC:-1,32,128,256}" \
  --only "${ONLY-vllm-api1=1,32,128}" --prompts "${PROMPTS-1=16,32=256}" --reps "${REPS:-40}" --budget-s "$budget" \
  | grep '^gpu_vs_vllm:'
rc=${PIPESTATUS[0]}
save
if [ "$phase" = last ]; then
  gvv report --records "$DIR/records.json" --ps "$DIR/ps.txt" --mesh-logs "$DIR" --server "${JUDGE:-mesh-embedded}" \
    --out "$OUT/gpu_vs_vllm_serve.json" > "$OUT/report.txt" 2>&1
  head -40 "$OUT/report.txt"
  gvv stop --dir "$DIR"
fi
echo "bench_vs_vllm $phase: done at ${SECONDS}s (bench exit status $rc)"
exit "$rc"
