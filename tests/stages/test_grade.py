import threading
import time

import pytest

from qreason.records import Generation, Problem
from qreason.stages.grade import GradeJob, Grader, grade_key, grade_text, grader_id


@pytest.mark.parametrize(
    "text, finish, reference, answer_type, status, extracted",
    [
        ("Step 1: 2 + 3 = 5\nThe final answer is \\boxed{5}.", "stop", "5", "number", "correct", "5"),
        ("Step 1: 2 + 3 = 6\nThe final answer is \\boxed{6}.", "stop", "5", "number", "wrong", "6"),
        ("Step 1: 2 + 3 = 5\nSo there are 5 apples left.", "stop", "5", "number", "no_answer", None),
        ("Step 1: 2 + 3 = 5\n\\boxed{5}", "length", "5", "number", "truncated", "5"),
        ("Step 1: 2 + 3 = 5\nStep 2: 5 +", "length", "5", "number", "truncated", None),
        ("Total: \\boxed{1,234}", "stop", "1234", "number", "correct", "1234"),
        ("The answer is $\\frac{1}{2}$", "stop", "0.5", "latex", "correct", "\\frac{1}{2}"),
        (
            "\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}",
            "stop",
            "\\left( 3, \\frac{\\pi}{2} \\right)",
            "latex",
            "correct",
            None,
        ),
        ("\\boxed{025}", "stop", "25", "integer", "correct", "025"),
        # a number quoted early in the reasoning is not the answer: only the final-answer region counts
        (
            "We have 5 apples. Then 5 * 2 = 10.\nThe final answer is \\boxed{10}.",
            "stop",
            "5",
            "number",
            "wrong",
            "10",
        ),
    ],
)
def test_outcomes(text, finish, reference, answer_type, status, extracted):
    got_status, got_extracted, _ = grade_text(text, finish, reference, answer_type)
    assert got_status == status
    if extracted is not None:
        assert got_extracted == extracted


def make_job(i: int, text: str, reference: str = "5") -> GradeJob:
    problem = Problem(
        key=f"p{i}", task="t", problem_id=str(i), question="q", answer=reference, answer_type="number"
    )
    gen = Generation(
        key=f"g{i}",
        variant="base",
        model_fingerprint="f",
        task="t",
        problem_id=str(i),
        seed=0,
        prompt_hash="h",
        messages=[],
        text=text,
        steps=[],
        prompt_tokens=1,
        completion_tokens=1,
        finish_reason="stop",
        backend="test",
        versions={},
        sampling={},
        seconds=0.0,
        created_at="now",
    )
    return GradeJob(gen, problem, grade_key(gen.key, grader_id()))


def test_grader_works_off_the_main_thread():
    jobs = [make_job(i, f"\\boxed{{{i}}}") for i in range(6)]
    out = []
    thread = threading.Thread(target=lambda: out.extend(Grader(timeout_s=5, workers=2).grade(jobs)))
    thread.start()
    thread.join(120)
    assert sorted((g.problem_id, g.status) for g in out) == [
        (str(i), "correct" if i == 5 else "wrong") for i in range(6)
    ]


def hang_on_seven(args):
    """A grading function that never returns for one input (stands in for a pathological expression)."""
    if "7" in args[0]:
        time.sleep(600)
    return "correct", "ok", None


def test_a_hanging_answer_becomes_grader_error_and_the_rest_still_grade():
    jobs = [make_job(i, f"\\boxed{{{i}}}") for i in (1, 7, 2, 3)]
    t0 = time.monotonic()
    grades = {
        g.problem_id: g for g in Grader(timeout_s=1, workers=2, grace_s=1, fn=hang_on_seven).grade(jobs)
    }
    assert time.monotonic() - t0 < 60
    assert grades["7"].status == "grader_error" and "timed out" in grades["7"].detail
    assert {grades[i].status for i in ("1", "2", "3")} == {"correct"}


def test_a_math_verify_timeout_is_a_grader_error_not_a_dead_worker(monkeypatch):
    from math_verify.errors import TimeoutException

    import qreason.stages.grade.grader as grade

    def too_slow(*args):
        raise TimeoutException("Operation timed out!")  # a BaseException: it would end the worker process

    monkeypatch.setattr(grade, "grade_answer", too_slow)
    status, extracted, detail = grade._worker(("\\boxed{5}", "stop", "5", "number", 3))
    assert (status, extracted) == ("grader_error", None) and "3 s limit" in detail
