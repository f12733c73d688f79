"""Child processes that die with qreason: a killed ``qreason run`` (kill -9, OOM killer) must not leave a
quantization, training or lm-eval worker or a vLLM server running, holding memory and, on a GPU, the
device's memory.

Every child starts in its own process group (so qreason can stop it with everything it started) and, on
Linux, asks the kernel for a signal when its parent dies (``prctl(PR_SET_PDEATHSIG)``, set between fork and
exec). A child whose parent died before the request took effect kills itself at once.

A child started for a while (a worker, a server) is also ``track``-ed: Ctrl-C reaches only qreason (children
run in their own sessions), and a child serving another thread (lm-eval's targets) would otherwise run until
that thread looked up. ``stop_on_interrupt`` stops every tracked child's group at once when the block it
guards is interrupted, and from then on ``check_stopping`` refuses to start new ones.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

PR_SET_PDEATHSIG = 1

# loaded in the parent: the function that runs between fork and exec should allocate and load nothing (the
# process's own symbols hold libc's prctl)
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None


def die_with_parent(sig: int = signal.SIGKILL) -> Callable[[], None] | None:
    """A ``preexec_fn`` for ``subprocess.Popen``: the child receives ``sig`` when this process (the thread
    that started it) dies. None where the kernel offers no such signal (not Linux)."""
    if _LIBC is None:
        return None
    parent = os.getpid()
    prctl = _LIBC.prctl

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:  # the parent died between fork and prctl
            os.kill(os.getpid(), sig)

    return preexec


# how long an interrupted child gets for SIGTERM before SIGKILL: Ctrl-C must take effect within seconds
INTERRUPT_GRACE_S = 2.0

_tracked: set[subprocess.Popen] = set()
_tracked_lock = threading.Lock()
_stopping = threading.Event()


def track(proc: subprocess.Popen) -> None:
    """Register a running child (the leader of its own process group) for ``stop_tracked``."""
    with _tracked_lock:
        _tracked.add(proc)


def untrack(proc: subprocess.Popen) -> None:
    with _tracked_lock:
        _tracked.discard(proc)


def stop_group(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM the child's process group, SIGKILL it after ``grace`` seconds if it still runs."""
    stop_groups([proc], grace)


def stop_groups(procs: list[subprocess.Popen], grace: float) -> None:
    """Stop several children's process groups at once: SIGTERM to all, SIGKILL to those still running after
    ``grace`` seconds; returns when every leader has exited (or 5 s after the SIGKILL)."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        running = [p for p in procs if p.poll() is None]
        if not running:
            return
        for p in running:
            try:
                os.killpg(p.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and any(p.poll() is None for p in running):
            time.sleep(0.05)


def stop_tracked(grace: float = INTERRUPT_GRACE_S) -> None:
    """Stop every tracked child now (their groups, in parallel), and refuse new ones (``check_stopping``)."""
    _stopping.set()
    with _tracked_lock:
        procs = list(_tracked)
    stop_groups(procs, grace)


def stopping() -> bool:
    """Whether an interrupt is stopping the children (a thread should start none, and wait for none)."""
    return _stopping.is_set()


def check_stopping() -> None:
    """Raise KeyboardInterrupt in a thread (not the main one, which got the interrupt itself) about to start
    or wait for a child while an interrupt stops them."""
    if _stopping.is_set() and threading.current_thread() is not threading.main_thread():
        raise KeyboardInterrupt


@contextmanager
def stop_on_interrupt() -> Iterator[None]:
    """Guard a block whose children other threads started (a thread pool): when it is interrupted (Ctrl-C, or
    any exception), every tracked child is stopped before the exception leaves the block, so the threads
    waiting on them return at once and the pool's shutdown does not wait for their work to finish."""
    _stopping.clear()
    try:
        yield
    except BaseException:
        stop_tracked()
        raise
