"""Planning a run: everything that can be wrong with the input (config, task data, models, recipes,
calibration files, the executor) is checked here, before the run directory is touched, so bad input leaves no
artifacts. ``make_plan`` turns a config into a ``Plan`` (problems with their prompts, the resolved base model,
the variant names); ``describe_plan`` says what a run of it would do and what is cached (``qreason plan``).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from qreason.config.schema import LoadedConfig, VariantConfig, load_config, noise_variant
from qreason.engines import GenerationRequest, generates_on, requests_for, resolve_base
from qreason.errors import UserError
from qreason.inputs.models import ResolvedModel, resolve_model
from qreason.inputs.tasks import TaskSpec, build_messages, load_problems
from qreason.records import Problem
from qreason.store import RunIndex, RunStore, check_output_dir

log = logging.getLogger(__name__)


def runs_root() -> Path:
    return Path(os.environ.get("QREASON_RUNS", "runs")).resolve()


def default_index() -> RunIndex:
    """The run index: ``$QREASON_INDEX``, else ``index.sqlite`` beside the checkpoint cache, so every run that
    uses a cache is in the index ``prune`` reads before deleting from that cache, wherever the run was
    started."""
    from qreason.store import cache_dir

    return RunIndex(Path(os.environ.get("QREASON_INDEX") or cache_dir() / "index.sqlite"))


@dataclass
class Plan:
    loaded: LoadedConfig
    run_dir: Path
    base: ResolvedModel
    problems: list[Problem]
    prompts: list[tuple[Problem, list[dict[str, str]]]]  # every problem with its chat messages
    variant_names: list[str] = field(default_factory=list)

    def requests_for(self, variant: str, model: ResolvedModel) -> list[GenerationRequest]:
        return requests_for(self.loaded.config, variant, model, self.prompts)


def variant_name(spec: VariantConfig) -> str:
    """A variant's label: its ``name``, else the method (an import: the checkpoint's directory name)."""
    if spec.name:
        return spec.name
    return Path(spec.path.rstrip("/")).name if spec.method == "import" else spec.method


def _check_variant(base: ResolvedModel, spec: VariantConfig, loaded: LoadedConfig) -> str:
    """Validate one quantized variant without creating anything; returns its name."""
    from qreason.stages.quantize import prepare

    if spec.method == "import":
        from qreason.stages.quantize.imports import describe_quantization
        from qreason.stages.quantize.shapes import read_config

        model = resolve_model(spec.path, spec.revision, loaded.base_dir)
        # an unquantized checkpoint would only fail once the run has started (and been indexed as failed)
        describe_quantization(read_config(model.path).get("quantization_config"), f"{model.path}/config.json")
    else:
        prepare(base, spec, variant_name(spec), base_dir=loaded.base_dir)
    return variant_name(spec)


def _check_executor(loaded: LoadedConfig) -> None:
    """What can be known about the executor before a run starts: Ray importable, jobs fitting a local instance
    (a remote cluster is checked when connected)."""
    ex = loaded.config.executor
    if ex.kind != "ray":
        return
    if importlib.util.find_spec("ray") is None:
        raise UserError(
            f"{loaded.path}: executor",
            "Ray is not installed in this environment (scripts/setup-env.sh installs it)",
        )
    local_cpus = ex.local_cpus or os.cpu_count() or 1
    if not (ex.address or os.environ.get("RAY_ADDRESS")) and ex.cpus_per_job and ex.cpus_per_job > local_cpus:
        raise UserError(
            f"{loaded.path}: executor.cpus_per_job",
            f"a job needs {ex.cpus_per_job:g} CPUs but the local Ray instance has {local_cpus}",
        )


def _check_prompt_lengths(
    prompts: list[tuple[Problem, list[dict[str, str]]]],
    base: ResolvedModel,
    loaded: LoadedConfig,
    where: dict[str, str],
) -> None:
    """Every prompt must fit the engine's context: vLLM refuses a prompt of ``max_model_len`` tokens or more,
    and finding that out mid-run wastes the run. Counted with the base model's tokenizer and chat template
    (what vLLM applies), before anything is written. ``where``: problem key -> the place it was read from."""
    b = loaded.config.backend
    limit = int(b.engine_args.get("max_model_len", b.max_model_len))
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(base.path)
    except Exception as exc:  # a checkpoint without a loadable tokenizer fails the same way in vLLM later
        log.warning("prompt lengths not checked: the tokenizer of %s did not load (%s)", base.path, exc)
        return
    texts = [
        tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        for _, messages in prompts
    ]
    # a token covers at least one byte of text (give or take a prefix token): only prompts with about as many
    # bytes as the limit need counting
    longish = [i for i, text in enumerate(texts) if len(text.encode("utf-8")) + 8 >= limit]
    if not longish:
        return
    counts = tok([texts[i] for i in longish], add_special_tokens=False)["input_ids"]
    for i, ids in zip(longish, counts):
        if len(ids) >= limit:
            problem = prompts[i][0]
            raise UserError(
                where.get(problem.key, f"task {problem.task} problem {problem.problem_id}"),
                f"the prompt is {len(ids)} tokens, but backend.max_model_len {limit} must leave room "
                f"for at least one generated token; raise max_model_len or shorten the problem",
            )


def _check_task_identity(
    loaded: LoadedConfig, specs_and_problems: list[tuple[TaskSpec, list[Problem]]], output_dir
) -> None:
    """A problem is known by ``(task, problem_id)`` in every later stage, so two task entries must not yield
    the same task name (one spec given twice, by name and by path), and a run directory must not hold a
    problem of that name with another question or answer (the task's data file or params changed since):
    either would grade one problem's solutions against another's reference."""
    seen: dict[str, str] = {}
    for task_cfg, (spec, _) in zip(loaded.config.tasks, specs_and_problems):
        if spec.name in seen:
            raise UserError(
                f"{loaded.path}: tasks",
                f"entries {seen[spec.name]!r} and {task_cfg.name!r} are both task {spec.name!r}; "
                "give each task entry its own spec name",
            )
        seen[spec.name] = task_cfg.name
    stored_path = run_dir_of(loaded, output_dir) / "problems.jsonl"
    if not stored_path.is_file():
        return
    stored = {(p.task, p.problem_id): p for p in RunStore(stored_path.parent).problems.all()}
    for _, task_problems in specs_and_problems:
        for p in task_problems:
            old = stored.get((p.task, p.problem_id))
            if old is not None and (old.question, old.answer, old.answer_type) != (
                p.question,
                p.answer,
                p.answer_type,
            ):
                raise UserError(
                    str(stored_path),
                    f"this run directory holds problem {p.task}/{p.problem_id} with another question or "
                    "answer (the task's data or params changed); use a new output_dir",
                )


def run_dir_of(loaded: LoadedConfig, output_dir: str | Path | None = None) -> Path:
    if output_dir is not None:
        return Path(output_dir).resolve()
    cfg = loaded.config
    return loaded.resolve(cfg.output_dir) if cfg.output_dir else runs_root() / cfg.name


def make_plans(config_path: str | Path, output_dir: str | Path | None = None) -> list[Plan]:
    """One plan per model of the config (``models:``), or the single plan; everything is validated before any
    plan is returned."""
    loaded = load_config(config_path)
    if not loaded.config.models:
        return [make_plan(loaded, output_dir)]
    run_dir = run_dir_of(loaded, output_dir)
    check_output_dir(run_dir, children=[m.name for m in loaded.config.models])
    return [make_plan(sub) for sub in loaded.per_model(run_dir)]


def make_plan(config: str | Path | LoadedConfig, output_dir: str | Path | None = None) -> Plan:
    """Validate the config, load every task's problems, resolve the models, check the quantization recipes.
    Writes nothing to the run directory."""
    loaded = config if isinstance(config, LoadedConfig) else load_config(config)
    cfg = loaded.config
    if cfg.models:
        raise UserError(str(loaded.path), "a config with models: is several runs; use make_plans()")
    places: dict[str, str] = {}
    specs_and_problems: list[tuple[TaskSpec, list[Problem]]] = [
        load_problems(t, loaded.base_dir, places) for t in cfg.tasks
    ]
    base = resolve_base(cfg.backend, cfg.model, loaded.base_dir)
    names = [cfg.model.name] + [_check_variant(base, v, loaded) for v in cfg.quantize]
    _check_executor(loaded)
    if cfg.recover.enabled:
        from qreason.workers.launch import TRAIN

        TRAIN.python()  # the training environment: found now, not after generating and judging
    if cfg.lm_eval.tasks:
        from qreason.stages.lm_eval import check_config

        check_config(cfg.lm_eval, cfg.tasks, loaded.base_dir)
    if len(set(names)) != len(names):
        raise UserError(str(loaded.path), f"variant names must be unique (got {', '.join(names)}); set name:")
    _check_task_identity(loaded, specs_and_problems, output_dir)
    problems, prompts = [], []
    for task_cfg, (spec, task_problems) in zip(cfg.tasks, specs_and_problems):
        problems.extend(task_problems)
        prompts.extend((p, build_messages(spec, p, task_cfg.format_example)) for p in task_problems)
    if cfg.backend.kind == "vllm":
        _check_prompt_lengths(prompts, base, loaded, places)
    run_dir = run_dir_of(loaded, output_dir)
    check_output_dir(run_dir)
    return Plan(loaded, run_dir, base, problems, prompts, names)


def describe_plan(plan: Plan) -> str:
    """What a run of this plan would do, job by job, and what is cached already."""
    from qreason.inputs.models import fingerprint_dir
    from qreason.stages.quantize import prepare
    from qreason.stages.quantize.cache import read_provenance

    cfg = plan.loaded.config
    store = RunStore(plan.run_dir)
    have = store.generations if (plan.run_dir / "generations.jsonl").exists() else None
    lines = [
        f"plan for {cfg.name}: {len(plan.problems)} problems x {len(cfg.sampling.seeds)} seeds, "
        f"run directory {plan.run_dir}"
    ]
    if cfg.sampling.temperature == 0 and len(cfg.sampling.seeds) > 1:
        lines.append(
            "  note      temperature 0: every seed gives the same text; each prompt is generated once and "
            "stored under each seed"
        )
    ex = cfg.executor
    if ex.kind == "ray":
        where = ex.address or os.environ.get("RAY_ADDRESS") or "a local Ray instance started for the run"
        lines.append(
            f"  executor  ray on {where}: quantize jobs as tasks, one engine actor per model, "
            f"{ex.max_retries} retries per lost worker"
        )
    else:
        lines.append("  executor  local: the jobs below run in turn in this process")
    models = [(cfg.model.name, plan.base)]
    for spec in cfg.quantize:
        name = variant_name(spec)
        if spec.method == "import":
            m = resolve_model(spec.path, spec.revision, plan.loaded.base_dir)
            lines.append(f"  quantize  {name:<22} import {m.path}")
            models.append((name, m))
            continue
        prep = prepare(plan.base, spec, name, base_dir=plan.loaded.base_dir)
        found = read_provenance(prep.dest)
        if found is not None and found.get("key") == prep.key:
            lines.append(f"  quantize  {name:<22} cached {prep.dest}")
            models.append((name, ResolvedModel(name, str(prep.dest), fingerprint_dir(prep.dest), "variant")))
        else:
            lines.append(f"  quantize  {name:<22} to do ({spec.method} -> {prep.dest})")
            models.append((name, None))

    def count(variant: str, tasks: list[str] | None = None) -> int:
        on = [
            p for p, _ in plan.prompts if generates_on(cfg, variant, p.task) and p.task in (tasks or [p.task])
        ]
        return len(on) * len(cfg.sampling.seeds)

    for name, model in models:
        n = count(name)
        if model is None:
            lines.append(f"  generate  {name:<22} {n} to do (after quantization)")
            continue
        cached = sum(r.key in have for r in plan.requests_for(name, model)) if have is not None else 0
        lines.append(f"  generate  {name:<22} {n - cached} to do, {cached} cached")
    if cfg.noise is not None and cfg.noise.enabled:
        n = count(cfg.model.name, cfg.noise.tasks)
        names = ", ".join(noise_variant(cfg.model.name, p.name) for p in cfg.noise.perturbations)
        lines.append(f"  noise     {n} generations for each of {names} (kept in noise/; cached ones skipped)")
    if cfg.lm_eval.tasks:
        picked = cfg.lm_eval.variants
        names = [n for n, _ in models if picked is None or n == cfg.model.name or n in picked]
        lines.append(
            f"  lm-eval   {', '.join(cfg.lm_eval.tasks)} on {', '.join(names)} "
            f"(limit {cfg.lm_eval.limit or 'none'}): results already stored are skipped"
        )
    judges = ", ".join(j.name for j in cfg.judge.judges) or "model-free layers only"
    lines.append(
        f"  then      grade, judge ({judges}), analyze, "
        f"{'curate, ' if cfg.curate.enabled else ''}{'report' if cfg.report.enabled else ''}: "
        "finished work is skipped"
    )
    return "\n".join(lines)
