"""Grading with Math-Verify: two verdicts per solution, each one of correct / wrong / no_answer / truncated /
grader_error.

- ``status`` (strict): the answer stated behind an explicit marker (``\\boxed{}``, "final answer is", "the
  answer is", "Answer:", ``####``), found by the rules in ``qreason.extract``; no marker that parses is
  no_answer. A number quoted in the middle of the reasoning is never taken for the answer.
- ``lenient_status``: the same comparison on the answer a reader would take when no marker states one (the
  number or formula of the final sentence). Equal to ``status`` whenever a marker was found. ``no_answer``
  strictly but ``correct`` leniently is a *format failure*: right maths, unreadable format.
- truncated: the generation hit max_tokens (finish_reason "length"); its answer, if any, is not final.
- grader_error: parsing or verification failed or ran past the time limit.

Each answer is graded in a worker process. Math-Verify's own timeouts use SIGALRM, which works only on a main
thread; the worker's main thread gives it that, and the parent enforces the same limit from the outside by
killing a worker that overruns. So grading is bounded wherever ``grade`` is called from (threads included).
"""

from __future__ import annotations

import importlib.metadata as md
import json
import math
import re
import time
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple, get_args

from qreason import console
from qreason.errors import UserError
from qreason.pool import bounded_calls
from qreason.records import Generation, Grade, GradeStatus, Problem, clean_text, content_key
from qreason.registry import GRADERS
from qreason.stages.grade.extract import (
    MAX_CANDIDATE,
    AnswerCandidate,
    clean,
    lenient_candidate,
    normalize_text,
    number_in,
    strict_candidates,
    words,
)
from qreason.store import Table, iter_jsonl, write_atomic

STATUSES = get_args(GradeStatus)
PLAIN_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:/[1-9]\d*)?")
MAX_TRIES = 8  # candidates tried per solution: bounds the parser's work on a text full of boxes

GRADER_REVISION = 2  # 2: extraction in a defined order over all markers, and the lenient verdict


def grader_id() -> str:
    return f"math-verify=={md.version('math-verify')}/qreason-grade-{GRADER_REVISION}"


class GradeVerdict(NamedTuple):
    """The strict verdict (explicit markers only) and the lenient one (what a reader takes) on one
    solution."""

    status: str
    extracted: str | None
    detail: str | None
    lenient_status: str
    lenient_extracted: str | None


