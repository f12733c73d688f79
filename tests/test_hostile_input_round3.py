"""Hostile and careless input, round three (issue 31): qreason never deletes or overwrites what it did not
create or what a live run still uses, interrupts reach side environments at once, and untrusted JSON is
parsed with bounds. Every test uses a temporary cache and index."""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import pytest
from conftest import REPO, write_config
from fault_server import FAKE_VLLM_SERVER, FaultServer, chat_completion
from judge_helpers import GOOD
from test_hostile_input_round2 import alive, wait_until

from qreason.errors import UserError
from qreason.records import ModelVariant
from qreason.store import RunIndex, RunLock, RunStore, mark_owned, mark_run_dir, seal


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("QREASON_CACHE", str(root))
    monkeypatch.setenv("QREASON_INDEX", str(tmp_path / "index.sqlite"))
    return root


def variant(name: str, path: Path | str, fingerprint: str = "fp", method: str = "rtn") -> ModelVariant:
    return ModelVariant(
        key=f"v-{name}",
        name=name,
        base_model="m",
        base_fingerprint="f",
        method=method,
        path=str(path),
        fingerprint=fingerprint,
        created_at="now",
    )


def finished_run(index: RunIndex, run_dir: Path, run_id: str = "r", old: bool = False) -> RunStore:
    store = RunStore(run_dir)
    mark_run_dir(store.dir, run_dir.name)
    index.start(run_id, store.dir, run_dir.name, "h", {})
    index.finish(run_id, "ok", None)
    if old:
        with index._connect() as db:
            db.execute(
                "UPDATE runs SET started_at = '2020-01-01T00:00:00+00:00', finished_at = "
                "'2020-01-01T00:00:00+00:00' WHERE run_id = ?",
                (run_id,),
            )
    return store


def checkpoint(path: Path) -> Path:
    """A cached checkpoint as qreason makes one: with its ownership marker."""
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    mark_owned(path, "checkpoint", path.name)
    return path


# ------------------------------------------------------------------------------- prune and live runs


