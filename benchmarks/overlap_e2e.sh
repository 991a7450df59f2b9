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
# 128k: the 128k overlap runs and the profile (~7 min); others: 32k sparse, 128k dense and batch 1;
# fused: the fused-graph plans (benchmarks/plans) against the unfused ones (benchmarks/plans-unfused,
# compiled with --no-fuse or before FuseElementwise existed): the fusion's kernel and engine tests
# on the GPU first (carry .whl with the PuLP wheel: the engine tests compile plans), then 128k and
# 32k at 0.8, a profile of the fused 128k step, and bench_prefill on the fused plans;
# fused-rest: the fused plans' other rows: 128k dense and batch 1, 128k and 32k at 0.7 and 0.9;
# sweep: every plan once at 0.8 beside HF first (128k, 32k, then dense and batch 1), then the
# other overlaps, then the profile, so a call cut short at its limit still has the headline rows.
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
if [[ $part == fused-rest ]]; then
e2e "128k fused dense, batch 1" --contexts 130560 --methods dense,sparse1
for f in 0.7 0.9; do
  e2e "128k fused @$f" --contexts 130560 --methods sparse --overlap $f
  e2e "32k fused @$f" --contexts 32768 --methods sparse --overlap $f
done
fi
if [[ $part == fused ]]; then
if compgen -G ".whl/pulp-*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/pulp-*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
t0=$SECONDS
python3 -m pytest -q -p no:cacheprovider --tb=short tests/runtime/kernels/test_fused_elementwise.py \
  tests/passes/test_fuse_elementwise.py 2>&1 | tail -3 | tee -a "$OUT/tests.log"
python3 -m pytest -q -p no:cacheprovider --tb=short -m gpu tests/runtime/test_engine.py tests/runtime/test_prefill.py \
  tests/runtime/test_attention.py 2>&1 | tail -8 | tee -a "$OUT/tests.log"
echo "tests: $((SECONDS - t0)) s"
[[ -d benchmarks/plans-unfused ]] && e2e "128k unfused @0.8" --plans benchmarks/plans-unfused --contexts 130560 --methods sparse --overlap 0.8
e2e "128k fused+hf @0.8" --contexts 130560 --methods sparse,hf --overlap 0.8
e2e "32k fused+hf @0.8" --contexts 32768 --methods sparse,hf --overlap 0.8
t0=$SECONDS
python3 benchmarks/profile_step.py --overlap 0.8 --list-kernels 4.0,4.5 --out /tmp/profile >"$OUT/profile-fused.log" 2>&1
cp /tmp/profile/profile-*.json "$OUT/" 2>/dev/null; echo "profile: $((SECONDS - t0)) s"
t0=$SECONDS
python3 benchmarks/bench_prefill.py --plans benchmarks/plans --out "$OUT" 2>&1 | tail -20 >"$OUT/prefill.log"
echo "prefill: $((SECONDS - t0)) s"; cat "$OUT/prefill.log"
fi
if [[ $part == sweep ]]; then
e2e "128k sparse+hf @0.8" --contexts 130560 --methods sparse,hf --overlap 0.8
e2e "32k sparse+hf @0.8" --contexts 32768 --methods sparse,hf --overlap 0.8
e2e "128k dense, batch 1" --contexts 130560 --methods dense,sparse1
e2e "32k dense" --contexts 32768 --methods dense
for f in 0.7 0.9; do
  e2e "128k sparse @$f" --contexts 130560 --methods sparse --overlap $f
  e2e "32k sparse @$f" --contexts 32768 --methods sparse --overlap $f
done
t0=$SECONDS
python3 benchmarks/profile_step.py --overlap 0.8 --list-kernels 5.0,5.6 --out /tmp/profile >"$OUT/profile.log" 2>&1
cp /tmp/profile/profile-*.json "$OUT/" 2>/dev/null; echo "profile: $((SECONDS - t0)) s"
fi
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
