#!/usr/bin/env bash
# Create the benchmark environment (.venv-bench): lm-evaluation-harness, the baseline that
# bench/generation_overhead.py compares qreason against. Kept apart from the main environment (.venv), whose
# resolved versions lm-eval would change; the pins shared with .venv (transformers, tokenizers, ...) match it.
#   QREASON_DEVICE=auto|cpu|cuda   which torch to install (auto: cuda when nvidia-smi sees a GPU)
#   QREASON_BENCH_VENV=.venv-bench where to put the environment
# Idempotent: a stamp file records what it was built from; nothing is redone when that matches.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${QREASON_BENCH_VENV:-.venv-bench}
DEVICE=${QREASON_DEVICE:-auto}
TORCH=torch==2.13.0
if [ "$DEVICE" = auto ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then DEVICE=cuda; else DEVICE=cpu; fi
fi
case "$DEVICE" in cpu|cuda) ;; *) echo "setup-bench-env: QREASON_DEVICE must be auto, cpu or cuda (got '$DEVICE')" >&2; exit 2;; esac

stamp="$VENV/.qreason-bench-env"
want="$DEVICE $TORCH $(cat requirements/bench.txt | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi

UV=$(command -v uv || true)
if [ -z "$UV" ]; then
  python3 -m pip install -q --disable-pip-version-check "uv==0.13.9"
  UV=$(command -v uv || echo "$(python3 -m site --user-base)/bin/uv")
fi
echo "setup-bench-env: creating $VENV for $DEVICE (a minute or two the first time)"
"$UV" venv -q --allow-existing -p 3.11 "$VENV"
PY="$VENV/bin/python"
FIND=()
[ -d /opt/wheels ] && FIND=(--find-links /opt/wheels)
# Every install is constrained to the torch installed first; without it pip would pull GBs of CUDA torch.
printf '%s\n' "$TORCH" > "$VENV/torch-constraint.txt"
if [ "$DEVICE" = cpu ]; then
  # torch's CPU wheel (in /opt/wheels on qreason's machines) first; plain PyPI torch is the CUDA build.
  "$UV" pip install -q -p "$PY" "${FIND[@]}" "$TORCH"
else
  "$UV" pip install -q -p "$PY" "$TORCH"
fi
"$UV" pip install -q -p "$PY" "${FIND[@]}" -c "$VENV/torch-constraint.txt" -r requirements/bench.txt
# Nothing here needs them, and CPU builds of them can break transformers' import.
"$UV" pip uninstall -q -p "$PY" torchvision torchaudio torchcodec 2>/dev/null || true
"$PY" -c "import lm_eval, torch, transformers; print('setup-bench-env: lm-eval', __import__('importlib.metadata').metadata.version('lm-eval'), 'torch', torch.__version__, 'transformers', transformers.__version__)"
echo "$want" > "$stamp"
echo "setup-bench-env: $VENV ready ($DEVICE)"
