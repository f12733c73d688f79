"""The judge stack: the reference locator, abandoned answers, the combined verdict and its deciding layer,
curation and analysis from it, and judge-bench's JSON (on small ProcessBench-format files written here)."""

from __future__ import annotations

import json
import time

import pytest
from judge_helpers import make_run

from qreason.cli import main as judge_main
from qreason.config.judge import JudgeConfig
from qreason.stages.analyze import abandoned_answers, frames, judge_layers
from qreason.stages.curate import find_candidates
from qreason.stages.judge import distribution, final_judgments, run_judging
from qreason.stages.judge.bench import normalise_problem, run_bench
from qreason.stages.judge.prompts import Verdict
from qreason.stages.judge.reference import Reference, abandoned_answer, locate, reference_verdict
from qreason.stages.judge.rules import rule_verdict_call
from qreason.stages.judge.stack import LayerVerdict, combine

PROBLEM = "Mia buys 3 boxes of 12 pencils. She gives 10 pencils to her brother. How many pencils are left?"
SOLUTION = "Mia has 3 * 12 = 36 pencils.\nShe has 36 - 10 = 26 pencils left."
REF = Reference(PROBLEM, "26", SOLUTION)

# --------------------------------------------------------------------------------------- reference locator


def test_gate_no_error_when_the_answer_is_right():
    steps = ["3 boxes of 12 is 3 * 12 = 36 pencils.", "36 - 10 = 26 pencils left."]
    v = locate(steps, REF, answer_correct=True)
    assert (v.first_error_step, v.details["rule"]) == (-1, "gate")


def test_arithmetic_slip_is_an_execution_error():
    steps = ["3 * 12 = 36 pencils.", "36 - 10 = 24 pencils left.", "The answer is 24."]
    v = locate(steps, REF, answer_correct=False)
    assert (v.first_error_step, v.error_type, v.sub_type, v.details["rule"]) == (
        1,
        "Execution",
        "computational_error",
        "slip",
    )
    # the slip wins over the gate: a right answer with a wrong step is still located
    assert locate(steps[:2] + ["So 26."], REF, answer_correct=True).first_error_step == 1


def test_off_reference_value_computed_is_a_method_error():
    # right arithmetic on a wrong plan: 36 + 10 is a value the reference never has
    steps = ["She has 3 * 12 = 36 pencils.", "Then 36 + 10 = 46 pencils.", "The answer is 46."]
    v = locate(steps, REF, answer_correct=False)
    assert (v.first_error_step, v.error_type, v.sub_type, v.details["rule"]) == (
        1,
        "Method",
        "procedural_error",
        "off_reference_result",
    )


def test_off_reference_value_stated_is_a_conceptual_error():
    steps = ["Each box has 15 pencils, so she has 45.", "45 - 10 = 35.", "The answer is 35."]
    v = locate(steps, REF, answer_correct=False)
    assert (v.first_error_step, v.error_type, v.sub_type) == (0, "Conceptual", "contextual_oversight")


def test_known_numbers_do_not_fire():
    """Numbers of the problem (digits, number words, percent forms), small constants, rounded decimals and
    earlier values are known; a wrong final value found nowhere else is located where it first appears."""
    ref = Reference(
        "A shop sells twelve pens at $2.50 each with a 20% discount. What do they cost?",
        "24",
        "12 * 2.5 = 30\n30 * 0.8 = 24",
    )
    steps = [
        "Twelve pens cost 12 * 2.50 = 30 dollars.",
        "The discount is 20% = 0.2 of 30, so they cost 30 * 0.8 = 24 dollars... or 30 / 1.25 = 24.",
        "Rounded, 100 / 3 = 33.33 is not needed.",
        "The answer is 30.",
    ]
    v = locate(steps, ref, answer_correct=False)
    # 33.33 and 1.25 are new; 1.25 comes first (step 1), written as an operand, not computed
    assert (v.first_error_step, v.details["rule"], v.error_type) == (1, "off_reference_value", "Conceptual")
    # without the off-reference numbers, the wrong final value 30 is first written in step 0
    v = locate(["Twelve pens cost 12 * 2.50 = 30 dollars.", "The answer is 30."], ref, answer_correct=False)
    assert (v.first_error_step, v.details["rule"]) == (0, "wrong_final_value")


