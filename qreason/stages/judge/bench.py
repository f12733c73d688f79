"""Scoring the judge stack on ProcessBench-format data (Zheng et al. 2024): locate the first faulty step.

Each row has ``id``, ``problem``, ``steps`` (list of str) and ``label`` (index of the first faulty step, or -1
when every step is right); ``final_answer_correct`` is read when present. The metric is ProcessBench's:
accuracy on the erroneous solutions (the predicted index equals the label), accuracy on the correct ones (the
prediction is -1), and their harmonic mean (F1). A judge_error counts as a wrong prediction in both. We also
report exact-step accuracy on the solutions whose final answer is wrong (``wrong_answer_exact``: qreason's
case, since it judges failures) and, for the steps a judge flags, how often the flagged step is the labelled
one (flag precision).

Protocols. ``gated``: the layers know whether the final answer is right (as in a qreason run, where the
grade says so): graded here by qreason's grader (the last step, else the whole solution, against the
reference answer of the matched problem); rows with no matched reference use the row's
``final_answer_correct``; rows with neither are judged blind. ``blind``: ProcessBench's protocol; no layer
sees the answer key, the reference solution or the grade (so no reference layer and no prior). Published
critics are scored blind; a gated score is not comparable with them.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any

from qreason.config.judge import JudgeSpec
from qreason.config.schema import PANEL_JUDGE, RULES_JUDGE, JudgeConfig
from qreason.errors import UserError
from qreason.records import clean_text
from qreason.stages.judge.base import make_judge
from qreason.stages.judge.client import ReplyCache, add_usage
from qreason.stages.judge.panel import vote
from qreason.stages.judge.prompts import JudgeInput, Verdict, load_taxonomy, load_template
from qreason.stages.judge.reference import (
    REFERENCE_JUDGE,
    Reference,
    arithmetic_reference,
    reference_verdict,
)
from qreason.stages.judge.rules import rule_verdict_call
from qreason.stages.judge.stack import (
    DEFAULT_PRIOR_STEP,
    LLM,
    PRIOR,
    PRM,
    REFERENCE,
    RULES,
    LayerVerdict,
    combine,
)
from qreason.stages.judge.stage import _run_coroutine
from qreason.store import iter_jsonl, write_atomic
from qreason.store.ownership import check_user_dir, claim_user_dir

BENCH_KIND = "judge bench"  # the ownership marker's kind of a --out directory


def load_processbench(path: Path, limit: int | None = None) -> list[dict]:
    """Validated rows of a ProcessBench JSONL file; a bad row is a UserError naming file and line."""
    path = Path(path)
    rows, ids = [], set()
    for where, row in iter_jsonl(path):
        missing = [f for f in ("id", "problem", "steps", "label") if f not in row]
        if missing:
            raise UserError(
                where,
                f"missing field(s) {', '.join(missing)} (ProcessBench rows need id, problem, steps, label)",
            )
        steps, label = row["steps"], row["label"]
        if not isinstance(steps, list) or not steps or not all(isinstance(s, str) for s in steps):
            raise UserError(where, "steps must be a non-empty list of strings")
        if not isinstance(label, int) or isinstance(label, bool) or not -1 <= label < len(steps):
            raise UserError(where, f"label must be -1 or a step index 0..{len(steps) - 1}, got {label!r}")
        if not isinstance(row["problem"], str):
            raise UserError(where, "problem must be a string")
        if isinstance(row["id"], bool) or not isinstance(row["id"], (str, int)):
            raise UserError(where, f"id must be a string or an integer, got {row['id']!r}")
        row = clean_text(row)  # a lone surrogate (a valid JSON escape) cannot be written back as UTF-8
        if str(row["id"]) in ids:
            raise UserError(where, f"duplicate id {row['id']!r}")
        ids.add(str(row["id"]))
        rows.append(row)
        if limit and len(rows) >= limit:
            break
    if not rows:
        raise UserError(str(path), "no rows")
    return rows


def processbench_metrics(labels: list[int], predictions: list[int | None]) -> dict[str, Any]:
    """ProcessBench's metric for predicted first-error indices (None = no valid prediction)."""
    if len(labels) != len(predictions):
        raise ValueError("labels and predictions differ in length")
    err = [(lab, p) for lab, p in zip(labels, predictions) if lab != -1]
    cor = [(lab, p) for lab, p in zip(labels, predictions) if lab == -1]
    acc_err = sum(p == lab for lab, p in err) / len(err) if err else None
    acc_cor = sum(p == -1 for _, p in cor) / len(cor) if cor else None
    if acc_err is None or acc_cor is None:
        f1 = None
    else:
        f1 = 2 * acc_err * acc_cor / (acc_err + acc_cor) if acc_err + acc_cor else 0.0
    flagged = [(lab, p) for lab, p in zip(labels, predictions) if p is not None and p >= 0]
    return {
        "n": len(labels),
        "n_erroneous": len(err),
        "n_correct": len(cor),
        "acc_erroneous": _r(acc_err),
        "acc_correct": _r(acc_cor),
        "f1": _r(f1),
        "flagged": len(flagged),
        "flag_precision": _r(sum(p == lab for lab, p in flagged) / len(flagged)) if flagged else None,
        "no_prediction": sum(p is None for p in predictions),
    }


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def normalise_problem(text: str) -> str:
    """Problem text for matching: lower case, every run of non-alphanumeric characters one space."""
    return " ".join(re.sub(r"[\W_]+", " ", text.lower()).split())


