"""What counts as a flip, in one place: a (task, problem, seed) the base variant solved and another variant
did not. Judging marks flips, curation builds its dataset from them, the report shows them first, and the
analysis counts them (``analysis.flips`` pairs the same cells in DataFrames)."""

from __future__ import annotations

from typing import Iterable

from qreason.records import Generation, Grade

Cell = tuple[str, str, int]  # (task, problem_id, seed)


def latest_grades(grades: Iterable[Grade]) -> dict[str, Grade]:
    """The newest grade of each generation (table order: a re-grade by a newer grader comes later)."""
    out: dict[str, Grade] = {}
    for g in grades:
        out[g.generation_key] = g
    return out


def solved_cells(grades: Iterable[Grade], base: str) -> set[Cell]:
    """The cells the base variant answered correctly."""
    return {(g.task, g.problem_id, g.seed) for g in grades if g.variant == base and g.status == "correct"}


def is_flip(gen: Generation | Grade, base: str, solved: set[Cell]) -> bool:
    """A failure of a non-base variant on a cell the base solved (the caller knows the generation failed)."""
    return gen.variant != base and (gen.task, gen.problem_id, gen.seed) in solved
