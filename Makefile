# qreason: the two commands of the README.
#   make demo   set everything up (first time: a few minutes) and run the demo on the embedded default model
#   make test   set everything up and run the test suite
# QREASON_DEVICE=cpu|cuda overrides the automatic choice of vLLM build (cuda when nvidia-smi sees a GPU).
PY := .venv/bin/python

.PHONY: demo test env bench clean
env:
	@bash scripts/setup-env.sh
	@bash scripts/setup-quant-env.sh
	@bash scripts/setup-bench-env.sh
	@bash scripts/setup-train-env.sh

demo: env
	$(PY) -m qreason.cli run configs/demo.yaml

test: env
	@bash scripts/setup-test-tools.sh
	$(PY) -m pytest -q -p no:cacheprovider --durations=15 tests

bench: env
	$(PY) bench/generation_overhead.py
	$(PY) bench/quantize_methods.py

clean:
	rm -rf runs reports/*.html bench/out
