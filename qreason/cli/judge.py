"""``qreason judge`` and ``qreason judge-bench``. The main CLI calls ``register(subparsers)``."""

from __future__ import annotations

import json
from pathlib import Path

from qreason import console
from qreason.errors import UserError

SPEC_HELP = (
    "a judge: 'rules' (the rule checks only, no LLM), key=value pairs such as "
    "name=gpt,base_url=https://api.openai.com/v1,model=gpt-4o-mini,api_key_env=OPENAI_API_KEY "
    "(other keys: concurrency, timeout_s, max_retries, invalid_retries, backoff_s, temperature, "
    "retry_temperature, max_tokens, seed, schema_limits), inline JSON, or a YAML/JSON file with one spec. "
    "Repeat for a panel (majority vote). The API key is read from the variable named by api_key_env."
)


def register(subparsers) -> None:
    j = subparsers.add_parser(
        "judge",
        help="find the first faulty step, error type and capability of a run's failures",
        description="Judge the failed solutions of a run directory: the rule checks always run (no LLM); LLM "
        "judges run when given. Appends to judgments.jsonl; re-running skips finished work, reuses "
        "cached replies and retries judge errors.",
    )
    j.add_argument(
        "run_dir", metavar="RUN_DIR", help="a run directory (with generations.jsonl and grades.jsonl)"
    )
    j.add_argument("--judge", action="append", default=None, metavar="SPEC", help=SPEC_HELP)
    j.add_argument(
        "--config",
        metavar="FILE",
        help="judge config YAML (a JudgeConfig mapping, or one under a "
        "top-level 'judge:' key); the options below override it",
    )
    j.add_argument(
        "--which",
        choices=["failures", "flips"],
        help="judge every failure (default), or only flips: failures on a problem and seed that the "
        "base variant solved",
    )
    j.add_argument(
        "--base-variant",
        metavar="NAME",
        help="the variant flips are measured against (default: the run's model)",
    )
    j.add_argument(
        "--prompt-version", metavar="V", help="judge prompt template in judge_prompts/ (default: judge-v1)"
    )
    j.add_argument(
        "--llm-for-outcomes",
        action="store_true",
        default=None,
        help="also send no-answer, truncated and repetition-collapsed solutions to the LLM judges "
        "(default: the rule checks settle them)",
    )
    j.add_argument(
        "--retry-invalid",
        action="store_true",
        default=None,
        help="ask again where a judge gave no valid reply in an earlier run (failures of the endpoint "
        "itself are always retried)",
    )
    group = j.add_mutually_exclusive_group()
    group.add_argument(
        "--batch-write",
        action="store_true",
        help="write OpenAI batch input files (one per judge) instead of calling the endpoints",
    )
    group.add_argument(
        "--batch-read",
        action="store_true",
        help="read the batch output files (OpenAI Batch API or vllm run-batch) and judge from them",
    )
    j.add_argument(
        "--batch-dir",
        metavar="DIR",
        help="batch files: DIR/JUDGE.batch_input.jsonl and "
        "DIR/JUDGE.batch_output.jsonl (default: RUN_DIR/judge_batch)",
    )
    j.add_argument("--cache", metavar="PATH", help="reply cache (default: RUN_DIR/judge_cache.sqlite)")
    j.add_argument("--json", action="store_true", help="print the statistics and the distribution as JSON")
    j.set_defaults(fn=cmd_judge)

    b = subparsers.add_parser(
        "judge-bench",
        help="score the judge stack and each layer on ProcessBench-format data (F1 and its parts)",
        description="Run the judge stack on ProcessBench-format JSONL (id, problem, steps, label; label -1 = "
        "no faulty step) and print one JSON object: for the stack, f1, acc_erroneous (exact step on "
        "erroneous solutions), acc_correct (-1 on correct ones), wrong_answer_exact (exact step on "
        "solutions whose final answer is wrong); the same per layer under 'layers'; fixed positional "
        "guesses under 'baselines'. See docs/judging.md.",
    )
    b.add_argument("--data", required=True, metavar="FILE.jsonl", help="ProcessBench-format data")
    b.add_argument(
        "--judge",
        action="append",
        default=None,
        metavar="SPEC",
        help="'offline' (every model-free layer: rule checks, reference locator, prior), "
        + SPEC_HELP
        + " A spec of kind prm is a layer of its own. Default: rules.",
    )
    b.add_argument(
        "--references",
        metavar="FILE.jsonl",
        help="the task's problems with reference answers and worked solutions (matched to rows by "
        "normalised problem text; unmatched rows are judged without the reference layer)",
    )
    b.add_argument("--task", metavar="NAME", help="the task spec that reads --references (e.g. gsm8k)")
    b.add_argument(
        "--protocol",
        choices=["gated", "blind"],
        default="gated",
        help="gated (default): the layers know whether the final answer is right, as in a qreason run; "
        "blind: ProcessBench's protocol (no answer key), comparable with published critics",
    )
    b.add_argument(
        "--prior-step",
        type=int,
        default=None,
        metavar="K",
        help="the prior layer's guess for wrong answers no layer located (default: the step stored for "
        "--task's family, else 2)",
    )
    b.add_argument(
        "--out",
        metavar="DIR",
        help="where predictions.jsonl, metrics.json and the reply cache are written (needed with model "
        "judges)",
    )
    b.add_argument(
        "--prompt-version", default="judge-v1", metavar="V", help="judge prompt template (default: judge-v1)"
    )
    b.add_argument("--limit", type=int, metavar="N", help="only the first N rows")
    b.add_argument(
        "--rules-timeout",
        type=float,
        default=None,
        metavar="S",
        help="wall-clock limit of the model-free layers per row, as judge.rules_timeout_s in a run (default "
        "10)",
    )
    b.add_argument(
        "--force",
        action="store_true",
        help="write into a non-empty --out directory judge-bench did not write (default: refused)",
    )
    b.set_defaults(fn=cmd_judge_bench)


