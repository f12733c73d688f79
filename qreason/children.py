"""Child processes that die with qreason: a killed ``qreason run`` (kill -9, OOM killer) must not leave a
quantization, training or lm-eval worker or a vLLM server running, holding memory and, on a GPU, the
device's memory.

Every child starts in its own process group (so qreason can stop it with everything it started) and, on
Linux, asks the kernel for a signal when its parent dies (``prctl(PR_SET_PDEATHSIG)``, set between fork and
exec). A child whose parent died before the request took effect kills itself at once.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable

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
