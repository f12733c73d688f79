#!/usr/bin/env python
"""Does qreason's grader agree with people? Checked against answer-correctness labels that people gave real
model solutions, and against solutions whose answers are known to be right.

1. ProcessBench gsm8k (400 solutions by 8 models, each labelled ``final_answer_correct``), joined with the
   GSM8K reference answers by question text. Printed: agreement, precision and recall of ``lenient_status ==
   correct`` and of ``status == correct`` against the label, and every disagreement. Target: lenient agreement
   >= 0.98.
2. MATH-style LaTeX answers, where no labelled set with references is at hand:
   - MATH-500: each reference solution (written by people, it boxes the right answer) graded against the
     dataset's answer: strict recall, which should be 1.0;
   - ProcessBench olympiadbench (no references): the share of solutions people marked correct from which the
     strict rules extract an answer at all (an upper bound on strict recall), and, per problem, whether the
     other solutions marked correct grade correct against the first one's extracted answer (answers written in
     different forms must compare equal).

The data is read from ../shared/data (or --data-dir); see its README. Nothing is written unless --json is
given.

    .venv/bin/python bench/grading_fidelity.py [--data-dir DIR] [--workers 2] [--json OUT.json]
                                               [--limit N] [--smoke]

--limit N grades only the first N rows of each set (of olympiadbench: the solutions of its first N problems);
--smoke is --limit 8, a quick check that the script runs.

It runs against whichever qreason is first on the path: with an older one that has only the strict verdict
(``grade_text``), the lenient columns repeat the strict ones, which gives the "before" numbers:

    PYTHONPATH=/path/to/old/checkout .venv/bin/python bench/grading_fidelity.py
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data"


def grade_one(args: tuple) -> tuple:
    """(status, extracted, detail, lenient_status, lenient_extracted) with an older qreason (strict only)."""
    import qreason.stages.grade.grader as g

    status, extracted, detail = g._worker(args)[:3]
    return status, extracted, detail, status, extracted


def grade_all(jobs: list[tuple], workers: int) -> list[tuple]:
    """Grade in qreason's own worker pool (per-answer time limits, as ``qreason grade-file`` does)."""
    import qreason.stages.grade.grader as g

    if not hasattr(g.Grader, "run"):  # an older qreason: a plain pool of its worker function
        with mp.get_context("spawn").Pool(workers) as pool:
            return pool.map(grade_one, jobs, chunksize=8)
    results: list[tuple] = [()] * len(jobs)
    for i, result in g.Grader(timeout_s=10, workers=workers).run(jobs):
        results[i] = result if len(result) > 3 else (*result, result[0], result[1])
    return results


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def solution_text(row: dict) -> str:
    return "\n\n".join(row["steps"])


def processbench_gsm8k(data: Path) -> list[dict]:
    """ProcessBench gsm8k rows with the GSM8K reference answer of the same question."""
    refs = {}
    for name in ("gsm8k_test.jsonl", "gsm8k_train.jsonl"):
        for r in read_jsonl(data / name):
            refs.setdefault(
                " ".join(r["question"].split()), r["answer"].split("####")[-1].strip().replace(",", "")
            )
    rows = []
    for r in read_jsonl(data / "processbench_gsm8k.jsonl"):
        ref = refs.get(" ".join(r["problem"].split()))
        if ref is None:
            print(f"  (no GSM8K reference for {r['id']}; left out)", file=sys.stderr)
            continue
        rows.append(
            {
                "id": r["id"],
                "generator": r["generator"],
                "text": solution_text(r),
                "reference": ref,
                "label": bool(r["final_answer_correct"]),
            }
        )
    return rows


def agreement(labels: list[bool], predicted: list[bool]) -> dict:
    tp = sum(p and y for p, y in zip(predicted, labels))
    fp = sum(p and not y for p, y in zip(predicted, labels))
    fn = sum(y and not p for p, y in zip(predicted, labels))
    n = len(labels)
    return {
        "n": n,
        "agreement": sum(p == y for p, y in zip(predicted, labels)) / n if n else float("nan"),
        "precision": tp / (tp + fp) if tp + fp else float("nan"),
        "recall": tp / (tp + fn) if tp + fn else float("nan"),
        "false_pos": fp,
        "false_neg": fn,
    }


def gsm8k_section(data: Path, workers: int, limit: int | None = None) -> dict:
    rows = processbench_gsm8k(data)[:limit]
    results = grade_all([(r["text"], "stop", r["reference"], "number", 10) for r in rows], workers)
    labels = [r["label"] for r in rows]
    out = {
        "strict": agreement(labels, [x[0] == "correct" for x in results]),
        "lenient": agreement(labels, [x[3] == "correct" for x in results]),
        "format_failures": sum(x[0] == "no_answer" and x[3] == "correct" for x in results),
        "disagreements": [],
    }
    for r, x in zip(rows, results):
        if (x[3] == "correct") != r["label"]:
            out["disagreements"].append(
                {
                    "id": r["id"],
                    "generator": r["generator"],
                    "label": r["label"],
                    "status": x[0],
                    "lenient_status": x[3],
                    "extracted": x[1] or x[4],
                    "reference": r["reference"],
                    "ending": r["text"][-160:],
                }
            )
    return out


