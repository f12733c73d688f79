"""The report's recovery section: the arms of every recovered variant (targeted, control, full precision)
as table rows, and one verdict line per variant (gap closed and repair beyond task learning, or "too few items
to conclude"). Rendered by ``recovery.html.j2``."""

from __future__ import annotations

from qreason.summary import RecoverySummary

TRAINED_ON = {
    "targeted": "Silver Bullet items",
    "control": "untargeted (control)",
    "fp": "same items, base model",
}


def recovery_section(recovery: RecoverySummary | None) -> dict | None:
    """What the template shows: ``rows`` (one per arm), ``variants`` (verdicts, notes) and ``skipped``."""
    if recovery is None:
        return None
    rows, variants = [], []
    for v in recovery.variants:
        for a in [v] + [x for x in (v.control, v.fp_arm) if x is not None]:
            rows.append({**a.model_dump(mode="json"), "trained_on": TRAINED_ON[a.arm]})
        variants.append(
            {
                "variant": v.variant,
                "verdict": v.verdict,
                "conclusive": v.conclusive,
                "train_items": len(v.train_problem_ids),
                "min_train_items": v.min_train_items,
                "head_to_head": v.targeted_vs_control.model_dump() if v.targeted_vs_control else None,
                "fp_arm_skipped": v.fp_arm_skipped,
                "matched_before": v.recovery_before is not None and v.recovery_before >= 1,
                "recovery_before": v.recovery_before,
            }
        )
    return {"rows": rows, "variants": variants, "skipped": dict(recovery.skipped)}
