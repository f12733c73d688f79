# qreason: the two commands of the README.
#   make demo   set everything up (first time: a few minutes) and run the demo on the embedded default model
#   make test   set everything up and run the test suite
# QREASON_DEVICE=cpu|cuda overrides the automatic choice of vLLM build (cuda when nvidia-smi sees a GPU).
PY := .venv/bin/python

.PHONY: demo test lint env bench clean
env:
	@bash scripts/setup-env.sh
	@bash scripts/setup-quant-env.sh
	@bash scripts/setup-bench-env.sh
	@bash scripts/setup-train-env.sh

demo: env
	$(PY) -m qreason.cli run configs/demo.yaml

test: env lint
	@bash scripts/setup-test-tools.sh
	$(PY) -m pytest -q -p no:cacheprovider --durations=15 tests

# ruff: the project's 110 columns, pyflakes, import order, and one formatting style (ruff format)
lint: env
	$(PY) -m ruff check qreason tests bench
	$(PY) -m ruff format --check qreason tests bench

bench: env
	$(PY) bench/generation_overhead.py
	$(PY) bench/quantize_methods.py

clean:
	rm -rf runs reports/*.html bench/out