def test_synthetic_reference_steps_locate_the_first_faulty_step():
    """The synthetic task's generator values (``a + b = c`` reference steps) are a worked reference."""
    from qreason.inputs.synthetic import generate

    row = generate(n=4, min_steps=3, max_steps=3, seed=1)[2]
    ref = Reference(row["question"], row["answer"], "\n".join(row["reference_steps"]))
    good = [f"Step {i + 1}: {s}." for i, s in enumerate(row["reference_steps"])]
    assert locate(good, ref, answer_correct=True).first_error_step == -1
    # a wrong value carried on from step 1 (stated, not computed)
    bad = list(good)
    bad[1] = "Step 2: Now the count is 999."
    v = locate(bad + ["The final answer is 999."], ref, answer_correct=False)
    assert v.first_error_step == 1


@pytest.mark.parametrize(
    "step",
    [
        "So the value is " + "9^" * 22 + "9 = 5.",  # a 45-character power tower
        "3 + 4 = 7 and " * 75_000,  # about 1 MB
        "{" * 10_000 + "1 + 1 = 3" + "}" * 10_000,  # 10,000 nested braces
    ],
    ids=["power-tower", "1MB", "nested-braces"],
)
def test_hostile_steps_are_judge_errors_quickly(step):
    steps = ["Start.", step]
    t0 = time.monotonic()
    ref_v = reference_verdict(steps, REF, False)
    rules_v = rule_verdict_call((steps, "wrong"))
    assert ref_v.status == "judge_error" and rules_v.status == "judge_error"
    assert "step 1" in ref_v.error and "step 1" in rules_v.error
    assert time.monotonic() - t0 < 10  # the stage's default limit; the checks refuse before reading


def test_hostile_steps_in_the_stage_are_judge_error_records(tmp_path):
    tower = "So the value is " + "9^" * 22 + "9 = 5."
    cases = [
        ("h0", "What is it?", "5", {"q4": (f"Step 1: {tower}\nThe final answer is \\boxed{{4}}.", "wrong")}),
        (
            "h1",
            "What is it?",
            "5",
            {"q4": ("Step 1: " + "{" * 10_000 + "1" + "}" * 10_000 + "\nSo \\boxed{4}.", "wrong")},
        ),
    ]
    store = make_run(tmp_path / "run", cases)
    run_judging(store, JudgeConfig(rules_timeout_s=10))
    recs = [j for j in store.judgments.all() if j.judge in ("rules", "reference")]
    assert len(recs) == 4 and all(j.status == "judge_error" for j in recs)
    assert all("timed out" not in j.error for j in recs)  # refused by the bounds, not by the clock
    final = final_judgments(store)
    # the stack falls back to the prior's guess (no layer gave a valid verdict)
    assert {j.votes["decided_by"] for j in final.values()} == {"prior"}


# --------------------------------------------------------------------------------------- abandoned answers


def test_abandoned_answer():
    steps = [
        "She has 3 * 12 = 36 pencils.",
        "36 - 10 = 26 pencils.",
        "But she buys 4 more: 26 + 4 = 30.",
        "30",
    ]
    assert abandoned_answer(steps, "26") == {"step": 1, "value": "26"}
    assert abandoned_answer(steps[:2], "26") is None  # it ends on the right value
    assert abandoned_answer(["The answer might be 26 pencils.", "So 30."], "26") is None  # not a result
    assert abandoned_answer(["So \\boxed{26}.", "No, 30."], "26") == {"step": 0, "value": "26"}
    assert abandoned_answer(steps, "x^2 + 1") is None  # not a number


# --------------------------------------------------------------------------------------- combined verdict


def _v(step, etype=None, status="ok"):
    return Verdict(status=status, first_error_step=step, error_type=etype)


def test_combine_precedence_and_deciding_layer():
    rules = LayerVerdict("rules", "rules", _v(3, "Execution"))
    ref = LayerVerdict("reference", "reference", _v(1, "Method"))
    llm = LayerVerdict("llm", "panel", _v(2, "Conceptual"))
    prm = LayerVerdict("prm", "qwen-prm", _v(4))
    assert combine([rules, ref], True, 6, 2)[1:] == ("reference", "reference")
    assert combine([rules, ref, prm], True, 6, 2)[1:] == ("prm", "qwen-prm")
    v, layer, judge = combine([rules, ref, prm, llm], True, 6, 2)
    assert (v.first_error_step, v.error_type, layer, judge) == (2, "Conceptual", "llm", "panel")
    assert v.details["decided_by"] == "llm" and set(v.details["layers"]) == {
        "rules",
        "reference",
        "qwen-prm",
        "panel",
    }
    # "no faulty step" from a stronger layer gives way to a located step below it
    assert combine([rules, LayerVerdict("llm", "a", _v(-1))], True, 6, None)[1] == "rules"
    # an invalid verdict does not decide
    bad = LayerVerdict("llm", "a", Verdict(status="judge_error", error="x"))
    assert combine([bad, ref], True, 6, 2)[1] == "reference"
    assert combine([bad], True, 6, None)[0].status == "judge_error"