def _specs(values: list[str] | None) -> list | None:
    from qreason.config.judge import parse_judge_spec

    if values is None:
        return None
    specs = [parse_judge_spec(v) for v in values]
    return [s for s in specs if s is not None]


def cmd_judge(args) -> int:
    from pydantic import ValidationError

    from qreason.config.judge import load_judge_config
    from qreason.stages.base import run_stage_command
    from qreason.stages.judge import JudgeStage, distribution
    from qreason.stages.judge.measured import accuracy_words

    run_dir = Path(args.run_dir)
    if not (run_dir / "generations.jsonl").is_file() or not (run_dir / "grades.jsonl").is_file():
        raise UserError(str(run_dir), "not a graded run directory (needs generations.jsonl and grades.jsonl)")

    def update(run_cfg):
        """The run's own judge section (its base variant among them), or --config's, then the flags."""
        data = (load_judge_config(args.config) if args.config else run_cfg.judge).model_dump()
        data["base_variant"] = run_cfg.model.name
        judges = _specs(args.judge)
        if judges is not None:
            data["judges"] = [spec.model_dump() for spec in judges]
        for opt, field in (
            ("which", "which"),
            ("base_variant", "base_variant"),
            ("prompt_version", "prompt_version"),
            ("llm_for_outcomes", "llm_for_outcomes"),
            ("retry_invalid", "retry_invalid"),
            ("cache", "cache_path"),
        ):
            if getattr(args, opt) is not None:
                data[field] = getattr(args, opt)
        if args.batch_write or args.batch_read:
            data["batch"]["mode"] = "write" if args.batch_write else "read"
        if args.batch_dir:
            data["batch"]["dir"] = args.batch_dir
        try:
            run_cfg.judge = type(run_cfg.judge).model_validate(data)
        except ValidationError as exc:
            err = exc.errors()[0]
            raise UserError("qreason judge", f"{'.'.join(map(str, err['loc']))}: {err['msg']}") from None

    ctx = run_stage_command(args.run_dir, JudgeStage(), update)
    store, stats = ctx.store, ctx.summary.judge
    dist = distribution(store)
    tasks = {p.task for p in store.problems.all()}
    if args.json:
        print(json.dumps({"stats": stats.model_dump(), "distribution": dist}, indent=2))
    else:
        print(
            f"{stats.candidates} failures selected ({stats.flips} flips); {stats.rules_written} new rule "
            "verdicts"
        )
        for name, c in stats.judges.items():
            print(
                f"judge {name}: {c['ok']} ok, {c['judge_error']} judge errors, {c['cached']} from cache, "
                f"{c['done']} already done, {c['pending']} pending"
            )
        if stats.judges:
            print(
                f"{stats.panel_written} panel verdicts; {stats.requests} HTTP requests; tokens {stats.usage}"
            )
        print(f"{stats.stack_written} new combined verdicts (judge 'stack')")
        for path in stats.batch_files:
            print(f"batch file: {path}")
        for variant, d in dist.items():
            types = ", ".join(f"{k} {v}" for k, v in sorted(d["error_types"].items())) or "-"
            layers = ", ".join(f"{k} {v}" for k, v in sorted(d["sources"].items()))
            deciding = [k for k in d["sources"] if k != "prior"]
            print(
                f"{variant}: {d['failures']} failures, {d['flips']} flips; types: {types}; median first "
                f"faulty step {d['first_error_step']['median']}; coverage {d['coverage']:.0%} located "
                f"(decided by {layers}; prior = guessed, not located); the stack's "
                f"{accuracy_words(tasks, deciding)}; abandoned answers {d['abandoned_answers']} of "
                f"{d['wrong_answers']} wrong"
            )
        print(f"judgments: {store.judgments.path}")
    for error in stats.errors:
        print(f"qreason: error: {error}", file=console.terminal())
    failure = ctx.summary.stage_failures.get("judge")
    if failure:
        print(f"qreason: judging failed: {failure}", file=console.terminal())
    errors = sum(c["judge_error"] for c in stats.judges.values())
    if stats.errors:
        return UserError.exit_code
    if failure:
        return 1
    if errors:
        print(
            f"qreason: {errors} judge errors recorded; a re-run retries the endpoint failures among them "
            "(--retry-invalid: also the invalid replies)",
            file=console.terminal(),
        )
    return 0


def cmd_judge_bench(args) -> int:
    from qreason.stages.judge.bench import run_bench
    from qreason.stages.judge.measured import prior_step_for

    values = args.judge or []
    offline = "offline" in [v.strip() for v in values]
    judges = _specs([v for v in values if v.strip() != "offline"]) or []
    if args.limit is not None and args.limit <= 0:
        raise UserError("--limit", "must be a positive number")
    if args.prior_step is not None and args.prior_step < 0:
        raise UserError("--prior-step", "must be 0 or more")
    if args.rules_timeout is not None and not 0 < args.rules_timeout < float("inf"):
        raise UserError("--rules-timeout", "must be a positive number of seconds")
    metrics = run_bench(
        Path(args.data),
        judges,
        Path(args.out) if args.out else None,
        args.prompt_version,
        args.limit,
        offline=offline,
        references=Path(args.references) if args.references else None,
        task=args.task,
        protocol=args.protocol,
        prior_step=prior_step_for(args.task or "", args.prior_step),
        force=args.force,
        **({"rules_timeout_s": args.rules_timeout} if args.rules_timeout is not None else {}),
    )
    print(json.dumps(metrics, indent=2))
    return 0
