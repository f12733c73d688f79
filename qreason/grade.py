"""Grading with Math-Verify: correct / wrong / no_answer / truncated / grader_error.

- truncated: the generation hit max_tokens (finish_reason "length"); its answer, if any, is not final.
- no_answer: the text finished but states no final answer (no \\boxed{}, "final answer", "answer:" or "####").
- correct / wrong: Math-Verify's verdict on the final answer. Only the text from the last final-answer marker
  on is parsed, so a number quoted earlier in the reasoning is never taken for the answer.
- grader_error: parsing or verification failed or ran past the time limit.

Each answer is graded in a worker process. Math-Verify's own timeouts use SIGALRM, which works only on a main
thread; the worker's main thread gives it that, and the parent enforces the same limit from the outside by
killing a worker that overruns. So grading is bounded wherever ``grade`` is called from (threads included).
"""

from __future__ import annotations

import importlib.metadata as md
import multiprocessing as mp
import re
import time
from dataclasses import dataclass
from typing import Iterable, Iterator

from tqdm.auto import tqdm

from .records import Generation, Grade, Problem, content_key
from .store import Table

GRADER_REVISION = 1
FINAL_MARKERS = re.compile(r"\\boxed\s*\{|\\fbox\s*\{|final answer|answer\s*(?:is|:)|####", re.IGNORECASE)


def grader_id() -> str:
    return f"math-verify=={md.version('math-verify')}/qreason-grade-{GRADER_REVISION}"


def final_answer_region(text: str) -> str | None:
    """The text from the last final-answer marker on, or None when the text states no final answer."""
    marks = list(FINAL_MARKERS.finditer(text))
    if not marks:
        return None
    return text[marks[-1].start():]


def _answer_text(parsed: list) -> str | None:
    if not parsed:
        return None
    return str(parsed[1] if len(parsed) > 1 else parsed[0])


def grade_text(text: str, finish_reason: str | None, reference: str, answer_type: str,
               timeout_s: int = 10) -> tuple[str, str | None, str | None]:
    """(status, extracted answer, detail) for one solution. Runs Math-Verify in the calling (main) thread."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    region = final_answer_region(text)
    pred = []
    if region is not None:
        pred = parse(region, [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()],
                     parsing_timeout=timeout_s, raise_on_error=True)
    extracted = _answer_text(pred)
    if finish_reason == "length":
        return "truncated", extracted, None
    if not pred:
        return "no_answer", None, None
    gold_text = reference if answer_type == "latex" else reference.replace(",", "")
    gold = parse(f"${gold_text}$", [LatexExtractionConfig(), ExprExtractionConfig()], parsing_timeout=timeout_s,
                 raise_on_error=True)
    if not gold:
        return "grader_error", extracted, f"could not parse the reference answer {reference!r}"
    ok = verify(gold, pred, timeout_seconds=timeout_s, raise_on_error=True)
    return ("correct" if ok else "wrong"), extracted, None


def _worker(args: tuple) -> tuple[str, str | None, str | None]:
    try:
        return grade_text(*args)
    except Exception as exc:  # noqa: BLE001 - any failure of the grader is a grader_error, never a crash
        return "grader_error", None, f"{type(exc).__name__}: {str(exc)[:200]}"


def _warm_up() -> None:
    import math_verify  # noqa: F401


def _noop(_: int) -> None:
    return None


@dataclass
class GradeJob:
    generation: Generation
    problem: Problem
    key: str


def grade_key(generation_key: str) -> str:
    return content_key("grade", generation_key, grader_id())


def bounded_calls(fn, jobs: list[tuple[object, tuple]], limit_s: float, workers: int,
                  warm_up=None) -> Iterator[tuple[object, bool, object]]:
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


class Grader:
    """Grades in a pool of spawned worker processes with a per-answer wall-clock limit."""

    def __init__(self, timeout_s: int = 10, workers: int = 2, grace_s: float = 5.0, fn=None):
        self.timeout_s = timeout_s
        self.workers = workers
        self.grace_s = grace_s  # Math-Verify's own limit fires first; the parent kills a worker after this too
        self.fn = fn or _worker  # a picklable top-level function of the job's argument tuple
        self.grader = grader_id()

    def grade(self, jobs: list[GradeJob]) -> Iterator[Grade]:
        """Yield one Grade per job (in completion order)."""
        limit = self.timeout_s + self.grace_s
        calls = [(job, (job.generation.text, job.generation.finish_reason, job.problem.answer,
                        job.problem.answer_type, self.timeout_s)) for job in jobs]
        for job, ok, result in bounded_calls(self.fn, calls, limit, self.workers, _warm_up):
            yield self._record(job, *result) if ok else self._record(job, "grader_error", None, result)

    def _record(self, job: GradeJob, status: str, extracted: str | None, detail: str | None) -> Grade:
        g = job.generation
        return Grade(key=job.key, generation_key=g.key, variant=g.variant, task=g.task, problem_id=g.problem_id,
                     seed=g.seed, status=status, extracted=extracted, reference=job.problem.answer,
                     grader=self.grader, detail=detail)


def run_grading(store, grader: Grader, generations: Iterable[Generation] | None = None,
                out: Table[Grade] | None = None, flush_every: int = 64) -> int:
    """Grade every generation (default: all stored) that has no grade in ``out`` (default: the grades table)
    yet; returns how many grades were written."""
    out = out if out is not None else store.grades
    problems = {(p.task, p.problem_id): p for p in store.problems.all()}
    jobs = []
    for g in generations if generations is not None else store.generations.all():
        key = grade_key(g.key)
        if key not in out:
            jobs.append(GradeJob(g, problems[(g.task, g.problem_id)], key))
    written, pending = 0, []
    for grade in tqdm(grader.grade(jobs), total=len(jobs), desc="grade", unit="ans", disable=not jobs,
                      dynamic_ncols=True):
        pending.append(grade)
        if len(pending) >= flush_every:
            written += out.append(pending)
            pending = []
    return written + out.append(pending)
