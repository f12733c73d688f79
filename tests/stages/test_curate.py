"""The Silver Bullet dataset: candidates from judged flips, verified continuations, balance, export,
loading."""

import datasets
import pytest

from qreason.config.schema import CurateConfig, SamplingConfig
from qreason.inputs.steps import step_spans
from qreason.records import Generation, Grade, Judgment, Problem
from qreason.stages.curate import balance, build_items, curate, export, find_candidates, split_at_step
from qreason.stages.grade import Grader, grade_text
from qreason.store import RunStore

PROMPT = "Solve step by step with 'Step N:' lines and give the final answer as \\boxed{{}}.\n\nProblem: {q}"
CASES = [  # question, answer, failed quantized solution (first faulty step = 1)
    (
        "Hana has 11 marbles. Then the number of marbles she has doubles. How many marbles does Hana have "
        "now?",
        "22",
        "Step 1: Hana starts with 11 marbles.\nStep 2: Doubling gives 11 * 2 = 23 marbles.\n"
        "The final answer is \\boxed{23}.",
    ),
    (
        "Ben has 10 coins. He gets 5 more coins. How many coins does Ben have now?",
        "15",
        "Step 1: Ben starts with 10 coins.\nStep 2: 10 + 5 = 16 coins.\nThe final answer is \\boxed{16}.",
    ),
    (
        "Ana has 8 cards. She gives 3 cards to a friend. How many cards does Ana have now?",
        "5",
        "Step 1: Ana starts with 8 cards.\nStep 2: 8 - 3 = 4 cards.\nThe final answer is \\boxed{4}.",
    ),
]


def gen(key, variant, pid, text, seed=0):
    return Generation(
        key=key,
        variant=variant,
        model_fingerprint=f"fp-{variant}",
        task="synthetic",
        problem_id=pid,
        seed=seed,
        prompt_hash="h",
        messages=[{"role": "user", "content": PROMPT.format(q=CASES[int(pid)][0])}],
        text=text,
        steps=[],
        prompt_tokens=1,
        completion_tokens=1,
        finish_reason="stop",
        backend="t",
        versions={},
        sampling={},
        seconds=0.0,
        created_at="now",
    )


def build_store(tmp_path, error_types=("Execution", "Method", "Execution")) -> RunStore:
    store = RunStore(tmp_path / "run")
    for i, (question, answer, failed) in enumerate(CASES):
        pid = str(i)
        store.problems.append(
            [
                Problem(
                    key=f"p{i}",
                    task="synthetic",
                    problem_id=pid,
                    question=question,
                    answer=answer,
                    answer_type="number",
                )
            ]
        )
        good = f"Step 1: The result is {answer}.\nThe final answer is \\boxed{{{answer}}}."
        store.generations.append([gen(f"b{i}", "base", pid, good), gen(f"q{i}", "rtn-w4a16", pid, failed)])
        store.grades.append(
            [
                Grade(
                    key=f"gb{i}",
                    generation_key=f"b{i}",
                    variant="base",
                    task="synthetic",
                    problem_id=pid,
                    seed=0,
                    status="correct",
                    extracted=answer,
                    reference=answer,
                    grader="t",
                ),
                Grade(
                    key=f"gq{i}",
                    generation_key=f"q{i}",
                    variant="rtn-w4a16",
                    task="synthetic",
                    problem_id=pid,
                    seed=0,
                    status="wrong",
                    extracted="x",
                    reference=answer,
                    grader="t",
                ),
            ]
        )
        store.judgments.append(
            [
                Judgment(
                    key=f"j{i}",
                    generation_key=f"q{i}",
                    variant="rtn-w4a16",
                    task="synthetic",
                    problem_id=pid,
                    seed=0,
                    judge="rules",
                    first_error_step=1,
                    error_type=error_types[i],
                    capability="numerical computation",
                    flip=True,
                    created_at="now",
                )
            ]
        )
    return store


def test_split_at_step_keeps_the_text_whole():
    text = CASES[0][2]
    before, after = split_at_step(text, 1)
    assert (
        before + after == text
        and after.startswith("Step 2:")
        and before == "Step 1: Hana starts with 11 marbles.\n"
    )
    assert split_at_step(text, 5) is None
    assert "".join(text[s:e] for s, e in step_spans(text)) == text


