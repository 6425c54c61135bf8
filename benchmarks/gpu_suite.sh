#!/usr/bin/env bash
# Every GPU-only check of mopd-megatron in one call, for a machine with one H100/H200: the
# fused loss kernel's bandwidth, TE vs local layer spec parity, the memory planner against
# measured memory, FP8 vs BF16 steps, SGLang on CUDA (memory saver, CUDA-IPC weight sync).
# Ends inside 8 minutes; writes a "GPU suite (<card>, <date>)" section into
# benchmarks/RESULTS.md and the raw figures to benchmarks/gpu_suite_results.json (and copies
# both to $OUT when that is set). Without a CUDA device a real run refuses with exit 2.
#
# usage: bash benchmarks/gpu_suite.sh [--setup] [--only NAME[,NAME]] [--skip NAME[,NAME]]
#                                     [--out PATH] [--results PATH] [--list | --dry-run | --help]
#   --setup     first run `bash tools/setup_env.sh` (needs network; it installs the package,
#               not Transformer Engine or SGLang: those come from `pip install -e .[gpu]`);
#               a failed setup is reported and the suite runs with what is installed
#   --list      the checks and their time budgets; --dry-run: what each would measure and
#               whether its packages are installed here (neither needs a GPU or writes a file)
# Python: $PYTHON if set, else the first of .venv/bin/python, python3, python whose torch sees
# a CUDA device (for --help/--list/--dry-run: the first that exists). The checkout goes on
# PYTHONPATH, so the package need not be installed. MOPD_COMMIT=<sha> names the commit in
# RESULTS.md where the checkout has no .git (a copied working tree).
# Exit status: 0 all checks passed or were skipped, 1 a check failed, 2 no CUDA device / usage.
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

SETUP=0
INFO=0
ARGS=()
for a in "$@"; do
    case "$a" in
        --setup) SETUP=1 ;;
        -h|--help) INFO=2 ;;
        --list|--dry-run) [[ $INFO == 2 ]] || INFO=1; ARGS+=("$a") ;;
        *) ARGS+=("$a") ;;
    esac
done

candidates() {
    if [[ -n "${PYTHON:-}" ]]; then echo "$PYTHON"; return; fi
    for c in "$ROOT/.venv/bin/python" python3 python; do
        command -v "$c" >/dev/null 2>&1 && echo "$c"
    done
}

if [[ $INFO == 2 ]]; then
    awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "${BASH_SOURCE[0]}"
    PY=$(candidates | head -n 1)
    if [[ -n "$PY" ]]; then
        echo
        echo "Options of the driver (benchmarks/gpu_suite.py):"
        PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PY" "$ROOT/benchmarks/gpu_suite.py" --help
    fi
    exit 0
fi

if [[ $SETUP == 1 && $INFO == 0 ]]; then
    if bash "$ROOT/tools/setup_env.sh"; then
        PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
    else
        echo "gpu_suite.sh: tools/setup_env.sh failed (exit $?); running with what is installed" >&2
    fi
fi

PY=""
if [[ $INFO == 1 ]]; then
    PY=$(candidates | head -n 1)
else
    while read -r c; do
        if "$c" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' \
                >/dev/null 2>&1; then
            PY=$c
            break
        fi
    done < <(candidates)
    # None sees a GPU: the driver itself says so (one line, exit 2).
    [[ -n "$PY" ]] || PY=$(candidates | head -n 1)
fi
if [[ -z "$PY" ]]; then
    echo "gpu_suite.sh: no python found (set PYTHON)" >&2
    exit 2
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export MOPD_GPU_SUITE_ENTRY="benchmarks/gpu_suite.sh"
exec "$PY" "$ROOT/benchmarks/gpu_suite.py" "${ARGS[@]+"${ARGS[@]}"}"
