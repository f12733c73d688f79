"""Which part of a solution is its final answer: the rules the grader applies before comparing with
Math-Verify.

Strict extraction (the ``status`` verdict) looks only at explicit markers, in this order:

1. ``\\boxed{...}`` / ``\\fbox{...}``, the last one first (boxes joined only by "and" or commas in the same
   sentence count as one answer: ``\\boxed{3}, \\boxed{4}``);
2. a final-answer phrase ("final answer is", "the answer is", "Answer:", ``####``), the last one first; what
   follows is read as LaTeX whether or not it sits in ``$...$``.

Every candidate is tried in that order and the first one that parses wins, so ``\\boxed{6+9i}. #### 6+9i``
gives ``6+9i`` and a box holding prose falls through to the next marker. A number quoted in the middle of the
reasoning is never a candidate.

Lenient extraction (the ``lenient_status`` verdict) is what a reader takes from a solution that states no
marker: the final sentence of the last line that contains a number or formula, and in it the bold number, else
the last formula, else the number after the last "is/are/=/total of/..." and else its last number.

Nothing here evaluates model text: candidates are strings handed to Math-Verify's parser under its time limit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*(\{)?")
# "answer" alone ("to answer this, note that 12 ...") is not a marker: it needs "is", ":" or "=" after it, or
# "final" before it and the end of its line ("**Final Answer**" as a heading)
PHRASE = re.compile(
    r"\bfinal\s+answer(?:\s*\*\*)?(?:\s*(?:is\b|:|=)|[ \t]*(?=\n))|\banswer(?:\s*\*\*)?\s*(?:is\b|:|=)"
    r"|####",
    re.IGNORECASE,
)
NUMBER = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?![\d])|(?<![\w.])-?\.\d+")
WORD = re.compile(r"(?<![\\a-zA-Z])[a-zA-Z]{2,}")
TEXT_COMMAND = re.compile(r"\\(?:text|textbf|mathrm|mbox|textit|mathbf|operatorname)\s*\{([^{}]*)\}")
# inline $...$ must hug its content, so "costs $5 and $6" is not read as the formula "5 and "
MATH_ENV = re.compile(
    r"\$\$(.+?)\$\$|\\\[(.+?)\\\]|\\\((.+?)\\\)|(?<![\\$])\$(?!\s)([^$\n]+?)(?<!\s)\$(?!\d)", re.DOTALL
)
BOLD = re.compile(r"\*\*(.+?)\*\*", re.DOTALL)
COPULA = re.compile(r"\b(?:is|are|was|were|be|equals?|total(?:s| of)?|has|have|had)\b|=", re.IGNORECASE)
CONNECTOR = re.compile(
    r"^(?:\s|[,;$]|\\[()]|\\quad|\\text\{\s*(?:and|or)\s*\}|\band\b|\bor\b|[a-zA-Z]\s*=)*$"
)
STATEMENT_VERB = re.compile(r"\b(?:is|are|equals?)\b|=|:")
_VALUE = r"\x00(\d+)\x00|\*\*([^*]+)\*\*|(-?\$?\d[\d,]*(?:\.\d+)?%?)"
STATEMENT_VALUE = re.compile(_VALUE)
STATEMENT_LIST = re.compile(rf"\s*(?:{_VALUE})(?:\s*(?:,\s*and|,\s*or|,|and|or)\s*(?:{_VALUE}))*\s*")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=\S)")
MAX_CANDIDATE = 400  # a longer "answer" is prose, not an answer; also bounds the parser's work
MAX_PHRASES = 8  # final-answer phrases considered, the last ones
CLOSING_CHARS = 3000  # the closing sentence is looked for in this much of the end of a solution


@dataclass(frozen=True)
class AnswerCandidate:
    """A piece of text that may state the final answer, and where it came from ("boxed", "phrase",
    "lenient")."""

    text: str
    source: str


def brace_pairs(text: str) -> dict[int, int]:
    """Index of each unescaped ``{`` -> index of its closing ``}``, in one pass (model text can hold thousands
    of unclosed braces; matching each one separately would take quadratic time)."""
    pairs, stack = {}, []
    for i, ch in enumerate(text):
        if ch in "{}" and i > 0 and text[i - 1] == "\\":
            continue
        if ch == "{":
            stack.append(i)
        elif ch == "}" and stack:
            pairs[stack.pop()] = i
    return pairs


def boxes(text: str) -> list[tuple[int, int, str]]:
    """Every ``\\boxed``/``\\fbox`` as (start, end, contents), in order; ``\\boxed 5`` (no braces) too."""
    found = []
    pairs = brace_pairs(text) if "\\boxed" in text or "\\fbox" in text else {}
    for m in BOX_OPEN.finditer(text):
        if m.group(1):
            close = pairs.get(m.start(1))
            if (
                close is not None and close - m.start(1) <= 2 * MAX_CANDIDATE
            ):  # longer: prose, never an answer
                found.append((m.start(), close + 1, text[m.start(1) + 1 : close]))
        else:
            plain = re.match(r"[^\s$.,}]+", text[m.end() : m.end() + MAX_CANDIDATE])
            if plain:
                found.append((m.start(), m.end() + plain.end(), plain.group()))
    return found


def boxed_candidates(text: str) -> list[AnswerCandidate]:
    """Box contents, last first; a run of boxes joined only by connectors is one candidate "a, b"."""
    found = [b for b in boxes(text) if b[2].strip()]
    out: list[AnswerCandidate] = []
    i = len(found) - 1
    while i >= 0:
        group = [found[i]]
        while (
            i > 0 and found[i - 1][1] <= group[0][0] and CONNECTOR.match(text[found[i - 1][1] : group[0][0]])
        ):
            i -= 1
            group.insert(0, found[i])
        if len(group) > 1:
            out.append(AnswerCandidate(", ".join(b[2] for b in group), "boxed"))
        out.append(AnswerCandidate(group[-1][2], "boxed"))
        i -= 1
    return out


def _math_block_at(text: str) -> str | None:
    """The contents of a math block (``$$``, ``\\[``, ``$``, ``\\(``) that ``text`` starts with."""
    m = MATH_ENV.match(text)
    return next((g for g in m.groups() if g is not None), None) if m else None


def _phrase_tail(text: str) -> str:
    """What follows a final-answer phrase: a math block right after it, else the rest of its line up to the
    end of the sentence (the next non-empty line when the phrase ends its line)."""
    tail = re.sub(r"^[\s:*_]*", "", text)
    block = _math_block_at(tail)
    if block is not None:
        return block
    line = tail.split("\n", 1)[0]
    line = re.split(r"\.(?:\s|$)|\bI hope\b", line, maxsplit=1)[0]
    return line


def phrase_candidates(text: str) -> list[AnswerCandidate]:
    """The text after each final-answer phrase, last phrase first."""
    out = []
    for m in list(PHRASE.finditer(text))[-MAX_PHRASES:][::-1]:
        tail = _phrase_tail(text[m.end() : m.end() + 4 * MAX_CANDIDATE])
        if tail.strip():
            out.append(AnswerCandidate(tail, "phrase"))
    return out


def strict_candidates(text: str) -> list[AnswerCandidate]:
    """Every explicit statement of the answer, in the order they are tried."""
    statement = statement_candidate(text)
    return boxed_candidates(text) + phrase_candidates(text) + ([statement] if statement else [])


def _protect_math(line: str) -> tuple[str, list[str]]:
    """The line with math blocks replaced by placeholders (so sentence splitting cannot cut a formula)."""
    blocks: list[str] = []

    def keep(m: re.Match) -> str:
        blocks.append(m.group(0))
        return f"\x00{len(blocks) - 1}\x00"

    return MATH_ENV.sub(keep, line), blocks


def final_sentence(text: str) -> str | None:
    """The last sentence that states a number or a formula, from the last non-empty line that has one
    (math blocks kept whole)."""
    protected, blocks = _protect_math(text.strip()[-CLOSING_CHARS:])
    for line in reversed([x for x in protected.split("\n") if x.strip()]):
        for sentence in reversed(SENTENCE_END.split(line)):
            restored = re.sub(r"\x00(\d+)\x00", lambda m: blocks[int(m.group(1))], sentence)
            if re.search(r"\d", restored) or "\x00" in sentence:
                return restored
        return None  # only the last line with content counts
    return None


def _last_statement(text: str) -> tuple[str, list[str]] | None:
    """The solution's closing sentence (math blocks as placeholders); a formula on a line of its own after a
    line that ends in ":" belongs to that line's sentence."""
    protected, blocks = _protect_math(text.strip()[-CLOSING_CHARS:])
    lines = [x.strip() for x in protected.split("\n") if x.strip()]
    if not lines:
        return None
    last = lines[-1]
    if re.fullmatch(r"\x00\d+\x00[\s.]*", last) and len(lines) > 1 and lines[-2].rstrip("*").endswith(":"):
        last = lines[-2] + " " + last
    return SENTENCE_END.split(last)[-1], blocks


def statement_candidate(text: str) -> AnswerCandidate | None:
    """The value a closing sentence such as "Therefore, the value of x is \\(3\\)." states: what follows its
    last "is/are/=/:" when that is nothing but formulas, bold text or numbers (joined by "and" or commas) and
    ends the sentence. "Raymond has $8 left." states no answer this way."""
    found = _last_statement(text)
    if found is None:
        return None
    sentence, blocks = found
    copulas = list(STATEMENT_VERB.finditer(sentence))
    if not copulas:
        return None
    tail = re.sub(r"[\s.!]+$", "", sentence[copulas[-1].end() :])
    tail = re.sub(r"^\s*(?:approximately|exactly|about|equal to|given by|therefore|thus)?\s*:?\s*", "", tail)
    items = STATEMENT_VALUE.findall(tail)
    if (
        len(items) == 1 and not items[0][2]
    ):  # a formula or bold value may carry a unit: "is \\(48\\) square units"
        tail = re.sub(r"(?<=\S)\s+[a-zA-Z]+(?:\s+[a-zA-Z]+){0,2}$", "", tail)
    if not items or not STATEMENT_LIST.fullmatch(tail):
        return None
    values = [blocks[int(i[0])] if i[0] else (i[1] or i[2]) for i in items]
    inner = [_math_block_at(v) or v for v in values]
    return AnswerCandidate(", ".join(x.strip().strip(",").strip() for x in inner), "statement")


def lenient_candidate(text: str) -> AnswerCandidate | None:
    """The answer a reader takes from the final sentence when no marker states one."""
    sentence = final_sentence(text)
    if sentence is None:
        return None
    bold = [b for b in BOLD.findall(sentence) if re.search(r"\d", b)]
    if bold:
        return AnswerCandidate(bold[-1], "lenient")
    formulas = [next(g for g in m.groups() if g is not None) for m in MATH_ENV.finditer(sentence)]
    if formulas:
        return AnswerCandidate(formulas[-1], "lenient")
    copulas = list(COPULA.finditer(sentence))
    after = sentence[copulas[-1].end() :] if copulas else ""
    numbers = NUMBER.findall(after) or NUMBER.findall(sentence)
    return (
        AnswerCandidate(numbers[0] if after and NUMBER.search(after) else numbers[-1], "lenient")
        if numbers
        else None
    )


def clean(candidate: str) -> str:
    """Strip what is not the answer: markdown, dollar signs, math delimiters, trailing punctuation."""
    s = candidate.strip()
    s = s.replace("**", "").replace("__", "")
    s = re.sub(r"\\\$|\$", "", s)  # currency and inline math delimiters
    s = re.sub(r"\\[()\[\]]", "", s)  # \( \) \[ \]
    s = re.sub(r"(?<!\\)\\(\d)", r"\1", s)  # "\15" (a mangled "\$15"), not "\\2" (a row break)
    s = s.replace("−", "-").replace("\\!", "").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.strip().lstrip(":=").strip()
    return re.sub(r"[\s.,;:]+$", "", s)


def words(latex: str) -> list[str]:
    """Plain words outside LaTeX commands and outside ``\\text{...}`` (text in a formula, such as units)."""
    return WORD.findall(TEXT_COMMAND.sub(" ", latex))


def number_in(s: str, last: bool = False) -> str | None:
    """The one number a short answer states ("12 tomatoes", "$1,234.50", "25%"): None when there are several,
    unless ``last`` (the lenient reader's rule). The part after the last "=" counts when there is one."""
    s = TEXT_COMMAND.sub(" ", s)
    if "=" in s:
        s = s.rsplit("=", 1)[1]
    s = re.sub(r"\\frac\{(-?\d+)\}\{(\d+)\}", r"\1/\2", s)
    fraction = re.fullmatch(r"\s*(-?\d+)\s*/\s*(\d+)\s*", s)
    if fraction:
        return f"{fraction.group(1)}/{fraction.group(2)}"
    found = NUMBER.findall(s)
    if len(found) == 1 or (last and found):
        return found[-1].replace(",", "")
    return None


def normalize_text(s: str) -> str:
    """A comparable form of an answer written as text ("\\text{(C)}", "Evelyn"): no markup, spaces or case."""
    s = TEXT_COMMAND.sub(r"\1", clean(s))
    s = re.sub(r"\\left|\\right|\\,|\\;|\\ |\\mathrm|\^\\circ|\^\{\\circ\}", "", s)
    return re.sub(r"[\s{}]", "", s).lower()
