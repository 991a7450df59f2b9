#!/usr/bin/env bash
# One device call for issue 15's end-to-end figures (~9 minutes on the H200): install, the gather
# and prefetch tests on the GPU, then bench_e2e at 128k with synthetic selection overlap 0.8 (the
# plan's own batch, beside HF eager in the same run), 0.7 and 0.9 (for the latency model's fit),
# the batch-11 plan of the earlier runs at 0.8 (benchmarks/plans-b11, when present), 32k sparse at
# 0.8, the 128k dense and batch-1 plans (no regression), and a profile of the 128k step
# (profile_step.py, with the kernels of the step's first gathers listed). Each run's JSON line goes to
# $OUT/bench_e2e.jsonl and its table to $OUT/e2e.log.
#   TARGET=h200 bash benchmarks/compile_bench_plans.sh e2e     # here, first (needs PuLP)
#   bash benchmarks/overlap_e2e.sh [128k|others|all]            # there; carry benchmarks/plans*
# 128k: the 128k overlap runs and the profile (~7 min); others: 32k sparse, 128k dense and batch 1.
set -uo pipefail
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
python3 -m pytest -q -p no:cacheprovider --tb=short tests/runtime/test_prefetch.py \
  tests/runtime/kernels/test_elastic_load.py 2>&1 | tail -3 | tee "$OUT/tests.log"
e2e() {     # e2e LABEL ARGS...: one bench_e2e run, timed
  local label="$1"; shift; local t0=$SECONDS
  echo "== $label" >>"$OUT/e2e.log"
  python3 benchmarks/bench_e2e.py --steps 10 --out "$OUT" "$@" 2>&1 | grep -v "^{" >>"$OUT/e2e.log"
  echo "$label: $((SECONDS - t0)) s"
}
part="${1:-all}"
if [[ $part == 128k || $part == all ]]; then
e2e "128k sparse+hf @0.8" --contexts 130560 --methods sparse,hf --overlap 0.8
e2e "128k sparse @0.7" --contexts 130560 --methods sparse --overlap 0.7
e2e "128k sparse @0.9" --contexts 130560 --methods sparse --overlap 0.9
[[ -d benchmarks/plans-b11 ]] && e2e "128k batch-11 plan @0.8" --plans benchmarks/plans-b11 --contexts 130560 --methods sparse --overlap 0.8
t0=$SECONDS
python3 benchmarks/profile_step.py --overlap 0.8 --list-kernels 2.4,4.6 --out /tmp/profile >"$OUT/profile.log" 2>&1
cp /tmp/profile/profile-*.json "$OUT/" 2>/dev/null; echo "profile: $((SECONDS - t0)) s"
fi
if [[ $part == others || $part == all ]]; then
e2e "32k sparse @0.8" --contexts 32768 --methods sparse,hf --overlap 0.8
e2e "128k dense, batch 1" --contexts 130560 --methods dense,sparse1
fi
grep -A12 "^| context | method | batch" "$OUT/e2e.log" | grep "^| [0-9]" | sort -u
