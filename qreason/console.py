"""The terminal: qreason's own lines go there, everything else goes to a log file.

qreason shows one progress line per stage, the stages' results and errors. Third-party output (library
warnings and loading bars written by Python, and C++ warnings written straight to file descriptor 2, such
as torch's NUMA notices) goes to a log file instead, the run's ``run.log`` once the run directory is known,
unless ``-v``. ``capture(path)`` points descriptor 2 at that file; ``terminal()`` is a stream that still
reaches the user's terminal; ``progress`` makes a stage's progress line; ``--quiet`` leaves only results and
errors.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TextIO

from tqdm.auto import tqdm

# ``log.info(..., extra=LOG_ONLY)``: a record for run.log only (the terminal shows it with ``-v``)
LOG_ONLY = {"log_only": True}


class _State:
    verbose = False
    quiet = False
    status_open = False  # a transient status line is on the terminal (the next line replaces it)
    saved_fd: int | None = None  # the terminal's descriptor 2, kept while 2 points at a log
    stream: TextIO | None = None
    log: Path | None = None


_state = _State()


def configure(verbose: bool = False, quiet: bool = False) -> None:
    _state.verbose, _state.quiet = verbose, quiet


def quiet() -> bool:
    return _state.quiet


def terminal() -> TextIO:
    """The user's terminal (standard error as it was before any capture)."""
    return _state.stream or sys.stderr


def say(line: str) -> None:
    """A progress line of qreason's own (not shown with ``--quiet``)."""
    if not _state.quiet:
        _clear_status()
        print(line, file=terminal(), flush=True)


def _clear_status() -> None:
    if _state.status_open:
        terminal().write("\r\x1b[K")
        _state.status_open = False


def status(line: str) -> None:
    """A note on the progress of a long step (a training step, a file written): on a terminal it replaces the
    previous note on one line, which the next ``say`` clears; elsewhere (a log, a pipe) and with ``-v`` it is
    left out: callers log it (``notes``), so run.log keeps them all and ``-v`` shows each as a line."""
    if _state.quiet or _state.verbose:
        return
    out = terminal()
    if not out.isatty():
        return
    width = shutil.get_terminal_size().columns - 1
    out.write("\r\x1b[K" + line[:width])
    out.flush()
    _state.status_open = True


@contextlib.contextmanager
def waiting(line: str) -> Iterator[None]:
    """A step with nothing to count (an engine starting, a server loading a model): its status line, with the
    seconds since it began redrawn by a heartbeat, so the terminal does not go silent. Logged for run.log."""
    logging.getLogger("qreason.progress").info("%s", line, extra=LOG_ONLY)
    stop, start = threading.Event(), time.monotonic()

    def beat() -> None:
        while True:
            status(f"{line} ({time.monotonic() - start:.0f} s)")
            if stop.wait(HEARTBEAT_S):
                return

    thread = threading.Thread(target=beat, name="qreason-waiting", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        _clear_status()
        terminal().flush()


def notes(prefix: str) -> Callable[[str], None]:
    """A worker's progress notes (``run_worker``'s ``echo``): each goes to run.log and to ``status``."""
    logger = logging.getLogger("qreason.progress")

    def note(message: str) -> None:
        logger.info("%s%s", prefix, message, extra=LOG_ONLY)
        status(prefix + message)

    return note


def capture(path: Path, start: bool = True) -> Path | None:
    """Send descriptor 2 (standard error of this process and of the libraries it loads) to ``path``,
    appending; a second call moves it on, appending what the first file collected (a file with ``.pending``
    in its name, used before the run directory was known) and removing that file. Nothing with ``-v``.
    ``start=False``: only move a capture the command line started (library callers keep their stderr)."""
    if _state.verbose or (not start and _state.saved_fd is None):
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    if _state.saved_fd is None:
        _state.saved_fd = os.dup(2)
        _state.stream = os.fdopen(
            os.dup(_state.saved_fd), "w", buffering=1, encoding="utf-8", errors="replace"
        )
    previous = _state.log
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    if previous is not None and previous != path and ".pending" in previous.name and previous.is_file():
        with open(previous, "rb") as src, os.fdopen(os.dup(fd), "wb") as dst:
            shutil.copyfileobj(src, dst)
        previous.unlink()
    os.dup2(fd, 2)
    os.close(fd)
    _state.log = path
    return path


def release() -> Path | None:
    """Give descriptor 2 back to the terminal; returns the log file that collected the output. A pending log
    (no run directory took it over) is removed when empty, else kept without ``.pending`` in its name."""
    if _state.saved_fd is None:
        return None
    sys.stderr.flush()
    os.dup2(_state.saved_fd, 2)
    os.close(_state.saved_fd)
    if _state.stream is not None:
        _state.stream.close()
    log, _state.log, _state.saved_fd, _state.stream = _state.log, None, None, None
    if log is not None and ".pending" in log.name and log.is_file():
        if log.stat().st_size == 0:
            log.unlink()
            return None
        log = log.rename(log.with_name(log.name.replace(".pending", "")))
    return log


HEARTBEAT_S = 5.0  # an open progress line is redrawn at least this often (its elapsed time moves on)
_bars: list[_StageBar] = []  # the progress lines open now, innermost last (``activity`` writes to it)


class _StageBar(tqdm):
    """A stage's progress line: no time estimate until a tenth of the work (at least two items) is done, then
    one from the average rate since the start (engines finish batches together: the first items come late,
    the rest fast, and a rate from the first items alone promised hours). A heartbeat redraws it every
    ``HEARTBEAT_S`` seconds, so the elapsed time and the ``activity`` note move while no item finishes (a
    batch of long answers can take minutes)."""

    def __init__(self, *args, **kwargs):
        _clear_status()
        self._stopped = threading.Event()
        self.note = ""
        super().__init__(*args, **kwargs)
        if not self.disable:
            _bars.append(self)
            threading.Thread(target=self._beat, name="qreason-heartbeat", daemon=True).start()

    def _beat(self) -> None:
        while not self._stopped.wait(HEARTBEAT_S):
            try:
                self.refresh()
            except Exception:  # noqa: BLE001 - a closed stream ends the heartbeat, never the run
                return

    def close(self) -> None:
        if hasattr(self, "_stopped"):
            self._stopped.set()
        if self in _bars:
            _bars.remove(self)
        super().close()

    @property
    def format_dict(self):
        d = super().format_dict
        if self.total and self.n < min(self.total, max(2, self.total / 10)):
            d["bar_format"] = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<?{postfix}]"
        if getattr(self, "note", ""):
            d["postfix"] = self.note
        return d


def activity(note: str) -> None:
    """What the innermost open progress line's current item is doing ("batch 2/5: 7/16 answers, 310 tok/s"),
    shown at its end from the next redraw (the heartbeat's at the latest); "" clears it. Also logged."""
    if _bars:
        _bars[-1].note = note


def progress(total: int, desc: str, unit: str, iterable=None, transient: bool = False) -> tqdm:
    """The progress line of one stage, on the terminal (over ``iterable`` when given); none with ``--quiet``
    or nothing to do. ``transient``: a sub-step's line (grading what a stage just generated, a curation
    round), removed from a terminal once done."""
    return _StageBar(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        leave=not transient,
        file=terminal(),
        disable=_state.quiet or not total,
        smoothing=0,
        dynamic_ncols=True,
        mininterval=0.5,
    )
