"""Careless and hostile input (issue 11, items 9-12, 15, 16): every case is a one-line error with exit code 2
that names the place, written before anything is created, or the right result; never a traceback or a lost
directory. Runs use the OpenAI-compatible backend against a local scripted endpoint, so no engine starts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import write_config
from fault_server import FaultServer

from qreason.config.schema import load_config, parse_config
from qreason.errors import UserError
from qreason.inputs.synthetic import generate as synthetic_rows
from qreason.pipeline.runner import run, run_all
from qreason.store import RunIndex

ANSWERS = {r["question"]: r["answer"] for r in synthetic_rows(n=6, seed=0)}


def solver(right: bool):
    def reply(body: dict) -> str:
        question = body["messages"][-1]["content"].split("Problem: ", 1)[1]
        answer = int(ANSWERS[question]) + (0 if right else 1)
        return f"Step 1: I count carefully.\nThe final answer is \\boxed{{{answer}}}."

    return reply


def qreason(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qreason.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit code 2, exactly one line on stderr (no traceback), holding every fragment."""
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qreason: error: "), result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def plain_task(tmp_path: Path) -> Path:
    """A task spec whose data rows are plain {question, answer} (no id field: the row index is the id)."""
    return write_config(
        tmp_path / "plain.yaml", "name: plain\nanswer_type: number\nsource: {synthetic: {}}\n"
    )


def endpoint_config(
    tmp_path: Path, base_url: str, out: str = "${RUN_ROOT}/night", extra: str = "", name: str = "c.yaml"
) -> Path:
    return write_config(
        tmp_path / name,
        f"""
name: night
output_dir: {out}
model: {{path: m-good}}
tasks: [{{name: synthetic, limit: 6}}]
sampling: {{max_tokens: 64}}
backend: {{kind: openai, base_url: "{base_url}", max_retries: 0}}
curate: {{enabled: false}}
{extra}""",
    )


# ---------------------------------------------------------------------------------------------- 9: models:
# axis


def test_a_sub_run_of_a_models_axis_keeps_its_own_config(tmp_path, monkeypatch):
    """Stage commands on RUN/MODEL re-read RUN/MODEL/config.yaml: it must describe that model's run (its base
    variant and name), not the whole matrix with the default model."""
    monkeypatch.setenv("RUN_ROOT", str(tmp_path / "out"))

    def by_model(body: dict) -> str:
        return solver(body["model"] == "m-good")(body)

    with FaultServer([], content=by_model) as server:
        cfg = write_config(
            tmp_path / "matrix.yaml",
            f"""
name: nightly
output_dir: ${{RUN_ROOT}}/nightly
models: [{{name: smol, path: m-good}}, {{name: bad, path: m-bad}}]
tasks: [{{name: synthetic, limit: 6}}]
sampling: {{max_tokens: 64}}
backend: {{kind: openai, base_url: "{server.base_url}", max_retries: 0}}
curate: {{enabled: false}}
""",
        )
        run_all(cfg)
    sub = tmp_path / "out" / "nightly" / "smol"
    stored_text = (sub / "config.yaml").read_text()
    assert "${RUN_ROOT}" in stored_text and str(tmp_path) not in stored_text  # still unexpanded
    stored = parse_config(stored_text, str(sub / "config.yaml"))
    assert (stored.name, stored.model.name, stored.model.path, stored.models) == (
        "nightly-smol",
        "smol",
        "m-good",
        [],
    )
    assert stored.judge.base_variant == "smol"
    curated = qreason("curate", sub)
    assert curated.returncode == 0, curated.stderr
    assert "nothing to curate" in curated.stdout
    analyzed = qreason("analyze", sub)
    assert analyzed.returncode == 0, analyzed.stderr
    assert "smol" in analyzed.stdout


# ------------------------------------------------------------------------------ 10: run markers and foreign
# dirs


