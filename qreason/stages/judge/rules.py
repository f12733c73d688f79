"""Rule checks that need no LLM: arithmetic in the steps, repetition collapse, and the grade's outcome.

Arithmetic. Each step is scanned for equations such as ``3 + 4 = 7``, ``$1,234 x 2 = $2,468``,
``5 apples * 3 = 15 apples`` or ``\\frac{18}{3} \\times 2 = 12``. The text is cut into tokens (numbers with
thousands separators, currency and percent signs, operators, parentheses, ``=``, words); a few operator words
(``times``, ``plus``, ``minus``, ``divided by``, ``x`` between numbers) become operators; a single word right
after a number that is followed by an operator, ``=`` or the end of the expression is read as a unit and
dropped, and so are rate units (``$194/meter``, ``3 pages per minute``). Any other word or punctuation ends
the expression. Each side of each ``=`` is parsed by a small recursive-descent parser over exact fractions
(``+ - * / ^``, unary minus, parentheses, percent, ``sqrt``); the text is never evaluated as code. A step is
flagged when the left side of an ``=`` holds an operator and its value differs from the right side's.

The check is built for precision: anything it cannot read with certainty is skipped, never flagged. It accepts
rounding to the decimals written on the right, a whole-number right side that is the floor or ceiling of a
fractional value, either reading of a percent sign (``0.2*100 = 20%``), ``≈`` within 1 %, and the "running
total" notation ``3 * 4 = 12 + 2 = 14`` (the right side starts with the left side's value).

Repetition collapse. The same step or line (at least 3 words) three or more times in a row, the same step or
line of at least 6 words five or more times anywhere, or a tail of the solution that is one block of words
repeated three or more times (at least 30 words in all); the collapse starts at the second copy.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Iterator

from qreason.stages.judge.prompts import OUTCOME, Verdict

RULES_REVISION = 2  # 2: hostile text (see ``screen``) is a judge_error

# ------------------------------------------------------------------------------------------------ text
# clean-up

_LATEX_SIMPLE = [
    (re.compile(r"\\(?:left|right|big|Big|bigg|Bigg)(?![A-Za-z])"), " "),
    (re.compile(r"\\[,;:! ]|\\q?quad(?![A-Za-z])"), " "),
    (re.compile(r"\{,\}"), ","),
    (re.compile(r"\\\$"), "$"),
    (re.compile(r"\\%"), "%"),
    (re.compile(r"\\(?:times|cdot|ast)(?![A-Za-z])"), " * "),
    (re.compile(r"\\div(?![A-Za-z])"), " / "),
    (re.compile(r"\\approx(?![A-Za-z])"), " ≈ "),
    (re.compile(r"\\[()\[\]]"), " ¶ "),  # math delimiters end an expression (safely)
]
_LATEX_TEXT = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_LATEX_SQRT = re.compile(r"\\sqrt\s*\{([^{}]*)\}")
_LATEX_FRAC = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_LATEX_BOXED = re.compile(r"\\boxed\s*\{([^{}]*)\}")
_UNICODE = str.maketrans(
    {
        "×": "*",
        "·": "*",
        "∙": "*",
        "⋅": "*",
        "÷": "/",
        "−": "-",
        "–": "-",
        "＝": "=",
        "≃": "≈",
        "≅": "≈",
        "€": " ",
        "£": " ",
        "¥": " ",
        "$": " ",
    }
)


def clean(text: str) -> str:
    """Normalise LaTeX, Markdown and Unicode math in a step to plain tokens (nothing is evaluated)."""
    text = text.replace("**", " ").replace("__", " ")
    for pattern, repl in _LATEX_SIMPLE:
        text = pattern.sub(repl, text)
    for _ in range(8):  # innermost first: \frac{\sqrt{3}}{2}
        new = _LATEX_TEXT.sub(r" \1 ", text)
        new = _LATEX_SQRT.sub(r" sqrt(\1)", new)
        new = _LATEX_FRAC.sub(r"((\1)/(\2))", new)
        new = _LATEX_BOXED.sub(r"(\1)", new)
        if new == text:
            break
        text = new
    text = text.replace("{", "(").replace("}", ")")
    return text.translate(_UNICODE)


# ------------------------------------------------------------------------------------------------ tokens


@dataclass
class Tok:
    kind: str  # num, op, pct, lp, rp, eq, approx, word, func, brk
    text: str
    value: Fraction | None = None
    glued: bool = False  # no space before this token
    decimals: int = 0  # for numbers: digits after the point as written
    latex: bool = False  # a word that is a LaTeX command (\\cdots, \\pi, ...)


_TOKEN = re.compile(
    r"""
    (?P<space>[^\S\n]+)
  | (?P<brk><=|>=|!=|==|=>|->|<-)
  | (?P<num>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)
  | (?P<op>[-+*/^])
  | (?P<pct>%)
  | (?P<lp>\()
  | (?P<rp>\))
  | (?P<eq>=)
  | (?P<approx>≈)
  | (?P<word>[A-Za-z]+)
  | (?P<other>.)
