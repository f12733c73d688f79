#!/usr/bin/env bash
# Create .venv-bench, lm-eval's environment: lm-evaluation-harness for the lm_eval stage and bench/generation_overhead.py.
# The same code as `qreason setup bench` (qreason/workers/envs.py, requirement files in
# qreason/workers/requirements/); run after scripts/setup-env.sh. Idempotent: nothing is redone while the
# environment's stamp matches its requirement files.
#   QREASON_DEVICE=auto|cpu|cuda   which torch to install (auto: cuda when nvidia-smi sees a GPU)
#   QREASON_BENCH_VENV=.venv-bench where to put the environment
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env-common.sh
PY=${QREASON_VENV:-.venv}/bin/python
[ -x "$PY" ] || { echo "setup-bench-env: $PY is missing; run scripts/setup-env.sh first" >&2; exit 2; }
find_uv
QREASON_UV=$UV exec "$PY" -m qreason.cli setup bench --path "${QREASON_BENCH_VENV:-.venv-bench}"
