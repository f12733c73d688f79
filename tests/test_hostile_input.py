"""Hostile and careless input (issue 11): rule checks that must stay bounded, a curate --out that must not
delete what qreason did not write, lone surrogates, a full disk, read-only commands that must not cut tables,
and batch files of the wrong shape."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import REPO
from judge_helpers import make_run

from qreason.errors import UserError
from qreason.records import Grade, Problem, SilverBulletItem, content_key
from qreason.stages.judge import JudgeConfig, run_judging
from qreason.store import RunLock, RunStore, Table

HOSTILE_STEP = "((((1/999999999999999)^64)^64)^64)^64 + 1 = 5"


def qreason(*args, cwd=None, timeout=120):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "qreason.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
        env=env,
    )


def grade(key: str, status: str = "correct") -> Grade:
    return Grade(
        key=key,
        generation_key="g" + key,
        variant="base",
        task="t",
        problem_id=key,
        seed=0,
        status=status,
        extracted="1",
        reference="1",
        grader="test",
    )


# ------------------------------------------------------------------------------------------ 1. rule checks


def test_hostile_power_tower_is_judged_in_seconds():
    """A 45-character step with a nested power of a tiny fraction used to run forever (digits x64 per
    level)."""
    assert len(HOSTILE_STEP) <= 46
    code = (
        "from qreason.stages.judge.rules import check_arithmetic\n"
        f"print(check_arithmetic({HOSTILE_STEP!r}))\n"
    )
    t0 = time.monotonic()
    try:
        out = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=20,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
    except subprocess.TimeoutExpired:
        pytest.fail("check_arithmetic did not return within 20 s")
    assert out.returncode == 0, out.stderr
    assert time.monotonic() - t0 < 10
    # an unreadable expression is skipped, never flagged
    assert out.stdout.strip() == "None"


def test_numbers_stay_small_in_bits_not_only_in_magnitude():
    from qreason.stages.judge.rules import check_arithmetic, evaluate, resolve_words, tokenize

    t0 = time.monotonic()
    for step in (
        "(1/999999999999999)^64 * 3 = 1",
        "((2/3)^64)^64 = 1",
        "(1/7)^64 + (1/11)^64 + (1/13)^64 = 1",
    ):
        check_arithmetic(step)
    assert time.monotonic() - t0 < 1
    # ordinary powers are still checked
    assert evaluate(resolve_words(tokenize("2^10"))) == [1024]
    assert check_arithmetic("2^10 = 1000") is not None
    assert check_arithmetic("(1/2)^3 = 0.125") is None


def _hostile_case(pid: str, steps: str) -> tuple:
    return (pid, "What is it?", "5", {"q4": (steps + "\nThe final answer is \\boxed{4}.", "wrong")})


def test_judge_stage_bounds_rule_checks_and_records_a_rule_error(tmp_path):
    """Each generation's rule checks run under a wall-clock limit in a worker process; what overruns gets a
    rule-check error record at once, so a re-run does not redo (or hang on) it. The long solution is made long
    enough, on this machine, to take ten times the limit: the test does not depend on the machine's speed."""
    from qreason.inputs.steps import split_steps
    from qreason.stages.judge.rules import rule_verdict

    n = 3000
    while True:
        long = "\n".join(f"Step {i}: {i} * 3 + {i} = {4 * i}. Then {i} + 7 - 2 = {i + 5}." for i in range(n))
        t0 = time.monotonic()
        rule_verdict(split_steps(long), "wrong")
        if time.monotonic() - t0 >= 3.0 or n >= 1_000_000:
            break
        n *= 2
    # the overrun alone under the tight limit; the ordinary cases under the default one, so that a loaded
    # machine (a slow worker start) cannot turn them into overruns
    store = make_run(tmp_path / "long", [_hostile_case("long", long)])
    tight = JudgeConfig(rules_timeout_s=0.3, layers=["rules"])
    stats = run_judging(store, tight)
    rules = {j.problem_id: j for j in store.judgments.all() if j.judge == "rules"}
    assert stats.rules_written == 1 and set(rules) == {"long"}
    assert rules["long"].status == "judge_error" and "rule checks" in rules["long"].error
    assert "0.3 s" in rules["long"].error
    assert run_judging(store, tight).rules_written == 0
    store = make_run(
        tmp_path / "run",
        [_hostile_case("hostile", f"Step 1: {HOSTILE_STEP}."), _hostile_case("fine", "Step 1: 2 + 2 = 5.")],
    )
    cfg = JudgeConfig(layers=["rules"])
    stats = run_judging(store, cfg)
    rules = {j.problem_id: j for j in store.judgments.all() if j.judge == "rules"}
    assert stats.rules_written == 2 and set(rules) == {"hostile", "fine"}
    assert rules["hostile"].status == "ok"
    assert rules["fine"].status == "ok" and rules["fine"].first_error_step == 0
    again = run_judging(store, cfg)
    assert again.rules_written == 0


