"""Hostile and careless input, round three (issue 31): qreason never deletes or overwrites what it did not
create or what a live run still uses, interrupts reach side environments at once, and untrusted JSON is
parsed with bounds. Every test uses a temporary cache and index."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from conftest import REPO, write_config
from fault_server import FaultServer
from test_hostile_input_round2 import alive, wait_until

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

FAKE_SERVER = """
import http.server, json, os, sys
from pathlib import Path
name, port = sys.argv[sys.argv.index("--served-model-name") + 1], int(sys.argv[sys.argv.index("--port") + 1])
Path(sys.argv[1]).with_name(f"server-{name}.pid").write_text(str(os.getpid()))
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"data": [{"id": name}]}).encode() if self.path == "/v1/models" else b"ok"
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
"""

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

def worker(job, work, log_path, label, python, on_line, check_only=False):
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

    (tmp_path / "fake_server.py").write_text(FAKE_SERVER)
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
