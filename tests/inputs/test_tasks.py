import json
import re
from pathlib import Path

import pytest
from conftest import SHARED_DATA

from qreason.config.schema import LoadedConfig, parse_config
from qreason.errors import UserError
from qreason.inputs import synthetic
from qreason.inputs.steps import split_steps
from qreason.inputs.tasks import build_messages, load_problems, load_spec


def loaded(tmp_path: Path, tasks_yaml: str) -> LoadedConfig:
    cfg = parse_config(f"name: t\ntasks:\n{tasks_yaml}", str(tmp_path / "run.yaml"))
    return LoadedConfig(config=cfg, path=tmp_path / "run.yaml", base_dir=tmp_path)


def write_jsonl(path: Path, rows: list, raw_lines: list[str] = ()) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "".join(raw_lines))
    return path


def apply(step: str) -> int:
    a, op, b, _, c = step.split()
    value = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b), "/": int(a) // int(b)}[op]
    assert value == int(c), step
    return value


def test_synthetic_problems_are_deterministic_and_their_answers_follow_from_the_steps():
    rows = synthetic.generate(n=40, min_steps=1, max_steps=5, seed=3)
    assert rows == synthetic.generate(n=40, min_steps=1, max_steps=5, seed=3)
    assert rows != synthetic.generate(n=40, min_steps=1, max_steps=5, seed=4)
    for row in rows:
        assert len(row["reference_steps"]) == row["steps"]
        chained = None
        for step in row["reference_steps"]:
            first = int(step.split()[0])
            assert chained is None or first == chained  # each step starts from the previous result
            chained = apply(step)
        assert str(chained) == row["answer"] and chained > 0
    assert {r["steps"] for r in rows} == {1, 2, 3, 4, 5}


def test_synthetic_task_records_difficulty(tmp_path):
    cfg = loaded(tmp_path, "  - name: synthetic\n    limit: 8\n    params: {max_steps: 2}\n")
    spec, problems = load_problems(cfg.config.tasks[0], cfg.base_dir)
    assert len(problems) == 8 and spec.answer_type == "number"
    assert {p.meta["difficulty"] for p in problems} == {1, 2}
    assert len({p.problem_id for p in problems}) == 8


def test_local_gsm8k_style_file_extracts_answer_and_reference_steps(tmp_path):
    data = write_jsonl(
        tmp_path / "g.jsonl",
        [
            {
                "question": "Tom has 3 bags of 4 apples. How many apples?",
                "answer": "3 * 4 = <<3*4=12>>12\n#### 12",
            },
            {"question": "A shop sells 1,000 pens and 234 more.", "answer": "1000 + 234 = 1234\n#### 1,234"},
        ],
    )
    cfg = loaded(tmp_path, f"  - name: gsm8k\n    data: {data}\n")
    spec, problems = load_problems(cfg.config.tasks[0], cfg.base_dir)
    assert [p.answer for p in problems] == ["12", "1234"]
    assert [p.problem_id for p in problems] == ["0", "1"]
    assert (
        problems[0].meta["reference_steps"] == ["3 * 4 = 12"] and problems[0].meta["n_reference_steps"] == 1
    )


def test_bad_jsonl_line_names_file_and_line(tmp_path):
    data = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "answer": "#### 1"}], ["{not json\n"])
    cfg = loaded(tmp_path, f"  - name: gsm8k\n    data: {data}\n")
    with pytest.raises(UserError, match=re.escape(f"{data}:2: invalid JSON")):
        load_problems(cfg.config.tasks[0], cfg.base_dir)


def test_missing_field_and_missing_file_are_user_errors(tmp_path):
    data = write_jsonl(tmp_path / "m.jsonl", [{"question": "q", "answer": "#### 1"}, {"question": "q2"}])
    cfg = loaded(tmp_path, f"  - name: gsm8k\n    data: {data}\n")
    with pytest.raises(UserError, match=re.escape(f"{data}:2: missing field 'answer'")):
        load_problems(cfg.config.tasks[0], cfg.base_dir)
    cfg = loaded(tmp_path, "  - name: gsm8k\n    data: nope.jsonl\n")
    with pytest.raises(UserError, match="nope.jsonl: data file not found"):
        load_problems(cfg.config.tasks[0], cfg.base_dir)


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(UserError, match="known: .*gsm8k"):
        load_spec("gsm9k")


def test_hub_source_unreachable_suggests_local_data(tmp_path):
    cfg = loaded(tmp_path, "  - name: gsm8k\n")
    with pytest.raises(UserError, match="set data: PATH.jsonl"):
        load_problems(cfg.config.tasks[0], cfg.base_dir)


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="shared data not present")
@pytest.mark.parametrize(
    "task, file, answer_type",
    [
        ("gsm8k", "gsm8k_test.jsonl", "number"),
        ("math500", "math500.jsonl", "latex"),
        ("aime24", "aime2024.jsonl", "integer"),
    ],
)
def test_real_datasets_load_by_path(tmp_path, task, file, answer_type):
    cfg = loaded(tmp_path, f"  - name: {task}\n    data: {SHARED_DATA / file}\n    limit: 20\n")
    spec, problems = load_problems(cfg.config.tasks[0], cfg.base_dir)
    assert len(problems) == 20 and all(p.answer_type == answer_type for p in problems)
    assert all(p.answer and "####" not in p.answer for p in problems)
    if task == "math500":
        assert {"level", "subject"} <= set(problems[0].meta)
    if task == "aime24":
        assert all(0 <= int(p.answer) <= 999 for p in problems)


def test_messages_ask_for_numbered_steps_and_boxed_answer_with_optional_example(tmp_path):
    cfg = loaded(tmp_path, "  - name: synthetic\n    limit: 1\n")
    spec, (problem,) = load_problems(cfg.config.tasks[0], cfg.base_dir)
    plain = build_messages(spec, problem, format_example=False)
    shown = build_messages(spec, problem, format_example=True)
    assert [m["role"] for m in plain] == ["user"] and [m["role"] for m in shown] == [
        "user",
        "assistant",
        "user",
    ]
    assert problem.question in plain[-1]["content"] and "Step 1" in plain[-1]["content"]
    assert "\\boxed" in plain[-1]["content"] and "\\boxed{" in shown[1]["content"]


@pytest.mark.parametrize(
    "text, steps",
    [
        ("Step 1: a\nStep 2: b\nThe answer is 3", ["a", "b\nThe answer is 3"]),
        ("Intro.\n**Step 1:** a\n**Step 2.** b", ["Intro.\na", "b"]),
        ("first paragraph\n\nsecond paragraph", ["first paragraph", "second paragraph"]),
        ("line one\nline two", ["line one", "line two"]),
        ("", []),
    ],
)
def test_split_steps(text, steps):
    assert split_steps(text) == steps