def math500_section(data: Path, workers: int, limit: int | None = None) -> dict:
    rows = read_jsonl(data / "math500.jsonl")[:limit]
    results = grade_all([(r["solution"], "stop", r["answer"], "latex", 10) for r in rows], workers)
    misses = [
        {"id": r["unique_id"], "answer": r["answer"], "status": x[0], "extracted": x[1]}
        for r, x in zip(rows, results)
        if x[0] != "correct"
    ]
    return {"n": len(rows), "strict_recall": 1 - len(misses) / len(rows), "misses": misses}


def olympiad_section(data: Path, workers: int, limit: int | None = None) -> dict:
    rows = [r for r in read_jsonl(data / "processbench_olympiadbench.jsonl") if r["final_answer_correct"]]
    if limit is not None:  # the solutions of the first ``limit`` problems, so that same-problem pairs remain
        keep = set(list(dict.fromkeys(r["problem"] for r in rows))[:limit])
        rows = [r for r in rows if r["problem"] in keep]
    # first pass: what each solution marked correct states (graded against a placeholder reference)
    first = grade_all([(solution_text(r), "stop", "0", "latex", 10) for r in rows], workers)
    found = [x[0] != "no_answer" for x in first]
    by_problem = defaultdict(list)
    for r, x in zip(rows, first):
        by_problem[r["problem"]].append((r, x[1]))
    pairs = []
    for group in by_problem.values():
        anchor = group[0][1]
        if anchor is None:
            continue
        pairs += [(r, anchor) for r, _ in group[1:]]
    second = grade_all([(solution_text(r), "stop", anchor, "latex", 10) for r, anchor in pairs], workers)
    return {
        "n_marked_correct": len(rows),
        "strict_answer_found": sum(found) / len(rows),
        "no_strict_answer": [r["id"] for r, ok in zip(rows, found) if not ok],
        "pairs": len(pairs),
        "pairs_equal": sum(x[0] == "correct" for x in second) / max(len(pairs), 1),
        "pairs_differing": [
            {"id": r["id"], "anchor": a, "status": x[0], "extracted": x[1]}
            for (r, a), x in zip(pairs, second)
            if x[0] != "correct"
        ],
    }


def show(title: str, m: dict) -> None:
    print(
        f"  {title:<8} agreement {m['agreement']:.4f}  precision {m['precision']:.4f}  recall "
        f"{m['recall']:.4f}"
        f"  (false positives {m['false_pos']}, false negatives {m['false_neg']}, n={m['n']})"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--skip-math", action="store_true", help="only ProcessBench gsm8k")
    ap.add_argument("--json", type=Path, help="also write every number and disagreement here")
    ap.add_argument("--limit", type=int, help="grade only the first N rows of each set")
    ap.add_argument("--smoke", action="store_true", help="--limit 8: check that the script runs, quickly")
    args = ap.parse_args(argv)
    if args.smoke:
        args.limit = 8
    import qreason.stages.grade.grader as g

    t0 = time.monotonic()
    grader = g.grader_id() + ("" if hasattr(g, "grade_answer") else " (strict verdict only)")
    print(f"grader {grader}; data {args.data_dir}")
    report = {"grader": grader, "gsm8k": gsm8k_section(args.data_dir, args.workers, args.limit)}
    gsm = report["gsm8k"]
    print(f"\nProcessBench gsm8k vs final_answer_correct ({gsm['format_failures']} format failures):")
    show("lenient", gsm["lenient"])
    show("strict", gsm["strict"])
    print(f"\n  {len(gsm['disagreements'])} disagreements of the lenient verdict:")
    for d in gsm["disagreements"]:
        print(
            f"  {d['id']:<11} label={'correct' if d['label'] else 'wrong':<7} strict={d['status']:<9} "
            f"lenient={d['lenient_status']:<9} extracted={d['extracted']!s:<12} "
            f"reference={d['reference']:<8} "
            f"… {d['ending'][-90:]!r}"
        )
    if not args.skip_math:
        m5 = report["math500"] = math500_section(args.data_dir, args.workers, args.limit)
        print(
            f"\nMATH-500 reference solutions vs their answers: strict recall {m5['strict_recall']:.4f} "
            f"(n={m5['n']})"
        )
        for miss in m5["misses"]:
            print(f"  {miss['id']}: answer {miss['answer']!r} -> {miss['status']} ({miss['extracted']!r})")
        ob = report["olympiadbench"] = olympiad_section(args.data_dir, args.workers, args.limit)
        print(
            f"\nProcessBench olympiadbench, {ob['n_marked_correct']} solutions marked correct: strict answer "
            "found "
            f"in {ob['strict_answer_found']:.4f}; {ob['pairs']} same-problem pairs agree in "
            f"{ob['pairs_equal']:.4f}"
        )
        print(f"  no strict answer: {', '.join(ob['no_strict_answer'])}")
        for d in ob["pairs_differing"]:
            print(f"  {d['id']}: {d['extracted']!r} vs {d['anchor']!r} -> {d['status']}")
    print(f"\n{time.monotonic() - t0:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, ensure_ascii=False), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.path.append(str(ROOT))  # a qreason on PYTHONPATH (an older checkout) comes first
    sys.exit(main())
