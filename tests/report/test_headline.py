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
    assert "Method grew most: 9 judged failures against 0 for b" in facts["where it broke"].text
    assert facts["recovery"].tone == "neutral" and "gap closed" not in facts["recovery"].text
    assert "no gap to close" in facts["recovery"].text  # no gap_closed measured in this summary
    assert (
        facts["gates"].tone == "bad"
        and "below the floor" in facts["gates"].text
        and "other" not in facts["gates"].text
    )
    (verdict,) = recovery_verdicts(summary.recover)
    assert [f.label for f in verdict["facts"]] == ["targeted", "control", "which helped"]
    assert "evaluated merged: adapter merged into a dense checkpoint" in verdict["facts"][0].text
    assert "the same budget, 6 examples" in verdict["facts"][1].text  # 6 and 6: equal


def noise_summary(p: float, exceeds: bool):
    from qreason.summary import NoiseSummary, PerturbationNoise, VariantVsNoise

    return NoiseSummary(
        base="b",
        perturbations=[
            PerturbationNoise(name="batch", variant="b~batch", task="t", cells=80, lost=1, gained=1)
        ],
        variants=[
            VariantVsNoise(
                variant="rtn",
                task="t",
                cells=80,
                lost=27,
                gained=2,
                noise_cells=80,
                noise_flips=2,
                p_value=p,
                exceeds_noise=exceeds,
            )
        ],
    )


def test_the_headline_answers_in_order_accuracy_noise_where_recovery():
    """Per variant, in this order: the accuracy change with interval and McNemar p; the flips against the
    noise floor with its p (scientific below 1e-4); where it broke, with coverage beside the deciding layer's
    measured accuracy (or "not measured"); recovery as gap closed and repair beyond task learning."""
    errors = pd.DataFrame([{"variant": "rtn", "error_type": "Execution", "count": 4}])
    rec = VariantRecovery(
        **{**arm("rtn+sb", 0.20, 0.30, 0.04), "train_problem_ids": [str(i) for i in range(30)]},
        control=ArmResult(**{**arm("rtn+ctl", 0.20, 0.21, 0.9), "arm": "control", "train_items": 4}),
        gap_closed=0.8,
        gap_closed_ci=[0.32, 1.68],
        repair_beyond_fp=0.051,
        repair_beyond_fp_ci=[-0.03, 0.131],
        conclusive=True,
        verdict="gap closed 80% [32%, 168%]; repair beyond ...: no significant repair beyond task learning",
    )
    summary = RunSummary(recover=RecoverySummary(variants=[rec]), noise=noise_summary(1.5e-8, True))
    located = {
        "rtn": {
            "failures": 20,
            "located": 18,
            "guessed": 2,
            "median_step": 2.0,
            "layers": {"reference": 18},
            "tasks": {"gsm8k"},
        }
    }
    (h,) = headlines(
        flips(acc_diff=-0.088, ci_low=-0.225, ci_high=0.038, mcnemar_p=0.26),
        errors,
        summary,
        "b",
        {},
        located=located,
    )
    labels = [f.label for f in h.facts]
    assert labels == ["accuracy · t", "vs noise · t", "where it broke", "recovery", "gates"]
    facts = {f.label: f for f in h.facts}
    assert "[-22.5, +3.8]" in facts["accuracy · t"].text and "McNemar p = 0.26" in facts["accuracy · t"].text
    assert facts["vs noise · t"].text == "real: 29 flips of 80 vs 2 of 80 in the base re-run, p 1.5e-08."
    where = facts["where it broke"].text
    assert "Execution grew most" in where and "Median first faulty step 2" in where
    assert "18 of 20 failures located, coverage 90 %" in where and "2 only guessed by the prior" in where
    assert "reference layer" in where and "55 % of wrong answers" in where
    recovery = facts["recovery"].text
    assert "gap closed 80 % [32 %, 168 %]" in recovery
    assert "repair beyond task learning +5.1 points [-3.0, +13.1]" in recovery
    assert "4 examples against the targeted arm's 6" in recovery and "budgets differ" in recovery
    assert "same budget" not in recovery
    assert "recovery 2" not in recovery  # no accuracy / base accuracy ratio called recovery


def test_no_verdict_says_why_and_an_unmeasured_layer_says_so():
    rec = VariantRecovery(
        **arm("rtn+sb", 0.20, 0.30, 0.04),
        gap_closed=-0.2,
        gap_closed_ci=[-1.0, 0.5],
        conclusive=False,
        verdict="too few items to conclude (4 train items, fewer than 20)",
    )
    summary = RunSummary(recover=RecoverySummary(variants=[rec]), noise=noise_summary(0.41, False))
    located = {
        "rtn": {
            "failures": 5,
            "located": 4,
            "median_step": 1.5,
            "layers": {"reference": 4},
            "tasks": {"synthetic"},
        }
    }
    empty = pd.DataFrame(columns=["variant", "error_type", "count"])
    (h,) = headlines(flips(acc_diff=0.0, mcnemar_p=1.0), empty, summary, "b", {}, located=located)
    facts = {f.label: f for f in h.facts}
    assert (
        facts["vs noise · t"].text.startswith("within the noise: 29 flips")
        and "p 0.41" in facts["vs noise · t"].text
    )
    assert "not measured on this task" in facts["where it broke"].text
    text = facts["recovery"].text
    assert text.startswith(
        "sft on 6 examples: no verdict: too few items to conclude (4 train items, fewer than 20)"
    )
    assert "gap closed" not in text and "task learning" not in text and facts["recovery"].tone == "neutral"


def test_p_values_below_1e4_are_scientific():
    from qreason.stats import format_p

    assert [format_p(p) for p in (0.26, 0.0034, 1.5e-8, 0.0, None)] == [
        "0.26",
        "0.0034",
        "1.5e-08",
        "0.0e+00",
        "–",
    ]


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
    facts = {f.label: f.text for f in h.facts}
    assert facts["where it broke"].startswith("no error type grew against b (most common: Method, 5).")


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


def test_report_defects_of_a_small_run():
    """The dataset card hides the loader's front matter; a variant keeps its colour from chart to chart; a
    difficulty dimension with one bucket is named, not tabulated."""
    from qreason.report import difficulty_context

    card = render_card(
        "---\nlicense: mit\nconfigs:\n- config_name: sft\n  data_files: sft.jsonl\n---\n# Card\n"
    )
    assert card["front_matter"] == [("license", "mit")]
    palette = figures.palette_for(["base", "gptq", "rtn"])
    assert figures.colors_for(["rtn"], palette) == figures.colors_for(["base", "gptq", "rtn"], palette)[2:]
    table = pd.DataFrame(
        [
            {"variant": "rtn", "task": "synthetic", "dimension": "steps", "bucket": "1", "n": 80},
            {"variant": "rtn", "task": "math", "dimension": "level", "bucket": "1", "n": 3},
            {"variant": "rtn", "task": "math", "dimension": "level", "bucket": "2", "n": 4},
        ]
    )
    ctx = difficulty_context(table)
    assert [r["task"] for r in ctx["difficulty"]] == ["math", "math"]
    assert ctx["difficulty_single"] == ["synthetic: steps 1"]