def test_combine_prior():
    none = LayerVerdict("rules", "rules", _v(-1))
    v, layer, _ = combine([none], True, 2, 2)
    assert (v.first_error_step, layer) == (1, "prior")  # clipped to the last step
    assert combine([none], False, 6, 2)[1] == "rules"  # the answer is right: no guess
    assert combine([none], None, 6, 2)[1] == "rules"  # unknown: no guess
    # a rules-located step later than the guess gives way when no other layer ran ...
    assert combine([LayerVerdict("rules", "rules", _v(4, "Execution"))], True, 6, 2)[1] == "prior"
    # ... but not an outcome, and not when the reference layer ran
    collapse = LayerVerdict("rules", "rules", _v(4, "Outcome"))
    assert combine([collapse], True, 6, 2)[1] == "rules"
    ref = LayerVerdict("reference", "reference", _v(-1))
    assert combine([LayerVerdict("rules", "rules", _v(4, "Execution")), ref], True, 6, 2)[1] == "rules"


# --------------------------------------------------------------------------------------- the stage


def test_stage_writes_the_combined_verdict(tmp_path):
    store = make_run(tmp_path / "run")
    stats = run_judging(store, JudgeConfig())
    assert stats.stack_written == stats.candidates == 5
    judges = {j.judge for j in store.judgments.all()}
    assert judges == {"rules", "reference", "stack"}
    final = final_judgments(store)
    assert all(j.judge == "stack" for j in final.values())
    by = {(j.problem_id, j.variant): j for j in final.values()}
    # p0/q4: "5 + 3 = 9", located by the reference layer (its slip rule), typed Execution
    p0 = by[("p0", "q4")]
    assert (p0.first_error_step, p0.error_type, p0.votes["decided_by"]) == (1, "Execution", "reference")
    assert set(p0.votes["layers"]) == {"rules", "reference"}
    # p2/q4 (no answer): not a wrong answer, no prior guess
    assert by[("p2", "q4")].votes["answer_wrong"] is False
    dist = distribution(store)
    assert dist["q4"]["sources"]["reference"] >= 1 and 0 < dist["q4"]["coverage"] <= 1
    # re-running writes nothing new; changing the layers writes a new combined verdict that counts
    assert run_judging(store, JudgeConfig()).stack_written == 0
    assert run_judging(store, JudgeConfig(layers=["rules", "prior"])).stack_written == 5
    assert final_judgments(store)[p0.generation_key].votes["decided_by"] == "rules"


def test_stage_records_abandoned_answers_and_the_analysis_counts_them(tmp_path):
    cases = [
        (
            "a0",
            "Ben has 4 boxes with 6 pens each. How many pens does he have?",
            "24",
            {
                "base": ("Step 1: 4 * 6 = 24.\nThe final answer is \\boxed{24}.", "correct"),
                "q4": (
                    "Step 1: 4 * 6 = 24 pens.\nStep 2: He loses 2, so 24 - 2 = 22 pens.\n"
                    "The final answer is \\boxed{22}.",
                    "wrong",
                ),
            },
        ),
        (
            "a1",
            "Cy has 5 cards and gets 3 more. How many cards?",
            "8",
            {"q4": ("Step 1: 5 + 4 = 9.\nThe final answer is \\boxed{9}.", "wrong")},
        ),
    ]
    store = make_run(tmp_path / "run", cases)
    run_judging(store, JudgeConfig())
    final = {j.problem_id: j for j in final_judgments(store).values()}
    ab = final["a0"].votes["abandoned_answer"]
    assert ab["step"] == 0 and ab["value"] == "24" and 0 < ab["tokens_to_correct"] < ab["tokens"] == 20
    assert final["a1"].votes["abandoned_answer"] is None
    assert distribution(store)["q4"]["abandoned_answers"] == 1
    chosen = frames(store)["judgments"]
    chosen = chosen[chosen["verdict"]]
    table = abandoned_answers(chosen)
    row = table[table["variant"] == "q4"].iloc[0]
    assert (row["wrong_answers"], row["abandoned"], row["rate"]) == (2, 1, 0.5)
    layers = judge_layers(chosen)
    assert set(layers["decided_by"]) <= {"rules", "reference", "prior"} and layers["failures"].sum() == 2


