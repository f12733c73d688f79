"""The ``qreason`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from .errors import UserError

EPILOG = "Docs: README.md. Bad input exits with code 2 and a one-line error naming the file and line."


def _cmd_run(args) -> int:
    from .runner import run
    from .summary import format_table

    summary = run(args.config, output_dir=args.output_dir)
    gen = summary["generations"]
    print(format_table(summary["results"]))
    print(f"\ngenerations: {gen['produced']} produced, {gen['cached']} cached, {gen['failed']} failed; "
          f"wall time {summary['wall_seconds']:.1f} s")
    print(f"run directory: {summary['run_dir']}")
    if gen["failed"]:
        print(f"qreason: {gen['failed']} generations failed; re-run the same command to retry them", file=sys.stderr)
        return 1
    return 0


def _cmd_runs(args) -> int:
    from .runner import default_index
    from .store import RunIndex

    index = RunIndex(Path(args.index)) if args.index else default_index()
    rows = index.list(args.name)
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    if not rows:
        print(f"no runs recorded in {index.path}")
        return 0
    for r in rows:
        s = r["summary"] or {}
        acc = ", ".join(f"{x['variant']}/{x['task']} {100 * x['accuracy_mean']:.1f}%" for x in s.get("results", []))
        produced = s.get("generations", {}).get("produced", "-")
        print(f"{r['run_id']}  {r['status']:<11} {r['name']:<16} produced={produced!s:<5} {acc}  {r['run_dir']}")
    return 0


def _cmd_grade(args) -> int:
    from .grade import Grader, run_grading
    from .store import RunStore

    store = RunStore(Path(args.run_dir))
    if not (store.dir / "generations.jsonl").exists():
        raise UserError(str(store.dir), "not a run directory (no generations.jsonl)")
    n = run_grading(store, Grader(args.timeout, args.workers))
    print(f"{n} new grades written to {store.grades.path}")
    return 0


def _cmd_model(args) -> int:
    from .models import resolve_model

    m = resolve_model(args.model)
    print(json.dumps({"spec": m.spec, "path": m.path, "fingerprint": m.fingerprint, "source": m.source}))
    return 0


def _cmd_tasks(args) -> int:
    from .tasks import TASKS_DIR, load_spec

    for path in sorted(TASKS_DIR.glob("*.yaml")):
        if path.stem == "prompts":
            continue
        spec = load_spec(path.stem)
        print(f"{spec.name:<10} {spec.answer_type:<8} {spec.description}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qreason", description="Measure how quantization damages LLM reasoning.",
                                epilog=EPILOG)
    p.add_argument("-v", "--verbose", action="store_true", help="show library (vLLM) logs at INFO level")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = sub.add_parser("run", help="run every stage of a config (cached work is skipped)", epilog=EPILOG,
                       description="Generate, grade and summarise for a run config. Re-running the same config "
                                   "does no model work; an interrupted run resumes where it stopped.")
    r.add_argument("config", help="run config YAML (see configs/ and the README's config reference)")
    r.add_argument("--output-dir", help="run directory (default: output_dir from the config, else runs/NAME; "
                                        "QREASON_RUNS sets the runs root)")
    r.set_defaults(fn=_cmd_run)

    s = sub.add_parser("runs", help="list past runs from the run index")
    s.add_argument("--index", help="index file (default: $QREASON_INDEX or runs/index.sqlite)")
    s.add_argument("--name", help="only runs of this config name")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(fn=_cmd_runs)

    g = sub.add_parser("grade", help="grade the ungraded generations of a run directory")
    g.add_argument("run_dir")
    g.add_argument("--timeout", type=int, default=10, help="seconds per answer (default 10)")
    g.add_argument("--workers", type=int, default=2, help="grading processes (default 2)")
    g.set_defaults(fn=_cmd_grade)

    m = sub.add_parser("model", help="resolve a model (converting the embedded default once) and print its "
                                     "path and fingerprint")
    m.add_argument("model", nargs="?", default="default", help="'default', a local directory or a hub id")
    m.set_defaults(fn=_cmd_model)

    t = sub.add_parser("tasks", help="list the task specs in tasks/")
    t.set_defaults(fn=_cmd_tasks)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = "INFO" if args.verbose else "WARNING"
    os.environ.setdefault("VLLM_LOGGING_LEVEL", level)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore", "openai"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.fn(args)
    except UserError as exc:
        print(f"qreason: error: {exc}", file=sys.stderr)
        return UserError.exit_code
    except KeyboardInterrupt:
        print("qreason: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
