#!/usr/bin/env bash
# Creates .venv-bench: hookinf's pinned dev environment plus kronfluence (benchmarks/curvature.py) and LogIX
# (benchmarks/gradient_logging.py).
#
#     benchmarks/setup-bench.sh          # then: .venv-bench/bin/python benchmarks/curvature.py [--quick]
#
# Idempotent: skipped when .venv-bench exists and was completed for the same requirements/dev.lock, pyproject.toml
# and extra pins (a stamp file records them). torch stays at the lock's torch==2.13.0 (the CPU wheel): kronfluence
# and its two small dependencies are installed with --no-deps, because kronfluence declares torchvision (which it
# never imports, and whose install would pull another torch and break transformers here). logix-ai 0.1.1 declares
# Python <3.11 (it runs on 3.11) and needs only numpy, einops, pyyaml and tqdm, already here: hence
# --ignore-requires-python.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3.11}
VENV=.venv-bench
EXTRA=(kronfluence==1.0.1 einconv==0.1.0 einops==0.8.2 logix-ai==0.1.1)
STAMP="$VENV/.hookinf-bench-setup"
want=$( (cat requirements/dev.lock pyproject.toml; printf '%s\n' "${EXTRA[@]}") | sha256sum | cut -d' ' -f1)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && [ -x "$VENV/bin/python" ]; then
    echo "==> $VENV is complete; nothing to do (delete $STAMP to force a reinstall)"
    exit 0
fi

echo "==> setting up $VENV (Python: $("$PY" --version 2>&1))"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet -r requirements/dev.lock
"$VENV/bin/python" -m pip install --quiet --no-deps --ignore-requires-python "${EXTRA[@]}"
"$VENV/bin/python" -m pip install --quiet --no-deps -e .

torch_version=$("$VENV/bin/python" -c 'import torch; print(torch.__version__)')
case "$torch_version" in
    2.13.0*) ;;
    *) echo "error: $VENV has torch $torch_version, expected 2.13.0 (requirements/dev.lock)" >&2; exit 1 ;;
esac
"$VENV/bin/python" -c 'import hookinf, kronfluence, logix; print("==> hookinf", hookinf.__version__, "· kronfluence ok · logix ok")'
echo "$want" > "$STAMP"
echo "==> $VENV ready (torch $torch_version)"