def test_curation_uses_the_combined_verdict_and_skips_prior_guesses(tmp_path):
    cases = [
        (
            "c0",
            "Ana has 5 apples and gets 3 more. How many apples?",
            "8",
            {
                "base": ("Step 1: 5 + 3 = 8.\nThe final answer is \\boxed{8}.", "correct"),
                "q4": (
                    "Step 1: Ana has 5 apples.\nStep 2: 5 + 3 = 9.\nThe final answer is \\boxed{9}.",
                    "wrong",
                ),
            },
        ),
        (
            "c1",
            "Ben has 4 boxes with 6 pens each. How many pens does he have?",
            "24",
            {
                "base": ("Step 1: 4 * 6 = 24.\nThe final answer is \\boxed{24}.", "correct"),
                "q4": (
                    "Step 1: Each box has 6 pens.\nStep 2: There are 4 boxes.\nStep 3: 6 - 4 = 2.\n"
                    "The final answer is \\boxed{2}.",
                    "wrong",
                ),
            },
        ),
    ]
    store = make_run(tmp_path / "run", cases)
    run_judging(store, JudgeConfig(layers=["rules", "prior"]))
    final = {j.problem_id: j for j in final_judgments(store).values()}
    assert final["c1"].votes["decided_by"] == "prior"  # no evidence: a guess
    got = {c.failed.problem_id: (c.k, c.verdict.judge) for c in find_candidates(store, "base")}
    assert got == {"c0": (1, "stack")}  # the guess is not a cut point
    # with the reference layer, c1 is located (2 is a value no reference has) and becomes a candidate
    run_judging(store, JudgeConfig())
    got = {c.failed.problem_id: (c.k, c.verdict.votes["decided_by"]) for c in find_candidates(store, "base")}
    assert got == {"c0": (1, "reference"), "c1": (2, "reference")}


# --------------------------------------------------------------------------------------- judge-bench


def _bench_files(tmp_path):
    problems = [
        (
            "Tom has 3 bags of 5 apples. He eats 2. How many apples are left?",
            "3 * 5 = <<3*5=15>>15\n15 - 2 = 13",
            13,
        ),
        ("Sue has 10 coins and finds 4 more. How many coins now?", "10 + 4 = <<10+4=14>>14", 14),
    ]
    refs = tmp_path / "refs.jsonl"
    refs.write_text(
        "".join(json.dumps({"question": q, "answer": f"{s}\n#### {a}"}) + "\n" for q, s, a in problems)
    )
    rows = [
        # wrong answer, arithmetic slip at 1
        {
            "id": "r0",
            "problem": problems[0][0],
            "steps": ["3 * 5 = 15 apples.", "15 - 2 = 12.", "So \\boxed{12}."],
            "label": 1,
        },
        # wrong answer, a wrong plan: 15 + 2 (a value no reference has) at 1
        {
            "id": "r1",
            "problem": problems[0][0],
            "steps": ["3 * 5 = 15.", "15 + 2 = 17.", "So \\boxed{17}."],
            "label": 1,
        },
        # right
        {
            "id": "r2",
            "problem": "  SUE has 10 coins, and finds 4 more! How many coins now? ",
            "steps": ["10 + 4 = 14.", "\\boxed{14}"],
            "label": -1,
        },
        # no reference for it: judged without the reference layer
        {
            "id": "r3",
            "problem": "Zed has 7 hats. He loses 1. How many now?",
            "steps": ["He has 7 hats.", "He loses one.", "7 - 1 = 5.", "\\boxed{5}"],
            "label": 2,
            "final_answer_correct": False,
        },
    ]
    data = tmp_path / "pb.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data, refs


def test_normalised_problem_text():
    assert normalise_problem("  SUE has 10 coins, and finds 4 more! ") == "sue has 10 coins and finds 4 more"


def test_judge_bench_offline_gated_and_blind(tmp_path):
    data, refs = _bench_files(tmp_path)
    m = run_bench(data, [], None, offline=True, references=refs, task="gsm8k")
    assert m["references"]["matched"] == 3 and m["gate"] == {"graded": 3, "row": 1}
    assert set(m["layers"]) == {"rules", "reference"}
    # r0 slip, r1 off-reference, r2 right, r3: the rule checks' slip at 2
    assert (m["acc_erroneous"], m["acc_correct"], m["f1"], m["wrong_answer_exact"]) == (1.0, 1.0, 1.0, 1.0)
    assert m["layers"]["reference"]["no_prediction"] == 1  # r3 had no reference
    assert m["layers"]["rules"]["acc_erroneous"] == round(2 / 3, 4)
    assert m["decided_by"] == {"reference": 3, "rules": 1}
    assert m["baselines"]["positional"]["step"] in range(8) and "by_step" in m["baselines"]
    blind = run_bench(data, [], None, offline=True, references=refs, task="gsm8k", protocol="blind")
    assert set(blind["layers"]) == {"rules"} and blind["gate"] == {"blind": 4}
    assert blind["acc_erroneous"] == round(2 / 3, 4) and blind["acc_correct"] == 1.0