def load_references(path: Path, task: str) -> tuple[str, dict[str, Any]]:
    """The problems of a task read from a local file (the task spec's fields, answer pattern and reference
    solution field apply), by normalised problem text; and the task's answer type."""
    from qreason.config.schema import TaskConfig
    from qreason.inputs.tasks import load_problems

    if not Path(path).is_file():
        raise UserError(str(path), "references file not found")
    spec, problems = load_problems(TaskConfig(name=task, data=str(path)), Path.cwd())
    return spec.answer_type, {normalise_problem(p.question): p for p in problems}


def wrong_answer_exact(rows: list[dict], preds: list[int | None], wrong: list[bool | None]) -> float | None:
    """Exact-step accuracy on the solutions whose final answer is wrong (ProcessBench's own flag when the row
    has it, else the gate's)."""
    picked = [
        p == r["label"]
        for r, p, w in zip(rows, preds, wrong)
        if (not r["final_answer_correct"] if isinstance(r.get("final_answer_correct"), bool) else w)
    ]
    return _r(sum(picked) / len(picked)) if picked else None


def _gate(row: dict, problem, answer_type: str) -> tuple[bool | None, str]:
    """(final answer right?, where that came from) for the gated protocol."""
    if problem is not None:
        from qreason.stages.grade import grade_answer

        for text in (row["steps"][-1], "\n\n".join(row["steps"])):
            try:
                status = grade_answer(text, None, problem.answer, answer_type).lenient_status
            except BaseException as exc:  # noqa: BLE001 - Math-Verify's timeout is a BaseException
                if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                    raise
                break
            if status in ("correct", "wrong"):
                return status == "correct", "graded"
    if isinstance(row.get("final_answer_correct"), bool):
        return row["final_answer_correct"], "row"
    return None, "unknown"


def _solution(problem) -> str | None:
    solution = problem.meta.get("reference_solution") if problem is not None else None
    if problem is not None and not solution and isinstance(problem.meta.get("reference_steps"), list):
        solution = "\n".join(map(str, problem.meta["reference_steps"]))
    return solution


def _offline_layers(problem, layers: list[str], protocol: str) -> list[tuple[str, str]]:
    """The model-free layers (layer, judge name) that judge a row."""
    out = [(RULES, RULES_JUDGE)] if RULES in layers else []
    if REFERENCE in layers and protocol == "gated" and arithmetic_reference(_solution(problem)):
        out.append((REFERENCE, REFERENCE_JUDGE))
    return out


def _offline(args: tuple) -> list[LayerVerdict]:
    """The model-free layers' verdicts on one row (run in a worker process, under a time limit)."""
    row, problem, correct, layers, protocol = args
    out = []
    for layer, judge in _offline_layers(problem, layers, protocol):
        if layer == RULES:
            out.append(LayerVerdict(RULES, RULES_JUDGE, rule_verdict_call((list(row["steps"]), None))))
        else:
            ref = Reference(row["problem"], problem.answer, _solution(problem))
            out.append(LayerVerdict(layer, judge, reference_verdict(list(row["steps"]), ref, correct)))
    return out