def test_rule_verdicts_are_appended_as_they_come(tmp_path, monkeypatch):
    """A run killed during the rule checks keeps the verdicts finished before: they are written in small
    groups, not after the loop."""
    from qreason.stages.judge import stage

    cases = [_hostile_case(f"p{i}", f"Step 1: {i} + 1 = {i + 2}.") for i in range(6)]
    store = make_run(tmp_path / "run", cases)
    monkeypatch.setattr(stage, "RULES_FLUSH_EVERY", 2)
    seen = []
    real = store.judgments.append

    def spy(records):
        records = list(records)
        rules = sum(r.judge == "rules" for r in records)
        if rules:
            seen.append(rules)
        return real(records)

    monkeypatch.setattr(store.judgments, "append", spy)
    run_judging(store, JudgeConfig(layers=["rules"]))
    assert sum(seen) == 6 and max(seen) <= 2


# ------------------------------------------------------------------------------------------ 2. curate --out


def _item(i: int) -> SilverBulletItem:
    return SilverBulletItem(
        key=f"k{i}",
        task="t",
        problem_id=str(i),
        variant="q",
        method="rtn",
        seed=0,
        messages=[{"role": "user", "content": "q"}],
        sft_solution="s",
        first_error_step=1,
        judge="rules",
    )


