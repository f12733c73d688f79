"""Bounded work in processes: calls on untrusted input (grading a model's answer, checking its arithmetic)
run in spawned worker processes, each under a wall-clock limit, so no model output can hang a run."""

from __future__ import annotations

import multiprocessing as mp
import time
from typing import Iterator


def _noop(_: int) -> None:
    return None


def bounded_calls(
    fn, jobs: list[tuple[object, tuple]], limit_s: float, workers: int, warm_up=None
) -> Iterator[tuple[object, bool, object]]:
    """Call ``fn(args)`` for each ``(job, args)`` in a pool of spawned worker processes, each call under a
    wall-clock limit; yield ``(job, True, result)`` or ``(job, False, "timed out after N s")`` in completion
    order. ``fn`` must be a picklable top-level function. Workers import ``fn``'s module (and run ``warm_up``)
    before any clock starts. A call past its limit cannot be cancelled inside a pool: the pool is replaced and
    the calls still running are resubmitted. Used for grading and for the judge's rule checks: untrusted model
    output must never hang a run."""
    if not jobs:
        return
    ctx = mp.get_context("spawn")

    def start():
        pool = ctx.Pool(workers, initializer=_import_and_warm, initargs=(fn.__module__, warm_up))
        pool.map(_noop, range(workers * 2))
        return pool

    pool = start()
    queue = list(reversed(jobs))
    running: dict[int, tuple[object, tuple, object, float]] = {}
    try:
        while queue or running:
            while queue and len(running) < workers:  # each submitted job starts at once
                job, args = queue.pop()
                running[id(job)] = (job, args, pool.apply_async(fn, (args,)), time.monotonic())
            finished = [k for k, (_, _, res, _) in running.items() if res.ready()]
            for k in finished:
                job, _, res, _ = running.pop(k)
                yield job, True, res.get()
            overdue = [k for k, (_, _, _, t) in running.items() if time.monotonic() - t > limit_s]
            if overdue:
                for k in overdue:
                    job, _, _, _ = running.pop(k)
                    yield job, False, f"timed out after {limit_s:g} s"
                pool.terminate()
                pool = start()
                queue.extend((job, args) for job, args, _, _ in running.values())
                running.clear()
            if not finished:
                time.sleep(0.005)
    finally:
        pool.terminate()


def _import_and_warm(module: str, warm_up) -> None:
    import importlib

    importlib.import_module(module)
    if warm_up is not None:
        warm_up()
