#!/usr/bin/env bash
# A newcomer's install, checked end to end from a directory outside the checkout:
#   1. build qreason's wheel from this checkout;
#   2. install it into a fresh virtualenv that reuses an existing vLLM (the checkout's .venv: its site-packages
#      joins the new environment's path through a .pth file, as a site-wide vLLM would; the wheel goes in
#      without dependencies and the script checks that every declared dependency is satisfied there);
#   3. `qreason doctor` (must name what is missing), `qreason setup` (the three side environments under
#      $QREASON_ENVS), `qreason doctor` again (must be all set);
#   4. `qreason run` of a small config with quantize, recover and lm_eval, in a fresh cache;
#   5. checks: every side environment imports the installed qreason (not the checkout's), the run finished,
#      and no artifact names the checkout or the work directory's cache (adapter configs, dataset cards).
# Usage: bench/wheel_install.sh [WORK_DIR]   (default: a new directory under /tmp; kept for inspection)
# Needs uv and the checkout's .venv (scripts/setup-env.sh). Takes minutes: the side environments come from
# uv's cache when it has them, the run quantizes, trains and runs lm-eval on the embedded default model.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=${1:-$(mktemp -d /tmp/qreason-wheel.XXXXXX)}
mkdir -p "$WORK" && WORK=$(cd "$WORK" && pwd)
MAIN=$REPO/.venv/bin/python
UV=${QREASON_UV:-$(command -v uv)}
cd "$WORK"
say() { printf '\n== %s (%s s)\n' "$1" "$SECONDS"; }
fail() { echo "wheel_install: FAILED: $*" >&2; exit 1; }

say "build the wheel"
rm -rf dist && "$UV" build -q --wheel --out-dir dist "$REPO"
WHEEL=$(ls dist/qreason-*.whl)
unzip -l "$WHEEL" | grep -q "qreason/workers/requirements/quant.txt" || fail "requirement files not in the wheel"

say "fresh environment reusing the checkout's vLLM"
rm -rf venv && "$UV" venv -q -p "$MAIN" venv
PY=$WORK/venv/bin/python
SITE=$("$PY" -c "import sysconfig; print(sysconfig.get_path('purelib'))")
"$MAIN" -c "import sysconfig; print(sysconfig.get_path('purelib'))" > "$SITE/reuse-vllm.pth"
"$UV" pip install -q -p "$PY" --no-deps "$WHEEL"
"$PY" - <<'EOF'
import importlib.metadata as md
from packaging.requirements import Requirement

missing = []
for text in md.requires("qreason") or []:
    req = Requirement(text)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue  # an extra's requirement
    try:
        if not req.specifier.contains(md.version(req.name), prereleases=True):
            missing.append(f"{req} (found {md.version(req.name)})")
    except md.PackageNotFoundError:
        missing.append(f"{req} (not installed)")
assert not missing, f"unsatisfied dependencies: {missing}"
import qreason
import vllm  # noqa: F401

print("qreason", qreason.__version__, "from", qreason.__file__, "with", vllm.__file__)
EOF
QREASON=$WORK/venv/bin/qreason
INSTALLED=$(cd / && "$PY" -c "import qreason, os; print(os.path.dirname(qreason.__file__))")
case "$INSTALLED" in "$WORK"/venv/*) ;; *) fail "the new environment imports qreason from $INSTALLED" ;; esac

export QREASON_ENVS=$WORK/envs QREASON_CACHE=$WORK/cache QREASON_RUNS=$WORK/runs QREASON_INDEX=$WORK/runs/index.sqlite
unset QREASON_QUANT_PYTHON QREASON_TRAIN_PYTHON QREASON_BENCH_PYTHON

say "doctor before setup"
if [ -d "$QREASON_ENVS" ]; then
  echo "(a second pass over $WORK: the side environments exist, setup only relinks them)"
elif "$QREASON" doctor > doctor-before.txt; then
  fail "doctor found nothing missing before setup"
else
  cat doctor-before.txt
  grep -q "fix: qreason setup quant" doctor-before.txt || fail "doctor does not say how to fix a missing environment"
fi

say "qreason setup"
"$QREASON" setup
say "doctor after setup"
"$QREASON" doctor | tee doctor-after.txt

for env in quant train bench; do
  got=$(cd "$WORK" && PYTHONSAFEPATH=1 "$WORK/envs/$env/bin/python" -c \
        "import qreason, os; print(os.path.realpath(os.path.dirname(qreason.__file__)))")
  [ "$got" = "$(realpath "$INSTALLED")" ] || fail "$env imports qreason from $got, not the installed $INSTALLED"
  echo "$env runs the installed qreason: $got"
done

say "qreason run (quantize, generate, grade, judge, curate, recover, lm_eval, report)"
cat > small.yaml <<'EOF'
name: wheel-check
model: {path: default}
quantize:
  - {name: rtn-w4a16, method: rtn-w4a16}
tasks:
  - name: synthetic
    limit: 40
    format_example: true
    params: {min_steps: 1, max_steps: 1, seed: 0, ops: [add], max_number: 9}
sampling: {temperature: 0.0, max_tokens: 192, seeds: [0]}
recover: {enabled: true, mode: sft, epochs: 1, control: false}
lm_eval: {tasks: [qreason_synthetic_mc], limit: 10}
EOF
set +e
"$QREASON" run small.yaml 2>&1 | tee run.txt
code=${PIPESTATUS[0]}
set -e
[ "$code" = 0 ] || [ "$code" = 3 ] || fail "qreason run exited with $code"   # 3: a regression gate tripped
RUN=$WORK/runs/wheel-check
grep -q '"lm_eval"' "$RUN/summary.json" || fail "no lm-eval results in the summary"
ls "$RUN"/recover*/ >/dev/null 2>&1 || grep -q "recover" run.txt || fail "the recover stage did not run"

say "no machine path in artifacts"
if grep -rIl --exclude=*.log --exclude=*.jsonl -e "$REPO" -e "$WORK/cache" "$RUN" "$WORK/cache" 2>/dev/null \
    | grep -E "adapter_config.json|README.md|\.yaml$" ; then
  fail "the files above name a path of this machine"
fi
echo "wheel_install: OK in ${SECONDS} s (work directory $WORK)"
