#!/usr/bin/env bash
# Create .venv-quant, the quantization environment: llm-compressor (qreason runs `python -m qreason.workers.quantize` there).
# The same code as `qreason setup quant` (qreason/workers/envs.py, requirement files in
# qreason/workers/requirements/); run after scripts/setup-env.sh. Idempotent: nothing is redone while the
# environment's stamp matches its requirement files.
#   QREASON_DEVICE=auto|cpu|cuda   which torch to install (auto: cuda when nvidia-smi sees a GPU)
#   QREASON_QUANT_VENV=.venv-quant where to put the environment
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env-common.sh
PY=${QREASON_VENV:-.venv}/bin/python
[ -x "$PY" ] || { echo "setup-quant-env: $PY is missing; run scripts/setup-env.sh first" >&2; exit 2; }
find_uv
QREASON_UV=$UV exec "$PY" -m qreason.cli setup quant --path "${QREASON_QUANT_VENV:-.venv-quant}"