def _parse(latex: str, timeout_s: int) -> list:
    """Math-Verify's reading of one answer written as LaTeX (with or without delimiters); [] if none."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    if not latex or len(latex) > MAX_CANDIDATE:
        return []
    if PLAIN_NUMBER.fullmatch(latex):  # most answers: skip the LaTeX parser
        import sympy

        return [sympy.Rational(latex)]
    got = parse(
        f"$${latex}$$",
        [LatexExtractionConfig(), ExprExtractionConfig()],
        fallback_mode="no_fallback",
        parsing_timeout=timeout_s,
        raise_on_error=True,
    )
    return [x for x in got if not isinstance(x, str)]


def _number_form(s: str) -> str:
    """A number answer without what only decorates it: thousands separators, percent signs."""
    s = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", s)
    return re.sub(r"\\?%$", "", s).strip()


def interpret(candidate: AnswerCandidate, answer_type: str, timeout_s: int) -> tuple[list, str] | None:
    """(parsed answer, the text compared) for a candidate, or None when it states no readable answer."""
    s = clean(candidate.text)
    if not s or len(s) > MAX_CANDIDATE:
        return None
    lenient = candidate.source == "lenient"
    if words(s):  # prose such as "the product of the digits is 6": the value is what the last "is" names
        stated = re.split(r"\b(?:is|are|equals)\b", s)[-1].strip()
        s = stated or s
    if answer_type in ("number", "integer"):
        if words(s) or lenient or "=" in s:
            s = number_in(s, last=lenient) or ""
        s = _number_form(s)
    elif words(s):  # prose around a single number ("5 apples"); else a text answer such as "Evelyn"
        number = number_in(s, last=lenient)
        if number is None and len(words(s)) > 3:
            return None  # a sentence, not an answer
        s = number or s
    parsed = _parse(s, timeout_s)
    if not parsed and answer_type == "latex" and not lenient and (words(s) or "\\text" in s) and len(s) <= 60:
        return [], s  # a short text answer: compared as text
    return (parsed, s) if parsed else None


def first_answer(
    candidates: list[AnswerCandidate], answer_type: str, timeout_s: int
) -> tuple[list, str] | None:
    """The first candidate that states a readable answer (at most MAX_TRIES are tried)."""
    for candidate in candidates[:MAX_TRIES]:
        got = interpret(candidate, answer_type, timeout_s)
        if got is not None:
            return got
    return None


@lru_cache(maxsize=256)
def _reference(reference: str, answer_type: str, timeout_s: int) -> tuple[list, str]:
    ref = clean(reference)
    if answer_type != "latex":
        ref = _number_form(ref.replace(",", ""))
    return _parse(ref, timeout_s), ref


def _same(gold: tuple[list, str], pred: tuple[list, str], timeout_s: int) -> bool:
    from math_verify import verify

    if normalize_text(gold[1]) == normalize_text(pred[1]):
        return True
    if not gold[0] or not pred[0]:
        return False
    if getattr(gold[0][0], "is_Integer", False) and getattr(
        pred[0][0], "is_Integer", False
    ):  # plain integers: no need for the general comparison
        return bool(gold[0][0] == pred[0][0])
    if verify(gold[0], pred[0], timeout_seconds=timeout_s, raise_on_error=True):
        return True
    if "%" in gold[1] + pred[1]:  # "17.5\\%" and "17.5" state the same percentage
        bare = [_parse(_number_form(x), timeout_s) for x in (gold[1], pred[1])]
        return bool(bare[0] and bare[1]) and verify(
            bare[0], bare[1], timeout_seconds=timeout_s, raise_on_error=True
        )
    return False


def _matches(gold: tuple[list, str], pred: tuple[list, str], timeout_s: int) -> bool:
    """Whether the answer states the reference; "x = 10,080" states "10080" when the reference is no
    equation."""
    if _same(gold, pred, timeout_s):
        return True
    if "=" in pred[1] and "=" not in gold[1]:
        rhs = pred[1].rsplit("=", 1)[1].strip()
        parsed = _parse(rhs, timeout_s)
        return bool(rhs) and _same(gold, (parsed, rhs), timeout_s)
    return False


def grade_answer(
    text: str, finish_reason: str | None, reference: str, answer_type: str, timeout_s: int = 10
) -> GradeVerdict:
    """Both verdicts on one solution. Runs Math-Verify in the calling (main) thread."""
    strict = first_answer(strict_candidates(text), answer_type, timeout_s)
    loose = strict
    if strict is None:
        fallback = lenient_candidate(text)
        loose = interpret(fallback, answer_type, timeout_s) if fallback else None
    shown, loose_shown = (strict[1] if strict else None), (loose[1] if loose else None)
    if finish_reason == "length":
        return GradeVerdict("truncated", shown, None, "truncated", loose_shown)
    gold = _reference(reference, answer_type, timeout_s)
    if not gold[0] and answer_type != "latex":
        detail = f"could not parse the reference answer {reference!r}"
        return GradeVerdict("grader_error", shown, detail, "grader_error", loose_shown)

    def verdict(pred) -> str:
        return "no_answer" if pred is None else "correct" if _matches(gold, pred, timeout_s) else "wrong"

    status = verdict(strict)
    return GradeVerdict(status, shown, None, status if strict else verdict(loose), loose_shown)


def grade_text(
    text: str, finish_reason: str | None, reference: str, answer_type: str, timeout_s: int = 10
) -> tuple[str, str | None, str | None]:
    """(strict status, extracted answer, detail) for one solution; see ``grade_answer`` for both verdicts."""
    v = grade_answer(text, finish_reason, reference, answer_type, timeout_s)
    return v.status, v.extracted, v.detail


def _worker(args: tuple) -> tuple:
    from math_verify.errors import (
        TimeoutException,  # a BaseException: "except Exception" would let it kill us
    )

    try:
        return tuple(grade_answer(*args))
    except TimeoutException:
        return "grader_error", None, f"Math-Verify ran past its {args[-1]} s limit"
    except Exception as exc:  # noqa: BLE001 - any failure of the grader is a grader_error, never a crash
        return "grader_error", None, f"{type(exc).__name__}: {str(exc)[:200]}"


def _warm_up() -> None:
    """Import Math-Verify and run its LaTeX parser and comparison once: the first parse builds the parser
    (seconds on a busy machine), which must not count against the first answer's time limit."""
    grade_answer("So $x = \\boxed{\\left(3, \\frac{\\pi}{2}\\right)}$.", "stop", "(3, \\pi/2)", "latex", 600)


