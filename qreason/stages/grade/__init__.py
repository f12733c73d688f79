"""The grade stage: every generation's final answer against the reference, with Math-Verify (strict and
lenient verdicts). ``extract`` finds answer candidates in a solution; ``grader`` interprets and compares
them."""

from qreason.stages.grade.grader import (
    ANSWER_TYPES,
    GRADER_REVISION,
    STATUSES,
    GradeJob,
    Grader,
    grade_answer,
    grade_file,
    grade_key,
    grade_text,
    grader_id,
    make_grader,
    run_grading,
)
from qreason.stages.grade.stage import GradeStage

__all__ = [
    "GradeStage",
    "ANSWER_TYPES",
    "GRADER_REVISION",
    "STATUSES",
    "GradeJob",
    "Grader",
    "grade_answer",
    "grade_file",
    "grade_key",
    "grade_text",
    "grader_id",
    "make_grader",
    "run_grading",
]
