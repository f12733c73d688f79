#!/usr/bin/env python
"""How much CPU do the judge stack's model-free layers cost? (target: 1,000 failures in at most 10 CPU-s)

The failures are real model solutions with a wrong final answer: the ProcessBench gsm8k and olympiadbench
rows whose final answer is wrong, in file order, gsm8k first (700 of them; the list is taken again from the
start until N are taken, default 1,000); the gsm8k
ones carry GSM8K's worked reference solutions (matched by problem text, read by qreason's own task loader),
the others have none, as in a run of a task without worked solutions. Each failure goes through what the
judge stage runs without a model: the rule checks, the reference locator (where a reference matched), the
stack's combined verdict (with the prior) and the abandoned-answer check. Measured: process CPU seconds of
that loop (no worker pool: the stage adds a pool start of about a second per run, not per failure), and the
same for three hostile solutions (a 45-character power tower, a 1 MB step, 10,000 nested braces), which must
each come back as judge_error records.

    .venv/bin/python bench/judge_offline.py [--n 1000] [--data-dir ../shared/data] [--json FILE] [--smoke]

--smoke: 20 failures (the numbers then mean nothing). Timings on a shared machine are noisy; CPU time is less
so than wall time, and the load average is printed with them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DATA = REPO.parent / "shared" / "data"
HOSTILE = {
    "power tower": "So the value is " + "9^" * 22 + "9 = 5.",
    "1 MB step": "3 + 4 = 7 and " * 75_000,
    "10,000 nested braces": "{" * 10_000 + "1 + 1 = 3" + "}" * 10_000,
}


def failures(data_dir: Path, n: int) -> list[dict]:
    from qreason.stages.judge.bench import load_processbench, load_references, normalise_problem

    _, refs = load_references(data_dir / "gsm8k_test.jsonl", "gsm8k")
    out = []
    for name in ("processbench_gsm8k.jsonl", "processbench_olympiadbench.jsonl"):
        for row in load_processbench(data_dir / name):
            if row.get("final_answer_correct") is False:
                out.append({**row, "reference": refs.get(normalise_problem(row["problem"]))})
    if not out:
        raise SystemExit("no failures in the ProcessBench files")
    return [out[i % len(out)] for i in range(n)]


def judge_one(row: dict) -> tuple:
    from qreason.stages.judge.reference import Reference, abandoned_answer, reference_verdict
    from qreason.stages.judge.rules import rule_verdict_call
    from qreason.stages.judge.stack import DEFAULT_PRIOR_STEP, LayerVerdict, combine

    steps = list(row["steps"])
    members = [LayerVerdict("rules", "rules", rule_verdict_call((steps, "wrong")))]
    p = row.get("reference")
    answer = p.answer if p is not None else None
    if p is not None and p.meta.get("reference_solution"):
        ref = Reference(row["problem"], answer, p.meta["reference_solution"])
        members.append(LayerVerdict("reference", "reference", reference_verdict(steps, ref, False)))
    verdict, layer, _ = combine(members, True, len(steps), DEFAULT_PRIOR_STEP)
    return verdict, layer, members, abandoned_answer(steps, answer) if answer else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--data-dir", default=str(DATA))
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    n = 20 if args.smoke else args.n
    rows = failures(Path(args.data_dir), n)
    judge_one(rows[0])  # imports and first-use work out of the clock
    load0 = os.getloadavg()[0]
    c0, t0 = time.process_time(), time.monotonic()
    results = [judge_one(r) for r in rows]
    cpu, wall = time.process_time() - c0, time.monotonic() - t0
    decided: dict[str, int] = {}
    for _, layer, _, _ in results:
        decided[layer or "none"] = decided.get(layer or "none", 0) + 1
    hostile = {}
    host = next((r for r in rows if r.get("reference") is not None), rows[0])  # both layers run on it
    for name, step in HOSTILE.items():
        c1 = time.process_time()
        verdict, layer, members, _ = judge_one({**host, "steps": ["Start.", step]})
        hostile[name] = {
            "cpu_seconds": round(time.process_time() - c1, 3),
            "layers": {m.judge: m.verdict.status for m in members},
            "error": members[0].verdict.error,
        }
    report = {
        "failures": len(rows),
        "with_reference": sum(r.get("reference") is not None for r in rows),
        "cpu_seconds": round(cpu, 3),
        "wall_seconds": round(wall, 3),
        "cpu_seconds_per_1000": round(cpu * 1000 / max(len(rows), 1), 3),
        "target_cpu_seconds_per_1000": 10,
        "decided_by": decided,
        "load_average": [round(load0, 2), round(os.getloadavg()[0], 2)],
        "hostile": hostile,
    }
    print("qreason judge stack, model-free layers")
    print(f"failures {report['failures']} ({report['with_reference']} with a worked reference)")
    print(
        f"cpu s {report['cpu_seconds']}  wall s {report['wall_seconds']}  per 1000: "
        f"{report['cpu_seconds_per_1000']} cpu s (target <= 10)"
    )
    print("decided by: " + ", ".join(f"{k} {v}" for k, v in sorted(decided.items())))
    for name, h in hostile.items():
        print(f"hostile {name}: {h['layers']} in {h['cpu_seconds']} cpu s")
    print(f"load average {report['load_average'][0]} -> {report['load_average'][1]}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    bad = [name for name, h in hostile.items() if set(h["layers"].values()) != {"judge_error"}]
    if bad:
        print(f"hostile input not refused: {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