@pytest.mark.parametrize("days", ["0", "-1", "nan", "-inf"])
def test_prune_refuses_an_age_that_is_not_positive(cache, days, capsys):
    from qreason.cli import main

    assert main(["prune", f"--older-than={days}", "--yes"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--older-than" in err[0] and "positive" in err[0]


def test_prune_next_to_a_running_run_leaves_it_and_the_run_finishes_ok_with_every_record(
    tmp_path, cache, monkeypatch
):
    """A real run holds its lock while its endpoint is held back; prune (its rows made old) deletes nothing
    of it, and the run then finishes ok with all its generations, its directory and its index row."""
    from qreason.pipeline.runner import run
    from qreason.store.retention import prune

    release, asked = threading.Event(), threading.Event()

    def reply(body: dict) -> str:
        asked.set()
        release.wait(60)
        return "Step 1: 2 + 3 = 5\nThe final answer is \\boxed{5}."

    cfg = write_config(
        tmp_path / "c.yaml",
        f"""
name: live
output_dir: {tmp_path / "runs" / "live"}
model: {{path: m-good}}
tasks: [{{name: synthetic, limit: 4}}]
sampling: {{max_tokens: 64}}
backend: {{kind: openai, base_url: "BASE", max_retries: 0}}
curate: {{enabled: false}}
""",
    )
    index = RunIndex(tmp_path / "index.sqlite")
    result: dict = {}
    with FaultServer([], content=reply) as server:
        cfg.write_text(cfg.read_text().replace("BASE", server.base_url))
        thread = threading.Thread(target=lambda: result.setdefault("summary", run(cfg, index=index)))
        thread.start()
        try:
            assert asked.wait(120), "the run never reached its endpoint"
            run_dir = tmp_path / "runs" / "live"
            with index._connect() as db:  # the run started long ago, as far as its age goes
                db.execute("UPDATE runs SET started_at = '2020-01-01T00:00:00+00:00'")
            removed = prune(index, 1, dry_run=False)
            assert removed["run_dirs"] == [] and removed["live"] == [str(run_dir.resolve())]
            assert (run_dir / "config.yaml").is_file() and (run_dir / "problems.jsonl").is_file()
            assert [r["status"] for r in index.list()] == ["running"]
        finally:
            release.set()
            thread.join(120)
    summary = result["summary"]
    assert summary.generations.failed == 0 and len(RunStore(run_dir).generations) == 4
    assert [r["status"] for r in index.list()] == ["ok"]


def test_a_held_run_lock_keeps_the_run_directory_whatever_its_index_row_says(tmp_path, cache):
    from qreason.store.retention import prune

    index = RunIndex(tmp_path / "index.sqlite")
    store = finished_run(index, tmp_path / "runs" / "old", old=True)
    with RunLock(store.dir):  # a re-run of the same directory in progress
        removed = prune(index, 30, dry_run=False)
        assert removed["run_dirs"] == [] and store.dir.is_dir()
    assert prune(index, 30, dry_run=False)["run_dirs"] == [str(store.dir.resolve())]
    assert not store.dir.exists() and index.list() == []


def test_prune_never_lists_or_deletes_a_cache_folder_qreason_did_not_make(tmp_path, cache):
    from qreason.store.retention import prune

    index = RunIndex(tmp_path / "index.sqlite")
    finished_run(index, tmp_path / "runs" / "r")
    foreign = [
        cache / "quantized" / "mine",
        cache / "recover" / "dense" / "x",
        cache / "recover" / "merged" / "y",
    ]
    for d in foreign:
        d.mkdir(parents=True)
        (d / "notes.txt").write_text("mine")
    ours = checkpoint(cache / "quantized" / "k1")
    removed = prune(index, 30, dry_run=False)
    assert removed["checkpoints"] == [str(ours)] and not ours.exists()
    assert removed["unmarked"] == sorted(map(str, foreign))
    assert all((d / "notes.txt").read_text() == "mine" for d in foreign)


def test_prune_keeps_every_checkpoint_a_kept_run_references_before_its_summary_exists(tmp_path, cache):
    """The merged checkpoints of every arm (targeted, control, full precision) a run recorded when its
    recover stage planned them are kept, with no recovery summary written yet."""
    from qreason.store.retention import prune

    index = RunIndex(tmp_path / "index.sqlite")
    store = finished_run(index, tmp_path / "runs" / "r")
    merged = cache / "recover" / "merged"
    arms = [checkpoint(merged / name) for name in ("targeted", "control", "fp")]
    unused = checkpoint(merged / "other")
    store.refer(arms)
    assert not (store.recovery_dir / "summary.json").exists()
    assert prune(index, 30, dry_run=True)["checkpoints"] == [str(unused)]


def test_prune_keeps_every_merged_checkpoint_of_an_older_run_without_a_recovery_summary(tmp_path, cache):
    from qreason.store.retention import prune

    index = RunIndex(tmp_path / "index.sqlite")
    store = finished_run(index, tmp_path / "runs" / "r")
    store.recovery_dir.mkdir()  # its recover stage started; no summary, no recorded references
    checkpoint(cache / "recover" / "merged" / "m1")
    assert prune(index, 30, dry_run=True)["checkpoints"] == []


def test_prune_while_a_run_is_live_deletes_no_cached_checkpoint(tmp_path, cache):
    from qreason.store.retention import prune

    index = RunIndex(tmp_path / "index.sqlite")
    store = finished_run(index, tmp_path / "runs" / "r")
    ck = checkpoint(cache / "quantized" / "just-made")  # made by the live run, not recorded yet
    with RunLock(store.dir):
        removed = prune(index, 30, dry_run=False)
    assert removed["checkpoints"] == [] and ck.is_dir()


# ------------------------------------------------------------------------ the cache moved (read-time paths)


def test_a_run_reads_its_quantized_checkpoint_where_the_cache_is_now(tmp_path, cache, monkeypatch):
    """variants.jsonl was written with the old cache's path; after QREASON_CACHE moved, the record is read
    with the checkpoint's present place, so recover finds it (no "checkpoint missing") and prune keeps it."""
    from qreason.store.retention import prune

    old = tmp_path / "old-cache" / "quantized" / "key1"
    store = RunStore(tmp_path / "runs" / "r")
    store.variants.append([variant("rtn", old)])
    moved = checkpoint(cache / "quantized" / "key1")
    [read] = RunStore(store.dir).variants.all()
    assert read.path == str(moved) and Path(read.path).is_dir()
    index = RunIndex(tmp_path / "index.sqlite")
    finished_run(index, store.dir)
    assert prune(index, 30, dry_run=True)["checkpoints"] == []


def test_lm_eval_reads_a_moved_merged_checkpoint(tmp_path, cache):
    from types import SimpleNamespace

    from qreason.stages.lm_eval.stage import targets_for

    merged = cache / "recover" / "merged" / "mk"
    merged.mkdir(parents=True)
    (merged / "model.safetensors").write_bytes(b"x")
    seal(merged)
    stored = str(tmp_path / "old" / "recover" / "merged" / "mk")  # the path the summary was written with
    rec = SimpleNamespace(variant="rtn", eval_variant="rtn+sb", merged_checkpoint=stored, adapter_key="a")
    recovery = SimpleNamespace(variants=[rec])
    targets = targets_for([variant("rtn", "/q")], recovery)
    assert [t.path for t in targets] == ["/q", str(merged)]


# ------------------------------------------------------------------------------ Ctrl-C reaches side workers

# lm-eval's worker as the stage sees it: one result line per task; the slow task hangs, ignoring SIGTERM
# (a library busy in native code), unless FAKE_FAST is set
FAKE_LM_EVAL = """
import json, os, signal, sys, time
from pathlib import Path
from qreason.workers.protocol import RESULT_PREFIX
signal.signal(signal.SIGTERM, signal.SIG_IGN)
job = json.loads(Path(sys.argv[-1]).read_text())
here = Path(os.environ["FAKE_DIR"])
(here / f"worker-{os.getpid()}.pid").write_text(str(os.getpid()))
with open(here / "asked.txt", "a") as fh:
    fh.write(",".join(t["name"] for t in job["tasks"]) + "\\n")
for t in job["tasks"]:
    if t["name"] == "slow" and not os.environ.get("FAKE_FAST"):
        (here / "busy").write_text("")
        time.sleep(600)
    out = Path(job["results_dir"]) / (t["name"] + ".json")
    out.write_text(json.dumps({"task": t["name"], "metrics": {"acc,none": 0.5},
                               "samples_file": str(out), "seconds": 0.1}))
    print(RESULT_PREFIX + str(out), flush=True)
"""

LM_EVAL_PARENT = """
import os, sys
from pathlib import Path
here = Path(sys.argv[1])
import qreason.stages.lm_eval.stage as st
from qreason.config.schema import LmEvalConfig, VLLMConfig
from qreason.engines.vllm_server import VLLMServer
from qreason.store import RunStore
from qreason.workers.launch import run_worker

VLLMServer.command = lambda self: [sys.executable, str(here / "fake_server.py"), str(here / "x"),
                                   "--served-model-name", self.served_name, "--port", str(self.port)]
st.lm_eval_version = lambda python: "fake"

def worker(job, work, log_path, label, python, on_line, check_only=False, **_):
    env = st.lm_eval_env()
    env["PYTHONPATH"] = str(here) + os.pathsep + env.get("PYTHONPATH", "")
    return run_worker(job, work, log_path, label, lambda _: None, python=Path(sys.executable),
                      module="fake_lm_eval", stage="lm_eval", env=env, on_line=on_line, check=False)

st.run_lm_eval_worker = worker
targets = [st.LmEvalTarget(n, str(here), "fp-" + n) for n in ("base", "rtn")]
cfg = LmEvalConfig(tasks=["fast", "slow"], python=sys.executable)
try:
    st.run_lm_eval(RunStore(here / "run"), cfg, VLLMConfig(), targets, "base")
except KeyboardInterrupt:
    sys.exit(130)
"""


def test_ctrl_c_during_lm_eval_stops_the_worker_and_its_server_within_5_s_and_a_rerun_resumes(tmp_path):
    """At the default parallel: 1, Ctrl-C while lm-eval's worker is busy (and ignores SIGTERM) ends qreason
    with 130 within 5 s, leaves no worker or server running and starts no other target; the task finished
    before is kept and a re-run asks only for the rest."""
    import os
    import signal
    import subprocess
    import sys
    import time

    (tmp_path / "fake_server.py").write_text(FAKE_VLLM_SERVER)
    (tmp_path / "fake_lm_eval.py").write_text(FAKE_LM_EVAL)
    env = {
        **os.environ,
        "FAKE_DIR": str(tmp_path),
        "QREASON_CACHE": str(tmp_path / "cache"),
        "PYTHONPATH": str(REPO),
    }
    argv = [sys.executable, "-c", LM_EVAL_PARENT, str(tmp_path)]
    parent = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert wait_until(lambda: (tmp_path / "busy").exists() or parent.poll() is not None)
        assert parent.poll() is None, parent.stdout.read()[-3000:]
        pids = [int(p.read_text()) for p in tmp_path.glob("*.pid")]
        assert len(pids) == 2 and all(alive(p) for p in pids)  # the base's server and its worker
        t0 = time.monotonic()
        parent.send_signal(signal.SIGINT)
        code = parent.wait(timeout=60)
        seconds = time.monotonic() - t0
    finally:
        if parent.poll() is None:
            parent.kill()
    assert code == 130 and seconds < 5.0, (code, seconds, parent.stdout.read()[-3000:])
    assert not any(alive(p) for p in pids)
    assert not (tmp_path / "server-rtn.pid").exists()  # the next target was never started
    stored = {r.task for r in RunStore(tmp_path / "run").lm_eval.all()}
    assert stored == {"fast"}
    env["FAKE_FAST"] = "1"
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    asked = (tmp_path / "asked.txt").read_text().splitlines()
    assert asked == ["fast,slow", "slow", "fast,slow"]  # base resumed with slow only; rtn ran both
    assert len(RunStore(tmp_path / "run").lm_eval) == 4


WORKER_PARENT = """
import os, sys
from pathlib import Path
here = Path(sys.argv[1])
from qreason.workers.launch import run_worker, side_env_vars
env = side_env_vars()
env["PYTHONPATH"] = str(here) + os.pathsep + env["PYTHONPATH"]
try:
    run_worker({}, here / "job", here / "w.log", "w", print, python=Path(sys.executable), module="stubborn",
               stage="recover", env=env)
except KeyboardInterrupt:
    sys.exit(130)
"""


def test_ctrl_c_stops_a_training_or_quantization_worker_that_ignores_sigterm_within_5_s(tmp_path):
    """Training and quantization run their worker from the main thread: Ctrl-C stops its whole process
    group (SIGKILL after a short grace, here a worker that ignores SIGTERM) and qreason exits 130 in 5 s."""
    import os
    import signal
    import subprocess
    import sys
    import time

    (tmp_path / "stubborn.py").write_text(
        "import os, signal, subprocess, sys, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        "print(os.getpid(), child.pid, flush=True)\ntime.sleep(600)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    parent = subprocess.Popen(
        [sys.executable, "-c", WORKER_PARENT, str(tmp_path)], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert wait_until(lambda: (tmp_path / "w.log").is_file() and (tmp_path / "w.log").read_text())
        pids = [int(p) for p in (tmp_path / "w.log").read_text().split()]
        t0 = time.monotonic()
        parent.send_signal(signal.SIGINT)
        code = parent.wait(timeout=60)
        seconds = time.monotonic() - t0
    finally:
        if parent.poll() is None:
            parent.kill()
    assert code == 130 and seconds < 5.0, (code, seconds)
    assert wait_until(lambda: not any(alive(p) for p in pids), 5.0)  # the worker and what it started


# ----------------------------------------------------------------- user-named directories are not ours


def foreign_dir(path: Path, name: str = "utils.py") -> Path:
    path.mkdir(parents=True)
    (path / name).write_text("mine\n")
    (path / ".gitignore").write_text("notes/\n")
    return path


def unchanged(path: Path, name: str = "utils.py") -> bool:
    return (
        sorted(p.name for p in path.iterdir()) == sorted([name, ".gitignore"])
        and (path / name).read_text() == "mine\n"
    )


def one_line_exit_2(code: int, capsys, *fragments: str) -> None:
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert all(f in err[0] for f in fragments), err[0]


def test_setup_path_refuses_a_folder_of_someone_elses_files(tmp_path, cache, capsys):
    from qreason.cli import main

    d = foreign_dir(tmp_path / "mine", "bin")
    (d / "bin").unlink()
    (d / "bin").mkdir()
    (d / "bin" / "python").write_text("mine\n")
    one_line_exit_2(main(["setup", "train", "--path", str(d)]), capsys, str(d), "--force")
    assert (d / "bin" / "python").read_text() == "mine\n" and (d / ".gitignore").read_text() == "notes/\n"
    assert sorted(p.name for p in d.iterdir()) == [".gitignore", "bin"]


def test_export_lm_eval_refuses_a_folder_of_someone_elses_files_and_rewrites_its_own(tmp_path, capsys):
    from qreason.cli import main

    d = foreign_dir(tmp_path / "mine")
    one_line_exit_2(main(["export-lm-eval", "--out", str(d), "--task", "synthetic"]), capsys, "--force")
    assert unchanged(d)
    ours = tmp_path / "ours"
    for _ in range(2):  # a directory qreason exported into is its own: written again without --force
        assert main(["export-lm-eval", "--out", str(ours), "--task", "synthetic"]) == 0
    assert (ours / "qreason_synthetic.yaml").is_file() and (ours / "utils.py").is_file()
    assert main(["export-lm-eval", "--out", str(d), "--task", "synthetic", "--force"]) == 0
    assert (d / ".gitignore").read_text() == "notes/\n" and (d / "qreason_synthetic.yaml").is_file()


def test_an_export_an_older_qreason_wrote_is_still_its_own(tmp_path):
    from qreason.config.schema import SamplingConfig, TaskConfig
    from qreason.stages.lm_eval.export import export_tasks

    out = tmp_path / "old-export"
    export_tasks(out, [TaskConfig(name="synthetic", limit=2)], SamplingConfig())
    (out / ".qreason").unlink()  # written before the marker existed
    export_tasks(out, [TaskConfig(name="synthetic", limit=3)], SamplingConfig())
    assert (out / ".qreason").is_file()


def processbench_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


ROW = {"id": "a", "problem": "2 + 3?", "steps": ["2 + 3 = 6.", "So 6."], "label": 0}


def test_judge_bench_out_refuses_a_folder_of_someone_elses_files_before_judging(tmp_path, capsys):
    from qreason.cli import main

    data = processbench_rows(tmp_path / "pb.jsonl", [ROW])
    d = foreign_dir(tmp_path / "mine", "metrics.json")
    one_line_exit_2(main(["judge-bench", "--data", str(data), "--out", str(d)]), capsys, "--force")
    assert unchanged(d, "metrics.json")


def test_curate_out_refuses_a_folder_of_someone_elses_files(tmp_path):
    from qreason.stages.curate import check_out_dir

    d = foreign_dir(tmp_path / "mine", "README.md")
    with pytest.raises(UserError, match="not a dataset qreason wrote") as err:
        check_out_dir(d)
    assert "--force" not in str(
        err.value
    )  # the export replaces its directory whole: never among others' files
    assert unchanged(d, "README.md")


# ------------------------------------------------------------------------------ untrusted JSON (bounded)

DEEP = "[" * 100_000 + "]" * 100_000


def fault_cases(markers: list[str]) -> list[tuple]:
    """Judge inputs (judge_helpers.make_run cases) whose question carries a marker the fake judge reads."""
    step = "Step 1: Ana has 5 apples.\nStep 2: She buys 3 more, so she has 9.\nThe answer is \\boxed{9}."
    return [
        (f"f{i}", f"FAULT:{m} Ana has 5 apples and buys 3 more. How many?", "8", {"q4": (step, "wrong")})
        for i, m in enumerate(markers)
    ]


HUGE_INT = '{"first_error_step": ' + "9" * 5000 + "}"


@pytest.mark.parametrize("text", [DEEP, HUGE_INT, '{"a": ' + DEEP + "}"])
def test_untrusted_json_beyond_its_bounds_is_a_json_error_not_a_crash(text):
    from qreason.untrusted import UnsafeJSON, loads

    with pytest.raises(json.JSONDecodeError) as err:
        loads(text)
    assert isinstance(err.value, UnsafeJSON)
    assert loads('{"s": "[[[[", "n": 12345678901234567890}') == {"s": "[[[[", "n": 12345678901234567890}


def test_one_batch_reply_nested_deep_or_with_a_huge_integer_is_one_recorded_error(tmp_path):
    """judge --batch-read: the good reply is stored, the two hostile ones become invalid-reply records, and a
    second read adds nothing."""
    from judge_helpers import make_run

    from qreason.stages.judge import JudgeConfig, run_judging

    store = make_run(tmp_path / "run", fault_cases(["ok", "ok2", "ok3"]))
    base = {"judges": [{"name": "j", "base_url": "http://127.0.0.1:9/v1", "model": "m"}]}
    stats = run_judging(store, JudgeConfig.model_validate({**base, "batch": {"mode": "write"}}))
    path = Path(stats.batch_files[0])
    ids = [json.loads(x)["custom_id"] for x in path.read_text().splitlines()]
    contents = [json.dumps(GOOD), DEEP, HUGE_INT]
    outputs = [
        {
            "custom_id": cid,
            "response": {
                "status_code": 200,
                "body": {"choices": [{"index": 0, "message": {"role": "assistant", "content": c}}]},
            },
        }
        for cid, c in zip(ids, contents)
    ]
    (path.parent / "j.batch_output.jsonl").write_text("".join(json.dumps(o) + "\n" for o in outputs))
    read = JudgeConfig.model_validate({**base, "batch": {"mode": "read"}})
    stats = run_judging(store, read)
    assert stats.judges["j"]["ok"] == 1 and stats.judges["j"]["judge_error"] == 2
    errors = sorted(j.error for j in store.judgments.all() if j.judge == "j" and j.status == "judge_error")
    assert "integer of more than" in errors[0] and "nested deeper" in errors[1]
    n = len(store.judgments)
    run_judging(store, read)
    assert len(store.judgments) == n


class HostileJudge:
    """An endpoint whose replies are (by the problem's marker) true as a step, nesting or a huge integer."""

    CONTENT = {
        "bool": lambda good: json.dumps({**good, "first_error_step": True}),
        "deep": lambda good: DEEP,
        "bigint": lambda good: HUGE_INT,
    }

    def __init__(self):
        import re

        from fault_server import JsonServer

        outer = self

        class Server(JsonServer):
            def handle(self, h, body):
                marker = re.search(r"FAULT:(\w+)", body["messages"][-1]["content"]).group(1)
                outer.requests += 1
                content = HostileJudge.CONTENT[marker](GOOD)
                reply = chat_completion(body, content)
                self.send(h, 200, json.dumps(reply).encode())

        self.requests = 0
        self.server = Server()


def test_hostile_judge_replies_are_invalid_replies_that_a_rerun_does_not_ask_again(tmp_path):
    """ "first_error_step": true is not step 1; nesting and huge integers are invalid replies (final), not
    transport errors that every run would ask again."""
    from judge_helpers import make_run

    from qreason.stages.judge import JudgeConfig, run_judging

    store = make_run(tmp_path / "run", fault_cases(["bool", "deep", "bigint"]))
    judge = HostileJudge()
    with judge.server as server:
        spec = {
            "name": "h",
            "base_url": server.base_url,
            "model": "m",
            "invalid_retries": 0,
            "max_retries": 0,
        }
        cfg = JudgeConfig.model_validate({"judges": [spec]})
        stats = run_judging(store, cfg)
        assert stats.judges["h"]["judge_error"] == 3 and stats.judges["h"]["ok"] == 0
        asked = judge.requests
        errors = sorted(j.error for j in store.judgments.all() if j.judge == "h")
        assert "not true or false" in errors[0] and "integer of more than" in errors[1]
        assert "nested deeper" in errors[2]
        run_judging(store, cfg)
        assert judge.requests == asked


@pytest.mark.parametrize(
    "line",
    [DEEP, '{"id": ' + "9" * 5000 + "}"],
    ids=["nested-100000-deep", "5000-digit-integer"],
)
@pytest.mark.parametrize("command", ["judge-bench", "grade-file", "task-data"])
def test_a_hostile_jsonl_line_is_one_error_naming_file_and_line(tmp_path, capsys, command, line):
    from qreason.cli import main

    data = tmp_path / "in.jsonl"
    data.write_text(json.dumps({**ROW, "r": "The answer is 5.", "a": "5"}) + "\n" + line + "\n")
    if command == "judge-bench":
        code = main(["judge-bench", "--data", str(data)])
    elif command == "grade-file":
        argv = ["grade-file", str(data), "--response-field", "r", "--reference-field", "a"]
        code = main([*argv, "--answer-type", "number", "--out", str(tmp_path / "out.jsonl")])
    else:  # a task's data file, as a run reads it
        from qreason.inputs.tasks import read_jsonl

        with pytest.raises(UserError) as err:
            read_jsonl(data)
        code = err.value.exit_code
        print(f"qreason: error: {err.value}", file=sys.stderr)
    one_line_exit_2(code, capsys, f"{data}:2", "refused JSON")


# ----------------------------------------------------------------------------------------- other limits


def test_judge_bench_bounds_the_model_free_layers_per_row_like_a_run(tmp_path):
    """A 2 MB row (seconds of rule checks) gets a timed-out judge_error under --rules-timeout; the other row
    is judged."""
    from qreason.stages.judge.bench import run_bench

    huge = {"id": "huge", "problem": "sum?", "steps": ["12 + 13 = 25. " * 6000] * 24, "label": -1}
    data = processbench_rows(tmp_path / "pb.jsonl", [ROW, huge])
    metrics = run_bench(data, [], tmp_path / "out", rules_timeout_s=0.5)
    preds = {p["id"]: p for p in map(json.loads, (tmp_path / "out" / "predictions.jsonl").open())}
    assert preds["a"]["status"] == "ok" and preds["a"]["prediction"] == 0
    # unbounded, the rule checks find nothing wrong in it (after seconds): a judge_error is the time limit
    assert preds["huge"]["status"] == "judge_error" and preds["huge"]["layers"] == {"rules": None}
    assert metrics["judge_errors"] == 1


def test_judge_bench_writes_ids_and_steps_with_lone_surrogates_and_refuses_a_nan_id(tmp_path, capsys):
    from qreason.cli import main

    row = {**ROW, "id": "a\ud800", "steps": ["2 + 3 = 6. \ud800", "So 6."]}
    data = tmp_path / "pb.jsonl"
    data.write_text(json.dumps(row) + "\n")  # json.dumps escapes the surrogate: valid JSON
    assert main(["judge-bench", "--data", str(data), "--out", str(tmp_path / "out")]) == 0
    capsys.readouterr()
    (pred,) = map(
        json.loads, (tmp_path / "out" / "predictions.jsonl").read_text(encoding="utf-8").splitlines()
    )
    assert pred["id"] == "a\ufffd"
    json.loads((tmp_path / "out" / "metrics.json").read_text(encoding="utf-8"))
    data.write_text(json.dumps({**ROW, "id": float("nan")}) + "\n")
    one_line_exit_2(main(["judge-bench", "--data", str(data)]), capsys, f"{data}:1", "id must be")


def test_a_yaml_alias_bomb_with_a_variable_is_refused_at_once(tmp_path, monkeypatch):
    """Nine aliases of nine make 4e8 values; with one ${VAR} the expansion used to walk every one (54 s,
    1.2 GB): the expanded size is bounded before anything walks it."""
    import time

    from qreason.config.schema import parse_config

    monkeypatch.setenv("QREASON_TEST_VAR", "x")
    lines = ['a0: &a0 ["x", "${QREASON_TEST_VAR}", "x", "x", "x", "x", "x", "x", "x"]']
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    text = "name: bomb\nmodel: {path: m}\ntasks: [synthetic]\nextra:\n" + "".join(f"  {x}\n" for x in lines)
    t0 = time.monotonic()
    with pytest.raises(UserError, match="expands to 4.9e\\+08 values through aliases"):
        parse_config(text, "bomb.yaml")
    assert time.monotonic() - t0 < 30  # generous: it takes milliseconds; the walk took about a minute


def test_aliases_within_the_bound_still_expand_variables(monkeypatch):
    from qreason.config.schema import _load_yaml, env_expander

    monkeypatch.setenv("QREASON_TEST_VAR", "v")
    _, data = _load_yaml("a: &a ['${QREASON_TEST_VAR}']\nb: [*a, *a]\n", "c.yaml", env_expander("c.yaml"))
    assert data == {"a": ["v"], "b": [["v"], ["v"]]}


def test_an_endpoint_ignoring_max_tokens_gets_its_text_cut_to_the_budget_and_marked_truncated(tmp_path):
    from qreason.config.schema import OpenAIConfig, SamplingConfig
    from qreason.engines.base import GenerationRequest
    from qreason.engines.openai import MAX_CHARS_PER_TOKEN, OpenAIBackend
    from qreason.inputs.models import ResolvedModel

    huge = "Step 1: 2 + 3 = 5. " * 500_000  # about 10 MB
    with FaultServer([], content=huge) as server:
        cfg = OpenAIConfig(base_url=server.base_url, model="m", max_retries=0)
        backend = OpenAIBackend(cfg, ResolvedModel("m", "m", "fp", "endpoint"))
        req = GenerationRequest("k", "v", "fp", "t", "p", [{"role": "user", "content": "2+3?"}], 0)
        [(_, done)] = list(backend.generate([req], SamplingConfig(max_tokens=64)))
    assert len(done.text) == 64 * MAX_CHARS_PER_TOKEN and done.finish_reason == "length"


def test_doctor_reports_an_environment_whose_interpreter_answers_its_probe_with_an_empty_object(tmp_path):
    from qreason.workers.envs import inspect
    from qreason.workers.launch import TRAIN

    python = tmp_path / "bin" / "python"
    python.parent.mkdir()
    python.write_text("#!/bin/sh\necho '{}'\n")
    python.chmod(0o755)
    status = inspect(TRAIN, python)
    assert status.problem is not None and "{}" in status.problem


def test_a_judge_name_too_long_for_a_file_name_is_refused_in_the_config(tmp_path):
    from qreason.config.judge import parse_judge_spec

    with pytest.raises(UserError, match="at most 100 characters"):
        parse_judge_spec(f"name={'j' * 300},base_url=http://127.0.0.1:9/v1,model=m")
