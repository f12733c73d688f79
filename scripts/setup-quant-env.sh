#!/usr/bin/env bash
# Create qreason's quantization environment (.venv-quant): llm-compressor and its pins, apart from the main
# environment (whose vllm pins a different compressed-tensors). qreason runs `python -m qreason.workers.quantize`
# in it as a subprocess.
#   QREASON_DEVICE=auto|cpu|cuda   which torch to install (auto: cuda when nvidia-smi sees a GPU)
#   QREASON_QUANT_VENV=.venv-quant where to put the environment
exec bash "$(dirname "$0")/torch-side-env.sh" setup-quant-env "${QREASON_QUANT_VENV:-.venv-quant}" \
  requirements/quant.txt yes \
  "import llmcompressor, torch; print('setup-quant-env: llmcompressor', llmcompressor.__version__, 'torch', torch.__version__)"
