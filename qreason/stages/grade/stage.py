"""The grade stage: grade the wanted generations not graded yet; the accuracy table is its section."""

from __future__ import annotations

import logging

from qreason.config.schema import RunConfig
from qreason.stages.base import RunContext
from qreason.stages.grade.grader import grade_key, run_grading
from qreason.summary import ResultRow, accuracy_table

log = logging.getLogger(__name__)


class GradeStage:
    name = "grade"
    section = "results"

    def enabled(self, cfg: RunConfig) -> bool:
        return True

    def run(self, ctx: RunContext) -> list[ResultRow]:
        generations = [g for g in ctx.store.generations.all() if g.key in ctx.wanted]
        g = ctx.cfg.grading
        log.info(
            "grading with %s, timeout %g s per answer, %d worker%s",
            g.kind,
            g.timeout_s,
            g.workers,
            "s" if g.workers != 1 else "",
        )
        ctx.summary.grades_written = run_grading(ctx.store, ctx.grader, generations)
        keys = {grade_key(g.key, ctx.grader.grader) for g in generations}
        return [
            ResultRow(**row) for row in accuracy_table([g for g in ctx.store.grades.all() if g.key in keys])
        ]
