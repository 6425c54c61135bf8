#!/usr/bin/env bash
# CPU TEST HARNESS ONLY - never used on GPU machines.
#
# Installs a real SGLang 0.5.23 server that runs on a CPU-only torch, for the rollout tests:
#   1. sglang==0.5.23 with --no-deps (its declared deps are the CUDA stack), plus the
#      pure-Python packages it imports on the text-only CPU path and sglang-router==0.3.2;
#   2. two stand-in modules (standins/: import-only torchvision, minimal sgl_kernel) appended
#      to the END of sys.path through a .pth file, so real packages always take precedence;
#   3. from the same folder, an SGLang general plugin (mopd_sglang_cpu_plugin, registered by its
#      dist-info's entry_points.txt): the torch_native backend's decode attention as one batched
#      call instead of a Python loop over sequences (1.6x faster demo steps on 2 cores).
# Packages already in the venv (torch, transformers, tokenizers, numpy, ...) are passed as pip
# constraints, so the harness adds packages and never changes the project's own versions.
# Run servers with SGLANG_USE_CPU_ENGINE=1 --device cpu --attention-backend torch_native
# (mopd_megatron.rollout does that when the configured device is cpu).
#
# usage: tests/harness/sglang_cpu/setup.sh [VENV]     (default: the active venv)
# Idempotent: a stamp keyed on this folder's contents makes a repeat run take ~1 s.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
VENV=${1:-${VIRTUAL_ENV:-}}
if [[ -z "$VENV" ]]; then
    echo "setup.sh: no venv given and none active (usage: setup.sh [VENV])" >&2
    exit 2
fi
PY="$VENV/bin/python"
if [[ ! -x "$PY" ]]; then
    echo "setup.sh: $PY not found or not executable (VENV=$VENV)" >&2
    exit 2
fi

SITE=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
STANDINS_DST="$VENV/mopd_sglang_cpu_harness"
PTH="$SITE/zz_mopd_sglang_cpu_harness.pth"
STAMP="$VENV/.mopd_sglang_cpu_harness.stamp"
WANT=$(cd "$HERE" && find . -type f \( -name '*.py' -o -name '*.txt' -o -name '*.sh' \) \
        -not -path '*/__pycache__/*' | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -d' ' -f1)

installed_ok() {
    "$PY" - <<'PYEOF' 2>/dev/null
import importlib.metadata as md
assert md.version("sglang") == "0.5.23"
assert md.version("sglang-router") == "0.3.2"
PYEOF
}

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" && -f "$PTH" ]] && installed_ok; then
    echo "sglang CPU harness: already installed in $VENV"
    exit 0
fi

start=$(date +%s)
# Pin everything the venv already has, so nothing the project runs on moves.
CONSTRAINTS=$(mktemp)
trap 'rm -f "$CONSTRAINTS"' EXIT
"$PY" -m pip freeze --exclude-editable | grep -E '^[A-Za-z0-9_.-]+==' > "$CONSTRAINTS" || true

# pip's resolver complains about sglang's declared CUDA dependencies (deliberately not
# installed) on every run; keep its output in a log and show it only when pip fails.
PIPLOG="$VENV/.mopd_sglang_cpu_harness.pip.log"
run_pip() {
    if ! "$PY" -m pip install -q "$@" >>"$PIPLOG" 2>&1; then
        cat "$PIPLOG" >&2
        echo "setup.sh: pip install $* failed (log: $PIPLOG)" >&2
        exit 1
    fi
}
: > "$PIPLOG"
run_pip --no-deps -r "$HERE/requirements-nodeps.txt"
run_pip -c "$CONSTRAINTS" -r "$HERE/requirements.txt"

# Stand-ins: a copy inside the venv (the repo may move; CI clones it elsewhere).
rm -rf "$STANDINS_DST"
mkdir -p "$STANDINS_DST"
cp -r "$HERE/standins/." "$STANDINS_DST/"
find "$STANDINS_DST" -name '__pycache__' -prune -exec rm -rf {} +
echo "$STANDINS_DST" > "$PTH"

# Smoke check: the server-side engine imports on this torch.
if ! SGLANG_USE_CPU_ENGINE=1 "$PY" -c "import sglang.srt.entrypoints.engine, sglang_router" \
        >>"$PIPLOG" 2>&1; then
    tail -40 "$PIPLOG" >&2
    echo "setup.sh: SGLang does not import on this venv (log: $PIPLOG)" >&2
    exit 1
fi
echo "$WANT" > "$STAMP"
echo "sglang CPU harness: installed into $VENV in $(( $(date +%s) - start )) s"
