"""Format failures (strict no_answer, lenient correct) are counted apart from wrong answers everywhere a run's
results are read: the summary rows, the analysis, the gates and the report."""

from run_builders import build_run

from qreason.config.schema import GatesConfig
from qreason.records import Grade
from qreason.report import build_report
from qreason.stages.analyze import analyze
from qreason.stages.gates import check_gates
from qreason.store import RunIndex
from qreason.summary import RunSummary, accuracy_table, format_table


def grade(i: int, variant: str, status: str, lenient: str | None, seed: int = 0) -> Grade:
    return Grade(
        key=f"{variant}{i}-{seed}",
        generation_key=f"g{variant}{i}-{seed}",
        variant=variant,
        task="t",
        problem_id=str(i),
        seed=seed,
        status=status,
        extracted=None,
        reference="1",
        grader="t",
        lenient_status=lenient,
    )


def test_summary_rows_split_format_failures_from_wrong_answers():
    grades = [
        grade(0, "base", "correct", "correct"),
        grade(1, "base", "wrong", "wrong"),
        grade(0, "q", "no_answer", "correct"),
        grade(1, "q", "no_answer", "correct"),
        grade(2, "q", "no_answer", "wrong"),
        grade(3, "q", "wrong", "wrong"),
        grade(4, "q", "correct", None),
    ]  # written by grader revision 1: its strict verdict stands in
    rows = {r["variant"]: r for r in accuracy_table(grades)}
    q = rows["q"]
    assert q["accuracy_mean"] == 1 / 5 and q["lenient_accuracy_mean"] == 3 / 5
    assert q["format_failures"] == 2 and q["outcomes"]["wrong"] == 1 and q["outcomes"]["no_answer"] == 3
    assert rows["base"]["format_failures"] == 0 and rows["base"]["lenient_accuracy_mean"] == 0.5
    assert "format_failures" in format_table(list(rows.values())).splitlines()[0]


def test_format_failure_gate_trips_per_cell():
    grades = [grade(i, "q", "no_answer", "correct") for i in range(3)] + [grade(9, "q", "correct", "correct")]
    summary = RunSummary(results=accuracy_table(grades + [grade(0, "base", "correct", "correct")]))
    assert (
        summary.results[1].format_failures == 3 and RunSummary.read(summary.dump()).results[1].n_grades == 4
    )
    tripped = check_gates(GatesConfig(max_format_failure_rate=0.5), summary, "base", None, [])
    assert tripped == ["q/t: 3 of 4 answers (75.0%) are format failures; the limit is 50.0%"]
    assert check_gates(GatesConfig(max_format_failure_rate=0.75), summary, "base", None, []) == []


def make_format_failures(store, variant: str, n: int) -> None:
    """Turn the first ``n`` wrong grades of ``variant`` into format failures."""
    grades = store.grades.all()
    changed = 0
    for i, g in enumerate(grades):
        if g.variant == variant and g.status == "wrong" and changed < n:
            grades[i] = g.model_copy(update={"status": "no_answer", "lenient_status": "correct"})
            changed += 1
    store.grades.path.write_text("".join(g.model_dump_json() + "\n" for g in grades))
    store.grades._rows = None  # re-read


def test_analysis_and_report_show_format_failures_per_variant(tmp_path):
    store = build_run(tmp_path)  # the quantized variant is wrong on 4 of 8
    make_format_failures(store, "rtn-w4a16", 3)
    formats = analyze(store).formats.set_index("variant")
    assert (formats.loc["rtn-w4a16", "wrong"], formats.loc["rtn-w4a16", "format_failures"]) == (1, 3)
    assert (
        formats.loc["rtn-w4a16", "lenient_accuracy"] == 7 / 8
        and formats.loc["rtn-w4a16", "accuracy"] == 4 / 8
    )
    assert formats.loc["base", "format_failures"] == 0
    assert (store.dir / "analysis" / "formats.csv").exists()
    html = build_report(store, index=RunIndex(tmp_path / "index.sqlite")).read_text()
    assert "Wrong answers and format failures" in html
    assert "3 (37.5%)" in html  # the quantized variant's format failures and their share
