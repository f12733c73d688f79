#!/usr/bin/env bash
# Create .venv-train, the training environment: TRL and PEFT for the recover stage (`python -m qreason.workers.train`).
# The same code as `qreason setup train` (qreason/workers/envs.py, requirement files in
# qreason/workers/requirements/); run after scripts/setup-env.sh. Idempotent: nothing is redone while the
# environment's stamp matches its requirement files.
#   QREASON_DEVICE=auto|cpu|cuda   which torch to install (auto: cuda when nvidia-smi sees a GPU)
#   QREASON_TRAIN_VENV=.venv-train where to put the environment
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env-common.sh
PY=${QREASON_VENV:-.venv}/bin/python
[ -x "$PY" ] || { echo "setup-train-env: $PY is missing; run scripts/setup-env.sh first" >&2; exit 2; }
find_uv
QREASON_UV=$UV exec "$PY" -m qreason.cli setup train --path "${QREASON_TRAIN_VENV:-.venv-train}"
