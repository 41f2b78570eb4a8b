#!/usr/bin/env bash
# The prepared GPU check, one command: bash scripts/gpu_check.sh OUT [--tiny]
# ATSPEED_DEVICE selects the device (default cuda); PYTHON the interpreter (default .venv/bin/python of this repo).
# At most ~10 minutes on one H100/H200; writes OUT/gpu_check.json and OUT/gpu_check.md (atspeed/bench/gpu_check.py).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" WANDB_MODE="${WANDB_MODE:-offline}"
exec "${PYTHON:-$root/.venv/bin/python}" "$root/scripts/gpu_check.py" "$@"
