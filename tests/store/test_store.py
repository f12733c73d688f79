import json

import pytest

from qreason.errors import UserError
from qreason.records import Grade
from qreason.store import RunIndex, RunStore, Table, write_atomic


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


def test_append_skips_stored_keys_and_duplicates_within_a_batch(tmp_path):
    table = Table(tmp_path / "grades.jsonl", Grade)
    assert table.append([grade("a"), grade("b"), grade("a")]) == 2
    assert table.append([grade("b"), grade("c")]) == 1
    reopened = Table(tmp_path / "grades.jsonl", Grade)
    assert sorted(r.key for r in reopened.all()) == ["a", "b", "c"]
    assert len((tmp_path / "grades.jsonl").read_text().splitlines()) == 3


def test_torn_last_line_is_ignored_then_cut_off_by_the_writer_and_appends_stay_valid(tmp_path):
    path = tmp_path / "grades.jsonl"
    Table(path, Grade).append([grade("a"), grade("b")])
    whole = path.read_bytes()
    torn = whole + grade("c").model_dump_json().encode()[:40]  # kill -9 in the middle of a write
    path.write_bytes(torn)
    table = Table(path, Grade)
    assert [r.key for r in table.all()] == ["a", "b"]
    assert path.read_bytes() == torn  # a reader changes nothing (the line may be a write in progress)
    table.append([grade("c")])
    assert [json.loads(line)["key"] for line in path.read_text().splitlines()] == ["a", "b", "c"]


def test_corrupt_record_in_the_middle_names_file_and_line(tmp_path):
    path = tmp_path / "grades.jsonl"
    path.write_text(grade("a").model_dump_json() + '\n{"key": 3}\n' + grade("b").model_dump_json() + "\n")
    with pytest.raises(UserError) as err:
        Table(path, Grade).all()
    assert f"{path}:2" in str(err.value)


def test_write_atomic_replaces_whole_file(tmp_path):
    path = tmp_path / "x" / "summary.json"
    write_atomic(path, "one")
    write_atomic(path, "two")
    assert path.read_text() == "two"
    assert [p.name for p in path.parent.iterdir()] == ["summary.json"]


def test_run_index_records_start_and_finish(tmp_path):
    index = RunIndex(tmp_path / "index.sqlite")
    index.start("r1", tmp_path, "demo", "h1", {"versions": {"vllm": "x"}})
    index.start("r2", tmp_path, "other", "h2", {})
    index.finish("r1", "ok", {"results": [1]})
    rows = index.list("demo")
    assert [(r["run_id"], r["status"], r["summary"]) for r in rows] == [("r1", "ok", {"results": [1]})]
    assert rows[0]["environment"]["versions"]["vllm"] == "x"
    assert [r["status"] for r in index.list()] == ["ok", "running"]


def test_run_store_tables_live_in_the_run_directory(tmp_path):
    store = RunStore(tmp_path / "run")
    store.grades.append([grade("a")])
    store.write_json("summary.json", {"a": 1})
    assert (tmp_path / "run" / "grades.jsonl").exists()
    assert store.read_json("summary.json") == {"a": 1}