def _offline_all(jobs: list[tuple], timeout_s: float) -> list[list[LayerVerdict]]:
    """``_offline`` for every row, each under a wall-clock limit as in a run (``judge.rules_timeout_s``): a
    row past it gets a judge_error from each of its layers."""
    from qreason.pool import bounded_calls

    out: list[list[LayerVerdict]] = [[] for _ in jobs]
    workers = min(2, max(len(jobs), 1))
    for i, ok, result in bounded_calls(_offline, list(enumerate(jobs)), timeout_s, workers):
        if not ok:
            _, problem, _, layers, protocol = jobs[i]
            error = Verdict(status="judge_error", error=f"model-free layers {result}")
            result = [
                LayerVerdict(layer, judge, error)
                for layer, judge in _offline_layers(problem, layers, protocol)
            ]
        out[i] = result
    return out


def positional_baselines(rows: list[dict], gate: list[bool | None], steps: range = range(8)) -> dict:
    """F1 of fixed guesses: step k for every solution not known to be right (-1 for those known right), for
    each k; the best k (an optimistic baseline: chosen on the data it is scored on)."""
    labels = [r["label"] for r in rows]
    by_k = {}
    for k in steps:
        preds = [-1 if g else min(k, len(r["steps"]) - 1) for r, g in zip(rows, gate)]
        by_k[k] = {
            **_core(processbench_metrics(labels, preds)),
            "wrong_answer_exact": wrong_answer_exact(rows, preds, [g is False for g in gate]),
        }
    best = max(by_k, key=lambda k: by_k[k]["f1"] or 0.0)
    return {"positional": {"step": best, **by_k[best]}, "by_step": {str(k): v["f1"] for k, v in by_k.items()}}


def _core(m: dict) -> dict:
    return {k: m[k] for k in ("f1", "acc_erroneous", "acc_correct", "n", "no_prediction")}


