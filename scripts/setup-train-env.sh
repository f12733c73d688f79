#!/usr/bin/env bash
# Create qreason's training environment (.venv-train): TRL and PEFT for the recover stage, apart from the main
# environment (vLLM's pins) and the quantization one (llm-compressor's). qreason runs
# `python -m qreason.workers.train` in it as a subprocess.
#   QREASON_DEVICE=auto|cpu|cuda   which torch to install (auto: cuda when nvidia-smi sees a GPU)
#   QREASON_TRAIN_VENV=.venv-train where to put the environment
exec bash "$(dirname "$0")/torch-side-env.sh" setup-train-env "${QREASON_TRAIN_VENV:-.venv-train}" \
  requirements/train.txt yes \
  "import peft, trl, torch; print('setup-train-env: trl', trl.__version__, 'peft', peft.__version__, 'torch', torch.__version__)"
