"""Split a solution into numbered steps (0-based), the unit the grader reports and the judges point at."""

from __future__ import annotations

import re

# "Step 3:", "**Step 3.**", "### Step 3)" at the start of a line.
STEP_MARK = re.compile(r"^[ \t#>*_]*step\s+(\d+)\s*[:.)][ \t*_]*", re.IGNORECASE | re.MULTILINE)


def step_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) offsets of each step in ``text``, labels included, covering the text without gaps.

    Steps are the "Step N:" sections when the text has them (text before the first marker joins the first
    step, so step i is the model's "Step i+1"), else its paragraphs, else its lines.
    """
    if not text.strip():
        return []
    marks = list(STEP_MARK.finditer(text))
    if marks:
        starts = [0] + [m.start() for m in marks[1:]]
    else:
        sep = r"\n\s*\n" if re.search(r"\n\s*\n", text.strip()) else r"\n"
        starts = [0] + [m.end() for m in re.finditer(sep, text) if text[m.end() :].strip()]
    ends = starts[1:] + [len(text)]
    return [(s, e) for s, e in zip(starts, ends) if text[s:e].strip()]


def split_steps(text: str) -> list[str]:
    """The steps of a solution as text, without their "Step N:" labels."""
    steps = []
    for start, end in step_spans(text):
        chunk = text[start:end].strip()
        labelled = list(STEP_MARK.finditer(chunk))
        if labelled:
            m = labelled[0]
            chunk = f"{chunk[: m.start()].strip()}\n{chunk[m.end() :].strip()}".strip()
        steps.append(chunk)
    return steps
