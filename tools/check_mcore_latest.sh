#!/usr/bin/env bash
# API-drift lane: the foundation, conversion and loss tests on Python 3.12 with the megatron-core
# release GPU users run (CI's main lane is Python 3.11 + megatron-core 0.16.1).
#
#   bash tools/check_mcore_latest.sh [MCORE_VERSION]     (default 0.19.2)
#
# On a CPU machine this installs PyPI's torch 2.13.0, a CUDA build (~2.6 GB download) that runs
# on the CPU; the tests use gloo and the CPU compatibility layer exactly as on 3.11.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MCORE=${1:-0.19.2}
VENV=${VENV312:-$ROOT/.venv312}
PY312=${PY312:-python3.12}
command -v "$PY312" >/dev/null || PY312=$(ls /root/.pyenv/versions/3.12*/bin/python 2>/dev/null | head -1)
if [[ ! -x "$VENV/bin/python" ]]; then
    "$PY312" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
fi
"$VENV/bin/python" -m pip install -q "torch==2.13.0" "megatron-core==$MCORE"
"$VENV/bin/python" -m pip install -q -e "$ROOT[dev]"
cd "$ROOT"
"$VENV/bin/python" -m pytest -p no:cacheprovider tests/test_megatron_layouts.py \
    tests/test_megatron_optim.py tests/test_runtime.py tests/test_convert_mappings.py \
    tests/test_convert_parity.py tests/test_ops_tp.py tests/test_ops_mopd_loss.py
