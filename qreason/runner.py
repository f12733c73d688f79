"""``qreason run``: plan from the config, then the stages in order, each reading the store and appending to it:

    quantize -> generate -> grade -> judge -> analyze -> curate -> report

Everything that can be wrong with the input (config, task data, models, recipes, calibration files) is checked
before the run directory is touched, so bad input leaves no artifacts behind.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import secrets
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import yaml

from .config import LoadedConfig, RunConfig, VariantConfig, load_config
from .envinfo import environment
from .errors import UserError
from .executor import make_executor
from .generate import Backend, GenerationRequest, make_request
from .grade import Grader, grade_key, run_grading
from .models import ResolvedModel, resolve_model
from .records import ModelVariant, Problem, content_key
from .gates import check_gates, previous_summary
from .store import RunIndex, RunLock, RunStore, now_iso, write_atomic
from .summary import accuracy_table
from .tasks import TaskSpec, build_messages, load_problems

log = logging.getLogger(__name__)


def runs_root() -> Path:
    return Path(os.environ.get("QREASON_RUNS", "runs")).resolve()


def default_index() -> RunIndex:
    return RunIndex(Path(os.environ.get("QREASON_INDEX", runs_root() / "index.sqlite")))


@dataclass
class Plan:
    loaded: LoadedConfig
    run_dir: Path
    base: ResolvedModel
    problems: list[Problem]
    prompts: list[tuple[Problem, list[dict[str, str]]]]   # every problem with its chat messages
    variant_names: list[str] = field(default_factory=list)

    def requests_for(self, variant: str, model: ResolvedModel) -> list[GenerationRequest]:
        cfg = self.loaded.config
        return [make_request(variant, model, p, messages, cfg.sampling, seed)
                for p, messages in self.prompts for seed in cfg.sampling.seeds]


def variant_name(spec: VariantConfig) -> str:
    """A variant's label: its ``name``, else the method (an import: the checkpoint's directory name)."""
    if spec.name:
        return spec.name
    return Path(spec.path.rstrip("/")).name if spec.method == "import" else spec.method


def _check_variant(base: ResolvedModel, spec: VariantConfig, loaded: LoadedConfig) -> str:
    """Validate one quantized variant without creating anything; returns its name."""
    from .quantize import prepare

    if spec.method == "import":
        resolve_model(spec.path, spec.revision, loaded.base_dir)
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
        raise UserError(f"{loaded.path}: executor", "Ray is not installed in this environment "
                                                   "(scripts/setup-env.sh installs it)")
    local_cpus = ex.local_cpus or os.cpu_count() or 1
    if not (ex.address or os.environ.get("RAY_ADDRESS")) and ex.cpus_per_job and ex.cpus_per_job > local_cpus:
        raise UserError(f"{loaded.path}: executor.cpus_per_job", f"a job needs {ex.cpus_per_job:g} CPUs but the "
                                                                f"local Ray instance has {local_cpus}")


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
    return [make_plan(sub) for sub in loaded.per_model(run_dir_of(loaded, output_dir))]


def make_plan(config: str | Path | LoadedConfig, output_dir: str | Path | None = None) -> Plan:
    """Validate the config, load every task's problems, resolve the models, check the quantization recipes.
    Writes nothing to the run directory."""
    loaded = config if isinstance(config, LoadedConfig) else load_config(config)
    cfg = loaded.config
    if cfg.models:
        raise UserError(str(loaded.path), "a config with models: is several runs; use make_plans()")
    specs_and_problems: list[tuple[TaskSpec, list[Problem]]] = [load_problems(t, loaded) for t in cfg.tasks]
    if cfg.backend.kind == "vllm":
        base = resolve_model(cfg.model.path, cfg.model.revision, loaded.base_dir)
    else:
        served = cfg.backend.model or cfg.model.path
        base = ResolvedModel(cfg.model.path, served, content_key("endpoint", cfg.backend.base_url, served), "endpoint")
    names = [cfg.model.name] + [_check_variant(base, v, loaded) for v in cfg.quantize]
    _check_executor(loaded)
    if len(set(names)) != len(names):
        raise UserError(str(loaded.path), f"variant names must be unique (got {', '.join(names)}); set name:")
    problems, prompts = [], []
    for task_cfg, (spec, task_problems) in zip(cfg.tasks, specs_and_problems):
        problems.extend(task_problems)
        prompts.extend((p, build_messages(spec, p, task_cfg.format_example)) for p in task_problems)
    return Plan(loaded, run_dir_of(loaded, output_dir), base, problems, prompts, names)


def describe_plan(plan: Plan) -> str:
    """What a run of this plan would do, job by job, and what is cached already."""
    from .models import fingerprint_dir
    from .quantize import prepare
    from .quantize.cache import read_provenance

    cfg = plan.loaded.config
    store = RunStore(plan.run_dir)
    have = store.generations if (plan.run_dir / "generations.jsonl").exists() else None
    lines = [f"plan for {cfg.name}: {len(plan.problems)} problems x {len(cfg.sampling.seeds)} seeds, "
             f"run directory {plan.run_dir}"]
    ex = cfg.executor
    if ex.kind == "ray":
        where = ex.address or os.environ.get("RAY_ADDRESS") or "a local Ray instance started for the run"
        lines.append(f"  executor  ray on {where}: quantize jobs as tasks, one engine actor per model, "
                     f"{ex.max_retries} retries per lost worker")
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
    for name, model in models:
        n = len(plan.prompts) * len(cfg.sampling.seeds)
        if model is None:
            lines.append(f"  generate  {name:<22} {n} to do (after quantization)")
            continue
        cached = sum(r.key in have for r in plan.requests_for(name, model)) if have is not None else 0
        lines.append(f"  generate  {name:<22} {n - cached} to do, {cached} cached")
    judges = ", ".join(j.name for j in cfg.judge.judges) or "rule checks only"
    lines.append(f"  then      grade, judge ({judges}), analyze, "
                 f"{'curate, ' if cfg.curate.enabled else ''}{'report' if cfg.report.enabled else ''}: "
                 "finished work is skipped")
    return "\n".join(lines)


def _base_variant(plan: Plan) -> ModelVariant:
    cfg = plan.loaded.config
    return ModelVariant(key=content_key("variant", cfg.model.name, plan.base.fingerprint), name=cfg.model.name,
                        base_model=plan.base.spec, base_fingerprint=plan.base.fingerprint, method="none",
                        path=plan.base.path, fingerprint=plan.base.fingerprint, reused=True, created_at=now_iso())


def _attach_log_file(run_dir: Path) -> logging.Handler:
    handler = logging.FileHandler(run_dir / "run.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    return handler


def run(config_path: str | Path, output_dir: str | Path | None = None, index: RunIndex | None = None,
        backend: Backend | None = None) -> dict:
    """Run every stage for a config; returns the summary (also written to summary.json).

    ``backend``: an already started engine for the base model, used instead of starting one (the caller keeps
    ownership and closes it)."""
    t0 = time.monotonic()
    plan = make_plan(config_path, output_dir)
    return run_plan(plan, index, backend, t0)


def run_all(config_path: str | Path, output_dir: str | Path | None = None,
            index: RunIndex | None = None) -> list[dict]:
    """Every run of a config: one, or one per model of a ``models:`` axis (all validated first, run in turn)."""
    plans = make_plans(config_path, output_dir)
    return [run_plan(plan, index) for plan in plans]


def run_plan(plan: Plan, index: RunIndex | None = None, backend: Backend | None = None,
             t0: float | None = None) -> dict:
    store = RunStore(plan.run_dir)
    with RunLock(store.dir):
        return _run_locked(plan, store, index or default_index(), backend,
                           time.monotonic() if t0 is None else t0)


def _run_locked(plan: Plan, store: RunStore, index: RunIndex, backend: Backend | None, t0: float) -> dict:
    cfg = plan.loaded.config
    handler = _attach_log_file(store.dir)
    run_id = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"
    config_hash = content_key("config", cfg.model_dump())
    env = environment()
    store.write_json("environment.json", env)
    # the config as written: ${VAR} references stay unexpanded, so no secret or local path leaks into the run
    write_atomic(store.dir / "config.yaml", plan.loaded.text or yaml.safe_dump(cfg.model_dump(), sort_keys=False))
    index.start(run_id, store.dir, cfg.name, config_hash, env)
    status, summary = "failed", None
    executor = None
    try:
        store.problems.append(plan.problems)
        summary = {"run_id": run_id, "name": cfg.name, "run_dir": str(store.dir), "config_hash": config_hash,
                   "model": {"spec": plan.base.spec, "fingerprint": plan.base.fingerprint,
                             "source": plan.base.source}}

        executor = make_executor(cfg, backend, plan.base.fingerprint)
        summary["executor"] = executor.kind
        # quantize (or reuse cached checkpoints)
        variants = [_base_variant(plan)] + executor.quantize(
            [(plan.base, spec, variant_name(spec), None, plan.loaded.base_dir) for spec in cfg.quantize])
        store.variants.append(variants)
        summary["quantization"] = {
            "variants": [{"name": v.name, "method": v.method, "reused": v.reused, "seconds": v.quantize_seconds,
                          "path": v.path, "versions": v.versions} for v in variants[1:]],
            "quantized": sum(not v.reused for v in variants[1:]), "reused": sum(v.reused for v in variants[1:])}

        # generate: quantized variants first, the base last (a local engine then stays up for curation)
        jobs, planned, wanted = [], 0, set()
        for v in variants[1:] + variants[:1]:
            model = ResolvedModel(v.name, v.path, v.fingerprint, "variant")
            requests = plan.requests_for(v.name, model)
            planned += len(requests)
            wanted |= {r.key for r in requests}
            todo = [r for r in requests if r.key not in store.generations]
            log.info("%s: %d generations planned, %d to do", v.name, len(requests), len(todo))
            if todo:
                jobs.append((model, todo))
        stats = executor.generate(store.generations, jobs, cfg.sampling, {v.fingerprint: v.name for v in variants})
        produced, failed, gen_seconds = stats.produced, stats.failed, stats.seconds
        summary["generations"] = {"planned": planned, "cached": planned - produced - failed, "produced": produced,
                                  "failed": failed, "seconds": round(gen_seconds, 2)}

        # grade
        grader = Grader(cfg.grading.timeout_s, cfg.grading.workers)
        generations = [g for g in store.generations.all() if g.key in wanted]
        summary["grades_written"] = run_grading(store, grader, generations)
        grade_keys = {grade_key(g.key) for g in generations}
        summary["results"] = accuracy_table([g for g in store.grades.all() if g.key in grade_keys])

        # judge, analyze, curate, report (they need graded generations)
        from .judge import run_judging

        summary["judge"] = run_judging(store, cfg.judge).model_dump()
        from .analysis import analyze

        analysis = analyze(store, cfg.model.name, generation_keys=wanted) if summary["results"] else None
        if analysis is None:
            log.warning("no graded generations: skipping analysis, curation and the report")
        if cfg.curate.enabled and analysis is not None:
            from .curate import curate

            result = curate(store, cfg.curate, cfg.sampling, cfg.model.name, plan.base.fingerprint,
                            lambda: executor.backend_for(plan.base), grader, run_id)
            summary["curate"] = {"candidates": result.candidates, "items": result.items,
                                 "dpo_pairs": result.dpo_pairs,
                                 "dir": str(result.out_dir) if result.out_dir else None}
        executor.close()
        summary["finished_at"] = now_iso()
        summary["wall_seconds"] = round(time.monotonic() - t0, 2)
        summary["versions"], summary["hardware"] = env["versions"], env["hardware"]
        store.write_json("summary.json", summary)
        if cfg.report.enabled and analysis is not None:
            from .report import build_report

            path = build_report(store, index=index, base=cfg.model.name, max_failures=cfg.report.max_failures,
                                analysis=analysis, generation_keys=wanted)
            summary["report"] = str(path)
        tripped = check_gates(cfg.gates, summary, cfg.model.name, previous_summary(index, cfg.name, run_id),
                              [j for j in store.judgments.all() if j.generation_key in wanted])
        summary["gates"] = {"tripped": tripped, "passed": not tripped}
        store.write_json("summary.json", summary)
        status = "incomplete" if failed else "gated" if tripped else "ok"
        return summary
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    finally:
        if executor is not None:
            executor.close()
        index.finish(run_id, status, summary)
        logging.getLogger().removeHandler(handler)
        handler.close()
