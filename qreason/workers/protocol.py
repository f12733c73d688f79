"""What the main process and its workers in other environments agree on (standard library only).

qreason starts a worker as ``python -m MODULE JOB.json`` in another virtual environment (quantization in
``.venv-quant``, training in ``.venv-train``): the environments pin different versions of the libraries they
share, so a worker imports only this module of qreason, plus its own libraries.

Protocol, stdout: a line starting with ``PROGRESS_PREFIX`` is progress for the user; every other line belongs
in the log file. On success the worker writes ``job["result_file"]`` (JSON) and exits 0; on failure it prints
one ``ERROR_PREFIX`` line naming the problem and exits 1 (130 when interrupted). A worker that produces
several results (lm-eval: one per task) prints ``RESULT_PREFIX PATH`` for each file as it is written, and
``ERROR_PREFIX ITEM: MESSAGE`` for each item that failed.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import platform
import sys
import time
import traceback
from typing import Any, Callable, NotRequired, TypedDict

PROGRESS_PREFIX = "@qreason-progress "
ERROR_PREFIX = "@qreason-error "
RESULT_PREFIX = "@qreason-result "  # a worker that streams results: one line per result file written
HUB_MARK = "needs the Hugging Face hub"  # lm-eval --check: a dataset neither local nor cached
_START = time.monotonic()


# ---------------------------------------------------------------------------------------------- the jobs
# What the main process sends each worker (the job file, JSON). ``result_file`` is added by the launcher.


class CalibrationFile(TypedDict):
    file: str  # JSONL of chat samples
    max_seq_len: int


class QuantizeJob(TypedDict):
    model: str  # the base checkpoint directory
    output_dir: str
    modifiers: list[dict[str, Any]]  # llm-compressor modifiers of the resolved recipe
    calibration: CalibrationFile | None
    seed: int


class TrainRun(TypedDict):
    name: str  # "VARIANT ARM"
    mode: str  # sft | dpo | sft+dpo | kd
    sft: list[dict]  # TRL conversational prompt-completion rows
    dpo: list[dict]  # TRL conversational preference rows (kd: ``prefix`` + ``chosen``, the failure frontier)
    hyper: dict[str, Any]
    merged_dir: str | None  # also write the adapter merged into a dense checkpoint here
    adapter_dir: NotRequired[str]  # train a new adapter into this directory
    load_adapter: NotRequired[str]  # or load this finished one (to merge it)
    model_dir: NotRequired[str]  # train on this checkpoint instead of the dense copy (full-precision arm)
    base_name: NotRequired[str]  # what its adapter names as base (model_dir's VARIANT@FINGERPRINT)


class TrainJob(TypedDict):
    checkpoint: str  # the quantized checkpoint
    dense_dir: str  # its dense copy of the grid weights (made once, reused)
    base_name: (
        str  # what adapter configs name as their base: VARIANT@FINGERPRINT, never a path of this machine
    )
    device: str
    seed: int
    threads: int | None
    runs: list[TrainRun]
    teacher: NotRequired[str]  # kd: the full-precision checkpoint
    teacher_key: NotRequired[str]  # its fingerprint (part of the cache key)
    teacher_cache: NotRequired[str]  # the directory of cached teacher top-k files


class LmEvalJob(TypedDict):
    model: str  # lm-eval model type (local-completions)
    model_args: dict[str, Any]
    tasks: list[dict[str, str]]  # name and the stage's result key
    include_paths: list[str]
    limit: NotRequired[int | float | None]
    num_fewshot: NotRequired[int | None]
    apply_chat_template: NotRequired[bool]
    fewshot_as_multiturn: NotRequired[bool]
    bootstrap_iters: NotRequired[int]
    metadata: NotRequired[dict[str, Any]]
    samples_dir: NotRequired[str]
    results_dir: NotRequired[str]
    cache: NotRequired[str]


def progress(message: str) -> None:
    print(f"{PROGRESS_PREFIX}[{time.monotonic() - _START:6.1f}s] {message}", flush=True)


def versions(dists: tuple[str, ...]) -> dict[str, str]:
    """The python version and the installed version of each distribution in ``dists`` (missing ones left
    out)."""
    out = {"python": platform.python_version()}
    for dist in dists:
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


def worker_main(run: Callable[[dict], dict], usage: str, argv: list[str] | None = None) -> int:
    """Read the job file named on the command line, ``run`` it, write its result; the protocol's exit
    codes."""
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
