#!/usr/bin/env python
"""Carry a long study's generations from one machine to the next, without the dataset's text.

A study longer than a working session (configs/gsm8k-study.yaml: hours on 2 cores) is resumed on another
machine, where the run directory and the cache are gone. Re-running the config re-quantizes (expected to give
the same checkpoint fingerprints: a checkpoint that differs is generated again) and then finds every
generation whose key it already holds; grading and the model-free judge are cheap to redo. So only the
generations travel: the run's, the noise floor's and recovery's, each record without its chat messages (they
hold the problem's text, which stays in the shared data folder and is rebuilt from the config on restore,
checked against the record's prompt hash).

    .venv/bin/python bench/study_state.py save RUN_DIR STATE_DIR
    .venv/bin/python bench/study_state.py restore STATE_DIR CONFIG [--output-dir RUN_DIR]

``save`` writes STATE_DIR/{generations,noise-generations,recovery-generations}.jsonl.gz (model output only);
``restore`` appends the records the run directory does not hold yet (run it before ``qreason run CONFIG``).
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

TABLES = {
    "generations": "generations",
    "noise-generations": "noise_generations",
    "recovery-generations": "recovery_generations",
}


def save(run_dir: Path, state: Path) -> dict[str, int]:
    from qreason.store import RunStore

    store = RunStore(run_dir)
    state.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name, attr in TABLES.items():
        records = sorted(getattr(store, attr).all(), key=lambda g: g.key)
        lines = [json.dumps(g.model_dump(exclude={"messages"}), sort_keys=True) for g in records]
        with gzip.open(state / f"{name}.jsonl.gz", "wt", encoding="utf-8", compresslevel=9) as fh:
            fh.writelines(line + "\n" for line in lines)
        counts[name] = len(lines)
    return counts


def restore(state: Path, config: Path, output_dir: Path | None) -> dict[str, int]:
    from qreason.pipeline.plan import make_plan
    from qreason.records import Generation, content_key
    from qreason.store import RunStore

    plan = make_plan(config, output_dir)
    messages = {(p.task, p.problem_id): m for p, m in plan.prompts}
    store = RunStore(plan.run_dir)
    counts = {}
    for name, attr in TABLES.items():
        path = state / f"{name}.jsonl.gz"
        if not path.is_file():
            continue
        table = getattr(store, attr)
        new = []
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            for line in fh:
                row = json.loads(line)
                if row["key"] in table:
                    continue
                msgs = messages.get((row["task"], row["problem_id"]))
                if msgs is None or content_key("messages", msgs) != row["prompt_hash"]:
                    raise SystemExit(
                        f"{path}: {row['task']}/{row['problem_id']}: the config's prompt is not the one this "
                        "generation answered (another config or data file)"
                    )
                new.append(Generation.model_validate({**row, "messages": msgs}))
        counts[name] = table.append(new)
    return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("save", help="write a run directory's generations (without messages) to STATE_DIR")
    s.add_argument("run_dir", type=Path)
    s.add_argument("state", type=Path)
    r = sub.add_parser("restore", help="append STATE_DIR's generations to the config's run directory")
    r.add_argument("state", type=Path)
    r.add_argument("config", type=Path)
    r.add_argument("--output-dir", type=Path, default=None)
    args = p.parse_args(argv)
    if args.cmd == "save":
        counts = save(args.run_dir, args.state)
    else:
        counts = restore(args.state, args.config, args.output_dir)
    print(json.dumps(counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
