"""The terminal: library output (Python and C++ writing to descriptor 2) goes to the log file, qreason's
own lines to the terminal; a closed pipe ends a command without a traceback. Each case runs in its own
process: descriptor 2 is the process's."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _python(code: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO)},  # this checkout's qreason, from any directory
        timeout=120,
    )


def test_library_output_goes_to_the_log_and_qreason_lines_to_the_terminal(tmp_path):
    done = _python(
        """
        import logging, os, sys
        from qreason import console
        console.configure()
        pending = console.capture(sys.argv[1] + "/logs/run.pending.log")
        os.write(2, b"[W utils.cpp:68] Warning: NUMA binding\\n")  # what C++ code writes, below Python
        print("Loading safetensors checkpoint shards", file=sys.stderr)
        console.say("generate base: 40 to do")
        console.capture(sys.argv[1] + "/run/run.log")  # the run directory is known: its log takes over
        with console.progress(3, "grade", "ans") as bar:
            bar.update(3)
        os.write(2, b"engine shutting down\\n")
        print("released:", console.release(), file=sys.stderr)
        """,
        str(tmp_path),
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "generate base: 40 to do" in done.stderr and "grade: 100%" in done.stderr
    assert "NUMA" not in done.stderr and "safetensors" not in done.stderr and "shutting" not in done.stderr
    log = (tmp_path / "run" / "run.log").read_text()
    assert log.index("NUMA") < log.index("safetensors") < log.index("shutting down")
    assert not list((tmp_path / "logs").iterdir())  # the pending log moved into the run's
    assert f"released: {tmp_path / 'run' / 'run.log'}" in done.stderr


def test_quiet_shows_no_progress(tmp_path):
    done = _python(
        """
        from qreason import console
        console.configure(quiet=True)
        console.say("a progress note")
        with console.progress(3, "grade", "ans") as bar:
            bar.update(3)
        """,
        cwd=tmp_path,
    )
    assert done.returncode == 0 and done.stderr == ""


def test_a_closed_pipe_ends_the_command_quietly(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "qreason.cli", "runs", "--json", "--index", str(tmp_path / "index.sqlite")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    proc.stdout.close()  # the reader is gone before the command prints (`qreason runs --json | head -0`)
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 141
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def test_version_and_help_of_every_command(capsys):
    from qreason import __version__
    from qreason.cli import build_parser

    parser = build_parser()
    try:
        parser.parse_args(["--version"])
    except SystemExit:
        pass
    assert capsys.readouterr().out.strip() == f"qreason {__version__}"
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, command in sub.choices.items():
        assert command.description, f"`qreason {name} -h` says nothing about the command"
