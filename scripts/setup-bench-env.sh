#!/usr/bin/env bash
# Create lm-eval's environment (.venv-bench): lm-evaluation-harness for qreason's lm-eval stage (qreason/lm_eval.py,
# the `lm_eval:` section of a run config) and the baseline bench/generation_overhead.py compares qreason against.
# Kept apart from the main environment (.venv), whose resolved versions lm-eval would change; the pins shared with
# .venv (transformers, tokenizers, ...) match it. `make env` (so `make demo` and `make test`) creates it.
#   QREASON_DEVICE=auto|cpu|cuda   which torch to install (auto: cuda when nvidia-smi sees a GPU)
#   QREASON_BENCH_VENV=.venv-bench where to put the environment
exec bash "$(dirname "$0")/torch-side-env.sh" setup-bench-env "${QREASON_BENCH_VENV:-.venv-bench}" \
  requirements/bench.txt no \
  "import importlib.metadata as m, torch; print('setup-bench-env: lm-eval', m.version('lm-eval'), 'torch', torch.__version__)"