def test_judge_bench_cli_prints_one_json_object(tmp_path, capsys):
    data, refs = _bench_files(tmp_path)
    args = [
        "judge-bench",
        "--data",
        str(data),
        "--references",
        str(refs),
        "--task",
        "gsm8k",
        "--judge",
        "offline",
    ]
    assert judge_main(args) == 0
    out = json.loads(capsys.readouterr().out)  # one object, nothing else on stdout
    for key in ("f1", "acc_erroneous", "acc_correct", "wrong_answer_exact", "layers", "baselines"):
        assert key in out
    for layer in out["layers"].values():
        assert {"f1", "acc_erroneous", "acc_correct", "wrong_answer_exact"} <= set(layer)
    assert judge_main(["judge-bench", "--data", str(data), "--references", str(refs)]) == 2  # --task missing
    assert "--references" in capsys.readouterr().err
    assert judge_main(args[:3] + ["--references", str(tmp_path / "none.jsonl"), "--task", "gsm8k"]) == 2
    assert judge_main(args + ["--out", str(tmp_path / "o")]) == 0
    preds = [json.loads(x) for x in (tmp_path / "o" / "predictions.jsonl").read_text().splitlines()]
    assert [p["decided_by"] for p in preds] == ["reference", "reference", "reference", "rules"]


# --------------------------------------------------------------------------------------- real vLLM server


@pytest.mark.server
@pytest.mark.vllm
def test_processbench_prompt_version_against_the_server(openai_server, tmp_path):
    """The processbench prompt version, through a real OpenAI-compatible server: the bench sends one request
    per row, blind (no reference answer in the messages even when references are given), parses the replies
    and scores the judge as the llm layer of the stack."""
    from qreason.config.judge import JudgeSpec
    from qreason.stages.judge.prompts import JudgeInput, build_messages, load_taxonomy, load_template

    data, refs = _bench_files(tmp_path)
    spec = JudgeSpec(name="smol", base_url=openai_server, model="smollm2", max_tokens=200, timeout_s=300)
    m = run_bench(
        data,
        [spec],
        tmp_path / "out",
        "processbench",
        limit=2,
        references=refs,
        task="gsm8k",
        protocol="blind",
    )
    assert m["prompt_version"] == "processbench" and m["protocol"] == "blind"
    assert m["requests"] >= 2 and m["usage"]["prompt_tokens"] > 0
    assert m["layers"]["smol"]["layer"] == "llm" and m["layers"]["smol"]["n"] == 2
    preds = [json.loads(x) for x in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    for p in preds:
        step = p["layers"]["smol"]
        assert step is None or -1 <= step < 3  # a parsed, validated verdict, or a judge_error
    msgs = build_messages(
        JudgeInput(problem="p", steps=["a"], reference_answer="4242", reference_solution="4242"),
        load_template("processbench"),
        load_taxonomy(),
    )
    assert "4242" not in json.dumps(msgs)


def test_wrong_final_value_that_the_problem_gives_is_located_where_it_is_a_result():
    """A wrong final value equal to a number of the problem is not located where the problem is restated."""
    ref = Reference("Jun has 6 coins. Then they get 5 more coins. How many now?", "11", "6 + 5 = 11")
    steps = ["Jun has 6 coins.", "5 more coins are added.", "The final answer is \\boxed{6}."]
    assert locate(steps, ref, answer_correct=False).first_error_step == 2
    steps = ["The total is 5 + 6 = 11.", "Then 11 - 5 = 6 coins.", "The final answer is \\boxed{6}."]
    v = locate(steps, ref, answer_correct=False)
    assert (v.first_error_step, v.details["rule"]) == (1, "wrong_final_value")
    assert abandoned_answer(steps, "11") == {"step": 0, "value": "11"}


def test_latex_references_are_not_used():
    """MATH-style (LaTeX) worked solutions do not feed the reference layer: the stack falls back to the rule
    checks and the prior there."""
    from qreason.stages.judge.reference import arithmetic_reference

    assert arithmetic_reference("Mia has 3 * 12 = 36 pencils.\nShe pays $5.")
    assert not arithmetic_reference("We have $x^2 = \\frac{1}{4}$, so $x = \\pm \\frac12$.")
    assert not arithmetic_reference("  ") and not arithmetic_reference(None)
