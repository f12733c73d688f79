"""Per-stage commands (``qreason grade RUN_DIR``, ``qreason judge RUN_DIR``) work on the run they are given:
they open its stored config, so on a sub-run of a ``models:`` axis the base variant is that run's model and
the grading settings are the run's, not the defaults."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from run_builders import generation

from qreason.config.schema import load_config
from qreason.records import Problem, content_key
from qreason.stages.base import RunContext
from qreason.store import RunStore

MATRIX = """
name: nightly
output_dir: out
models: [{name: small, path: m-small}, {name: large, path: m-large}]
tasks: [{name: synthetic, limit: 2}]
backend: {kind: openai, base_url: "http://127.0.0.1:9/v1"}
grading: {timeout_s: 7, workers: 1}
"""


def sub_run(tmp_path: Path) -> Path:
    """The run directory of model ``large`` of a ``models:`` axis, as ``qreason run`` leaves it: the stored
    sub-run config, problems, and generations of the base (``large``) and one quantized variant, ungraded."""
    (tmp_path / "matrix.yaml").write_text(MATRIX)
    loaded = load_config(tmp_path / "matrix.yaml")
    sub = loaded.per_model(tmp_path / "out")[1]
    run_dir = tmp_path / "out" / "large"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(sub.text)
    store = RunStore(run_dir)
    problems = [
        Problem(
            key=f"p{i}",
            task="synthetic",
            problem_id=f"s{i}",
            question=f"What is {i} + 2?",
            answer=str(i + 2),
            answer_type="number",
        )
        for i in range(2)
    ]
    store.problems.append(problems)
    gens = []
    for variant, wrong in (("large", set()), ("large-w4", {"s0"})):
        for p in problems:
            answer = int(p.answer) + 1 if p.problem_id in wrong else int(p.answer)
            text = f"Step 1: {p.question[8:-1]} = {answer}.\nStep 2: The final answer is \\boxed{{{answer}}}"
            gens.append(generation(content_key("gen", variant, p.problem_id), variant, p.problem_id, text))
    store.generations.append(gens)
    return run_dir


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qreason.cli", *map(str, args)], capture_output=True, text=True, timeout=300
    )


def test_grade_and_judge_of_a_models_axis_sub_run_use_that_runs_config(tmp_path):
    run_dir = sub_run(tmp_path)
    ctx = RunContext.open(run_dir)
    assert ctx.base_name == "large" and ctx.cfg.judge.base_variant == "large"
    assert (ctx.cfg.grading.timeout_s, ctx.cfg.grading.workers) == (7, 1)

    graded = cli("grade", run_dir)
    assert graded.returncode == 0, graded.stderr
    assert "grading with math-verify, timeout 7 s per answer, 1 worker\n" in graded.stderr
    statuses = {(g.variant, g.problem_id): g.status for g in RunStore(run_dir).grades.all()}
    assert statuses == {
        ("large", "s0"): "correct",
        ("large", "s1"): "correct",
        ("large-w4", "s0"): "wrong",
        ("large-w4", "s1"): "correct",
    }

    judged = cli("judge", run_dir, "--json")
    assert judged.returncode == 0, judged.stderr
    stats = json.loads(judged.stdout)["stats"]
    # the one failure is a flip: the run's base variant (large) solved that problem
    assert (stats["candidates"], stats["flips"]) == (1, 1)
    # one combined verdict (judge "stack") beside its layers' records
    (judgment,) = [j for j in RunStore(run_dir).judgments.all() if j.judge == "stack"]
    assert judgment.variant == "large-w4" and judgment.flip
    # each command stored its section in the run's summary
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["judge"]["flips"] == 1 and summary["grades_written"] == 4


def test_flags_still_override_the_stored_config(tmp_path):
    run_dir = sub_run(tmp_path)
    graded = cli("grade", run_dir, "--timeout", "4", "--workers", "2")
    assert graded.returncode == 0, graded.stderr
    assert "grading with math-verify, timeout 4 s per answer, 2 workers" in graded.stderr
    judged = cli("judge", run_dir, "--json", "--base-variant", "nobody")
    assert judged.returncode == 0, judged.stderr
    assert json.loads(judged.stdout)["stats"]["flips"] == 0