def test_export_refuses_a_foreign_directory_and_touches_nothing(tmp_path):
    from qreason.stages.curate import export

    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    with pytest.raises(UserError) as err:
        export([_item(0)], out, {})
    assert str(out) in str(err.value) and "not a dataset" in str(err.value)
    assert [p.name for p in out.iterdir()] == ["thesis.tex"]
    assert (out / "thesis.tex").read_text() == "years of work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_export_replaces_its_own_dataset_atomically(tmp_path):
    from qreason.stages.curate import export
    from qreason.store import owned_as

    out = tmp_path / "ds"
    export([_item(0), _item(1)], out, {})
    assert owned_as(out) == "dataset"
    export([_item(2)], out, {})
    assert [json.loads(x)["key"] for x in (out / "items.jsonl").read_text().splitlines()] == ["k2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # nothing left beside it
    empty = tmp_path / "empty"
    empty.mkdir()
    export([_item(3)], empty, {})
    assert (empty / "items.jsonl").is_file()


def test_curate_cli_refuses_a_foreign_out_dir_before_any_work(tmp_path):
    from qreason.records import Judgment, ModelVariant
    from qreason.store import now_iso

    store = make_run(tmp_path / "run")
    store.variants.append(
        [
            ModelVariant(
                key="v",
                name="base",
                base_model="m",
                base_fingerprint="fp",
                method="none",
                path=str(tmp_path / "no-model"),
                fingerprint="fp",
                created_at=now_iso(),
            )
        ]
    )
    gen = next(g for g in store.generations.all() if g.variant == "q4" and g.problem_id == "p0")
    store.judgments.append(
        [
            Judgment(
                key="j",
                generation_key=gen.key,
                variant="q4",
                task="toy",
                problem_id="p0",
                seed=0,
                judge="rules",
                first_error_step=1,
                error_type="Execution",
                flip=True,
                created_at=now_iso(),
            )
        ]
    )
    (store.dir / "config.yaml").write_text("name: x\ntasks: [{name: synthetic}]\n")
    out = tmp_path / "home"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    result = qreason("curate", str(store.dir), "--out", str(out))
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and str(out) in result.stderr
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"
    assert not (store.dir / "continuations.jsonl").exists()


# ------------------------------------------------------------------------------------------ 5. surrogates


def test_lone_surrogates_are_replaced_on_the_way_in(tmp_path):
    bad = json.loads('"x \\ud800 y"')
    p = Problem(
        key="k",
        task="t",
        problem_id="1",
        question=bad,
        answer="1",
        answer_type="number",
        meta={"steps": [bad]},
    )
    assert "\ud800" not in p.question and "\ufffd" in p.question and "\ud800" not in p.meta["steps"][0]
    assert content_key("problem", bad) == content_key("problem", bad)  # no crash
    table = Table(tmp_path / "problems.jsonl", Problem)
    assert table.append([p]) == 1
    assert Table(tmp_path / "problems.jsonl", Problem).get("k").question == p.question


def test_plan_accepts_a_task_file_with_a_lone_surrogate(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text(
        '{"question": "How many? \\ud800", "answer": "#### 4"}\n'
        '{"question": "And now?", "answer": "#### 5"}\n'
    )
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"name: s\noutput_dir: out\ntasks:\n  - name: gsm8k\n    data: {data}\n"
        "backend: {kind: openai, base_url: 'http://127.0.0.1:9/v1', model: m}\n"
    )
    result = qreason("plan", "--skip-preflight", str(cfg))  # no endpoint answers there: the data is checked
    assert result.returncode == 0, result.stderr
    assert "2 problems" in result.stdout


# ------------------------------------------------------------------------------------------ 6. full disk

FULL_DISK = textwrap.dedent("""
    import resource, signal, sys
    from qreason.records import Grade
    from qreason.store import Table
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    path = sys.argv[1]
    size = int(sys.argv[2])
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
    def grade(k):
        return Grade(key=k, generation_key="g" + k, variant="base", task="t", problem_id=k, seed=0,
                     status="correct", extracted="1", reference="1", grader="test")
    t = Table(__import__("pathlib").Path(path), Grade)
    try:
        t.append([grade(f"n{i}") for i in range(20)])
    except Exception as exc:
        print(type(exc).__name__, exc)
        sys.exit(2)
""")


def test_failed_append_restores_the_last_complete_line(tmp_path):
    """A write that fails half-way (EFBIG from RLIMIT_FSIZE: a real partial write) leaves the table as it was;
    the next append stays valid."""
    path = tmp_path / "grades.jsonl"
    Table(path, Grade).append([grade("a"), grade("b")])
    before = path.read_bytes()
    script = tmp_path / "full.py"
    script.write_text(FULL_DISK)
    out = subprocess.run(
        [sys.executable, str(script), str(path), str(len(before) + 300)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=60,
    )
    assert out.returncode == 2, out.stderr
    assert "grades.jsonl" in out.stdout and "restored" in out.stdout
    assert path.read_bytes() == before
    table = Table(path, Grade)
    table.append([grade("c")])
    assert [json.loads(x)["key"] for x in path.read_text().splitlines()] == ["a", "b", "c"]


def test_corrupt_middle_line_points_at_repair_and_repair_keeps_the_good_lines(tmp_path):
    from qreason.store import mark_run_dir

    store = RunStore(tmp_path / "run")
    mark_run_dir(store.dir, "run")
    store.grades.append([grade("a")])
    path = store.grades.path
    glued = grade("b").model_dump_json()[:30] + grade("c").model_dump_json() + "\n"
    path.write_text(path.read_text() + glued + grade("d").model_dump_json() + "\n")
    with pytest.raises(UserError) as err:
        RunStore(store.dir).grades.all()
    assert f"{path}:2" in str(err.value) and "qreason repair" in str(err.value)
    result = qreason("repair", str(store.dir))
    assert result.returncode == 0, result.stderr
    assert "grades.jsonl" in result.stdout and "1 corrupt line" in result.stdout
    assert [g.key for g in RunStore(store.dir).grades.all()] == ["a", "d"]
    aside = list(store.dir.glob("grades.jsonl.corrupt*"))
    assert len(aside) == 1 and aside[0].read_text() == glued  # nothing is thrown away
    assert "nothing to repair" in qreason("repair", str(store.dir)).stdout


# ------------------------------------------------------------------------------------------ 7. readers and
# locks


def test_reading_never_cuts_a_table(tmp_path):
    """A reader (another process may be writing this very line) leaves a torn tail alone; the next writer
    repairs it before appending."""
    path = tmp_path / "grades.jsonl"
    Table(path, Grade).append([grade("a")])
    torn = path.read_bytes() + grade("b").model_dump_json().encode()[:40]
    path.write_bytes(torn)
    assert [g.key for g in Table(path, Grade).all()] == ["a"]
    assert path.read_bytes() == torn
    Table(path, Grade).append([grade("c")])
    assert [json.loads(x)["key"] for x in path.read_text().splitlines()] == ["a", "c"]


def test_read_only_commands_leave_a_locked_run_alone_and_writers_wait_for_the_lock(tmp_path):
    store = make_run(tmp_path / "run")
    (store.dir / "config.yaml").write_text("name: x\ntasks: [{name: synthetic}]\n")
    path = store.generations.path
    torn = path.read_bytes() + b'{"key": "half-writ'
    path.write_bytes(torn)
    with RunLock(store.dir):
        for cmd in ("analyze", "report"):
            qreason(cmd, str(store.dir))
            assert path.read_bytes() == torn, cmd
        for cmd in (("judge", str(store.dir)), ("grade", str(store.dir)), ("repair", str(store.dir))):
            result = qreason(*cmd)
            assert result.returncode == 2 and "another qreason" in result.stderr, (cmd, result.stderr)
            assert path.read_bytes() == torn, cmd
    assert qreason("judge", str(store.dir)).returncode == 0
    assert path.read_bytes() == torn  # judge wrote judgments, not generations


# ------------------------------------------------------------------------------------------ 13. batch files

WRONG_SHAPES = [
    {"response": [1, 2]},
    {"response": {"status_code": 200, "body": {"choices": {"a": 1}}}},
    {"response": {"status_code": 200, "body": {"choices": ["text"]}}},
    {"response": {"status_code": 200, "body": {"choices": [{"message": "hi"}]}}},
    {"response": {"status_code": 200, "body": {"choices": [{"message": {"content": 7}}]}}},
    {"response": {"status_code": 200, "body": {"choices": [{"message": None}]}}},
    {"response": {"status_code": 200, "body": {"choices": [], "usage": [3]}}},
    {"response": {"status_code": "200", "body": "<html>"}, "error": ["x"]},
]


def test_batch_lines_of_the_wrong_shape_become_judge_errors(tmp_path):
    """Well-formed JSON lines whose fields have the wrong shape: each becomes a judge_error, none a crash."""
    cases = [_hostile_case(f"p{i}", f"Step 1: {i} + 1 = {i + 3}.") for i in range(len(WRONG_SHAPES))]
    store = make_run(tmp_path / "run", cases)
    base = {"judges": [{"name": "j", "base_url": "http://127.0.0.1:9/v1", "model": "m"}]}
    stats = run_judging(store, JudgeConfig.model_validate({**base, "batch": {"mode": "write"}}))
    path = Path(stats.batch_files[0])
    ids = [json.loads(x)["custom_id"] for x in path.read_text().splitlines()]
    assert len(ids) == len(WRONG_SHAPES)
    (path.parent / "j.batch_output.jsonl").write_text(
        "".join(json.dumps({**line, "custom_id": i}) + "\n" for i, line in zip(ids, WRONG_SHAPES))
    )
    stats = run_judging(store, JudgeConfig.model_validate({**base, "batch": {"mode": "read"}}))
    assert stats.judges["j"]["judge_error"] == len(ids) and stats.requests == 0
    errors = [j.error for j in store.judgments.all() if j.judge == "j"]
    assert len(errors) == len(ids) and all(e.startswith("batch") for e in errors)