def run_bench(
    data: Path,
    judges: list[JudgeSpec],
    out: Path | None = None,
    prompt_version: str = "judge-v1",
    limit: int | None = None,
    *,
    offline: bool = False,
    references: Path | None = None,
    task: str | None = None,
    protocol: str = "gated",
    prior_step: int | None = DEFAULT_PRIOR_STEP,
    rules_timeout_s: float = JudgeConfig().rules_timeout_s,
    force: bool = False,
) -> dict[str, Any]:
    """Score the judge stack on ProcessBench data: the rule checks always; with ``offline`` every model-free
    layer (reference locator where a reference matched, the prior); the judge specs as prm layers (kind
    "prm") and an llm layer (one judge, or the panel of two or more). Returns the stack's metrics with
    ``layers`` (each layer's own) and ``baselines``; with ``out``, writes OUT/predictions.jsonl and
    OUT/metrics.json (and the reply cache of model judges): a non-empty ``out`` that judge-bench did not
    write is refused before any work, unless ``force``. ``rules_timeout_s``: the wall-clock limit of the
    model-free layers per row."""
    t0, c0 = time.monotonic(), time.process_time()
    if protocol not in ("gated", "blind"):
        raise UserError("--protocol", f"must be gated or blind, got {protocol!r}")
    if (references is None) != (task is None):
        raise UserError("--references", "--references and --task go together")
    mark = check_user_dir(Path(out), BENCH_KIND, force) if out is not None else False
    rows = load_processbench(Path(data), limit)
    answer_type, refs = load_references(Path(references), task) if references else ("number", {})
    matched = [refs.get(normalise_problem(r["problem"])) for r in rows]
    layers = [RULES] + ([REFERENCE, PRIOR] if offline else [])
    gate: list[bool | None] = []
    sources: Counter = Counter()
    for row, problem in zip(rows, matched):
        g, src = _gate(row, problem, answer_type) if protocol == "gated" else (None, "blind")
        gate.append(g)
        sources[src] += 1
    members = _offline_all(
        [(r, p, g, layers, protocol) for r, p, g in zip(rows, matched, gate)], rules_timeout_s
    )
    if out is not None and mark:  # checked above; marked before anything is written into it
        claim_user_dir(Path(out), BENCH_KIND, "judge-bench")
    elif out is not None:  # --force among someone else's files: written, not marked
        Path(out).mkdir(parents=True, exist_ok=True)

    prm_specs = [s for s in judges if s.kind == "prm"]
    llm_specs = [s for s in judges if s.kind != "prm"]
    requests, usage = 0, {}
    if judges:
        if out is None:
            raise UserError("judge-bench", "--out is needed with model judges (it holds their reply cache)")
        template, taxonomy = load_template(prompt_version), load_taxonomy()
        cache = ReplyCache(Path(out) / "judge_cache.sqlite")
        clients = [make_judge(spec, template, taxonomy, cache) for spec in judges]
        inputs = [
            JudgeInput(
                problem=r["problem"],
                steps=list(r["steps"]),
                reference_answer=p.answer if (p is not None and protocol == "gated") else None,
                reference_solution=(
                    p.meta.get("reference_solution") if (p is not None and protocol == "gated") else None
                ),
            )
            for r, p in zip(rows, matched)
        ]
        try:
            got = _run_coroutine(_judge_rows(inputs, clients))
        finally:
            requests = sum(cl.requests for cl in clients)
            cache.close()
        for verdicts in got:
            for v in verdicts:
                if not v.usage.get("cached"):
                    add_usage(usage, v.usage)
        for mine, verdicts in zip(members, got):
            by = dict(zip([s.name for s in judges], verdicts))
            mine += [LayerVerdict(PRM, s.name, by[s.name]) for s in prm_specs]
            if len(llm_specs) == 1:
                mine.append(LayerVerdict(LLM, llm_specs[0].name, by[llm_specs[0].name]))
            elif len(llm_specs) >= 2:
                mine.append(LayerVerdict(LLM, PANEL_JUDGE, vote([(s.name, by[s.name]) for s in llm_specs])))

    prior = prior_step if PRIOR in layers and protocol == "gated" else None
    stacked = [
        combine(m, None if g is None else not g, len(r["steps"]), prior)
        for m, g, r in zip(members, gate, rows)
    ]
    labels = [r["label"] for r in rows]
    wrong = [g is False for g in gate]
    preds = [v.first_error_step if v.ok else None for v, _, _ in stacked]
    names = [m.judge for m in members[0]] if members else []
    for m in members[1:]:
        names += [x.judge for x in m if x.judge not in names]
    per_layer = {}
    for name in names:
        lp = []
        for m in members:
            v = next((x.verdict for x in m if x.judge == name), None)
            lp.append(v.first_error_step if v is not None and v.ok else None)
        per_layer[name] = {
            **processbench_metrics(labels, lp),
            "wrong_answer_exact": wrong_answer_exact(rows, lp, wrong),
            "layer": next(x.layer for m in members for x in m if x.judge == name),
        }
    metrics = {
        "data": str(data),
        "protocol": protocol,
        "judge": "offline" if offline else ("rules" if not judges else ",".join(s.name for s in judges)),
        "prompt_version": prompt_version if judges else None,
        **processbench_metrics(labels, preds),
        "wrong_answer_exact": wrong_answer_exact(rows, preds, wrong),
        "decided_by": dict(Counter(layer or "none" for _, layer, _ in stacked)),
        "layers": per_layer,
        "baselines": positional_baselines(rows, gate),
        "references": {"file": str(references), "task": task, "matched": sum(p is not None for p in matched)}
        if references
        else None,
        "gate": dict(sources),
        "judge_errors": sum(not v.ok for v, _, _ in stacked),
        "requests": requests,
        "usage": usage,
        "seconds": round(time.monotonic() - t0, 2),
        "cpu_seconds": round(time.process_time() - c0, 2),
    }
    if out is not None:
        out = Path(out)
        lines = []
        for r, (v, layer, judge), m, g in zip(rows, stacked, members, gate):
            rec = {
                "id": r["id"],
                "label": r["label"],
                "prediction": v.first_error_step if v.ok else None,
                "decided_by": layer,
                "judge": judge,
                "final_answer_correct": g,
                "status": v.status,
                "error_type": v.error_type,
                "sub_type": v.sub_type,
                "capability": v.capability,
                "rationale": v.rationale,
                "error": v.error,
                "layers": {x.judge: x.verdict.first_error_step if x.verdict.ok else None for x in m},
            }
            lines.append(json.dumps(rec, ensure_ascii=False))
        write_atomic(out / "predictions.jsonl", "".join(line + "\n" for line in lines))
        metrics["predictions"] = str(out / "predictions.jsonl")
        write_atomic(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    return metrics


async def _judge_rows(inputs: list[JudgeInput], clients: list) -> list[list[Verdict]]:
    async def one(inp: JudgeInput) -> list[Verdict]:
        got = await asyncio.gather(*(cl.judge(cl.request(inp)) for cl in clients), return_exceptions=True)
        return [
            v
            if isinstance(v, Verdict)
            else Verdict(status="judge_error", error=f"judge failed: {type(v).__name__}" if v else "no reply")
            for v in got
        ]

    try:
        return list(await asyncio.gather(*(one(i) for i in inputs)))
    finally:
        for cl in clients:
            await cl.aclose()