def test_balance_round_robins_groups_and_keeps_one_item_per_problem(tmp_path):
    store = build_store(tmp_path)
    items = build_items(
        store,
        find_candidates(store, "base"),
        {"q0": "x", "q1": "y"},
        "base",
        CurateConfig(),
        {"rtn-w4a16": "rtn-w4a16"},
        "run1",
    )
    assert len(items) == 3 and [
        it.chosen is not None for it in sorted(items, key=lambda i: i.problem_id)
    ] == [True, True, False]
    two = balance(items, 2, seed=0)
    assert {it.error_type for it in two} == {"Execution", "Method"}  # one from each group before a second
    dup = items + [items[0].model_copy(update={"variant": "gptq-w4a16", "key": "other"})]
    assert len(balance(dup, 10, seed=0)) == 3


def test_export_loads_with_datasets_in_trl_formats(tmp_path):
    store = build_store(tmp_path)
    cands = find_candidates(store, "base")
    chosen = {
        c.failed.key: f"Step 2: The result is {CASES[int(c.failed.problem_id)][1]}.\n\\boxed{{"
        f"{CASES[int(c.failed.problem_id)][1]}}}"
        for c in cands[:2]
    }
    items = build_items(store, cands, chosen, "base", CurateConfig(test_fraction=0.0), {}, "run1")
    out = export(items, tmp_path / "sb", {"run_id": "run1"})
    sft = datasets.load_dataset("json", data_files=str(out / "sft" / "train.jsonl"), split="train")
    dpo = datasets.load_dataset("parquet", data_files=str(out / "dpo" / "train.parquet"), split="train")
    assert len(sft) == 3 and len(dpo) == 2
    assert [m["role"] for m in sft[0]["prompt"] + sft[0]["completion"]] == ["user", "assistant"]
    for row in dpo:
        assert row["prompt"][0]["role"] == "user"
        assert row["chosen"][0]["content"].startswith(row["prefix"])
        assert row["rejected"][0]["content"].startswith(row["prefix"])
        assert row["chosen"][0]["content"] != row["rejected"][0]["content"]
    card = (out / "README.md").read_text()
    assert "Execution" in card and "run1" in card and "config_name: dpo" in card


@pytest.mark.vllm
def test_curate_with_real_continuations(vllm_backend, tmp_path):
    store = build_store(tmp_path)
    result = curate(
        store,
        CurateConfig(attempts=4, test_fraction=0.0),
        SamplingConfig(max_tokens=96),
        "base",
        "fp-base",
        lambda: vllm_backend,
        Grader(timeout_s=5),
        run_id="r1",
    )
    assert result.candidates == 3 and result.items == 3
    # every continuation the grader saw is stored with its grade; a re-run generates nothing new
    n_cont = len(store.continuations)
    assert n_cont >= 3 and len(store.continuation_grades) == n_cont
    curate(
        store,
        CurateConfig(attempts=4, test_fraction=0.0),
        SamplingConfig(max_tokens=96),
        "base",
        "fp-base",
        lambda: pytest.fail("no model work expected on a re-run"),
        Grader(timeout_s=5),
        run_id="r1",
    )
    assert len(store.continuations) == n_cont
    dpo_file = result.out_dir / "dpo" / "train.jsonl"
    rows = (
        list(datasets.load_dataset("json", data_files=str(dpo_file), split="train"))
        if dpo_file.stat().st_size
        else []
    )
    assert len(rows) == result.dpo_pairs
    answers = {str(i): a for i, (_, a, _) in enumerate(CASES)}
    for row in rows:  # the DPO pairs really share their prefix, and "chosen" grades correct
        chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
        assert chosen.startswith(row["prefix"]) and rejected.startswith(row["prefix"])
        assert grade_text(chosen, "stop", answers[row["problem_id"]], "number")[0] == "correct"
        assert grade_text(rejected, "stop", answers[row["problem_id"]], "number")[0] == "wrong"
