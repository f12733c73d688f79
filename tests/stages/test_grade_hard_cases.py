"""Hand-written hard cases for answer extraction, each with the strict and the lenient verdict a person
expects, and the ``qreason grade-file`` command end to end."""

import json

import pytest

from qreason.cli import main
from qreason.stages.grade import grade_answer

# (solution text, reference, answer type, strict status, lenient status)
CASES = [
    # a box, then "####" with LaTeX that has no $...$: the box is read, not the "6" of "6+9i"
    ("Multiplying out, $z = \\boxed{6+9i}$. #### 6+9i", "6+9i", "latex", "correct", "correct"),
    (
        "In polar form: $\\boxed{\\left(3, \\frac{\\pi}{2}\\right)}$. #### \\left(3, \\frac{\\pi}{2}\\right)",
        "\\left( 3, \\frac{\\pi}{2} \\right)",
        "latex",
        "correct",
        "correct",
    ),
    ("Collecting terms gives the polynomial.\n#### 15x-80", "15x-80", "latex", "correct", "correct"),
    (
        "The diagonal has length 11 times root two.\nThe answer is 11\\sqrt{2}",
        "11\\sqrt2",
        "latex",
        "correct",
        "correct",
    ),
    # complex numbers in another order, intervals and tuples
    ("Hence $w = \\boxed{-2 - 3i}$.", "-3i-2", "latex", "correct", "correct"),
    ("So the solution set is $\\boxed{(-\\infty, 3]}$.", "(-\\infty,3]", "latex", "correct", "correct"),
    ("So the solution set is $\\boxed{(-\\infty, 3]}$.", "(-\\infty,3)", "latex", "wrong", "wrong"),
    ("The intersection point is $\\boxed{(1, -2)}$.", "(1,-2)", "latex", "correct", "correct"),
    # units, words and currency inside the box
    ("The side is $\\boxed{12 \\text{ cm}}$.", "12", "number", "correct", "correct"),
    ("She picked \\boxed{12 tomatoes} in total.", "12", "number", "correct", "correct"),
    ("The bill comes to \\boxed{\\$1,250.50}.", "1250.5", "number", "correct", "correct"),
    ("Left over: \\boxed{\\15}", "15", "number", "correct", "correct"),  # a mangled "\$15"
    ("She has \\boxed{4 red cards and 6 blue cards}.", "10", "number", "no_answer", "wrong"),
    # percentages
    ("The discount is \\boxed{25\\%}.", "25", "number", "correct", "correct"),
    ("The growth rate is $\\boxed{17.5}$ percent.", "17.5\\%", "latex", "correct", "correct"),
    # markdown
    ("**Final answer:** **\\boxed{42}**", "42", "number", "correct", "correct"),
    ("**Answer:** 42 marbles", "42", "number", "correct", "correct"),
    # several boxes: the last answer counts; boxes joined by "and" are one answer
    (
        "A first guess was \\boxed{3}, but 3 fails the check.\nRedoing it, the count is \\boxed{5}.",
        "5",
        "number",
        "correct",
        "correct",
    ),
    ("Solving the system, $x = \\boxed{2}$ and $y = \\boxed{3}$.", "2, 3", "latex", "correct", "correct"),
    # thousands separators, negative numbers, a Unicode minus
    ("Adding the three prizes, the final answer is 1,234,567.", "1234567", "number", "correct", "correct"),
    ("The temperature dropped to \\boxed{-7} degrees.", "-7", "number", "correct", "correct"),
    ("The temperature dropped to \\boxed{-7} degrees.", "7", "number", "wrong", "wrong"),
    ("The balance ends at \\boxed{−4}.", "-4", "number", "correct", "correct"),
    # fractions against decimals, and a rounding that is not the same number
    ("The share is \\boxed{\\frac{3}{4}}.", "0.75", "number", "correct", "correct"),
    ("The share is \\boxed{0.75}.", "\\frac34", "latex", "correct", "correct"),
    ("The probability is \\boxed{0.33}.", "\\frac{1}{3}", "latex", "wrong", "wrong"),
    ("Final Answer: \\frac{7}{2}", "3.5", "number", "correct", "correct"),
    # the marker's text is LaTeX without delimiters; a box that does not parse gives way to the next marker
    ("The answer is: \\dfrac{5}{8}", "\\frac{5}{8}", "latex", "correct", "correct"),
    ("\\boxed{???}\nOn reflection the count is right.\n#### 12", "12", "number", "correct", "correct"),
    ("$\\boxed{x = 5}$", "5", "number", "correct", "correct"),
    ("Therefore $\\theta = \\boxed{30^\\circ}$.", "30", "latex", "correct", "correct"),
    (
        "\\[\\boxed{\\begin{pmatrix} 1 \\\\ -2 \\end{pmatrix}}\\]",
        "\\begin{pmatrix}1\\\\-2\\end{pmatrix}",
        "latex",
        "correct",
        "correct",
    ),
    ("The meeting falls on \\boxed{\\text{Tuesday}}.", "\\text{Tuesday}", "latex", "correct", "correct"),
    ("The meeting falls on \\boxed{\\text{Monday}}.", "\\text{Tuesday}", "latex", "wrong", "wrong"),
    ("\\boxed{025}", "25", "integer", "correct", "correct"),
    ("The total price is $\\$1,200$, so the answer is $\\$1,200$.", "1200", "number", "correct", "correct"),
    # a closing sentence that states the value after "is" is an explicit answer
    ("We solve 2x = 14.\nTherefore, the value of \\(x\\) is \\(7\\).", "7", "latex", "correct", "correct"),
    ("Each side is 12, so the area is \\(144\\) square units.", "144", "number", "correct", "correct"),
    # no marker at all: strictly no answer; a reader still finds the result -> a format failure
    (
        "She started with $40 and paid $25 for the bills.\nAfter paying the bills, Mia still has $15 left.",
        "15",
        "number",
        "no_answer",
        "correct",
    ),
    (
        "Each of the 12 rows holds 20 plants.\nTherefore, the garden has a total of 240 flowers.",
        "240",
        "number",
        "no_answer",
        "correct",
    ),
    ("She pays $5 and gets $3 back, so she spent 2 dollars.", "2", "number", "no_answer", "correct"),
    (
        "Each tray holds 6 muffins, so the baker fills 9 trays in 3 hours.",
        "9",
        "number",
        "no_answer",
        "wrong",
    ),
    # a number quoted in the reasoning is never the answer
    (
        "We have 5 apples and buy 3 more, giving 8 apples.\nSo she ends up with 8 apples in the basket.",
        "5",
        "number",
        "no_answer",
        "wrong",
    ),
    ("Step 1: 5 + 5 = 10.\nThe final answer is \\boxed{10}.", "5", "number", "wrong", "wrong"),
    (
        "To answer this, recall that 12 eggs fill a carton.\nSo two cartons hold 24 eggs in all.",
        "12",
        "number",
        "no_answer",
        "wrong",
    ),
    ("I am not able to work this out.", "3", "number", "no_answer", "no_answer"),
]


