"""Smoke tests of the benchmarks in bench/: each script runs its real code path end to end at a tiny size,
so a refactor that breaks one fails here. Nothing is timed: a test checks the exit code, the table the script
prints and, where it writes one, its results file."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, SHARED_DATA, has_vllm

QUANT_PYTHON = Path(os.environ.get("QREASON_QUANT_PYTHON") or REPO / ".venv-quant" / "bin" / "python")


def bench(script: str, *args: str, timeout: float = 900) -> str:
    """Run bench/SCRIPT with this checkout's qreason first on the path; its stdout (exit code 0 asserted)."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    proc = subprocess.run(
        [sys.executable, f"bench/{script}", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, (
        f"{script} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return proc.stdout


def has_line(pattern: str, text: str) -> bool:
    return re.search(pattern, text, re.MULTILINE) is not None


def needs_data(*names: str):
    missing = [n for n in names if not (SHARED_DATA / n).is_file()]
    return pytest.mark.skipif(
        bool(missing), reason=f"shared data not present: {', '.join(missing)} in {SHARED_DATA}"
    )


@pytest.mark.vllm
@pytest.mark.skipif(not has_vllm(), reason="vLLM is not installed")
@needs_data("gsm8k_test.jsonl")
def test_generation_overhead_smoke(tmp_path):
    out = bench("generation_overhead.py", "--smoke", "--skip-lm-eval", "--out", str(tmp_path / "out"))
    assert "qreason generation overhead benchmark" in out
    assert has_line(r"^path +median s +min s", out)  # (a): raw llm.chat vs run_generation
    assert "qreason / raw = " in out
    assert has_line(r"^harness +wall s +cpu s +accuracy", out)  # (b): qreason run end to end
    result = json.loads((tmp_path / "out" / "generation_overhead.json").read_text(encoding="utf-8"))
    assert result["overhead"]["n_prompts"] == 2 and result["end_to_end"]["qreason"]["n_problems"] == 2


@needs_data(
    "gsm8k_test.jsonl",
    "gsm8k_train.jsonl",
    "processbench_gsm8k.jsonl",
    "math500.jsonl",
    "processbench_olympiadbench.jsonl",
)
def test_grading_fidelity_smoke(tmp_path):
    out = bench(
        "grading_fidelity.py", "--smoke", "--data-dir", str(SHARED_DATA), "--json", str(tmp_path / "r.json")
    )
    assert "ProcessBench gsm8k vs final_answer_correct" in out
    assert has_line(r"^  lenient +agreement ", out)
    assert "MATH-500 reference solutions vs their answers: strict recall" in out
    assert "ProcessBench olympiadbench" in out
    report = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    assert report["gsm8k"]["lenient"]["n"] == 8 and report["math500"]["n"] == 8


@pytest.mark.quant
@pytest.mark.skipif(
    not QUANT_PYTHON.is_file(), reason=f"{QUANT_PYTHON} not found: run scripts/setup-quant-env.sh"
)
def test_quantize_methods_smoke(tmp_path):
    out = bench("quantize_methods.py", "--smoke", "--json", str(tmp_path / "q.json"))
    assert has_line(r"^method +overrides +wall s +method s +CPU s +peak MB", out)
    assert has_line(r"^rtn-w4a16 ", out)
    rows = json.loads((tmp_path / "q.json").read_text(encoding="utf-8"))
    assert [r["method"] for r in rows] == ["rtn-w4a16"] and "error" not in rows[0]


def arm(name: str, kind: str, train_s: float | None) -> dict:
    """One well-formed ArmResult: 4 training items, 6 generations in 3 s of re-evaluation."""
    return {
        "variant": "rtn-w4a16",
        "eval_variant": name,
        "arm": kind,
        "mode": "sft",
        "train_items": 4,
        "train_problem_ids": ["1", "2", "3", "4"],
        "eval_problem_ids": ["5", "6"],
        "seeds": [0, 1],
        "base_accuracy": 0.5,
        "accuracy_before": 0.25,
        "accuracy_after": 0.5,
        "recovery_before": 0.5,
        "recovery_after": 1.0,
        "repaired": 1,
        "broken": 0,
        "mcnemar_p": 1.0,
        "diff_ci": [0.0, 0.5],
        "adapter": f"/nowhere/{name}",
        "adapter_key": name,
        "adapter_reused": False,
        "eval_mode": "lora",
        "train_seconds": train_s,
        "eval_seconds": 3.0,
        "generations_produced": 6,
        "loss": {"sft": [[1, 2.0], [2, 1.5], [3, 1.2]]},
    }


def test_recovery_smoke(tmp_path):
    """bench/recovery.py without --fresh on a fake run: the table from recovery/summary.json (arms as the
    recover stage writes them, validated against qreason's RecoverySummary)."""
    from qreason.summary import RecoverySummary

    run = tmp_path / "run"
    (run / "recovery").mkdir(parents=True)
    config = "name: fake\ntasks: [{name: synthetic}]\nquantize: [{method: rtn-w4a16}]\nrecover: {epochs: 2}\n"
    (run / "config.yaml").write_text(config, encoding="utf-8")
    (run / "generations.jsonl").write_text("", encoding="utf-8")
    targeted, control = arm("rtn-w4a16+sb", "targeted", 2.0), arm("rtn-w4a16+ctl", "control", None)
    summary = RecoverySummary.model_validate(
        {"variants": [{**targeted, "control": control}], "produced": 12, "seconds": 10.0}
    )
    (run / "recovery" / "summary.json").write_text(summary.model_dump_json(), encoding="utf-8")
    out = bench("recovery.py", str(run))
    lines = out.splitlines()
    assert lines[0].split() == [
        "variant",
        "examples",
        "steps",
        "train_s",
        "examples_per_s",
        "eval_s",
        "produced",
        "gen_per_s",
    ]
    # examples/s = 4 items x 2 epochs / 2 s; generations/s = 6 / 3 s; the control has no training time
    assert lines[1].split() == ["rtn-w4a16+sb", "4", "3", "2.00", "4.00", "3.00", "6", "2.00"]
    assert lines[2].split() == ["rtn-w4a16+ctl", "4", "3", "-", "-", "3.00", "6", "2.00"]


@pytest.mark.vllm
@pytest.mark.skipif(not has_vllm(), reason="vLLM is not installed")
@pytest.mark.skipif(
    not QUANT_PYTHON.is_file(), reason=f"{QUANT_PYTHON} not found: run scripts/setup-quant-env.sh"
)
def test_noise_floor_smoke(tmp_path):
    out = bench("noise_floor.py", "--smoke", "--out", str(tmp_path / "out"))
    assert "qreason noise-floor benchmark" in out
    assert has_line(r"^perturbation +cells +flips +lost +gained +texts changed +accuracy", out)
    for name in ("same", "batch16", "batch1", "nocache"):
        assert has_line(rf"^{name} +4 ", out), name
    assert has_line(r"^rtn-w4a16 +\d+ +\d+ +\d+ ", out)
    result = json.loads((tmp_path / "out" / "noise_floor.json").read_text(encoding="utf-8"))
    assert [p["variant"] for p in result["noise"]["perturbations"]] == [
        "base~same",
        "base~batch16",
        "base~batch1",
        "base~nocache",
    ]
    assert result["engines"]["base~nocache"]["enable_prefix_caching"] is False


@needs_data("gsm8k_test.jsonl", "processbench_gsm8k.jsonl", "processbench_olympiadbench.jsonl")
def test_judge_offline_smoke(tmp_path):
    out = bench(
        "judge_offline.py", "--smoke", "--data-dir", str(SHARED_DATA), "--json", str(tmp_path / "r.json")
    )
    assert "qreason judge stack, model-free layers" in out
    assert has_line(r"^failures 20 \(20 with a worked reference\)", out)
    assert has_line(r"^cpu s [0-9.]+  wall s [0-9.]+  per 1000: ", out)
    report = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    assert report["failures"] == 20 and sum(report["decided_by"].values()) == 20
    for name in ("power tower", "1 MB step", "10,000 nested braces"):  # each refused by both layers
        assert report["hostile"][name]["layers"] == {"rules": "judge_error", "reference": "judge_error"}


def test_study_state_carries_generations_without_the_problem_text(tmp_path):
    """save drops each generation's chat messages (the dataset's text); restore rebuilds them from the config
    into a new run directory, record for record, and refuses a config whose prompt is another."""
    import gzip

    from qreason.cli import main
    from qreason.pipeline.plan import make_plan
    from qreason.store import RunStore

    cfg = tmp_path / "run.yaml"
    body = "name: s\noutput_dir: {out}\nbackend: {{kind: replay, path: replay.jsonl}}\n" + (
        "tasks: [{{name: synthetic, limit: 3, params: {{seed: 7}}}}]\ncurate: {{enabled: false}}\n"
        "report: {{enabled: false}}\n"
    )
    cfg.write_text(body.format(out="old"))
    (tmp_path / "replay.jsonl").write_text("")  # the plan needs the file to exist
    ids = [p.problem_id for p in make_plan(cfg).problems]
    rows = [
        {"problem_id": i, "text": f"Step 1: 1 + 1 = 2.\nThe answer is \\boxed{{{n}}}."}
        for n, i in enumerate(ids)
    ]
    (tmp_path / "replay.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["run", "--skip-preflight", str(cfg)]) == 0
    old = {g.key: g for g in RunStore(tmp_path / "old").generations.all()}
    assert len(old) == 3
    state = tmp_path / "state"
    bench("study_state.py", "save", str(tmp_path / "old"), str(state))
    saved = gzip.decompress((state / "generations.jsonl.gz").read_bytes()).decode()
    assert len(saved.splitlines()) == 3 and '"messages"' not in saved
    assert not any(p.question in saved for p in make_plan(cfg).problems)  # no problem text travels
    cfg.write_text(body.format(out="new"))
    bench("study_state.py", "restore", str(state), str(cfg))
    new = {g.key: g for g in RunStore(tmp_path / "new").generations.all()}
    assert new == old
    # another prompt (a worked example shown first): the records answered a different one
    cfg.write_text(body.format(out="other").replace("limit: 3,", "limit: 3, format_example: true,"))
    proc = subprocess.run(
        [sys.executable, "bench/study_state.py", "restore", str(state), str(cfg)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode != 0 and "is not the one this generation answered" in proc.stderr
