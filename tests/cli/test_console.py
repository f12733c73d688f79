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


def _on_terminal(code: str, *args: str, cwd: Path) -> str:
    """What ``code`` writes to standard error when that is a 120-column terminal (a pseudo-terminal)."""
    import fcntl
    import pty
    import struct
    import termios

    primary, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        stdout=subprocess.DEVNULL,
        stderr=secondary,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    os.close(secondary)
    seen = b""
    while True:
        try:
            chunk = os.read(primary, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    assert proc.wait(timeout=120) == 0
    os.close(primary)
    return seen.decode()


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


def test_worker_notes_and_log_only_records_stay_off_the_terminal(tmp_path):
    """A training worker's step-by-step notes and bookkeeping records (engine starts, planned counts) reach
    run.log; the terminal gets the stage's results. On a terminal the notes share one line that the next
    result clears; with -v each is a line."""
    code = """
        import logging, os, sys
        from qreason import console
        from qreason.cli import setup_logging
        verbose = sys.argv[2] == "v"
        console.configure(verbose=verbose)
        setup_logging(verbose)
        handler = logging.FileHandler(sys.argv[1] + "/run.log")
        logging.getLogger().addHandler(handler)
        log = logging.getLogger("qreason.stages.generate")
        log.info("starting the generation engine for /models/x", extra=console.LOG_ONLY)
        note = console.notes("recover: ")
        for step in (1, 2, 3):
            note(f"targeted sft: step {step}/3")
        console.say("recover: rtn: accuracy 10% -> 20%")
        """
    quiet = _python(code, str(tmp_path), "-", cwd=tmp_path)
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr == "recover: rtn: accuracy 10% -> 20%\n"  # not a terminal: results only
    log = (tmp_path / "run.log").read_text()
    assert "starting the generation engine" in log and "recover: targeted sft: step 3/3" in log

    loud = _python(code, str(tmp_path), "v", cwd=tmp_path)
    assert "starting the generation engine" in loud.stderr
    assert [ln for ln in loud.stderr.splitlines() if "step" in ln] == [
        f"recover: targeted sft: step {i}/3" for i in (1, 2, 3)
    ]

    screen = _on_terminal(code, str(tmp_path), "-", cwd=tmp_path)
    assert "starting the generation engine" not in screen
    # each note overwrites the last on one line; the result clears it and takes a line of its own
    assert screen.count("\n") == 1 and screen.endswith("\x1b[Krecover: rtn: accuracy 10% -> 20%\r\n")
    assert "\r\x1b[Krecover: targeted sft: step 3/3" in screen


def test_a_sub_steps_progress_line_leaves_the_terminal_when_done(tmp_path):
    """Grading what a stage just generated, or a curation round, is a transient line: on a terminal it is
    cleared once done, so a run's screen keeps one line per stage."""
    code = """
        from qreason import console
        console.configure()
        with console.progress(3, "generate base", "gen") as bar:
            bar.update(3)
        with console.progress(3, "grade", "ans", transient=True) as bar:
            bar.update(3)
        console.say("done")
        """
    lines = _on_terminal(code, cwd=tmp_path).replace("\r\n", "\n").split("\n")
    # what a terminal shows of each line: the text after its last carriage return
    shown = [ln.rsplit("\r", 1)[-1].strip() for ln in lines if ln.rsplit("\r", 1)[-1].strip()]
    assert shown[0].startswith("generate base: 100%") and "grade" not in " ".join(shown[1:])
    assert shown[-1] == "done" and len(shown) == 2


def test_an_open_progress_line_keeps_moving_while_no_item_finishes(tmp_path):
    """A batch of long answers finishes together: until then the line is redrawn by its heartbeat, with the
    elapsed time and what the current item is doing (vLLM's finished requests), so the terminal never sits
    unchanged. The child waits for two beats itself, however slow the machine."""
    seen = _on_terminal(
        """
        import threading
        from qreason import console

        console.HEARTBEAT_S = 0.05
        bar = console.progress(8, "generate base", "gen")
        drawn = threading.Event()
        real = bar.display
        count = [0]

        def display(*a, **k):
            count[0] += 1
            if count[0] >= 4:
                drawn.set()
            return real(*a, **k)

        bar.display = display
        console.activity("batch 1/2: 3/4 answers")
        assert drawn.wait(60)
        bar.close()
        """,
        cwd=tmp_path,
    )
    frames = [f for f in seen.replace("\r\n", "\r").split("\r") if "generate base" in f]
    assert len(frames) >= 3, seen
    assert any("0/8" in f and "batch 1/2: 3/4 answers" in f for f in frames), seen


def test_vllm_progress_reports_finished_requests_as_the_lines_activity(tmp_path):
    from qreason import console
    from qreason.engines.vllm import _RequestProgress

    make = _RequestProgress.factory("batch 2/3")
    assert make(["a", "b"], desc="Rendering conversations") == ["a", "b"]  # vLLM's other use: passed through
    bar = console.progress(4, "generate x", "gen")
    try:
        progress = make(total=4, desc="Processed prompts", dynamic_ncols=True, postfix="")
        assert bar.note == "batch 2/3: 0/4 answers"
        progress.postfix = "est. speed input: 1.00 toks/s, output: 2.00 toks/s"
        progress.update(1)
        assert bar.note == "batch 2/3: 1/4 answers" and progress.format_dict["elapsed"] > 0
    finally:
        bar.close()
