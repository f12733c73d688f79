"""JSON someone else wrote (judge replies, JSONL inputs, batch files, specs given on the command line), parsed
with bounds: ``loads`` refuses nesting deeper than ``MAX_DEPTH`` (the standard parser recurses once per level
and dies with RecursionError) and integers longer than ``MAX_INT_DIGITS`` digits (Python refuses more than
4,300 with a ValueError that is not a JSON error). Every refusal is a ``json.JSONDecodeError``
(``UnsafeJSON``), so a caller that handles invalid JSON handles these too: one bad item becomes one error,
never a traceback.
"""

from __future__ import annotations

import json
import re
from itertools import accumulate
from typing import Any

MAX_DEPTH = 100
MAX_INT_DIGITS = 100

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKETS = re.compile(r"[\[\]{}]")


class UnsafeJSON(json.JSONDecodeError):
    """JSON refused by a bound (nesting depth, integer size)."""


def _depth(text: str) -> int:
    """The deepest nesting of arrays and objects outside strings."""
    brackets = _BRACKETS.findall(_STRING.sub('""', text))
    return max(accumulate(1 if b in "[{" else -1 for b in brackets), default=0)


def loads(text: str | bytes) -> Any:
    """``json.loads`` with bounds on nesting depth and integer size; raises ``json.JSONDecodeError`` for
    invalid JSON and ``UnsafeJSON`` (a subclass) beyond a bound."""
    if isinstance(text, (bytes, bytearray)):
        text = text.decode("utf-8")
    if text.count("[") + text.count("{") > MAX_DEPTH:  # only then can it be nested that deep
        if _depth(text) > MAX_DEPTH:
            raise UnsafeJSON(f"nested deeper than {MAX_DEPTH} levels", text, 0)

    def parse_int(digits: str) -> int:
        if len(digits.lstrip("-")) > MAX_INT_DIGITS:
            raise UnsafeJSON(f"an integer of more than {MAX_INT_DIGITS} digits", text, 0)
        return int(digits)

    return json.loads(text, parse_int=parse_int)
