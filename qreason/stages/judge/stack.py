"""The judge stack: the layers that locate the first faulty step, and the rule that combines their verdicts.

Layers (``JudgeConfig.layers``, run cheapest first):

- ``rules``: the rule checks (arithmetic slip, repetition collapse, no-answer/truncation outcome). No model.
- ``reference``: the reference locator (``reference.py``): the problem's worked reference solution and
  answer. No model. Runs for problems with a worked reference solution.
- ``prm``: each judge spec of kind ``prm`` (a process reward model), one layer member per spec; never a
  panel member.
- ``llm``: the other judge specs: one LLM judge, or the panel's vote of two or more.
- ``prior``: a fixed guess (``prior_step``, default step 2, clipped to the last step) for a solution known to
  be wrong that no evidence layer located. No model, no evidence: the report counts it apart, and curation
  and the first-error tables leave it out.

Combined verdict (judge ``stack``): the layers are read in the order llm, prm, reference, rules; the first
valid verdict that locates a step (index >= 0) decides. Reason: every layer is trusted more than the ones
below it (measured on ProcessBench: published LLM and PRM critics beat the reference locator, which contains
the rule checks), and a located step beats "no faulty step", since the solutions judged are failures. When no
layer locates a step, a solution known to be wrong gets the prior's guess; a rules-located step later than the
prior's guess gives way to the guess too when no model or reference layer ran (on ProcessBench
olympiadbench's development half the rule checks' slips were right less often than the guess). Otherwise the
first valid verdict in that order decides (no faulty step, or an outcome); with none, the stack is a
judge_error. The combined record names the deciding layer (``votes["decided_by"]``).

The LLM judges do not see the cheaper layers' candidate step: showing it could anchor them, and that could not
be measured here (no LLM judge strong enough to be worth measuring runs offline). It is an open question.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from qreason.stages.judge.prompts import Verdict

RULES = "rules"
REFERENCE = "reference"
PRM = "prm"
LLM = "llm"
PRIOR = "prior"
LAYERS = (RULES, REFERENCE, PRM, LLM, PRIOR)
PRECEDENCE = (LLM, PRM, REFERENCE, RULES)
STACK_JUDGE = "stack"  # Judgment.judge of the combined verdict
DEFAULT_PRIOR_STEP = 2  # chosen on the development halves (even ids) of ProcessBench gsm8k and olympiadbench


@dataclass
class LayerVerdict:
    """One layer's verdict on one solution: the layer, the judge name that gave it, the verdict."""

    layer: str
    judge: str
    verdict: Verdict


def prior_verdict(n_steps: int, step: int) -> Verdict:
    k = max(0, min(step, n_steps - 1))
    return Verdict(
        first_error_step=k,
        rationale=f"no layer located a step; the prior guesses step {k}",
        details={"rule": "prior", "step": step},
    )


def combine(
    members: list[LayerVerdict], answer_wrong: bool | None, n_steps: int, prior_step: int | None = None
) -> tuple[Verdict, str | None, str | None]:
    """(combined verdict, deciding layer, deciding judge name) by the rule in the module docstring.
    ``answer_wrong``: the final answer is known to be wrong (the prior applies only then); ``prior_step``:
    None turns the prior off."""
    order = {layer: i for i, layer in enumerate(PRECEDENCE)}
    ranked = sorted((m for m in members if m.layer in order), key=lambda m: order[m.layer])
    valid = [m for m in ranked if m.verdict.ok and m.verdict.first_error_step is not None]
    summary: dict[str, Any] = {
        "layers": {
            m.judge: {
                "layer": m.layer,
                "status": m.verdict.status,
                "step": m.verdict.first_error_step,
                "error_type": m.verdict.error_type,
                "sub_type": m.verdict.sub_type,
            }
            for m in members
        }
    }
    use_prior = prior_step is not None and bool(answer_wrong) and n_steps > 0
    located = next((m for m in valid if m.verdict.first_error_step >= 0), None)
    strong = any(m.layer != RULES for m in valid)
    if located is not None and not (
        located.layer == RULES
        and use_prior
        and not strong
        and located.verdict.error_type != "Outcome"
        and prior_step < located.verdict.first_error_step
    ):
        return _decided(located.verdict, summary, located.layer, located.judge)
    if use_prior:
        return _decided(prior_verdict(n_steps, prior_step), summary, PRIOR, PRIOR)
    if valid:
        return _decided(valid[0].verdict, summary, valid[0].layer, valid[0].judge)
    return Verdict(status="judge_error", error="no layer gave a valid verdict", details=summary), None, None


def _decided(v: Verdict, summary: dict, layer: str, judge: str) -> tuple[Verdict, str, str]:
    summary = {**summary, "decided_by": layer, "judge": judge}
    # the deciding layer's verdict with the stack's details; its token usage stays with the layer's own record
    out = replace(v, usage={}, details=summary)
    return out, layer, judge