@dataclass
class GradeJob:
    generation: Generation
    problem: Problem
    key: str


def grade_key(generation_key: str, grader: str) -> str:
    """The key of a generation's grade by one grader (``grader``: its id, ``Grader.grader``). Two graders
    never share keys, so each finds only its own grades."""
    return content_key("grade", generation_key, grader)


@dataclass(frozen=True, eq=False)
class _Index:
    """A job handle for ``bounded_calls`` (which tells jobs apart by identity)."""

    i: int


def make_grader(cfg) -> Grader:
    """The grader a run config asks for (``GradingConfig``): its kind in ``qreason.registry.GRADERS``."""
    return GRADERS.get(cfg.kind, "grading.kind")(cfg.timeout_s, cfg.workers)


class Grader:
    """Grades in a pool of spawned worker processes with a per-answer wall-clock limit."""

    def __init__(self, timeout_s: int = 10, workers: int = 2, grace_s: float = 5.0, fn=None):
        self.timeout_s = timeout_s
        self.workers = workers
        self.grace_s = (
            grace_s  # Math-Verify's own limit fires first; the parent kills a worker after this too
        )
        self.fn = fn or _worker  # a picklable top-level function of the job's argument tuple
        self.grader = grader_id()

    def grade(self, jobs: list[GradeJob]) -> Iterator[Grade]:
        """Yield one Grade per job (in completion order)."""
        calls = [
            (
                job,
                (
                    job.generation.text,
                    job.generation.finish_reason,
                    job.problem.answer,
                    job.problem.answer_type,
                    self.timeout_s,
                ),
            )
            for job in jobs
        ]
        for job, ok, result in bounded_calls(
            self.fn, calls, self.timeout_s + self.grace_s, self.workers, _warm_up
        ):
            yield self._record(job, *result) if ok else self._record(job, "grader_error", None, result)

    def run(self, args: list[tuple]) -> Iterator[tuple[int, tuple]]:
        """``(index, result)`` for each argument tuple of ``fn`` (in completion order); an answer that
        overruns the limit gets a grader_error result."""
        calls = [(_Index(i), a) for i, a in enumerate(args)]
        for job, ok, result in bounded_calls(
            self.fn, calls, self.timeout_s + self.grace_s, self.workers, _warm_up
        ):
            yield job.i, result if ok else ("grader_error", None, result)

    def _record(
        self,
        job: GradeJob,
        status: str,
        extracted: str | None,
        detail: str | None,
        lenient_status: str | None = None,
        lenient_extracted: str | None = None,
    ) -> Grade:
        g = job.generation
        return Grade(
            key=job.key,
            generation_key=g.key,
            variant=g.variant,
            task=g.task,
            problem_id=g.problem_id,
            seed=g.seed,
            status=status,
            extracted=extracted,
            reference=job.problem.answer,
            grader=self.grader,
            detail=detail,
            lenient_status=lenient_status or status,
            lenient_extracted=lenient_extracted if lenient_status else extracted,
        )


def run_grading(
    store,
    grader: Grader,
    generations: Iterable[Generation] | None = None,
    out: Table[Grade] | None = None,
    flush_every: int = 64,
    transient: bool = False,
    desc: str = "grade",
) -> int:
    """Grade every generation (default: all stored) that has no grade in ``out`` (default: the grades table)
    yet; returns how many grades were written. ``desc``: the progress line's label (a sub-step's names its
    stage: "curate: grade")."""
    out = out if out is not None else store.grades
    problems = {(p.task, p.problem_id): p for p in store.problems.all()}
    jobs = []
    for g in generations if generations is not None else store.generations.all():
        key = grade_key(g.key, grader.grader)
        if key not in out:
            jobs.append(GradeJob(g, problems[(g.task, g.problem_id)], key))
    written, pending = 0, []
    bar = console.progress(len(jobs), desc, "ans", grader.grade(jobs), transient=transient) if jobs else []
    for grade in bar:
        pending.append(grade)
        if len(pending) >= flush_every:
            written += out.append(pending)
            pending = []
    return written + out.append(pending)


