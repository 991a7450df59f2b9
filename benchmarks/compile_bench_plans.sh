#!/usr/bin/env bash
# Compile every plan the GPU benchmarks read (bench_e2e.py, bench_prefill.py, bench_workloads.py) for one target
# (TARGET, default h100; `specontext targets` lists them), into benchmarks/plans/ (gitignored).
# Needs the compiler's dependencies (PuLP): run it here, then carry benchmarks/plans to the GPU
# machine. ~15 s a plan on 2 cores. The plans' names do not say the target: recompile all of them
# when the GPU changes.
#   bash benchmarks/compile_bench_plans.sh            # all, for the H100
#   TARGET=h200 bash benchmarks/compile_bench_plans.sh e2e   # bench_e2e.py and bench_prefill.py plans, for the H200
#   bash benchmarks/compile_bench_plans.sh workloads  # Table 5 plans only
set -euo pipefail
cd "$(dirname "$0")/.."
which="${1:-all}"
target="${TARGET:-h100}"
compile() { specontext compile llama-3.1-8b --target "$target" --budget "$1" "${@:2}" >/dev/null; }

if [[ "$which" == all || "$which" == e2e ]]; then
  for ctx in 32768 65536 130560; do
    max=$(( ctx + 512 > 131072 ? 131072 : ctx + 512 ))
    compile 2048 --prompt-len "$ctx" --max-len "$max" --batch auto -o "benchmarks/plans/sparse-$ctx"
    compile "$ctx" --prompt-len "$ctx" --max-len "$max" --batch auto -o "benchmarks/plans/dense-$ctx"
  done
  compile 2048 --prompt-len 130560 --max-len 131072 --batch 1 -o benchmarks/plans/sparse1-130560
  # bench_prefill.py: a batch-1 plan leaves room to prefill a whole 32k prompt in one forward
  compile 32768 --prompt-len 32768 --max-len 33280 --batch 1 -o benchmarks/plans/dense1-32768
fi
if [[ "$which" == all || "$which" == workloads ]]; then
  for workload in 2048:16384 2048:32768 16384:2048 32768:2048; do
    in=${workload%:*}; out=${workload#*:}
    compile 2048 --prompt-len "$in" --max-len $(( in + out )) --batch auto -o "benchmarks/plans/wl-$in-$out"
  done
fi
echo "compiled for target $target:"
ls benchmarks/plans
