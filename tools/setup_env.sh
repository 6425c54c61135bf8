#!/usr/bin/env bash
# One-command environment for mopd-megatron on a fresh machine.
#
# usage: bash tools/setup_env.sh [--dev | --help]
#   bash tools/setup_env.sh          -> .venv with the package (the main job's needs)
#   bash tools/setup_env.sh --dev    -> also the test tools (pytest, triton, ...)
#   bash tools/setup_env.sh --help   -> this text; installs nothing
#
# On a machine without a CUDA GPU it installs PyTorch's CPU build (an unpinned torch would pull
# a multi-GB CUDA build) and the SGLang CPU harness (tests/harness/sglang_cpu: a real SGLang
# server on CPU, used by the embedded demo and the rollout tests; never used on GPU).
# GPU clusters install with `pip install -e .[gpu]` into their own CUDA environment instead
# (docs/cluster-quickstart.md).
# Idempotent: a second run only checks what is there. VENV=path overrides the location.
set -euo pipefail
EXTRAS=""
case "${1:-}" in
    "") ;;
    --dev) EXTRAS="[dev]" ;;
    -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "${BASH_SOURCE[0]}"
               exit 0 ;;
    *) echo "setup_env.sh: unknown argument '$1' (usage: bash tools/setup_env.sh [--dev|--help])" >&2
       exit 2 ;;
esac
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${VENV:-$ROOT/.venv}
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3

if [[ ! -x "$VENV/bin/python" ]]; then
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
fi
PY="$VENV/bin/python"
HAS_GPU=$(command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | grep -c GPU || true)
if ! "$PY" -c "import torch" 2>/dev/null; then
    if [[ "${HAS_GPU:-0}" == "0" ]]; then
        "$PY" -m pip install -q "torch==2.13.0"   # the CPU wheel on CPU-only machines
    else
        "$PY" -m pip install -q torch
    fi
fi
"$PY" -m pip install -q -e "$ROOT$EXTRAS"
if [[ "${HAS_GPU:-0}" == "0" ]]; then
    bash "$ROOT/tests/harness/sglang_cpu/setup.sh" "$VENV"
fi
echo "environment ready: $VENV"