def test_run_refuses_a_foreign_non_empty_output_directory_up_front(tmp_path, monkeypatch):
    foreign = tmp_path / "thesis"
    foreign.mkdir()
    (foreign / "chapter1.tex").write_text("precious")
    cfg = endpoint_config(tmp_path, "http://127.0.0.1:9/v1", out=str(foreign))
    result = qreason("run", cfg)
    one_line_error(result, str(foreign), "not a qreason run directory")
    assert sorted(p.name for p in foreign.iterdir()) == ["chapter1.tex"]
    assert RunIndex(tmp_path / "runs" / "index.sqlite").list() == []
    one_line_error(qreason("plan", cfg), "not a qreason run directory")


def test_prune_deletes_only_directories_carrying_the_run_marker(tmp_path, monkeypatch):
    """A directory indexed as a run long ago and since replaced by someone's files is left alone."""
    from qreason.store.retention import prune

    monkeypatch.setenv("RUN_ROOT", str(tmp_path / "out"))
    monkeypatch.setenv("QREASON_CACHE", str(tmp_path / "cache"))
    index = RunIndex(tmp_path / "runs" / "index.sqlite")
    with FaultServer([], content=solver(True)) as server:
        run(endpoint_config(tmp_path, server.base_url, out="${RUN_ROOT}/kept-run"), index=index)
        run(endpoint_config(tmp_path, server.base_url, out="${RUN_ROOT}/reused", name="d.yaml"), index=index)
    real, reused = tmp_path / "out" / "kept-run", tmp_path / "out" / "reused"
    # the second directory is emptied and reused by somebody else for their own files
    for p in reused.iterdir():
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    (reused / "notes.txt").write_text("mine")
    with index._connect() as db:
        db.execute(
            "UPDATE runs SET finished_at = '2020-01-01T00:00:00+00:00', started_at = "
            "'2020-01-01T00:00:00+00:00'"
        )
    removed = prune(index, 30, dry_run=False)
    assert (reused / "notes.txt").read_text() == "mine"
    assert removed["run_dirs"] == [str(real)] and removed["skipped"] == [str(reused)]
    assert not real.exists()


# ------------------------------------------------------------------------------------- 11: input first,
# really


def _fake_checkpoint(path: Path, config: dict) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_plan_rejects_an_unquantized_import_before_anything_is_written(tmp_path, default_model):
    plain = _fake_checkpoint(tmp_path / "not-quantized", {"model_type": "llama", "hidden_size": 64})
    cfg = write_config(
        tmp_path / "c.yaml",
        f"""
name: imp
output_dir: {tmp_path / "out"}
tasks: [{{name: synthetic, limit: 2}}]
quantize: [{{method: import, path: {plain}}}]
""",
    )
    one_line_error(qreason("plan", cfg), str(plain / "config.json"), "not a quantized checkpoint")
    one_line_error(qreason("run", cfg), "not a quantized checkpoint")
    assert not (tmp_path / "out").exists()
    assert RunIndex(tmp_path / "runs" / "index.sqlite").list() == []


