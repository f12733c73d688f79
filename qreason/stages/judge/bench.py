"""Scoring a judge on ProcessBench-format data (Zheng et al. 2024): locate the first faulty step.

Each row has ``id``, ``problem``, ``steps`` (list of str) and ``label`` (index of the first faulty step, or -1
when every step is right). The metric is ProcessBench's: accuracy on the erroneous solutions (the predicted
index equals the label), accuracy on the correct ones (the prediction is -1), and their harmonic mean (F1). A
judge_error counts as a wrong prediction in both. We also report, for the steps a judge flags, how often the
flagged step is the labelled one (flag precision).
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from qreason.config.judge import JudgeSpec
from qreason.config.schema import RULES_JUDGE
from qreason.errors import UserError
from qreason.stages.judge.base import make_judge
from qreason.stages.judge.client import JudgeClient, ReplyCache, add_usage
from qreason.stages.judge.panel import vote
from qreason.stages.judge.prompts import JudgeInput, Verdict, load_taxonomy, load_template
from qreason.stages.judge.rules import rule_verdict
from qreason.stages.judge.stage import _run_coroutine
from qreason.store import iter_jsonl, write_atomic


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


def run_bench(
    data: Path, judges: list[JudgeSpec], out: Path, prompt_version: str = "judge-v1", limit: int | None = None
) -> dict[str, Any]:
    """Run the rule judge (no specs), one judge, or a panel (two or more) on ProcessBench data. Writes
    OUT/predictions.jsonl and OUT/metrics.json (and OUT/judge_cache.sqlite for LLM judges); returns the
    metrics."""
    t0 = time.monotonic()
    rows = load_processbench(Path(data), limit)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    requests = 0
    usage: dict[str, int] = {}
    if not judges:
        verdicts = [rule_verdict(r["steps"]) for r in rows]
        judge_name = RULES_JUDGE
    else:
        template, taxonomy = load_template(prompt_version), load_taxonomy()
        cache = ReplyCache(out / "judge_cache.sqlite")
        clients = [make_judge(spec, template, taxonomy, cache) for spec in judges]
        try:
            verdicts = _run_coroutine(_judge_rows(rows, clients))
        finally:
            requests = sum(cl.requests for cl in clients)
            cache.close()
        for v in verdicts:
            if not v.usage.get("cached"):
                add_usage(usage, v.usage)
        judge_name = judges[0].name if len(judges) == 1 else "panel(" + ",".join(j.name for j in judges) + ")"
    preds = [v.first_error_step if v.ok else None for v in verdicts]
    lines = []
    for r, v, p in zip(rows, verdicts, preds):
        lines.append(
            json.dumps(
                {
                    "id": r["id"],
                    "label": r["label"],
                    "prediction": p,
                    "status": v.status,
                    "error_type": v.error_type,
                    "sub_type": v.sub_type,
                    "capability": v.capability,
                    "rationale": v.rationale,
                    "error": v.error,
                },
                ensure_ascii=False,
            )
        )
    write_atomic(out / "predictions.jsonl", "".join(line + "\n" for line in lines))
    metrics = {
        "data": str(data),
        "judge": judge_name,
        "prompt_version": prompt_version if judges else None,
        **processbench_metrics([r["label"] for r in rows], preds),
        "judge_errors": sum(not v.ok for v in verdicts),
        "requests": requests,
        "usage": usage,
        "seconds": round(time.monotonic() - t0, 2),
        "predictions": str(out / "predictions.jsonl"),
    }
    write_atomic(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    return metrics


async def _judge_rows(rows: list[dict], clients: list[JudgeClient]) -> list[Verdict]:
    async def one(row: dict) -> Verdict:
        inp = JudgeInput(problem=row["problem"], steps=list(row["steps"]))
        got = await asyncio.gather(*(cl.judge(cl.request(inp)) for cl in clients))
        if len(clients) == 1:
            return got[0]
        panel = vote([(cl.spec.name, v) for cl, v in zip(clients, got)])
        panel.usage = {}
        for v in got:
            add_usage(panel.usage, v.usage)
        if all(v.usage.get("cached") for v in got):
            panel.usage["cached"] = 1
        return panel

    try:
        return list(await asyncio.gather(*(one(r) for r in rows)))
    finally:
        for cl in clients:
            await cl.aclose()
