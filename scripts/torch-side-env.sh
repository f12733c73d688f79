#!/usr/bin/env bash
# Shared by setup-quant-env.sh and setup-bench-env.sh: create a side environment with torch (the CPU wheel on
# machines without a GPU) and one requirements file, apart from the main environment (.venv).
#   torch-side-env.sh LABEL VENV REQUIREMENTS INSTALL_QREASON(yes|no) CHECK_PYTHON_CODE
#   QREASON_DEVICE=auto|cpu|cuda   which torch to install (auto: cuda when nvidia-smi sees a GPU)
# Idempotent: a stamp file records what it was built from; nothing is redone when that matches.
set -euo pipefail
cd "$(dirname "$0")/.."
LABEL=$1 VENV=$2 REQ=$3 WITH_QREASON=$4 CHECK=$5
TORCH=torch==2.13.0
source scripts/env-common.sh
resolve_device "$LABEL"

stamp="$VENV/.qreason-side-env"
sources=("$REQ")
[ "$WITH_QREASON" = yes ] && sources+=(pyproject.toml)
want="$DEVICE $TORCH $(cat "${sources[@]}" | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi

find_uv
echo "$LABEL: creating $VENV for $DEVICE (a minute or two the first time)"
"$UV" venv -q --allow-existing -p 3.11 "$VENV"
PY="$VENV/bin/python"
# Every install is constrained to the torch installed first; without it pip would pull GBs of CUDA torch.
printf '%s\n' "$TORCH" > "$VENV/torch-constraint.txt"
if [ "$DEVICE" = cpu ]; then
  # torch's CPU wheel (in /opt/wheels on qreason's machines) first; plain PyPI torch is the CUDA build.
  "$UV" pip install -q -p "$PY" "${FIND[@]}" "$TORCH"
else
  "$UV" pip install -q -p "$PY" "$TORCH"
fi
"$UV" pip install -q -p "$PY" "${FIND[@]}" -c "$VENV/torch-constraint.txt" -r "$REQ"
# Nothing here needs them, and CPU builds of them can break transformers' import.
"$UV" pip uninstall -q -p "$PY" torchvision torchaudio torchcodec 2>/dev/null || true
# qreason itself, without its dependencies (the quantization worker imports only the standard library, torch,
# transformers and llm-compressor).
[ "$WITH_QREASON" = yes ] && "$UV" pip install -q -p "$PY" --no-deps -e .
"$PY" -c "$CHECK"
echo "$want" > "$stamp"
echo "$LABEL: $VENV ready ($DEVICE)"