def test_a_prompt_longer_than_max_model_len_is_refused_before_anything_is_written(tmp_path, default_model):
    data = tmp_path / "long.jsonl"
    rows = [
        {"question": "What is 1 + 1?", "answer": "2"},
        {"question": "Add these numbers: " + " + ".join(["1"] * 300), "answer": "300"},
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = write_config(
        tmp_path / "c.yaml",
        f"""
name: long
output_dir: {tmp_path / "out"}
tasks: [{{name: {plain_task(tmp_path)}, data: {data}}}]
backend: {{max_model_len: 256}}
""",
    )
    result = qreason("plan", cfg)
    one_line_error(result, f"{data}:2", "max_model_len 256")
    one_line_error(qreason("run", cfg), f"{data}:2", "tokens")
    assert not (tmp_path / "out").exists()
    # the short one alone passes
    data.write_text(json.dumps(rows[0]) + "\n")
    assert qreason("plan", cfg).returncode == 0


# ---------------------------------------------------------------------------------- 12: one-line errors, not
# tracebacks


def test_non_utf8_config_task_and_data_files(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_bytes(b"name: x\ntasks: [{name: synthetic}]\nmodel: {path: caf\xe9}\n")
    one_line_error(qreason("plan", cfg), f"{cfg}:3", "UTF-8")
    spec = tmp_path / "t.yaml"
    spec.write_bytes(b"name: t\nanswer_type: number\ndescription: na\xefve\nsource: {synthetic: {}}\n")
    cfg.write_text(f"name: x\ntasks: [{{name: {spec}}}]\n")
    one_line_error(qreason("plan", cfg), f"{spec}:3", "UTF-8")
    data = tmp_path / "d.jsonl"
    data.write_bytes(b'{"question": "1+1", "answer": "2"}\n{"question": "\xff", "answer": "2"}\n')
    cfg.write_text(
        f"name: x\ntasks: [{{name: {plain_task(tmp_path)}, data: {data}}}]\nbackend: "
        f"{{kind: openai, base_url: 'http://x/v1'}}\n"
    )
    one_line_error(qreason("plan", cfg), f"{data}:2", "UTF-8")


@pytest.mark.parametrize(
    "pattern, message",
    [
        ("'#### (?P<ans>.*)'", "(?P<answer>"),
        ("'#### (?P<answer>.*'", "invalid regular expression"),
    ],
)
def test_bad_answer_patterns_are_named_in_the_task_file(tmp_path, pattern, message):
    spec = write_config(
        tmp_path / "t.yaml",
        f"""
name: t
answer_type: number
source: {{synthetic: {{}}}}
answer_pattern: {pattern}
""",
    )
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"question": "q", "answer": "#### 4"}) + "\n")
    cfg = write_config(
        tmp_path / "c.yaml",
        f"""
name: x
tasks: [{{name: {spec}, data: {data}}}]
backend: {{kind: openai, base_url: "http://127.0.0.1:9/v1"}}
""",
    )
    one_line_error(qreason("plan", cfg), str(spec), "answer_pattern", message)


