"""The reference locator: a judge layer that needs no model. It finds the first faulty step of a solution
by comparing the numbers it writes with the problem and a worked reference solution.

Method (each rule is tried in order; the first that fires decides):

1. Gate. When the final answer is known to be right (``answer_correct``) and the rule checks find no
   arithmetic slip, there is no faulty step (-1).
2. Slip. The rule checks' arithmetic slip (``rules.check_arithmetic``): Execution / computational_error.
3. Off-reference value. The first step that writes a number that is none of: a number of the problem
   (digits, number words, percentages, their hundredfold, hundredth and reciprocal), a small constant
   (``SMALL_CONSTANTS``), a number written in an earlier step, a value of the reference solution (every number
   of its text: GSM8K's ``<<a*b=c>>`` results, the synthetic task's ``a + b = c`` steps), or the reference
   answer; a decimal matches a known value rounded to one or two places (66.67 is 200/3). Numbers are read as
   written, as magnitudes (``1,200``, ``3.5``, ``20%`` is 20 and 0.2, ``\\frac{3}{4}``). Type, by a fixed
   rule: when the value is the result of an equation in that step (``... = 42``) the plan computed a quantity
   the problem does not need, Method / procedural_error; when it is stated without being computed, a quantity
   was misread or made up, Conceptual / contextual_oversight.
4. Wrong final value. The step where the final (wrong) answer's value is first written (where the value is a
   number of the problem, only as a result: after "=" or boxed, not restated): Method / procedural_error.

Only arithmetic references: a reference solution written with LaTeX commands (a backslash, as MATH and
olympiad solutions are) is not used (``arithmetic_reference``). The method does not transfer to them: the
first wrong step of such a solution is usually a conceptual move with few or no new numbers, and on MATH-500
references a prototype of this method scored like a positional guess, the same with an empty reference. There
the stack falls back to the rule checks and the prior; such problems need a model layer.

Without a worked solution the stack does not run this layer: rules 1, 2 and 4 alone (the answer key and the
rule checks) located fewer first errors on ProcessBench olympiadbench's development half than a fixed guess
of step 2 (F1 0.24 against 0.29), so they would add nothing to the rule checks and the prior.

How the type of an off-reference value was decided: rule 2 ran first, so an equation in the flagged step is
arithmetically right; a right computation of a value the reference never needs is a wrong plan (Method). A
number written without being computed was not derived at all: it was misread from the problem or made up
(Conceptual). This is a rule, not a measurement: ProcessBench labels steps, not error types, so it could not
be checked against labels; an LLM layer, when configured, decides the type of the failures it locates.

Bounds: every step passes ``screen`` first (length, brace nesting, stacked powers); a step over a bound makes
the whole verdict a judge_error, as the rule checks' time limit does. Numbers are parsed by the rule checks'
tokenizer (digits only, at most 18 of them); nothing is evaluated as code; the work is linear in the text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from fractions import Fraction

from qreason.stages.judge.prompts import Verdict
from qreason.stages.judge.rules import Unchecked, check_arithmetic, clean, resolve_words, screen, tokenize

REFERENCE_REVISION = 2  # 2: a given number restated is not where a wrong final value is written
REFERENCE_JUDGE = "reference"

# Numbers a solution may write without a source: small counts, 100 (percent) and simple fractions. Unit
# factors (7, 12, 24, 60, 365, ...) are not among them: when a problem needs one, the reference solution
# writes it; a wrong one ("30 days in March") is an error. The cut at 5 was the best of 2, 3, 4, 5, 6, 8,
# 10 and 12 on the development half (even ids) of ProcessBench gsm8k (F1 0.64-0.67; with unit factors
# known, 0.62-0.65).
SMALL_CONSTANTS = frozenset(Fraction(x) for x in (0, 1, 2, 3, 4, 5, 100)) | frozenset(
    {Fraction(1, 2), Fraction(1, 4), Fraction(3, 4), Fraction(1, 3), Fraction(2, 3)}
)

NUMBER_WORDS = {
    "zero": 0,
    "one": 1,
    "two": 2,
    "three": 3,
    "four": 4,
    "five": 5,
    "six": 6,
    "seven": 7,
    "eight": 8,
    "nine": 9,
    "ten": 10,
    "eleven": 11,
    "twelve": 12,
    "thirteen": 13,
    "fourteen": 14,
    "fifteen": 15,
    "sixteen": 16,
    "seventeen": 17,
    "eighteen": 18,
    "nineteen": 19,
    "twenty": 20,
    "thirty": 30,
    "forty": 40,
    "fifty": 50,
    "sixty": 60,
    "seventy": 70,
    "eighty": 80,
    "ninety": 90,
    "hundred": 100,
    "thousand": 1000,
    "million": 1_000_000,
    "dozen": 12,
    "score": 20,
    "half": 2,
    "twice": 2,
    "double": 2,
    "triple": 3,
    "thrice": 3,
    "quarter": 4,
    "third": 3,
    "fourth": 4,
    "fifth": 5,
    "sixth": 6,
    "tenth": 10,
    "weekly": 7,
    "daily": 1,
}
_WORD = re.compile(r"[A-Za-z]+")
# ------------------------------------------------------------------------------------------------ numbers


@dataclass
class Written:
    """The numbers of one step: every value written, and those that are results of an equation."""

    values: list[Fraction] = field(default_factory=list)
    results: set[Fraction] = field(default_factory=set)


def _forms(v: Fraction, percent: bool) -> set[Fraction]:
    return {v, v / 100} if percent else {v}


def read_numbers(text: str) -> Written:
    """The numbers written in a text, in order, as magnitudes (signs are not read: a minus sign is as often
    an operator as a sign), a percent giving both 20 and 0.2; and the results: numbers right after '=' or
    '≈'."""
    out = Written()
    toks = resolve_words(tokenize(clean(text)))
    for k, t in enumerate(toks):
        if t.kind != "num" or t.value is None:
            continue
        nxt = toks[k + 1] if k + 1 < len(toks) else None
        prev = toks[k - 1] if k else None
        if nxt is not None and nxt.kind == "pct":
            forms = [t.value, t.value / 100]
        else:
            forms = [t.value]
        out.values.extend(forms)
        if prev is not None and prev.kind in ("eq", "approx"):
            out.results.update(forms)
    return out


def problem_numbers(text: str) -> set[Fraction]:
    """The numbers a problem states: digits (with percent forms and reciprocals of small counts) and number
    words."""
    found = set(read_numbers(text).values)
    for w in _WORD.findall(text.lower()):
        if w in NUMBER_WORDS:
            found.add(Fraction(NUMBER_WORDS[w]))
    extra = set()
    for v in found:
        if v and abs(v) <= 1000:
            extra.add(1 / v)
        extra.add(v / 100)
        extra.add(v * 100)
    return found | extra


def answer_value(text: str | None) -> Fraction | None:
    """The single number of a reference answer ("18", "1,200", "$5", "\\frac{3}{4}"), or None."""
    if not text:
        return None
    toks = resolve_words(tokenize(clean(str(text))))
    nums = [t for t in toks if t.kind == "num"]
    if len(nums) == 1 and len(toks) <= 4:
        neg = any(t.kind == "op" and t.text == "-" for t in toks[: toks.index(nums[0])])
        return -nums[0].value if neg else nums[0].value
    if len(nums) == 2 and [t.kind for t in toks].count("op") == 1 and any(t.text == "/" for t in toks):
        return nums[0].value / nums[1].value if nums[1].value else None
    return None


def _boxed(step: str, value: Fraction) -> bool:
    return any(answer_value(b) == value for b in re.findall(r"\\boxed\s*\{([^{}]{0,80})\}", step))


def final_value(steps: list[str]) -> Fraction | None:
    """The value the solution ends on: the last number of its last step that writes one (a boxed answer
    first)."""
    for s in reversed(steps):
        boxed = re.findall(r"\\boxed\s*\{([^{}]{0,80})\}", s)
        if boxed:
            v = answer_value(boxed[-1])
            if v is not None:
                return v
        w = read_numbers(s).values
        if w:
            return w[-1] if len(w) == 1 or w[-1] != w[-2] * 100 else w[-2]
    return None


# ------------------------------------------------------------------------------------------------ verdict


def arithmetic_reference(solution: str | None) -> bool:
    """Whether a worked reference solution is one this layer uses: present and written without LaTeX (GSM8K's
    annotated solutions and the synthetic task's steps are; MATH-style solutions are not)."""
    return bool(solution and solution.strip()) and "\\" not in solution


@dataclass
class Reference:
    """What the locator knows about a problem: its text, the reference answer and the reference solution
    (either may be missing)."""

    problem: str
    answer: str | None = None
    solution: str | None = None

    def known(self) -> set[Fraction]:
        vals = problem_numbers(self.problem) | set(SMALL_CONSTANTS)
        if self.solution:
            vals |= set(read_numbers(self.solution).values)
        a = answer_value(self.answer)
        if a is not None:
            vals.add(a)
        return vals


class Known:
    """A set of values with membership up to rounding: 66.67 matches 200/3, 3.3 matches 10/3."""

    def __init__(self, values: set[Fraction]):
        self.exact: set[Fraction] = set()
        self.rounded: set[float] = set()
        self.update(values)

    def update(self, values) -> None:
        for v in values:
            self.exact.add(v)
            self.rounded.add(round(float(v), 2))
            self.rounded.add(round(float(v), 1))

    def __contains__(self, v: Fraction) -> bool:
        if v in self.exact:
            return True
        if v.denominator != 1:
            return round(float(v), 2) in self.rounded or round(float(v), 1) in self.rounded
        return False


def _verdict(step: int, etype: str, sub: str, cap: str, why: str, rule: str) -> Verdict:
    return Verdict(
        first_error_step=step,
        error_type=etype,
        sub_type=sub,
        capability=cap,
        rationale=why,
        details={"rule": rule, "revision": REFERENCE_REVISION},
    )


def _fmt(v: Fraction) -> str:
    return str(v.numerator) if v.denominator == 1 else f"{float(v):.6g}"


def locate(steps: list[str], ref: Reference, answer_correct: bool | None) -> Verdict:
    """The reference locator's verdict (see the module docstring); raises ``Unchecked`` on hostile text."""
    screen(steps)
    slip = next(((i, e) for i, s in enumerate(steps) if (e := check_arithmetic(s)) is not None), None)
    if answer_correct and slip is None:
        return Verdict(
            first_error_step=-1,
            rationale="the final answer is right and no arithmetic slip was found",
            details={"rule": "gate", "revision": REFERENCE_REVISION},
        )
    if slip is not None:
        return _verdict(
            slip[0], "Execution", "computational_error", "numerical_computation", str(slip[1]), "slip"
        )
    if ref.solution:
        known = Known(ref.known())
        for i, s in enumerate(steps):
            w = read_numbers(s)
            new = next((v for v in w.values if v not in known), None)
            if new is not None:
                if new in w.results:
                    return _verdict(
                        i,
                        "Method",
                        "procedural_error",
                        "reasoning_planning",
                        f"computes {_fmt(new)}, a value neither the problem nor the reference solution has",
                        "off_reference_result",
                    )
                return _verdict(
                    i,
                    "Conceptual",
                    "contextual_oversight",
                    "problem_comprehension",
                    f"states {_fmt(new)}, a number neither the problem nor the reference solution has",
                    "off_reference_value",
                )
            known.update(w.values)
    if answer_correct is False and ref.solution:
        wrong = final_value(steps)
        if wrong is not None:
            # a value the problem gives is only "written" where the solution states it as a result (after
            # "=", or boxed), not where it restates the problem ("Jun has 6 coins.")
            given = problem_numbers(ref.problem)
            written = [read_numbers(s) for s in steps]
            hits = [
                i
                for i, w in enumerate(written)
                if wrong in w.values and (wrong not in given or wrong in w.results or _boxed(steps[i], wrong))
            ]
            hits = hits or [i for i, w in enumerate(written) if wrong in w.values]
            if hits:
                i = hits[0]
                return _verdict(
                    i,
                    "Method",
                    "procedural_error",
                    "reasoning_planning",
                    f"first writes the wrong final value {_fmt(wrong)}",
                    "wrong_final_value",
                )
    return Verdict(
        first_error_step=-1,
        rationale="no rule of the reference locator fired",
        details={"rule": "none", "revision": REFERENCE_REVISION},
    )


def reference_verdict(steps: list[str], ref: Reference, answer_correct: bool | None) -> Verdict:
    """``locate`` with hostile text and unexpected failures turned into judge_error verdicts."""
    try:
        return locate(steps, ref, answer_correct)
    except Unchecked as exc:
        return Verdict(status="judge_error", error=f"reference locator: {exc}")
    except Exception as exc:  # noqa: BLE001 - untrusted model output must not stop the stage
        return Verdict(
            status="judge_error", error=f"reference locator failed: {type(exc).__name__}: {str(exc)[:200]}"
        )


# ------------------------------------------------------------------------------------------------ abandoned

MAX_ABANDONED_CHARS = 200_000  # solutions longer than this are not searched for an abandoned answer


def abandoned_answer(steps: list[str], answer: str | None) -> dict | None:
    """Where a wrong solution first states the correct value as a result (after '=', or boxed) in a step
    before its last one, while its final value differs: ``{"step": i, "value": "18"}``; None otherwise, or
    when the answer is not a single number, or the text is past the bounds."""
    right = answer_value(answer)
    if right is None or sum(len(s) for s in steps) > MAX_ABANDONED_CHARS or len(steps) < 2:
        return None
    try:
        screen(steps)
    except Unchecked:
        return None
    final = final_value(steps)
    if final is None or final == right:
        return None
    for i, s in enumerate(steps[:-1]):
        boxed = [answer_value(b) for b in re.findall(r"\\boxed\s*\{([^{}]{0,80})\}", s)]
        if right in read_numbers(s).results or right in boxed:
            return {"step": i, "value": _fmt(right)}
    return None
