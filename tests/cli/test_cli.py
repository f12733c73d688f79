"""The command line: help, and bad input giving one line, exit code 2 and no artifacts."""

import json
import subprocess
import sys

import pytest
from conftest import write_config


def qreason(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "qreason.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def test_help_lists_commands_and_options():
    out = qreason("--help").stdout
    for cmd in ("run", "runs", "grade", "model", "tasks"):
        assert cmd in out
    assert "--output-dir" in qreason("run", "--help").stdout


@pytest.mark.parametrize(
    "config, where, message",
    [
        (
            "name: x\ntasks:\n  - name: synthetic\nsampling: {max_tokens: 0}\n",
            "run.yaml:4",
            "sampling.max_tokens",
        ),
        (
            "name: x\ntasks:\n  - name: gsm8k\n    data: missing.jsonl\n",
            "missing.jsonl",
            "data file not found",
        ),
        ("name: x\ntasks:\n  - name: gsm8k\n    data: bad.jsonl\n", "bad.jsonl:2", "invalid JSON"),
        ("name: x\ntasks:\n  - name: nosuchtask\n", "task 'nosuchtask'", "no such task"),
        (
            "name: x\nmodel: {path: ./no/such/dir}\ntasks:\n  - name: synthetic\n",
            "model ./no/such/dir",
            "no such",
        ),
    ],
)
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(tmp_path, config, where, message):
    (tmp_path / "bad.jsonl").write_text('{"question": "q", "answer": "#### 1"}\n{oops\n')
    cfg = write_config(tmp_path / "run.yaml", config)
    result = qreason("run", str(cfg))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and where in lines[0] and message in lines[0], result.stderr
    assert not (tmp_path / "runs").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "run.yaml"]


def test_tasks_and_runs_commands(tmp_path):
    out = qreason("tasks").stdout
    assert {"gsm8k", "math500", "aime24", "synthetic"} <= {line.split()[0] for line in out.splitlines()}
    assert "no runs recorded" in qreason("runs").stdout
    assert json.loads(qreason("runs", "--json").stdout) == []