@pytest.mark.parametrize("text, reference, answer_type, strict, lenient", CASES)
def test_tricky_case(text, reference, answer_type, strict, lenient):
    verdict = grade_answer(text, "stop", reference, answer_type)
    assert (verdict.status, verdict.lenient_status) == (strict, lenient), verdict


def test_truncated_solutions_stay_truncated_in_both_verdicts():
    verdict = grade_answer("Step 1: 3 + 4 = 7.\nSo the total is \\boxed{7", "length", "7", "number")
    assert (verdict.status, verdict.lenient_status) == ("truncated", "truncated")


def test_the_extracted_answer_is_the_one_compared():
    verdict = grade_answer("$\\boxed{6+9i}$. #### 6+9i", "stop", "6+9i", "latex")
    assert verdict.extracted == "6+9i"
    loose = grade_answer("So it took Ana 45 minutes in all.", "stop", "45", "number")
    assert (loose.extracted, loose.lenient_extracted) == (None, "45")


@pytest.mark.parametrize(
    "text",
    [
        "\\boxed{" * 20000,  # thousands of unclosed braces
        "\\boxed{" * 5000 + "}" * 5000,  # deeply nested boxes
        "The answer is " * 20000,  # a phrase repeated without an answer
        "$$ x " * 20000 + "\\(" * 20000,  # unclosed math delimiters
    ],
)
def test_hostile_text_is_graded_quickly(text):
    import time

    t0 = time.process_time()
    verdict = grade_answer(text, "stop", "5", "latex")
    assert verdict.status in ("no_answer", "wrong") and time.process_time() - t0 < 5


def write_jsonl(path, rows):
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8"
    )


def test_grade_file_adds_both_verdicts_and_prints_counts(tmp_path, capsys):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    rows = [
        {"id": 1, "resp": "So \\boxed{12}.", "gold": "12", "keep": [1, 2]},
        {"id": 2, "resp": "So \\boxed{13}.", "gold": 12},
        {"id": 3, "resp": "So, in the end, Sam has 12 marbles left.", "gold": "12"},
    ]
    write_jsonl(src, rows)
    code = main(
        [
            "grade-file",
            str(src),
            "--response-field",
            "resp",
            "--reference-field",
            "gold",
            "--answer-type",
            "number",
            "--out",
            str(out),
            "--workers",
            "1",
        ]
    )
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["rows"] == 3 and summary["format_failures"] == 1
    assert summary["status"] == {"correct": 1, "wrong": 1, "no_answer": 1, "truncated": 0, "grader_error": 0}
    assert summary["lenient_status"]["correct"] == 2
    graded = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [g["id"] for g in graded] == [1, 2, 3] and graded[0]["keep"] == [1, 2]  # input order, fields kept
    assert [(g["status"], g["lenient_status"], g["extracted"]) for g in graded] == [
        ("correct", "correct", "12"),
        ("wrong", "wrong", "13"),
        ("no_answer", "correct", None),
    ]


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ("{not json", "invalid JSON"),
        (json.dumps({"resp": "\\boxed{1}"}), "missing field 'gold'"),
        (json.dumps({"resp": ["\\boxed{1}"], "gold": "1"}), "field 'resp' must be a string"),
        (
            json.dumps({"resp": "\\boxed{1}", "gold": None}),
            "field 'gold' must be a non-empty string or number",
        ),
        (json.dumps([1, 2]), "must be a JSON object"),
    ],
)
def test_grade_file_bad_row_names_the_line_and_writes_nothing(tmp_path, capsys, bad_line, message):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(src, [{"resp": "\\boxed{1}", "gold": "1"}, "", bad_line])
    code = main(
        [
            "grade-file",
            str(src),
            "--response-field",
            "resp",
            "--reference-field",
            "gold",
            "--answer-type",
            "number",
            "--out",
            str(out),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert f"{src}:3" in err and message in err
    assert not out.exists() and list(tmp_path.iterdir()) == [src]


def test_grade_file_refuses_to_overwrite_its_input(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    write_jsonl(src, [{"resp": "\\boxed{1}", "gold": "1"}])
    before = src.read_text(encoding="utf-8")
    code = main(
        [
            "grade-file",
            str(src),
            "--response-field",
            "resp",
            "--reference-field",
            "gold",
            "--answer-type",
            "number",
            "--out",
            str(src),
        ]
    )
    assert code == 2 and "overwrite the input" in capsys.readouterr().err
    assert src.read_text(encoding="utf-8") == before
