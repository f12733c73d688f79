"""The report answers first: a headline per variant whose colour follows significance, gate results, recovery
verdicts in words, a rendered dataset card, and charts that do not draw what says nothing."""

import pandas as pd
from run_builders import build_run

from qreason.config.schema import GatesConfig
from qreason.report import build_report, figures
from qreason.report.headline import gate_rows, headlines, recovery_verdicts, render_card
from qreason.summary import ArmResult, GatesSummary, HeadToHead, RecoverySummary, RunSummary, VariantRecovery

FLIP = {"variant": "rtn", "task": "t", "pairs": 80, "lost": 12, "gained": 2, "acc_ref": 0.262, "acc": 0.175}


def flips(**row) -> pd.DataFrame:
    return pd.DataFrame([{**FLIP, **row}])


def arm(name: str, before: float, after: float, p: float, **extra) -> dict:
    return dict(
        variant="rtn",
        eval_variant=name,
        arm="targeted",
        mode="sft",
        train_items=6,
        train_problem_ids=[],
        eval_problem_ids=[str(i) for i in range(76)],
        seeds=[0],
        base_accuracy=0.25,
        accuracy_before=before,
        accuracy_after=after,
        recovery_before=None,
        recovery_after=None,
        repaired=1,
        broken=4,
        mcnemar_p=p,
        diff_ci=[-0.1, 0.02],
        adapter="a",
        adapter_key="k",
        adapter_reused=False,
        eval_mode="merged",
        train_seconds=1.0,
        eval_seconds=1.0,
        generations_produced=76,
        **extra,
    )


def test_colour_only_for_a_significant_change():
    empty = pd.DataFrame(columns=["variant", "error_type", "count"])
    quiet = headlines(
        flips(acc_diff=-0.088, ci_low=-0.2, ci_high=0.03, mcnemar_p=0.26), empty, RunSummary(), "b", {}
    )
    fact = quiet[0].facts[0]
    assert (
        fact.tone == "neutral"
        and "not significant" in fact.text
        and "26.2 % for b → 17.5 %: -8.8 points" in fact.text
    )
    loud = headlines(
        flips(acc_diff=-0.15, ci_low=-0.25, ci_high=-0.05, mcnemar_p=0.004), empty, RunSummary(), "b", {}
    )
    assert loud[0].facts[0].tone == "bad" and ": significant" in loud[0].facts[0].text
    up = headlines(
        flips(acc_diff=0.15, ci_low=0.05, ci_high=0.25, mcnemar_p=0.004), empty, RunSummary(), "b", {}
    )
    assert up[0].facts[0].tone == "good"


def test_headline_names_the_error_shift_the_recovery_and_the_tripped_gates():
    errors = pd.DataFrame(
        [
            {"variant": "b", "error_type": "Execution", "count": 3},
            {"variant": "rtn", "error_type": "Execution", "count": 4},
            {"variant": "rtn", "error_type": "Method", "count": 9},
        ]
    )
    rec = VariantRecovery(
        **arm("rtn+sb", 0.184, 0.145, 0.4),
        control=ArmResult(**{**arm("rtn+ctl", 0.184, 0.132, 0.3), "arm": "control"}),
        targeted_vs_control=HeadToHead(
            diff=0.013,
            ci=[-0.05, 0.08],
            targeted_only=3,
            control_only=2,
            mcnemar_p=1.0,
            verdict="no significant difference",
        ),
    )
    summary = RunSummary(
        recover=RecoverySummary(variants=[rec]),
        gates=GatesSummary(
            tripped=["rtn/t: accuracy 10.0% is below the floor 20.0%", "other/t: x"], passed=False
        ),
    )
    (h,) = headlines(flips(acc_diff=-0.05, ci_low=-0.1, ci_high=0.0, mcnemar_p=0.3), errors, summary, "b", {})
    facts = {f.label: f for f in h.facts}
    assert "Method grew most: 9 judged failures against 0 for b" in facts["error types"].text
    assert "lowered accuracy on 76 held-out problems from 18.4 % to 14.5 %" in facts["recovery"].text
    assert facts["recovery"].tone == "neutral" and "no significant difference" in facts["recovery"].text
    assert (
        facts["gates"].tone == "bad"
        and "below the floor" in facts["gates"].text
        and "other" not in facts["gates"].text
    )
    (verdict,) = recovery_verdicts(summary.recover)
    assert [f.label for f in verdict["facts"]] == ["targeted", "control", "which helped"]
    assert "evaluated merged: adapter merged into a dense checkpoint" in verdict["facts"][0].text