ANSWER_TYPES = ("number", "latex", "integer")


def read_solutions(
    path: Path, response_field: str, reference_field: str, finish_field: str | None = None
) -> list[dict]:
    """Every row of a JSONL file of solutions, checked: a row without a text response or a reference is a
    UserError naming its line (nothing is graded then)."""
    rows = []
    for where, row in iter_jsonl(path):
        for name in (response_field, reference_field):
            if name not in row:
                raise UserError(where, f"missing field {name!r}")
        if not isinstance(row[response_field], str):
            raise UserError(
                where, f"field {response_field!r} must be a string, not {type(row[response_field]).__name__}"
            )
        row = clean_text(row)  # a lone surrogate (valid JSON escape, not writable as UTF-8) becomes U+FFFD
        ref = row[reference_field]
        if (
            isinstance(ref, bool)
            or not isinstance(ref, (str, int, float))
            or not str(ref).strip()
            or (isinstance(ref, float) and not math.isfinite(ref))
        ):
            raise UserError(
                where, f"field {reference_field!r} must be a non-empty string or number, not {ref!r}"[:200]
            )
        if finish_field and row.get(finish_field) is not None and not isinstance(row[finish_field], str):
            raise UserError(where, f"field {finish_field!r} must be a string or null")
        rows.append(row)
    return rows


def grade_file(
    path: Path,
    out: Path,
    response_field: str,
    reference_field: str,
    answer_type: str,
    grader: Grader,
    finish_field: str | None = None,
) -> dict:
    """Grade a JSONL file of solutions written anywhere: ``out`` gets each row with ``status``,
    ``lenient_status`` and ``extracted`` added (same order), written whole or not at all. Returns the
    counts."""
    if answer_type not in ANSWER_TYPES:
        raise UserError(answer_type, f"answer type must be one of {', '.join(ANSWER_TYPES)}")
    path, out = Path(path), Path(out)
    if out.exists() and out.resolve() == path.resolve():
        raise UserError(str(out), "the output would overwrite the input file")
    if out.is_dir():
        raise UserError(str(out), "is a directory; --out names the output file")
    if not out.parent.is_dir():
        raise UserError(str(out.parent), "no such directory for the output file")
    if not (isinstance(grader.timeout_s, (int, float)) and grader.timeout_s > 0):
        raise UserError("--timeout", f"must be a positive number of seconds, not {grader.timeout_s}")
    if not (isinstance(grader.workers, int) and grader.workers >= 1):
        raise UserError("--workers", f"must be at least 1, not {grader.workers}")
    rows = read_solutions(path, response_field, reference_field, finish_field)
    args = [
        (
            r[response_field],
            r.get(finish_field) if finish_field else None,
            str(r[reference_field]),
            answer_type,
            grader.timeout_s,
        )
        for r in rows
    ]
    results: list[tuple] = [()] * len(rows)
    t0 = time.monotonic()
    for i, result in console.progress(len(args), "grade", "ans", grader.run(args)) if args else []:
        results[i] = result
    lines = []
    for row, result in zip(rows, results):
        status, extracted = result[0], result[1]
        lenient_status = result[3] if len(result) > 3 else status
        lines.append(
            json.dumps(
                {**row, "status": status, "lenient_status": lenient_status, "extracted": extracted},
                ensure_ascii=False,
            )
        )
    write_atomic(out, "".join(line + "\n" for line in lines))
    strict = Counter(r[0] for r in results)
    lenient = Counter(r[3] if len(r) > 3 else r[0] for r in results)
    return {
        "input": str(path),
        "out": str(out),
        "rows": len(rows),
        "answer_type": answer_type,
        "status": {s: strict.get(s, 0) for s in STATUSES},
        "lenient_status": {s: lenient.get(s, 0) for s in STATUSES},
        "format_failures": sum(r[0] == "no_answer" and len(r) > 3 and r[3] == "correct" for r in results),
        "seconds": round(time.monotonic() - t0, 2),
    }