def test_reference_steps_that_are_not_a_list(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(
        json.dumps({"question": "q", "answer": "4"})
        + "\n"
        + json.dumps({"question": "r", "answer": "4", "reference_steps": 3})
        + "\n"
    )
    cfg = write_config(
        tmp_path / "c.yaml",
        f"""
name: x
tasks: [{{name: {plain_task(tmp_path)}, data: {data}}}]
backend: {{kind: openai, base_url: "http://127.0.0.1:9/v1"}}
""",
    )
    one_line_error(qreason("plan", cfg), f"{data}:2", "reference_steps")


def test_analyze_and_report_on_an_ungraded_run(tmp_path, monkeypatch):
    """A run killed between generation and grading: analyze and report say what to do, they do not crash."""
    monkeypatch.setenv("RUN_ROOT", str(tmp_path / "out"))
    with FaultServer([], content=solver(True)) as server:
        run(endpoint_config(tmp_path, server.base_url))
    run_dir = tmp_path / "out" / "night"
    for table in ("grades.jsonl", "judgments.jsonl"):
        (run_dir / table).unlink(missing_ok=True)
    for command in ("analyze", "report"):
        one_line_error(qreason(command, run_dir), str(run_dir), "no graded generations", "qreason grade")


def test_mathtext_in_variant_and_task_names_is_drawn_literally(tmp_path):
    from run_builders import build_run

    from qreason.report import build_report

    store = build_run(tmp_path)
    hostile = r"w4$\undefinedcmd{$"
    for table in (store.generations, store.grades, store.judgments):
        text = (
            table.path.read_text()
            .replace('"rtn-w4a16"', json.dumps(hostile))
            .replace('"synthetic"', json.dumps("t$\\frac{$"))
        )
        table.path.write_text(text)
        table._rows = None
    out = build_report(store, index=RunIndex(tmp_path / "index.sqlite"))
    html = out.read_text()
    assert html.count("data:image/png;base64,") >= 3
    assert "w4$\\undefinedcmd{$" in html


# ------------------------------------------------------------------------------ 15: ${VAR} expanded after
# parsing


def test_an_environment_value_with_a_newline_cannot_add_keys(tmp_path, monkeypatch):
    monkeypatch.setenv("EVIL", "/tmp/x\nmodels: [{name: a, path: b}]\nbogus: 1")
    cfg = parse_config("name: x\noutput_dir: ${EVIL}\ntasks: [{name: synthetic}]\n", "c.yaml")
    assert cfg.output_dir == "/tmp/x\nmodels: [{name: a, path: b}]\nbogus: 1" and cfg.models == []
    monkeypatch.setenv("TOKENS", "64")
    cfg = parse_config("name: x\ntasks: [{name: synthetic}]\nsampling: {max_tokens: '${TOKENS}'}\n", "c.yaml")
    assert cfg.sampling.max_tokens == 64
    monkeypatch.delenv("NOPE", raising=False)
    with pytest.raises(UserError, match=r"^c.yaml:4: environment variable NOPE is not set"):
        parse_config("name: x\ntasks:\n  - name: synthetic\n    data: ${NOPE}/d.jsonl\n", "c.yaml")


def test_read_only_commands_on_a_stored_config_need_no_unset_variables(tmp_path, monkeypatch):
    monkeypatch.setenv("RUN_ROOT", str(tmp_path / "out"))
    with FaultServer([], content=solver(True)) as server:
        run(endpoint_config(tmp_path, server.base_url))
    run_dir = tmp_path / "out" / "night"
    env = {k: v for k, v in os.environ.items() if k != "RUN_ROOT"}
    for command in ("analyze", "report"):
        result = subprocess.run(
            [sys.executable, "-m", "qreason.cli", command, str(run_dir)],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )
        assert result.returncode == 0, result.stderr[-2000:]
    assert (run_dir / "report.html").is_file()


# ------------------------------------------------------------------------------------ 16: task data at scale


def test_duplicate_ids_at_scale_are_found_fast_and_named_by_line(tmp_path):
    """The duplicate check costs no more than reading the rows (a check comparing every id with every other
    one takes many times longer than reading 20k rows when the repeated id comes last)."""
    from qreason.inputs.tasks import load_problems

    data = tmp_path / "d.jsonl"
    rows = [{"id": f"p{i}", "question": f"q{i}", "answer": str(i)} for i in range(20000)]
    unique = "".join(json.dumps(r) + "\n" for r in rows)
    spec = write_config(
        tmp_path / "t.yaml", "name: t\nanswer_type: number\nsource: {synthetic: {}}\nfields: {id: id}\n"
    )
    cfg = write_config(
        tmp_path / "c.yaml",
        f"""
name: x
tasks: [{{name: {spec}, data: {data}}}]
backend: {{kind: openai, base_url: "http://127.0.0.1:9/v1"}}
""",
    )
    loaded = load_config(cfg)
    data.write_text(unique)
    t0 = time.perf_counter()
    load_problems(loaded.config.tasks[0], loaded.base_dir)
    reading = time.perf_counter() - t0
    data.write_text(unique + json.dumps({"id": "p19999", "question": "again", "answer": "1"}) + "\n")
    t0 = time.perf_counter()
    with pytest.raises(UserError) as err:
        load_problems(loaded.config.tasks[0], loaded.base_dir)
    checking = time.perf_counter() - t0
    assert str(err.value) == f"{data}:20001: duplicate problem id 'p19999' (first on line 20000)"
    assert checking < 2 * reading + 1.0, (checking, reading)


@pytest.mark.parametrize(
    "row, message",
    [
        ('{"question": NaN, "answer": "2"}', "question must be text"),
        ('{"question": 12, "answer": "2"}', "question must be text"),
        ('{"question": "q", "answer": NaN}', "answer"),
    ],
)
def test_nan_and_non_text_questions_are_refused_with_the_line(tmp_path, row, message):
    data = tmp_path / "d.jsonl"
    data.write_text('{"question": "fine", "answer": "1"}\n' + row + "\n")
    cfg = write_config(
        tmp_path / "c.yaml",
        f"""
name: x
tasks: [{{name: {plain_task(tmp_path)}, data: {data}}}]
backend: {{kind: openai, base_url: "http://127.0.0.1:9/v1"}}
""",
    )
    one_line_error(qreason("plan", cfg), f"{data}:2", message)
