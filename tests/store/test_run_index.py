"""The run index under failure (issue 11, item 17): a killed run does not stay `running` forever, the index
uses a write-ahead log, and a failing index never hides the error that ended a run."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap

import pytest
from conftest import REPO, write_config

from qreason.store import RunIndex

START_AND_WAIT = textwrap.dedent("""
    import sys, time
    from qreason.store import RunIndex
    RunIndex(sys.argv[1]).start("r-killed", sys.argv[2], "night", "h", {})
    print("started", flush=True)
    time.sleep(600)
""")


def test_a_killed_run_is_shown_as_killed_and_a_live_one_as_running(tmp_path):
    index = RunIndex(tmp_path / "index.sqlite")
    proc = subprocess.Popen(
        [sys.executable, "-c", START_AND_WAIT, str(index.path), str(tmp_path / "run")],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert proc.stdout.readline().strip() == "started"
        assert [r["status"] for r in index.list()] == ["running"]  # alive: still running
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    index.start("r-live", tmp_path / "run2", "night", "h", {})  # this process: alive
    rows = {r["run_id"]: r for r in index.list()}
    assert rows["r-killed"]["status"] == "killed"
    assert rows["r-live"]["status"] == "running"
    out = subprocess.run(
        [sys.executable, "-m", "qreason.cli", "runs", "--index", str(index.path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0
    line = next(x for x in out.stdout.splitlines() if x.startswith("r-killed"))
    assert "killed" in line


def test_the_index_uses_a_write_ahead_log(tmp_path):
    RunIndex(tmp_path / "index.sqlite").start("r", tmp_path, "n", "h", {})  # created by its first write
    with sqlite3.connect(tmp_path / "index.sqlite") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_failing_index_does_not_mask_the_error_that_ended_the_run(tmp_path, monkeypatch):
    import qreason.pipeline.runner as runner

    def broken_executor(*args, **kwargs):
        raise RuntimeError("the real reason the run stopped")

    def locked_finish(self, *args, **kwargs):
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(runner, "make_executor", broken_executor)
    monkeypatch.setattr(RunIndex, "finish", locked_finish)
    cfg = write_config(
        tmp_path / "c.yaml",
        f"""
name: x
output_dir: {tmp_path / "out"}
tasks: [{{name: synthetic, limit: 2}}]
backend: {{kind: openai, base_url: "http://127.0.0.1:9/v1"}}
""",
    )
    with pytest.raises(RuntimeError, match="the real reason the run stopped"):
        runner.run(cfg, index=RunIndex(tmp_path / "index.sqlite"))
