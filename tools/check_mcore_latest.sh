#!/usr/bin/env bash
# API-drift lane: the foundation, conversion, loss and config tests on Python 3.12 with the
# megatron-core release GPU users run (CI's main lane is Python 3.11 + megatron-core 0.16.1).
# CI runs it after the main lane (.ci/run).
usage() {
    cat <<'EOF'
usage: bash tools/check_mcore_latest.sh [-h|--help] [MCORE_VERSION] [-- PYTEST_ARGS...]

  MCORE_VERSION   megatron-core release to test against (default 0.19.2)
  -- PYTEST_ARGS  run these pytest arguments instead of the lane's test list

Creates or reuses a Python 3.12 venv (.venv312, or $VENV312) with PyPI's torch 2.13.0 (a CUDA
build, ~2.6 GB download, that runs on the CPU), megatron-core MCORE_VERSION and this package
with its [dev] extras, then runs the lane's tests with gloo and the CPU compatibility layer.
A second run with the same version and setup.py installs nothing (stamp: $VENV312/.mopd-lane).
Python 3.12 is taken from $PY312, else python3.12, else /root/.pyenv/versions/3.12*.
Exit status: pytest's, except "no tests ran" (5), which is 1; a failed setup is non-zero.
A test path that does not exist is an error (pytest exit 4), not a skip.
EOF
}
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MCORE=0.19.2
TESTS=(
    # foundation
    tests/test_runtime.py tests/test_megatron_layouts.py tests/test_megatron_optim.py
    # conversion
    tests/test_convert_mappings.py tests/test_convert_parity.py
    # loss
    tests/test_ops_tp.py tests/test_ops_mopd_loss.py tests/test_ops_reference.py
    tests/test_ops_reverse_kl.py
    # recipe -> TransformerConfig (field names differ between megatron-core releases)
    tests/test_transformer_config.py tests/test_recipe_fields.py
)
while [[ $# -gt 0 ]]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --) shift; TESTS=("$@"); break ;;
        [0-9]*.[0-9]*) MCORE=$1; shift ;;
        *) echo "check_mcore_latest: unexpected argument '$1'" >&2; usage >&2; exit 2 ;;
    esac
done

VENV=${VENV312:-$ROOT/.venv312}
TORCH=2.13.0
# A pyenv shim answers `command -v python3.12` and then fails to run, so probe by running.
runs_312() { [[ -n "$1" ]] && "$1" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; }
PY312=${PY312:-}
if ! runs_312 "$PY312"; then
    PY312=""
    for cand in python3.12 /root/.pyenv/versions/3.12*/bin/python3.12; do
        if runs_312 "$cand"; then PY312=$cand; break; fi
    done
fi

# What the venv must hold; a matching stamp means nothing is installed (no network, no pip).
WANT="python=3.12 torch=$TORCH megatron-core=$MCORE root=$ROOT setup=$(sha256sum "$ROOT/setup.py" | cut -c1-16)"
STAMP="$VENV/.mopd-lane"
t0=$SECONDS
if [[ -x "$VENV/bin/python" && -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]] \
        && "$VENV/bin/python" -c "import torch, megatron.core, pytest, mopd_megatron" 2>/dev/null; then
    echo "check_mcore_latest: reusing $VENV ($WANT)"
else
    if [[ -x "$VENV/bin/python" ]] && ! runs_312 "$VENV/bin/python"; then
        echo "check_mcore_latest: $VENV is not a Python 3.12 venv; remove it or set VENV312" >&2
        exit 1
    fi
    if [[ ! -x "$VENV/bin/python" ]]; then
        if [[ -z "$PY312" ]]; then
            echo "check_mcore_latest: no working Python 3.12 (set PY312=/path/to/python3.12)" >&2
            exit 1
        fi
        "$PY312" -m venv "$VENV"
        "$VENV/bin/python" -m pip install -q --upgrade pip
    fi
    rm -f "$STAMP"
    "$VENV/bin/python" -m pip install -q "torch==$TORCH" "megatron-core==$MCORE"
    "$VENV/bin/python" -m pip install -q -e "$ROOT[dev]"
    echo "$WANT" > "$STAMP"
    echo "check_mcore_latest: installed in $((SECONDS - t0)) s ($WANT)"
fi

cd "$ROOT"
"$VENV/bin/python" - <<'EOF'
import importlib.metadata as m, sys
print(f"check_mcore_latest: Python {sys.version.split()[0]}, torch {m.version('torch')}, "
      f"megatron-core {m.version('megatron-core')}")
EOF
t1=$SECONDS
rc=0
"$VENV/bin/python" -m pytest -p no:cacheprovider "${TESTS[@]}" || rc=$?
echo "check_mcore_latest: pytest exit $rc after $((SECONDS - t1)) s"
if [[ $rc -eq 5 ]]; then
    echo "check_mcore_latest: pytest collected no tests" >&2
    exit 1
fi
exit $rc
