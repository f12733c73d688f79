"""Extension points and packaging: the replay backend (generations made elsewhere, graded, judged and reported
end to end) and the built wheel (task specs and judge prompts inside it; runs the synthetic task from a
directory outside the checkout, in a fresh environment beside the existing vLLM)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from conftest import REPO

from qreason.cli import main
from qreason.inputs.synthetic import generate as synthetic_rows


def replay_config(tmp_path: Path, backend: str, n: int = 6) -> Path:
    cfg = tmp_path / "replay.yaml"
    cfg.write_text(f"""
name: replayed
output_dir: out
model: {{name: other-harness, path: external-model}}
tasks:
  - name: synthetic
    limit: {n}
    params: {{min_steps: 1, max_steps: 2, seed: 3}}
backend: {backend}
curate: {{enabled: false}}
""")
    return cfg


def test_replay_backend_grades_judges_and_reports_external_generations(tmp_path):
    rows = synthetic_rows(n=6, min_steps=1, max_steps=2, seed=3)
    # An lm-eval --log_samples style file: the question inside doc, the response in resps[0][0]; rows in
    # another order than the task's; two right, one wrong with an arithmetic slip, the rest without any final
    # answer.
    samples = []
    for i, row in enumerate(reversed(rows)):
        answer = row["answer"] if i < 2 else int(row["answer"]) + 1 if i == 2 else None
        text = (
            f"Step 1: 2 + 2 = 5\nStep 2: so the final answer is \\boxed{{{answer}}}"
            if i == 2
            else f"Step 1: work it out.\nStep 2: The final answer is \\boxed{{{answer}}}"
            if answer is not None
            else "Step 1: I am not sure."
        )
        samples.append(
            {
                "doc_id": i,
                "doc": {"question": "  " + row["question"].upper() + " "},
                "resps": [[text]],
                "target": str(row["answer"]),
            }
        )
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    cfg = replay_config(
        tmp_path, "{kind: replay, path: samples.jsonl, text_field: resps.0.0, question_field: doc.question}"
    )
    assert main(["run", str(cfg)]) == 0
    out = tmp_path / "out"
    summary = json.loads((out / "summary.json").read_text())
    (row,) = summary["results"]
    assert row["variant"] == "other-harness" and row["n_problems"] == 6
    assert (
        row["outcomes"]["correct"] == 2
        and row["outcomes"]["wrong"] == 1
        and row["outcomes"]["no_answer"] == 3
    )
    generations = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert {g["backend"] for g in generations} == {"replay:samples.jsonl"}
    judgments = [json.loads(line) for line in (out / "judgments.jsonl").read_text().splitlines()]
    slip = [j for j in judgments if j["judge"] == "rules" and j["error_type"] == "Execution"]
    assert len(slip) == 1 and slip[0]["first_error_step"] == 0  # "2 + 2 = 5" found by the rule checks
    assert (out / "report.html").exists() and "other-harness" in (out / "report.html").read_text()
    # a second run replays nothing: every generation is cached
    assert main(["run", str(cfg)]) == 0
    assert json.loads((out / "summary.json").read_text())["generations"]["produced"] == 0


def test_replay_backend_reports_missing_rows_and_bad_rows(tmp_path, capsys):
    rows = synthetic_rows(n=3, min_steps=1, max_steps=1, seed=3)
    (tmp_path / "samples.jsonl").write_text(
        "".join(
            json.dumps({"problem_id": r["id"], "text": f"\\boxed{{{r['answer']}}}"}) + "\n" for r in rows[:2]
        )
    )
    cfg = replay_config(tmp_path, "{kind: replay, path: samples.jsonl}", n=3)
    assert main(["run", str(cfg)]) == 1  # one problem has no row: a failed generation, reported, not stored
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["generations"]["produced"] == 2 and summary["generations"]["failed"] == 1
    (tmp_path / "bad.jsonl").write_text(json.dumps({"problem_id": rows[0]["id"], "text": 7}) + "\n")
    (tmp_path / "b").mkdir()
    bad = replay_config(tmp_path / "b", "{kind: replay, path: ../bad.jsonl}")
    assert main(["run", str(bad)]) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err
    assert not (tmp_path / "b" / "out").exists()  # bad input leaves nothing behind


def _uv() -> str:
    found = shutil.which("uv") or next(
        (str(p) for p in (Path.home() / ".local" / "bin" / "uv",) if p.exists()), None
    )
    if found is None:
        pytest.fail("uv is needed to build the wheel (scripts/setup-env.sh installs it)")
    return found


@pytest.mark.vllm
def test_the_wheel_has_its_data_and_runs_the_synthetic_task_outside_the_checkout(tmp_path, default_model):
    uv = _uv()
    dist, src = tmp_path / "dist", tmp_path / "src"
    # build from a copy: setuptools writes build/ and *.egg-info into the source tree
    shutil.copytree(
        REPO,
        src,
        symlinks=True,
        ignore=shutil.ignore_patterns(
            ".git", ".venv*", "runs", "build", "*.egg-info", "__pycache__", "bench", "tests"
        ),
    )
    subprocess.run(
        [uv, "build", "-q", "--wheel", "--out-dir", str(dist), str(src)],
        check=True,
        capture_output=True,
        text=True,
    )
    (wheel,) = dist.glob("qreason-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for data in (
        "qreason/specs/tasks/synthetic.yaml",
        "qreason/specs/tasks/prompts.yaml",
        "qreason/specs/judge_prompts/judge_v1.yaml",
        "qreason/specs/judge_prompts/taxonomy.yaml",
        "qreason/report/report.html.j2",
        "qreason/stages/quantize/recipes.yaml",
        "qreason/workers/requirements/quant.txt",  # what `qreason setup` builds the side environments from
        "qreason/workers/requirements/torch.txt",
    ):
        assert data in names, data

    # a fresh environment that sees the existing one's libraries (vLLM included), with qreason from the wheel
    # only
    venv = tmp_path / "venv"
    subprocess.run([uv, "venv", "-q", "-p", sys.executable, str(venv)], check=True)
    site = next(venv.glob("lib/python*/site-packages"))
    (site / "existing_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [uv, "pip", "install", "-q", "-p", str(venv / "bin" / "python"), "--no-deps", str(wheel)], check=True
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import qreason; print(qreason.__file__)"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert where.startswith(str(site)), where
    (elsewhere / "cfg.yaml").write_text(f"""
name: from-wheel
output_dir: out
model: {{path: {default_model.path}}}
tasks: [{{name: synthetic, limit: 4, params: {{min_steps: 1, max_steps: 1}}}}]
sampling: {{max_tokens: 24}}
backend: {{max_model_len: 1024}}
curate: {{enabled: false}}
""")
    result = subprocess.run(
        [str(venv / "bin" / "qreason"), "run", "cfg.yaml"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((elsewhere / "out" / "summary.json").read_text())
    assert summary["results"][0]["n_problems"] == 4 and summary["generations"]["produced"] == 4
    listed = subprocess.run(
        [str(venv / "bin" / "qreason"), "tasks"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert {"synthetic", "gsm8k", "math500", "aime24"} <= {line.split()[0] for line in listed.splitlines()}