def test_gate_section_lists_configured_gates_and_what_tripped():
    summary = RunSummary(
        gates=GatesSummary(tripped=["rtn/t: accuracy 10.0% is below the floor 20.0%"], passed=False)
    )
    rows = gate_rows(GatesConfig(min_accuracy=0.2, max_drop=0.05), summary)
    by = {r["gate"]: r for r in rows}
    assert set(by) == {"min_accuracy", "max_drop"}
    assert by["min_accuracy"]["tripped"] and not by["max_drop"]["tripped"]
    assert by["max_drop"]["limit"] == "5.0 points" and by["min_accuracy"]["limit"] == "20.0 %"
    assert gate_rows(None, summary) == []


def test_dataset_card_is_rendered_and_stays_inert():
    card = render_card(
        "---\nlicense: apache-2.0\ntags: [a, b]\n---\n# Silver Bullet\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n"
        "<script>alert(1)</script> [x](javascript:alert(1))\n"
    )
    assert card["front_matter"] == [("license", "apache-2.0"), ("tags", "[a, b]")]
    html = str(card["html"])
    assert "<h1>Silver Bullet</h1>" in html and "<table>" in html
    assert "<script>" not in html and "&lt;script&gt;" in html and 'href="javascript' not in html
    assert render_card(None) is None


def test_charts_skip_what_says_nothing():
    assert figures.step_histogram({"rtn": [2, 2, 2]}, "t") is None  # one bucket
    assert figures.step_histogram({"rtn": [1, 2, 4], "gptq": [1]}, "t").startswith("data:image/png")
    one = pd.DataFrame([{"task": "t", "variant": "v", "accuracy": 0.5}])
    assert figures.grouped_bars(one, "task", "variant", "accuracy", "t", "y") is None


def test_report_opens_with_the_headline(tmp_path):
    store = build_run(tmp_path)
    html = build_report(store).read_text()
    head, rest = html.split('<h2 id="summary">', 1)
    assert 'id="headline"' in head and 'id="gates"' in head
    assert "not significant" in head and 'class="bad"' not in head  # p = 0.25 on 8 pairs: no red
    assert "step index (0-based)" not in html


def test_gate_rows_match_the_lines_the_gate_check_writes(tmp_path):
    from qreason.stages.gates import check_gates
    from qreason.summary import ResultRow, accuracy_table

    store = build_run(tmp_path)
    summary = RunSummary(results=[ResultRow(**r) for r in accuracy_table(store.grades.all())])
    previous = RunSummary(
        run_id="r0", results=[r.model_copy(update={"accuracy_mean": 1.0}) for r in summary.results]
    )
    gates = GatesConfig(
        max_drop=0.2, max_drop_vs_previous=0.05, min_accuracy=0.6, max_format_failure_rate=0.5
    )
    tripped = check_gates(gates, summary, "base", previous, store.judgments.all())
    summary.gates = GatesSummary(tripped=tripped, passed=False)
    by = {r["gate"]: r["tripped"] for r in gate_rows(gates, summary)}
    # every tripped line lands on exactly the gate that wrote it
    assert len(by["max_drop"]) == 1 and "previous run" not in by["max_drop"][0]
    assert len(by["max_drop_vs_previous"]) == 2  # both cells fell below the previous run
    assert len(by["min_accuracy"]) == 1 and by["max_format_failure_rate"] == []
    assert sum(len(v) for v in by.values()) == len(tripped)


def test_no_growth_names_the_most_common_type():
    errors = pd.DataFrame(
        [
            {"variant": "b", "error_type": "Method", "count": 9},
            {"variant": "rtn", "error_type": "Method", "count": 5},
            {"variant": "b", "error_type": "Execution", "count": 3},
            {"variant": "rtn", "error_type": "Execution", "count": 1},
        ]
    )
    (h,) = headlines(
        flips(acc_diff=0.0, ci_low=-0.1, ci_high=0.1, mcnemar_p=1.0), errors, RunSummary(), "b", {}
    )
    assert h.facts[1].text == "no error type grew against b (most common: Method, 5)."


def test_lm_eval_colour_needs_a_difference_beyond_its_standard_errors():
    from qreason.report import lm_eval_rows
    from qreason.summary import LmEvalSummary

    section = LmEvalSummary(
        tasks=["t"],
        variants={"base": {"t": {"acc": 0.64}}, "rtn": {"t": {"acc": 0.60}}, "bad": {"t": {"acc": 0.20}}},
        stderr={"base": {"t": {"acc": 0.07}}, "rtn": {"t": {"acc": 0.07}}, "bad": {"t": {"acc": 0.05}}},
        primary_metric={"t": "acc"},
    )
    tone = {r["variant"]: r["tone"] for r in lm_eval_rows(section, "base")}
    assert tone == {"base": "neutral", "rtn": "neutral", "bad": "bad"}
