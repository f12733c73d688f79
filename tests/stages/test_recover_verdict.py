"""What the recover stage concludes from its arms, without training: gap closed and repair beyond task
learning (the full-precision arm) with their intervals, no verdict below the minimum of train items, the
min_gap_closed gate, and the terminal's table."""

from __future__ import annotations

import numpy as np
import pytest

from qreason.config.schema import GatesConfig
from qreason.stages.gates import check_gates
from qreason.stages.recover.evaluate import TOO_FEW, against_fp, compare, head_to_head, verdict
from qreason.summary import ArmResult, RecoverySummary, RunSummary, VariantRecovery


def _arrays(n_base: int, n_before: int, n_after: int, n_fp_after: int, n: int = 400):
    """0/1 outcomes on ``n`` paired problems with the given numbers of successes (nested: a model's solved
    set holds the smaller one's)."""

    def ones(k):
        return (np.arange(n) < k).astype(float)

    return ones(n_base), ones(n_before), ones(n_after), ones(n_fp_after)


def _variant(base, before, after, fp_after, train_items: int, min_items: int = 20) -> VariantRecovery:
    fields = dict(
        variant="rtn",
        eval_variant="rtn+sb",
        arm="targeted",
        mode="sft",
        train_items=train_items,
        train_problem_ids=[f"p{i}" for i in range(train_items)],
        eval_problem_ids=[str(i) for i in range(len(base))],
        seeds=[0],
        adapter="a",
        adapter_key="k",
        adapter_reused=False,
        eval_mode="lora",
        train_seconds=1.0,
        eval_seconds=1.0,
        generations_produced=0,
    )
    v = VariantRecovery(**fields, **compare(base, before, after))
    if fp_after is not None:
        fp = {**fields, "arm": "fp", "eval_variant": "rtn+fp"}
        v.fp_arm = ArmResult(**fp, **compare(base, base, fp_after))
        v.targeted_vs_control = head_to_head(fp_after, after)
    for k, x in against_fp(base, before, after, fp_after).items():
        setattr(v, k, x)
    v.min_train_items = min_items
    v.conclusive, v.verdict = verdict(v, min_items)
    if not v.conclusive and v.targeted_vs_control is not None:
        v.targeted_vs_control.verdict = TOO_FEW
    return v


def test_gap_closed_and_repair_beyond_task_learning_are_what_the_issue_defines():
    # base 60 %, variant 20 % -> 50 %: 30 of the 40 points of gap closed (75 %); the base gained 5 points
    # from the same data, so 25 points are repair beyond task learning
    base, before, after, fp_after = _arrays(240, 80, 200, 260)
    out = against_fp(base, before, after, fp_after)
    assert out["gap_closed"] == pytest.approx(0.75)
    assert out["repair_beyond_fp"] == pytest.approx(0.25)
    lo, hi = out["gap_closed_ci"]
    assert lo < 0.75 < hi and hi - lo < 0.3
    lo, hi = out["repair_beyond_fp_ci"]
    assert 0 < lo < 0.25 < hi
    v = _variant(base, before, after, fp_after, train_items=40)
    assert v.conclusive and "repaired more than the same data taught full precision" in v.verdict


def test_task_learning_is_not_called_repair():
    # the variant gains 40 points, but the base gains 40 points from the same data: no repair beyond it
    base, before, after, fp_after = _arrays(100, 60, 220, 260)
    v = _variant(base, before, after, fp_after, train_items=40)
    assert v.gap_closed == pytest.approx(4.0)  # "above the base" is not the measure
    assert v.repair_beyond_fp == pytest.approx(0.0)
    assert v.repair_beyond_fp_ci[0] < 0 < v.repair_beyond_fp_ci[1]
    assert "no significant repair beyond task learning" in v.verdict


def test_no_gap_leaves_gap_closed_undefined():
    base, before, after, fp_after = _arrays(100, 100, 120, 100)
    out = against_fp(base, before, after, fp_after)
    assert "gap_closed" not in out and out["repair_beyond_fp"] == pytest.approx(0.05)
    # the variant above the base on the held-out problems (the recovery study: 22 % against 9.5 %): no gap,
    # not a gap closed of -500 %; repair beyond task learning still says what the adapter did
    base, before, after, fp_after = _arrays(40, 88, 340, 334)
    v = _variant(base, before, after, fp_after, train_items=40)
    assert v.gap_closed is None and not v.gap_closed_ci
    assert v.verdict.startswith("the variant is not below the base on these problems: no gap to close; ")
    assert v.repair_beyond_fp == pytest.approx((340 - 88 - 334 + 40) / 400)


def test_too_few_items_print_no_verdict():
    base, before, after, fp_after = _arrays(240, 80, 200, 260)
    v = _variant(base, before, after, fp_after, train_items=6)
    assert not v.conclusive and v.verdict.startswith(TOO_FEW)
    from qreason.cli import format_recovery

    text = format_recovery(RecoverySummary(variants=[v]))
    assert TOO_FEW in text
    assert "beat" not in text and "no significant" not in text and "task learning" not in text
    assert "rtn+fp" in text  # the full-precision arm's row


def test_min_gap_closed_gate():
    base, before, after, fp_after = _arrays(240, 80, 120, 260)  # 10 of 40 points: 25 % of the gap
    summary = RunSummary(recover=RecoverySummary(variants=[_variant(base, before, after, fp_after, 40)]))
    tripped = check_gates(GatesConfig(min_gap_closed=0.5), summary, "base", None, [])
    assert tripped == ["rtn+sb: the adapter closed 25.0% of the gap to the base, below 50.0%"]
    assert check_gates(GatesConfig(min_gap_closed=0.2), summary, "base", None, []) == []


def test_the_report_shows_the_fp_arm_and_withholds_the_verdict_below_the_minimum(tmp_path):
    from run_builders import build_run

    from qreason.report import build_report

    store = build_run(tmp_path)
    base, before, after, fp_after = _arrays(240, 80, 200, 260)
    few = _variant(base, before, after, fp_after, train_items=6)
    html = build_report(store, summary=RunSummary(recover=RecoverySummary(variants=[few]))).read_text()
    section = html[html.index('id="recovery"') : html.index('id="failures"')]
    assert "rtn+fp" in section and "same items, base model" in section
    assert TOO_FEW in section and "beat" not in section and "no significant" not in section
    enough = _variant(base, before, after, fp_after, train_items=40)
    html = build_report(store, summary=RunSummary(recover=RecoverySummary(variants=[enough]))).read_text()
    section = html[html.index('id="recovery"') : html.index('id="failures"')]
    assert "gap closed 75%" in section and "repaired more than the same data taught full precision" in section
    assert TOO_FEW not in section
