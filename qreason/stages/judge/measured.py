"""How well the judge stack locates a first faulty step, as measured with ``qreason judge-bench`` on labelled
data: what a report and the terminal say beside coverage (the share of failures with a located step), so that
coverage is never read as accuracy.

The numbers are the held-out halves of docs/judging.md's table ("Measured (model-free stack, gated)",
2026-12-05): exact first faulty step on ProcessBench solutions whose final answer is wrong (qreason judges
failures). They hold for the model-free stack (rule checks, reference locator, prior) on that task family
only; a stack with a process reward model or LLM judges, or another task family, is "not measured".
"""

from __future__ import annotations

from dataclasses import dataclass

from qreason.stages.judge.stack import DEFAULT_PRIOR_STEP, LLM, PRM


@dataclass(frozen=True)
class Measured:
    family: str  # the task family the labelled data stands for
    exact: float  # exact first faulty step on solutions with a wrong final answer
    guess: float  # the best fixed positional guess on the same data (F1; the stack's F1 in ``f1``)
    f1: float
    source: str
    # the prior layer's guess for this family: of steps 0-5, the one giving the stack's best F1 on the
    # development half (even ids; `qreason judge-bench --judge offline --prior-step K`, 2026-12-06: gsm8k
    # F1 0.667 for k 0-1, 0.675 for k 2-5; olympiadbench 0.117, 0.279, 0.300, 0.215, 0.172 for k 0-4)
    prior_step: int = 2


MEASURED = {
    "gsm8k": Measured(
        "grade-school word problems",
        0.550,
        0.438,
        0.694,
        "judge-bench, ProcessBench gsm8k with GSM8K references, held-out half",
    ),
    "competition": Measured(
        "competition math",
        0.224,
        0.296,
        0.295,
        "judge-bench, ProcessBench olympiadbench (no references), held-out half",
    ),
}

# task name prefixes -> family (qreason's task specs: gsm8k, gsm8k-train, math500, aime2024, ...)
FAMILIES = (("gsm8k", "gsm8k"), ("math", "competition"), ("aime", "competition"), ("olympiad", "competition"))


def prior_step_for(task: str, configured: int | None) -> int:
    """The prior layer's guess for a task: the config's ``judge.prior_step`` when set, else the step chosen
    for the task's family on labelled development data, else step 2."""
    if configured is not None:
        return configured
    fam = family_of(task)
    return MEASURED[fam].prior_step if fam in MEASURED else DEFAULT_PRIOR_STEP


def family_of(task: str) -> str | None:
    name = task.lower()
    return next((fam for prefix, fam in FAMILIES if name.startswith(prefix)), None)


def measured_accuracy(tasks: list[str] | set[str], layers: list[str] | set[str]) -> Measured | None:
    """The measurement that holds for failures of these tasks decided by these layers, or None (not
    measured): one task family, and only the model-free layers deciding."""
    families = {family_of(t) for t in tasks}
    if len(families) != 1 or None in families or set(layers) & {PRM, LLM}:
        return None
    return MEASURED[families.pop()]


def accuracy_words(tasks: list[str] | set[str], layers: list[str] | set[str]) -> str:
    """The measured accuracy in words, or why there is none."""
    m = measured_accuracy(tasks, layers)
    if m is None:
        return "step accuracy not measured on this task (no judge-bench result for it)"
    below = " (no better than a fixed guess there)" if m.f1 <= m.guess + 0.01 else ""
    return f"step accuracy exact on {100 * m.exact:.0f} % of wrong answers on {m.family}{below} ({m.source})"
