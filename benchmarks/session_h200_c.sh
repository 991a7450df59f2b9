#!/usr/bin/env bash
# The device calls of the third H200 session of 2026-12-02 that the other scripts do not cover, one
# per argument (each under the 10-minute limit); logs to $OUT, a short table last. Plans first, here:
#   TARGET=h200 bash benchmarks/compile_bench_plans.sh all        # carry benchmarks/plans
#   bash benchmarks/session_h200_c.sh call3   # 8B distill (capped), sparse-decode sweep, [32k, 2k] beside
#                                             # HF, 128k dense and batch 1 on the fused graph (~9 min)
#   bash benchmarks/session_h200_c.sh call4   # [2k, 32k] beside HF (ours cut at 200 s), serving (~6 min)
#   bash benchmarks/session_h200_c.sh call5   # merged projections (plans in benchmarks/plans-merged, carry
#                                             # .whl too): GPU engine tests, 128k and 32k at 0.8, and
#                                             # [32k, 2k] with caches grown once per residency (~4 min)
#   bash benchmarks/session_h200_c.sh call6   # next session: [32k, 2k] and [16k, 2k] beside HF in the same
#                                             # run, after warm-up, with the steady decode rate (~6 min)
set -uo pipefail
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
timed() {   # timed LABEL LOG COMMAND...: run, log, say how long it took
  local label="$1" log="$2"; shift 2; local t0=$SECONDS
  "$@" >"$OUT/$log" 2>&1
  echo "$label: $((SECONDS - t0)) s (rc $?)"
}
case "${1:-}" in
  call3)
    timed distill distill.log timeout 240 python3 benchmarks/bench_distill.py --out "$OUT"
    timed sweep sparse_decode.log python3 benchmarks/bench_sparse_decode.py --out "$OUT"
    timed "[32k, 2k]" workloads-32k-2k.log python3 benchmarks/bench_workloads.py --workloads 32k:2k --hf
    timed "128k dense, batch 1" e2e-dense-b1.log python3 benchmarks/bench_e2e.py --steps 10 --contexts 130560 \
      --methods dense,sparse1 --out "$OUT"
    tail -12 "$OUT/distill.log"; tail -16 "$OUT/sparse_decode.log"; tail -3 "$OUT/workloads-32k-2k.log"
    grep "^| 130560" "$OUT/e2e-dense-b1.log" ;;
  call4)
    timed "[2k, 32k]" workloads-2k-32k.log python3 benchmarks/bench_workloads.py --workloads 2k:32k --hf \
      --max-seconds 200
    timed serving serving.log python3 benchmarks/bench_serving.py benchmarks/plans/sparse-32768 --preset llama-3.1-8b \
      --requests 64 --rate 4 --input-len 2048 --output-len 256 --out "$OUT"
    tail -3 "$OUT/workloads-2k-32k.log"; tail -14 "$OUT/serving.log" ;;
  call5)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/pulp-*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    timed "gpu tests" gpu-tests.log python3 -m pytest -q -p no:cacheprovider --tb=short -m gpu \
      tests/runtime/test_engine.py tests/runtime/test_prefill.py tests/runtime/kernels/test_fused_elementwise.py
    timed "128k merged @0.8" e2e-merged-128k.log python3 benchmarks/bench_e2e.py --plans benchmarks/plans-merged \
      --steps 10 --contexts 130560 --methods sparse --overlap 0.8 --out "$OUT"
    timed "32k merged @0.8" e2e-merged-32k.log python3 benchmarks/bench_e2e.py --plans benchmarks/plans-merged \
      --steps 10 --contexts 32768 --methods sparse --overlap 0.8 --out "$OUT"
    timed "[32k, 2k] merged" workloads-32k-2k-merged.log python3 benchmarks/bench_workloads.py \
      --plans benchmarks/plans-merged --workloads 32k:2k
    grep -v "Warning\|^ \|^$\|^tests/" "$OUT/gpu-tests.log" | tail -4; grep -h "^| [0-9]" "$OUT"/e2e-merged-*.log
    tail -1 "$OUT/workloads-32k-2k-merged.log"; grep -h '^{' "$OUT/workloads-32k-2k-merged.log" | cut -c1-400 ;;
  call6)
    timed "[32k, 2k] + [16k, 2k]" workloads-hf.log python3 benchmarks/bench_workloads.py --workloads 32k:2k,16k:2k --hf
    tail -4 "$OUT/workloads-hf.log" ;;
  *) echo "usage: session_h200_c.sh call3|call4|call5|call6" >&2; exit 2 ;;
esac
