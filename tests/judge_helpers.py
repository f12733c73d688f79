"""Shared helpers of the judge tests: a small run store with hand-made failures, and judge specs."""

from __future__ import annotations

from pathlib import Path

from qreason.inputs.steps import split_steps
from qreason.records import Generation, Grade, Problem, content_key
from qreason.store import RunStore, now_iso

# (problem id, question, answer, {variant: (solution text, grade status)})
# a valid judge verdict (the reply a well-behaved LLM judge sends)
GOOD = {
    "rationale": "The sum in step 1 is wrong.",
    "first_error_step": 1,
    "error_type": "Execution",
    "sub_type": "computational_error",
    "capability": "numerical_computation",
}

CASES = [
    (
        "p0",
        "Ana has 5 apples and buys 3 more. How many apples does she have?",
        "8",
        {
            "base": (
                "Step 1: Ana starts with 5 apples.\nStep 2: 5 + 3 = 8.\nThe final answer is \\boxed{8}.",
                "correct",
            ),
            "q4": (
                "Step 1: Ana starts with 5 apples.\nStep 2: 5 + 3 = 9.\nThe final answer is \\boxed{9}.",
                "wrong",
            ),
        },
    ),
    (
        "p1",
        "Ben has 4 boxes with 6 pens each. How many pens does he have?",
        "24",
        {
            "base": (
                "Step 1: Each box has 6 pens.\nStep 2: 4 + 6 = 10.\nThe final answer is \\boxed{10}.",
                "wrong",
            ),
            "q4": (
                "Step 1: Each box has 6 pens.\nStep 2: 6 - 4 = 2.\nThe final answer is \\boxed{2}.",
                "wrong",
            ),
        },
    ),
    (
        "p2",
        "A shirt costs $20 and is 10% off. What does it cost now?",
        "18",
        {
            "base": (
                "Step 1: 10% of $20 is $2.\nStep 2: $20 - $2 = $18.\nThe final answer is \\boxed{18}.",
                "correct",
            ),
            "q4": (
                "Step 1: The discount is 10% of $20.\nStep 2: The price goes up to $22.\nSo the shirt costs "
                "more now.",
                "no_answer",
            ),
        },
    ),
    (
        "p3",
        "Cy reads 12 pages a day for 3 days. How many pages does he read?",
        "36",
        {
            "base": ("Step 1: 12 * 3 = 36.\nThe final answer is \\boxed{36}.", "correct"),
            "q4": (
                "Step 1: He reads 12 pages a day.\n"
                + "Step 2: He reads 12 pages a day and then some more.\n" * 4,
                "truncated",
            ),
        },
    ),
]


def make_run(run_dir: Path, cases=CASES) -> RunStore:
    """A run store with problems, generations and grades for the cases (seed 0), and the config a run keeps
    (its base variant is ``base``)."""
    store = RunStore(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text("name: judged\nmodel: {name: base}\ntasks: [{name: synthetic}]\n")
    problems, gens, grades = [], [], []
    for pid, question, answer, by_variant in cases:
        p = Problem(
            key=content_key("problem", "toy", pid),
            task="toy",
            problem_id=pid,
            question=question,
            answer=answer,
            answer_type="number",
            meta={"reference_solution": f"The answer is {answer}."},
        )
        problems.append(p)
        for variant, (text, status) in by_variant.items():
            gkey = content_key("generation", variant, pid, text)
            gens.append(
                Generation(
                    key=gkey,
                    variant=variant,
                    model_fingerprint=variant,
                    task="toy",
                    problem_id=pid,
                    seed=0,
                    prompt_hash="h",
                    messages=[{"role": "user", "content": question}],
                    text=text,
                    steps=split_steps(text),
                    prompt_tokens=10,
                    completion_tokens=20,
                    finish_reason="length" if status == "truncated" else "stop",
                    backend="test",
                    versions={},
                    sampling={"seed": 0},
                    seconds=0.1,
                    created_at=now_iso(),
                )
            )
            grades.append(
                Grade(
                    key=content_key("grade", gkey),
                    generation_key=gkey,
                    variant=variant,
                    task="toy",
                    problem_id=pid,
                    seed=0,
                    status=status,
                    extracted=None,
                    reference=answer,
                    grader="test",
                )
            )
    store.problems.append(problems)
    store.generations.append(gens)
    store.grades.append(grades)
    return store