""",
    re.VERBOSE | re.DOTALL,
)

_OP_WORDS = {"times": "*", "plus": "+", "minus": "-"}
_OP_PHRASES = {("divided", "by"): "/", ("multiplied", "by"): "*"}
# A number right after one of these words is the object of an operation the text states in words
# ("half of 10 + 4"), so the expression that starts there is cut off on the left.
_IMPLIED = {
    "of",
    "half",
    "twice",
    "double",
    "doubled",
    "triple",
    "tripled",
    "thrice",
    "quarter",
    "third",
    "per",
    "each",
    "by",
    "than",
    "from",
    "over",
    "every",
}
_FUNCS = {"sqrt"}
# Words that are never units after a number: ordinal suffixes and function words ("from -2-5 = -7 to -2+5 =
# 3").
_NOT_UNITS = {
    "st",
    "nd",
    "rd",
    "th",
    "to",
    "and",
    "or",
    "is",
    "are",
    "was",
    "were",
    "be",
    "so",
    "then",
    "the",
    "an",
    "of",
    "in",
    "on",
    "at",
    "for",
    "with",
    "by",
    "from",
    "as",
    "if",
    "but",
    "that",
    "this",
    "which",
    "we",
    "it",
    "its",
    "has",
    "have",
    "had",
    "gives",
    "give",
    "get",
    "gets",
    "got",
    "than",
    "into",
    "over",
    "per",
    "each",
    "equals",
    "makes",
    "means",
    "becomes",
    "yields",
    "plus",
    "minus",
    "times",
    "less",
    "more",
}
MAX_DIGITS = 18  # longer numbers are not checked
MAX_TOKENS = 200  # nor are longer expressions (bounds the time spent on degenerate text)
MAX_BITS = 512  # nor are values whose numerator or denominator would grow past this many bits: a magnitude
# bound alone lets a tiny fraction's denominator grow 64-fold per nested power


def tokenize(text: str) -> list[Tok]:
    toks: list[Tok] = []
    prev_end = -1
    for m in _TOKEN.finditer(text):
        kind = m.lastgroup
        if kind == "space":
            continue
        s = m.group()
        glued = m.start() == prev_end
        prev_end = m.end()
        if kind == "num":
            digits = s.replace(",", "")
            if len(digits.replace(".", "")) > MAX_DIGITS:
                toks.append(Tok("brk", s))
                continue
            decimals = len(digits.split(".")[1]) if "." in digits else 0
            toks.append(Tok("num", s, Fraction(digits), glued, decimals))
        elif kind == "other":
            toks.append(Tok("brk", s, glued=glued))
        elif kind == "word":
            latex = glued and bool(toks) and toks[-1].text == "\\"
            toks.append(Tok("word", s, glued=glued, latex=latex))
        else:
            toks.append(Tok(kind, s, glued=glued))
    return toks


def _operand_end(t: Tok | None) -> bool:
    return t is not None and t.kind in ("num", "pct", "rp")


def _operand_start(t: Tok | None) -> bool:
    return t is not None and t.kind in ("num", "lp")


def _unit_at(toks: list[Tok], i: int) -> bool:
    """Whether toks[i] is a word that can be a unit: two letters or more, not a function word or a LaTeX
    command, and followed by an operator, "=", ")", a break, the end, or "per"."""
    if i >= len(toks):
        return False
    t = toks[i]
    if t.kind != "word" or len(t.text) < 2 or t.latex or t.text.lower() in _NOT_UNITS:
        return False
    nxt = toks[i + 1] if i + 1 < len(toks) else None
    return (
        nxt is None
        or nxt.kind in ("op", "eq", "approx", "rp", "brk")
        or (nxt.kind == "word" and nxt.text.lower() == "per")
    )


def resolve_words(toks: list[Tok]) -> list[Tok]:
    """Operator words become operators, units after numbers are dropped, every other word is a break."""
    out: list[Tok] = []
    i = 0
    while i < len(toks):
        t = toks[i]
        nxt = toks[i + 1] if i + 1 < len(toks) else None
        prev = out[-1] if out else None
        if (
            t.kind == "op"
            and t.text == "/"
            and prev is not None
            and prev.kind == "num"
            and _unit_at(toks, i + 1)
        ):
            i += 2  # a rate unit: "$194/meter", "4 eggs/person/day"
            continue
        if t.kind != "word":
            out.append(t)
            i += 1
            continue
        low = t.text.lower()
        if low == "per" and prev is not None and prev.kind == "num" and _unit_at(toks, i + 1):
            i += 2  # "0.3 pages per minute"
            continue
        if nxt is not None and nxt.kind == "word" and (low, nxt.text.lower()) in _OP_PHRASES:
            after = toks[i + 2] if i + 2 < len(toks) else None
            if _operand_end(prev) and _operand_start(after):
                out.append(Tok("op", _OP_PHRASES[(low, nxt.text.lower())]))
                i += 2
                continue
        if (low == "x" or low in _OP_WORDS) and _operand_end(prev) and _operand_start(nxt):
            out.append(Tok("op", _OP_WORDS.get(low, "*")))
        elif low in _FUNCS and nxt is not None and nxt.kind == "lp":
            out.append(Tok("func", low))
        elif prev is not None and prev.kind in ("num", "pct") and _unit_at(toks, i):
            # a unit: "5 apples + 3 apples = 8 apples", "3 pages per minute", "12 km/h" (then "/h" breaks)
            pass
        else:
            out.append(t)
        i += 1
    return out


# ------------------------------------------------------------------------------------------------ parser


class ParseFail(Exception):
    pass


class _Parser:
    """expr := term (('+'|'-') term)* ; term := unary (('*'|'/') unary)* ; unary := ('-'|'+') unary | power ;
    power := postfix ('^' unary)? ; postfix := atom '%'? ; atom := NUM | '(' expr ')' | sqrt '(' expr ')'"""

    def __init__(self, toks: list[Tok], percent: bool):
        self.toks = toks
        self.i = 0
        self.percent = percent  # True: "20%" is 0.2; False: the percent sign is ignored

    def peek(self) -> Tok | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self) -> Tok:
        t = self.peek()
        if t is None:
            raise ParseFail("unexpected end")
        self.i += 1
        return t

    def parse(self):
        value = self.expr()
        if self.peek() is not None:
            raise ParseFail(f"unexpected {self.peek().text!r}")
        return value

    def expr(self):
        value = self.term()
        while (t := self.peek()) is not None and t.kind == "op" and t.text in "+-":
            self.take()
            rhs = self.term()
            value = _bounded(value + rhs if t.text == "+" else value - rhs)
        return value

    def term(self):
        value = self.unary()
        while (t := self.peek()) is not None and t.kind == "op" and t.text in "*/":
            self.take()
            rhs = self.unary()
            if t.text == "*":
                value = value * rhs
            else:
                if rhs == 0:
                    raise ParseFail("division by zero")
                value = value / rhs
        return _bounded(value)

    def unary(self):
        t = self.peek()
        if t is not None and t.kind == "op" and t.text in "+-":
            self.take()
            value = self.unary()
            return -value if t.text == "-" else value
        return self.power()

    def power(self):
        base = self.postfix()
        t = self.peek()
        if t is not None and t.kind == "op" and t.text == "^":
            self.take()
            exp = self.unary()
            if exp != int(exp) or abs(exp) > 64 or abs(base) > 10**6 or (base == 0 and exp < 0):
                raise ParseFail("unsupported power")
            if isinstance(base, Fraction) and _bits(base) * abs(int(exp)) > MAX_BITS:
                raise ParseFail("power too large to check")
            return _bounded(Fraction(base) ** int(exp) if isinstance(base, Fraction) else base ** int(exp))
        return base

    def postfix(self):
        value = self.atom()
        t = self.peek()
        if t is not None and t.kind == "pct":
            self.take()
            if self.percent:
                value = value / 100
        return value

    def atom(self):
        t = self.take()
        if t.kind == "num":
            return t.value
        if t.kind == "lp":
            value = self.expr()
            if self.take().kind != "rp":
                raise ParseFail("unbalanced parenthesis")
            return value
        if t.kind == "func":
            if self.take().kind != "lp":
                raise ParseFail("sqrt without parenthesis")
            arg = self.expr()
            if self.take().kind != "rp":
                raise ParseFail("unbalanced parenthesis")
            if arg < 0:
                raise ParseFail("sqrt of a negative number")
            root = math.isqrt(int(arg)) if arg == int(arg) else None
            return Fraction(root) if root is not None and root * root == arg else math.sqrt(arg)
        raise ParseFail(f"unexpected {t.text!r}")


def _bits(value: Fraction) -> int:
    return max(value.numerator.bit_length(), value.denominator.bit_length())


def _bounded(value):
    """The value, if it is small enough to check quickly: at most 1e15, and (exact fractions) at most MAX_BITS
    bits in numerator and denominator, so every further operation stays cheap."""
    if isinstance(value, Fraction) and _bits(value) > MAX_BITS:
        raise ParseFail("number too long")
    if abs(value) > 10**15:
        raise ParseFail("number too large")
    return value


def evaluate(toks: list[Tok]) -> list:
    """The values of an expression (one per reading of percent signs); [] when it cannot be read."""
    if len(toks) > MAX_TOKENS:
        return []
    values = []
    for percent in (True, False) if any(t.kind == "pct" for t in toks) else (True,):
        try:
            values.append(_Parser(toks, percent).parse())
        except (ParseFail, ZeroDivisionError, OverflowError, ValueError, RecursionError):
            return []
    return values


# ------------------------------------------------------------------------------------------------ checking


@dataclass
class ArithmeticError_:
    expression: str
    stated: str
    computed: str

    def __str__(self) -> str:
        return f"{self.expression} = {self.stated}, but {self.expression} is {self.computed}"


def _fmt(value) -> str:
    if isinstance(value, Fraction):
        if value.denominator == 1:
            return str(value.numerator)
        return f"{float(value):.6g}"
    return f"{value:.6g}"


def _close(left, right, right_toks: list[Tok], rel_tol: float) -> bool:
    lf, rf = float(left), float(right)
    if left == right or abs(lf - rf) <= 1e-9 * max(1.0, abs(lf)):
        return True
    single = len(right_toks) == 1 or (len(right_toks) == 2 and right_toks[1].kind == "pct")
    decimals = right_toks[0].decimals if single and right_toks[0].kind == "num" else None
    if decimals is not None:
        # rounded, truncated or rounded up to the decimals written: "10/3 = 3.33", "10/4 = 2", "10/4 = 3"
        scaled, target = lf * 10**decimals, rf * 10**decimals
        if abs(scaled - round(scaled)) < 1e-6:
            scaled = float(round(scaled))
        if abs(target - math.floor(scaled)) < 1e-6 or abs(target - math.ceil(scaled)) < 1e-6:
            return True
    rounding = 0.5 * 10.0**-decimals if decimals else 0.0
    return rel_tol > 0 and abs(lf - rf) <= rel_tol * max(abs(lf), abs(rf)) + rounding


def _text(toks: list[Tok]) -> str:
    out = ""
    for t in toks:
        piece = t.text
        out += piece if (not out or t.kind in ("pct", "rp") or out.endswith("(")) else " " + piece
    return out


def _runs(toks: list[Tok]) -> Iterator[tuple[list[Tok], Tok | None, Tok | None]]:
    """Maximal stretches of math tokens, each with the tokens (word or break) just before and after it."""
    run: list[Tok] = []
    before: Tok | None = None
    for t in toks:
        if t.kind in ("word", "brk"):
            if run:
                yield run, before, t
            run, before = [], t
        else:
            run.append(t)
    if run:
        yield run, before, None


_SAFE_BREAKS = {",", ";", ":", ".", "?", "\n", "¶"}


def _clean_left_edge(run: list[Tok], before: Tok | None) -> bool:
    """Whether a run starts where an expression can start: not glued to a variable, a subscript or a LaTeX
    command ("f(3) + 3", "a_1 + 2", "\\cdots \\frac{100}{99}"), and not after a word that states an
    operation."""
    if run[0].kind not in ("num", "lp", "func"):
        return False
    if before is None:
        return True
    if before.kind == "word":
        return (
            not run[0].glued
            and len(before.text) >= 2
            and not before.latex
            and before.text.lower() not in _IMPLIED
        )
    return before.text in _SAFE_BREAKS


def _clean_right_edge(after: Tok | None) -> bool:
    """Whether the last side ends where an expression can end: not before a variable or a LaTeX command
    ("10 - 4 = 1.5x", "17^5 = 32 r^5", "= 2 \\pi")."""
    if after is None:
        return True
    if after.kind != "word":
        return after.text not in ("\\", "!", "_", "'")  # "= 5\\pi", "= 3!", "= a_1", "= f'"
    return not (after.glued or after.latex or len(after.text) == 1)


def check_arithmetic(step: str) -> ArithmeticError_ | None:
    """The first wrong equation in a step, or None."""
    toks = resolve_words(tokenize(clean(step)))
    for run, before, after in _runs(toks):
        if not any(t.kind in ("eq", "approx") for t in run):
            continue
        sides: list[list[Tok]] = [[]]
        relations: list[str] = []
        for t in run:
            if t.kind in ("eq", "approx"):
                relations.append(t.kind)
                sides.append([])
            else:
                sides[-1].append(t)
        for k, rel in enumerate(relations):
            left, right = sides[k], sides[k + 1]
            if not left or not right:
                continue
            if not any(t.kind in ("op", "func") for t in left):
                continue  # "x = 5", "5 = 5": nothing computed on the left
            if k == 0 and not _clean_left_edge(run, before):
                continue  # cut off on the left: "... each + 2 = 17", "half of 10 + 4 = 9", "f(3) + 3 = 5"
            if k + 1 == len(relations) and not _clean_right_edge(after):
                continue  # cut off on the right: "10 - 4 = 1.5x"
            lvals, rvals = evaluate(left), evaluate(right)
            if not lvals or not rvals:
                continue
            # "≈" allows 1 %; rounded decimals inside the expressions allow 0.1 % ("360/7*10 = 51.42857*10")
            tol = (
                0.01
                if rel == "approx"
                else 1e-3
                if any(t.kind == "num" and t.decimals for t in left + right[1:])
                else 0.0
            )
            if any(_close(lv, rv, right, tol) for lv in lvals for rv in rvals):
                continue
            if right[0].kind == "num" and len(right) > 1 and any(right[0].value == lv for lv in lvals):
                continue  # running total: "3 * 4 = 12 + 2 = 14"
            return ArithmeticError_(_text(left), _text(right), _fmt(lvals[0]))
    return None


# ------------------------------------------------------------------------------------------------ repetition


def _norm(s: str) -> str:
    return " ".join(s.lower().split())


def _words(s: str) -> int:
    """Words of at least two letters (so "\\[ 3a^2 = 1 \\]" is not a line of five words)."""
    return len(re.findall(r"(?<![\\A-Za-z])[A-Za-z]{2,}", s))


def _consecutive(items: list[tuple[str, int]], min_run: int) -> tuple[int, int, str] | None:
    """(index of the second copy, run length, text) of the first stretch of min_run identical items."""
    i = 0
    while i < len(items):
        j = i
        while j + 1 < len(items) and items[j + 1][0] == items[i][0]:
            j += 1
        if j - i + 1 >= min_run:
            return items[i + 1][1], j - i + 1, items[i][0]
        i = j + 1
    return None


def repetition_start(steps: list[str]) -> tuple[int, str] | None:
    """(step index where a repetition collapse starts, description), or None."""
    candidates: list[tuple[int, str]] = []
    norm_steps = [(_norm(s), i) for i, s in enumerate(steps) if _words(s) >= 3]
    norm_lines = [
        (_norm(line), i) for i, s in enumerate(steps) for line in s.splitlines() if _words(line) >= 3
    ]
    for items, what in ((norm_steps, "step"), (norm_lines, "line")):
        found = _consecutive(items, 3)
        if found:
            candidates.append((found[0], f"{what} repeated {found[1]} times in a row: {found[2][:60]!r}"))
        seen: dict[str, list[int]] = {}
        for text, i in items:
            if _words(text) >= 6:
                seen.setdefault(text, []).append(i)
        for text, idx in seen.items():
            if len(idx) >= 5:
                candidates.append((idx[1], f"{what} repeated {len(idx)} times: {text[:60]!r}"))
    # a tail that is one block of words repeated (the classic degenerate loop)
    words: list[tuple[str, int]] = [(w, i) for i, s in enumerate(steps) for w in s.split()]
    n = len(words)
    best: tuple[int, int] | None = None  # (start word of the second copy, period)
    for p in range(1, min(64, n // 3) + 1):
        r = 0
        while r < n - p and words[n - 1 - r][0] == words[n - 1 - r - p][0]:
            r += 1
        if r >= 2 * p and r + p >= 30:
            start = n - r
            if best is None or start < best[0]:
                best = (start, p)
    if best is not None:
        start, p = best
        candidates.append((words[start][1], f"a block of {p} words repeats to the end"))
    return min(candidates, default=None)


# ------------------------------------------------------------------------------------------------ bounds

MAX_STEP_CHARS = 100_000  # a longer step is not checked (a 1 MB step is a judge_error, not seconds of work)
MAX_NESTING = 64  # braces or parentheses nested deeper than this
MAX_POWER_CHAIN = 3  # a^b^c^d (three carets in one chain of powers) is a power tower

_NESTING = re.compile(r"[{}()\[\]]")
# a chain of powers: "^" then an operand (a number or one letter, maybe opening braces) then the next "^"
_TOWER = re.compile(r"(?:\^\s*[{(]*\s*-?(?:\d+(?:\.\d+)?|[A-Za-z])\s*(?=\^)){%d,}" % MAX_POWER_CHAIN)


class Unchecked(Exception):
    """A step beyond the bounds of the model-free checks."""


def screen(steps: list[str]) -> None:
    """Raise ``Unchecked`` for text the checks refuse: a step too long, brackets nested too deep, a power
    tower. Many steps are not refused: a collapsed solution can have thousands; the time limit bounds them."""
    for i, s in enumerate(steps):
        if len(s) > MAX_STEP_CHARS:
            raise Unchecked(f"step {i} has {len(s)} characters (more than {MAX_STEP_CHARS})")
        depth = top = 0
        for m in _NESTING.finditer(s):
            depth += 1 if m.group() in "{([" else -1
            top = max(top, depth)
        if top > MAX_NESTING:
            raise Unchecked(f"step {i} nests brackets {top} deep (more than {MAX_NESTING})")
        if _TOWER.search(s):
            raise Unchecked(f"step {i} holds a power tower")


# ------------------------------------------------------------------------------------------------ verdict


def rule_verdict_call(args: tuple[list[str], str | None]) -> Verdict:
    """``rule_verdict(*args)`` for a worker process (see ``qreason.stages.grade.bounded_calls``): a failure
    of the checks on hostile text becomes a rule-check error verdict, never an exception."""
    try:
        screen(args[0])
        return rule_verdict(*args)
    except Unchecked as exc:
        return Verdict(status="judge_error", error=f"rule checks: {exc}")
    except Exception as exc:  # noqa: BLE001 - untrusted model output must not stop the stage
        return Verdict(
            status="judge_error", error=f"rule checks failed: {type(exc).__name__}: {str(exc)[:200]}"
        )


def rule_verdict(steps: list[str], grade_status: str | None = None) -> Verdict:
    """The rule checks' verdict on a solution. The earliest step finding wins (arithmetic over repetition at
    the same step); with none, a no_answer or truncated grade gives that outcome; otherwise first_error_step
    is -1."""
    findings: list[dict] = []
    arith = None
    for i, s in enumerate(steps):
        err = check_arithmetic(s)
        if err is not None:
            arith = (i, str(err))
            findings.append({"kind": "arithmetic", "step": i, "detail": str(err)})
            break
    rep = repetition_start(steps)
    if rep is not None:
        findings.append({"kind": "repetition_collapse", "step": rep[0], "detail": rep[1]})
    outcome = {"no_answer": "no_answer", "truncated": "truncation"}.get(grade_status or "")
    if outcome:
        findings.append({"kind": outcome, "step": None, "detail": f"grade status {grade_status}"})
    details = {"findings": findings, "revision": RULES_REVISION}
    if arith is not None and (rep is None or arith[0] <= rep[0]):
        return Verdict(
            first_error_step=arith[0],
            error_type="Execution",
            sub_type="computational_error",
            capability="numerical_computation",
            rationale=arith[1],
            details=details,
        )
    if rep is not None:
        return Verdict(
            first_error_step=rep[0],
            error_type=OUTCOME,
            sub_type="repetition_collapse",
            rationale=rep[1],
            details=details,
        )
    if outcome:
        return Verdict(
            first_error_step=-1,
            error_type=OUTCOME,
            sub_type=outcome,
            rationale=f"no faulty step found; the grade is {grade_status}",
            details=details,
        )
    return Verdict(first_error_step=-1, rationale="no rule fired", details=details)
