#!/usr/bin/env bash
# One device call for issue 15's gather work: install, the prefetch/gather tests on the GPU, then
# the 128k sparse step profiled at a synthetic selection overlap for each gather-grid schedule
# given (profile_step.py --gather-grids: "8" = every gather on 8 programs, "8x6,32" = six on 8
# then the rest on 32), each profile's summary JSON and log copied to $OUT (the traces are large
# and stay on the machine). Plans: `TARGET=h200 bash benchmarks/compile_bench_plans.sh e2e`.
#   bash benchmarks/overlap_sweep.sh [OVERLAP] [GRIDS ...]
set -uo pipefail
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
overlap="${1:-0.8}"; shift || true
schedules=("$@"); [[ ${#schedules[@]} -gt 0 ]] || schedules=(4 8 16)
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
python3 -m pytest -q -p no:cacheprovider --tb=short tests/runtime/test_prefetch.py \
  tests/runtime/kernels/test_elastic_load.py tests/runtime/test_kernel_set.py 2>&1 | tail -15 | tee "$OUT/tests.log"
for grids in "${schedules[@]}"; do
  name="g${grids//,/_}-o$overlap"
  python3 benchmarks/profile_step.py --plan benchmarks/plans/sparse-130560 --context 130560 \
    --overlap "$overlap" --gather-grids "$grids" --out "/tmp/profile-$name" >"$OUT/profile-$name.log" 2>&1
  cp /tmp/profile-"$name"/profile-*.json "$OUT/" 2>/dev/null
  grep -E "ms/step wall|model at this overlap" "$OUT/profile-$name.log"
done
