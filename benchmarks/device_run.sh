#!/usr/bin/env bash
# One device-tool call: install this checkout on the GPU machine (it has torch, triton and
# transformers but no PuLP, so the runtime installs without dependencies), then run one stage with
# its log in $OUT. Plans are compiled beforehand here (benchmarks/compile_bench_plans.sh) and
# carried in benchmarks/plans. Stages (each fits one 10-minute call):
#   tests       kernel tests compiled for the GPU, and the GPU-marked runtime tests
#   e2e128      bench_e2e.py at 128k: the sparse plan (its own batch) and the batch-1 plan
#   e2e128-overlap [F ...]  the same two at a synthetic selection overlap of 0.8 (overlap_control.py),
#               then the sparse plan at 0.7 and 0.9 while the call has time left (MAX_SECONDS,
#               default 480: a target starts only if the last run's duration still fits); with
#               targets given, the sparse plan at those only. The batch-1 plan offloads nothing, so
#               overlap cannot change its step: it runs once, as a check.
#   workloads W bench_workloads.py for W (e.g. 32k:2k), --max-seconds from $MAX_SECONDS (default 420)
#   profile [PLAN CONTEXT]  profile_step.py, piece by piece against the latency model: without
#               arguments the 128k sparse step over four gather grids, the 128k batch-1 step, and
#               the [2k, 16k] plan's step at 10k tokens; else that plan (in benchmarks/plans) only
#   prefill     the GPU prefill tests (SDPA paths, offloaded-layer host writes, one chunk vs several),
#               then bench_prefill.py: 8k and 32k prompts, the engine beside HF's SDPA forward
#   pytest ARGS the given tests (e.g. one file after a fix)
#   distill     bench_distill.py: `specontext distill`'s code on a Llama-3.1-8B-shaped model (random
#               weights), its stages' seconds and peak GPU memory; cut at MAX_SECONDS (default 330)
# The fused-head GPU tests compile a plan, which needs PuLP: fetch its wheel here once
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl pulp==3.3.2      # 16 MB, bundles CBC
# and carry `.whl` (with benchmarks/plans); it is installed to /tmp/site below (first used in
# runs 21-23; run 14, without it, errored at those tests' set-up).
set -euo pipefail
stage="$1"; shift || true
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || {
  cat "$OUT/install.log"; exit 1; }
if compgen -G ".whl/pulp-*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/pulp-*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
case "$stage" in
  tests)
    python3 -m pytest -q tests/runtime/kernels tests/runtime/test_fused_head.py -p no:cacheprovider \
      2>&1 | tee "$OUT/tests.log" | tail -15 ;;
  e2e128)
    python3 benchmarks/bench_e2e.py --contexts 130560 --methods sparse,sparse1 --steps 10 --out "$OUT" \
      2>&1 | tee "$OUT/e2e128.log" | tail -25 ;;
  e2e128-overlap)
    budget="${MAX_SECONDS:-480}"
    runs=("0.8 sparse,sparse1" "0.7 sparse" "0.9 sparse")
    if [[ $# -gt 0 ]]; then runs=(); for target in "$@"; do runs+=("$target sparse"); done; fi
    for run in "${runs[@]}"; do
      read -r overlap methods <<<"$run"
      started=$SECONDS
      python3 benchmarks/bench_e2e.py --contexts 130560 --methods "$methods" --steps 10 --overlap "$overlap" \
        --out "$OUT" 2>&1 | tee -a "$OUT/e2e128-overlap.log" | tail -15
      took=$(( SECONDS - started ))    # SECONDS counts from the call's start, the install included
      if (( SECONDS + took > budget )); then
        echo "stopping after overlap $overlap (${took} s): the next would end past ${budget} s" \
          | tee -a "$OUT/e2e128-overlap.log"
        break
      fi
    done ;;
  workloads)
    python3 benchmarks/bench_workloads.py --workloads "$1" --max-seconds "${MAX_SECONDS:-420}" \
      2>&1 | tee "$OUT/workloads.log" | tail -25 ;;
  prefill)
    python3 -m pytest -q -p no:cacheprovider -m gpu tests/runtime/test_attention.py tests/runtime/test_prefill.py \
      2>&1 | tee "$OUT/prefill-tests.log" | tail -5
    python3 benchmarks/bench_prefill.py --out "$OUT" 2>&1 | tee "$OUT/prefill.log" | tail -15 ;;
  distill)
    timeout "${MAX_SECONDS:-330}" python3 benchmarks/bench_distill.py --out "$OUT" 2>&1 | tee "$OUT/distill.log" \
      | grep -v Warning | tail -20 ;;
  pytest)
    python3 -m pytest -q -p no:cacheprovider "$@" 2>&1 | tee "$OUT/pytest.log" | tail -15 ;;
  profile)
    profile() {   # PLAN CONTEXT [profile_step.py options]
      python3 benchmarks/profile_step.py --plan "benchmarks/plans/$1" --context "$2" "${@:3}" --out "$OUT" \
        2>&1 | tee -a "$OUT/profile.log" | grep -v Warning | tail -20
    }
    if [[ $# -ge 2 ]]; then
      profile "$@"; exit 0
    fi
    # The 128k sparse step with the host gather's default grid and 16, 66 and one program per
    # block (-1) (run 20 swept these when the default was 33; it is now 16 on the H100); then the
    # batch-1 plan and the [2k, 16k] plan at 10k tokens.
    for args in "sparse-130560 130560" "sparse-130560 130560 --gather-programs 16" \
                "sparse-130560 130560 --gather-programs 66" "sparse-130560 130560 --gather-programs -1" \
                "sparse1-130560 130560" "wl-2048-16384 10240"; do
      profile $args || true
    done ;;
  *) echo "unknown stage '$stage' (tests | e2e128 | e2e128-overlap | workloads W | profile [PLAN CONTEXT] | pytest ARGS)" >&2
     exit 2 ;;
esac
