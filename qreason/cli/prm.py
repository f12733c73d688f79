"""``qreason calibrate-prm``: fit a PRM judge's threshold on ProcessBench-format data and write its spec. The
main CLI calls ``register(subparsers)``."""

from __future__ import annotations

import json
from pathlib import Path

from qreason import console
from qreason.errors import UserError


def register(subparsers) -> None:
    c = subparsers.add_parser(
        "calibrate-prm",
        help="fit a process-reward-model judge's threshold on ProcessBench-format data (best F1)",
        description="Score every row of ProcessBench-format JSONL (id, problem, steps, label) with a PRM "
        "judge (kind prm), pick the threshold that maximises ProcessBench's F1 on the fitted rows, and write "
        "OUT/NAME.yaml (the judge spec with that threshold), OUT/prm_scores.jsonl and OUT/calibration.json. "
        "Prints the calibration as JSON. Scores are cached in OUT/judge_cache.sqlite: a re-run (another "
        "--fit) asks the model nothing again. See docs/prm.md.",
    )
    c.add_argument("--data", required=True, metavar="FILE.jsonl", help="ProcessBench-format data")
    c.add_argument(
        "--judge",
        required=True,
        metavar="SPEC",
        help="the PRM judge: key=value pairs (kind=prm,name=..,base_url=..,model=..), JSON or a YAML file",
    )
    c.add_argument("--out", required=True, metavar="DIR", help="where the spec, scores and cache are written")
    c.add_argument(
        "--fit",
        choices=["all", "even", "odd"],
        default="all",
        help="fit on all rows (default), or on even / odd ids and report the other half as held out",
    )
    c.add_argument("--limit", type=int, metavar="N", help="only the first N rows")
    c.set_defaults(fn=cmd_calibrate_prm)


def cmd_calibrate_prm(args) -> int:
    from qreason.config.judge import parse_judge_spec
    from qreason.stages.judge.prm import run_calibration

    spec = parse_judge_spec(args.judge)
    if spec is None:
        raise UserError("--judge", "calibrate-prm needs a PRM judge spec (kind=prm), not the rule checks")
    if args.limit is not None and args.limit <= 0:
        raise UserError("--limit", "must be a positive number")
    cal = run_calibration(spec, Path(args.data), Path(args.out), args.fit, args.limit)
    print(json.dumps(cal.result, indent=2))
    for error in cal.errors:
        print(f"qreason: judge error: {error}", file=console.terminal())
    failed = cal.result.get("judge_errors", 0)
    if failed and failed >= _rows(cal.scores_path):  # every row failed: the threshold was fitted on nothing
        first = cal.errors[0] if cal.errors else "?"
        print(f"qreason: PRM scoring failed for all {failed} rows (first: {first})", file=console.terminal())
        return 1
    return 0


def _rows(path: Path) -> int:
    with open(path, encoding="utf-8") as fh:
        return sum(1 for line in fh if line.strip())
