"""Split a solution into numbered steps (0-based), the unit the grader reports and the judges point at."""

from __future__ import annotations

import re

# "Step 3:", "**Step 3.**", "### Step 3)" at the start of a line.
STEP_MARK = re.compile(r"^[ \t#>*_]*step\s+(\d+)\s*[:.)][ \t*_]*", re.IGNORECASE | re.MULTILINE)


def split_steps(text: str) -> list[str]:
    """Steps of a solution: the "Step N:" sections when the text has them, else its paragraphs, else its lines.

    Text before the first "Step" marker joins the first step, so step i is the model's "Step i+1".
    """
    text = text.strip()
    if not text:
        return []
    marks = list(STEP_MARK.finditer(text))
    if marks:
        ends = [m.start() for m in marks[1:]] + [len(text)]
        steps = [text[m.end(): end].strip() for m, end in zip(marks, ends)]
        preamble = text[: marks[0].start()].strip()
        if preamble:
            steps[0] = f"{preamble}\n{steps[0]}".strip()
        return [s for s in steps if s] or [text]
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    if len(paragraphs) > 1:
        return paragraphs
    return [line.strip() for line in text.splitlines() if line.strip()]
