"""Time the recover stage on a run directory (default: the demo's, runs/demo): training and re-evaluation per
variant and arm, with examples/s and generations/s.

    python bench/recovery.py                 # runs/demo (run `make demo` first)
    python bench/recovery.py RUN_DIR --fresh # retrain and re-generate into a copy of RUN_DIR (a temporary
    dir)

Without --fresh the numbers come from RUN_DIR/recovery/summary.json (what the last real run measured: a reused
adapter keeps the training time of the run that trained it). With --fresh the stage runs again from scratch
on a copy, its cache directory (dense copies, merged checkpoints) in a temporary directory too, so every step
is paid: worker start-up, dense copy, training, merging, engine start-up, generation and grading. Needs
.venv-train (scripts/setup-train-env.sh).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path


def rows(summary: dict, epochs: int) -> list[dict]:
    """One row per evaluated adapter: training time and examples/s (examples x epochs / training time),
    re-evaluation time and generations/s (of the generations this invocation produced)."""
    out = []
    for v in summary.get("variants", []):
        for arm in [v] + [a for a in (v.get("control"), v.get("fp_arm")) if a]:
            train_s, eval_s, produced = arm["train_seconds"], arm["eval_seconds"], arm["generations_produced"]
            out.append(
                {
                    "variant": arm["eval_variant"],
                    "examples": arm["train_items"],
                    "steps": sum(len(c) for c in arm.get("loss", {}).values()),
                    "train_s": train_s,
                    "examples_per_s": arm["train_items"] * epochs / train_s if train_s else None,
                    "eval_s": eval_s,
                    "produced": produced,
                    "gen_per_s": produced / eval_s if produced and eval_s else None,
                }
            )
    return out


def show(table: list[dict]) -> None:
    def fmt(x):
        return "-" if x is None else f"{x:.2f}" if isinstance(x, float) else str(x)

    head = list(table[0]) if table else []
    widths = [max(len(h), *(len(fmt(r[h])) for r in table)) for h in head]
    print("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    for r in table:
        print("  ".join(fmt(r[h]).ljust(w) for h, w in zip(head, widths)))


def _sha(path: Path) -> str | None:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def determinism(fresh: dict, run_dir: Path) -> None:
    """Seeded training on the same data: the retrained adapter against the run's (same content key, same
    directory name), byte for byte, and the accuracy after."""
    old = (
        json.loads((run_dir / "recovery" / "summary.json").read_text())
        if (run_dir / "recovery" / "summary.json").is_file()
        else {"variants": []}
    )
    before = {
        a["eval_variant"]: a
        for v in old["variants"]
        for a in [v] + ([v["control"]] if v.get("control") else [])
    }
    for v in fresh["variants"]:
        for arm in [v] + [a for a in (v.get("control"), v.get("fp_arm")) if a]:
            prev = before.get(arm["eval_variant"])
            if prev is None:
                continue
            a = _sha(Path(arm["adapter"]) / "adapter_model.safetensors")
            b = _sha(
                run_dir / "recovery" / "adapters" / Path(arm["adapter"]).name / "adapter_model.safetensors"
            )
            print(
                f"{arm['eval_variant']}: adapter {'identical to' if a and a == b else 'DIFFERENT from'} the "
                "run's; "
                f"accuracy after {100 * arm['accuracy_after']:.1f}% (run: "
                f"{100 * prev['accuracy_after']:.1f}%)"
            )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", nargs="?", default="runs/demo")
    ap.add_argument("--fresh", action="store_true", help="retrain and re-generate on a copy")
    args = ap.parse_args(argv)
    run_dir = Path(args.run_dir)
    if not (run_dir / "config.yaml").is_file():
        print(f"{run_dir}: no run directory (run `make demo` first)", file=sys.stderr)
        return 2
    from qreason.stages.base import RunContext
    from qreason.stages.recover import recover

    cfg = RunContext.open(run_dir).cfg
    if not args.fresh:
        summary = json.loads((run_dir / "recovery" / "summary.json").read_text())
        show(rows(summary, cfg.recover.epochs))
        return 0

    with tempfile.TemporaryDirectory(prefix="qreason-bench-recover-") as tmp:
        copy = Path(tmp) / "run"
        shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("recovery", ".lock"))
        os.environ["QREASON_CACHE"] = str(Path(tmp) / "cache")
        # the quantized checkpoints stay where the run's variants point; only the stage's own outputs are
        # fresh
        ctx = RunContext.open(copy)
        store, cfg = ctx.store, ctx.cfg
        t0 = time.monotonic()
        summary = recover(store, cfg, cfg.model.name)
        wall = time.monotonic() - t0
        show(rows(summary.model_dump(), cfg.recover.epochs))
        print(f"stage wall time {wall:.1f} s (worker start-up, dense copy and engine start-up included)")
        determinism(summary.model_dump(), run_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
