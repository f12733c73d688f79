"""The panel: majority vote of several judges on the first faulty step and on the error type.

Rules (documented for users in the module docstring of qreason.stages.judge):
- Only valid verdicts vote; judge errors are listed but do not count. No valid verdict: the panel is a
  judge_error.
- Step: the step named by most judges. Tie: the earliest real step (0, 1, ...) among the tied ones; -1
  ("no faulty step") wins a tie only against nothing else, since the solution is known to have failed.
- Error type: voted among the judges that named the winning step. Tie: the type of the judge listed first.
  Sub-type and capability: voted among the judges with the winning step and type, same tie rule.
- The rationale is that of the first listed judge that agrees on step and type.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from qreason.stages.judge.prompts import Verdict


def _winner(values: list, order: list) -> tuple[Any, bool]:
    """Most common value; ties broken by first appearance in ``order``. Returns (value, tied)."""
    counts = Counter(values)
    top = max(counts.values())
    tied = [v for v in counts if counts[v] == top]
    return min(tied, key=order.index), len(tied) > 1


def vote(members: list[tuple[str, Verdict]]) -> Verdict:
    """The panel verdict of (judge name, verdict) pairs given in the judges' list order."""
    valid = [(name, v) for name, v in members if v.ok and v.first_error_step is not None]
    summary: dict[str, Any] = {
        "members": {
            name: {
                "status": v.status,
                "step": v.first_error_step,
                "error_type": v.error_type,
                "sub_type": v.sub_type,
                "capability": v.capability,
            }
            for name, v in members
        },
        "n_judges": len(members),
        "n_valid": len(valid),
    }
    if not valid:
        return Verdict(
            status="judge_error", error="no judge of the panel gave a valid verdict", details=summary
        )
    steps = [v.first_error_step for _, v in valid]
    step_counts = Counter(steps)
    top = max(step_counts.values())
    tied_steps = sorted(s for s in step_counts if step_counts[s] == top)
    real = [s for s in tied_steps if s >= 0]
    step = real[0] if real else -1
    agreeing = [(n, v) for n, v in valid if v.first_error_step == step]
    summary.update(
        step_counts={str(s): c for s, c in sorted(step_counts.items())},
        step_agreement=round(len(agreeing) / len(valid), 4),
        tie_step=len(tied_steps) > 1,
    )
    if step == -1:
        summary.update(unanimous=len(agreeing) == len(members))
        return Verdict(first_error_step=-1, rationale=agreeing[0][1].rationale, details=summary)

    typed = [(n, v) for n, v in agreeing if v.error_type]
    if not typed:
        summary.update(unanimous=len(agreeing) == len(members))
        return Verdict(first_error_step=step, rationale=agreeing[0][1].rationale, details=summary)
    order = [v.error_type for _, v in typed]
    etype, tie_type = _winner(order, order)
    same_type = [(n, v) for n, v in typed if v.error_type == etype]
    subs = [v.sub_type for _, v in same_type]
    sub, _ = _winner(subs, subs)
    caps = [v.capability for _, v in same_type]
    cap, _ = _winner(caps, caps)
    summary.update(
        type_counts=dict(Counter(order)),
        type_agreement=round(len(same_type) / len(valid), 4),
        tie_type=tie_type,
        unanimous=len(same_type) == len(members),
    )
    return Verdict(
        first_error_step=step,
        error_type=etype,
        sub_type=sub,
        capability=cap,
        rationale=same_type[0][1].rationale,
        details=summary,
    )
