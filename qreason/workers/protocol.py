"""What the main process and its workers in other environments agree on (standard library only).

qreason starts a worker as ``python -m MODULE JOB.json`` in another virtual environment (quantization in
``.venv-quant``, training in ``.venv-train``): the environments pin different versions of the libraries they share,
so a worker imports only this module of qreason, plus its own libraries.

Protocol, stdout: a line starting with ``PROGRESS_PREFIX`` is progress for the user; every other line belongs in the
log file. On success the worker writes ``job["result_file"]`` (JSON) and exits 0; on failure it prints one
``ERROR_PREFIX`` line naming the problem and exits 1 (130 when interrupted).
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import platform
import sys
import time
import traceback
from typing import Callable

PROGRESS_PREFIX = "@qreason-progress "
ERROR_PREFIX = "@qreason-error "
_START = time.monotonic()


def progress(message: str) -> None:
    print(f"{PROGRESS_PREFIX}[{time.monotonic() - _START:6.1f}s] {message}", flush=True)


def versions(dists: tuple[str, ...]) -> dict[str, str]:
    """The python version and the installed version of each distribution in ``dists`` (missing ones left out)."""
    out = {"python": platform.python_version()}
    for dist in dists:
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


def worker_main(run: Callable[[dict], dict], usage: str, argv: list[str] | None = None) -> int:
    """Read the job file named on the command line, ``run`` it, write its result; the protocol's exit codes."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print(usage.strip())
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    # Progress bars would flood the log; the worker reports its own progress.
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        with open(argv[0], encoding="utf-8") as fh:
            job = json.load(fh)
        result = run(job)
        with open(job["result_file"], "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=2)
    except KeyboardInterrupt:
        print(f"{ERROR_PREFIX}interrupted", flush=True)
        return 130
    except BaseException as exc:  # the parent turns this into one line and keeps the traceback in the log
        traceback.print_exc(file=sys.stdout)
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        print(f"{ERROR_PREFIX}{type(exc).__name__}: {first}", flush=True)
        return 1
    progress("done")
    return 0
