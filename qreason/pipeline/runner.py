"""``qreason run``: a plan (``plan.py``), then the stages in order over one run context:

    quantize -> generate -> grade -> judge -> analyze -> curate -> recover -> lm_eval -> report -> gates

Every stage has the same shape: ``stage(ctx)`` reads the run store (and what earlier stages left in the context),
appends its own records, and returns its typed section of the ``RunSummary`` (or None). The runner is the loop;
the work itself lives in each stage's module, which the per-stage CLI commands call too.
"""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass, field
from functools import cached_property
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import yaml

from qreason.pipeline.provenance import environment
from qreason.pipeline.executor import make_executor
from qreason.stages.gates import check_gates, previous_summary
from qreason.engines import Backend
from qreason.stages.grade import Grader, grade_key, make_grader, run_grading
from qreason.inputs.models import ResolvedModel
from qreason.pipeline.plan import Plan, default_index, make_plan, make_plans, variant_name
from qreason.records import ModelVariant, content_key
from qreason.store import RunIndex, RunLock, RunStore, mark_run_dir, now_iso, write_atomic
from qreason.summary import CurateSummary, GatesSummary, GenerationSummary, LmEvalSummary, QuantizationSummary, QuantizedVariant, RunSummary, accuracy_table

if TYPE_CHECKING:  # the stages import their modules when they run: pandas and matplotlib cost seconds to load
    from qreason.stages.analyze import Analysis

log = logging.getLogger(__name__)


@dataclass
class RunContext:
    """What the stages of one run share: the plan, the store, the executor (engines), and what earlier stages
    produced for later ones (the variants, the generation keys of this config, the analysis)."""

    plan: Plan
    store: RunStore
    index: RunIndex
    summary: RunSummary
    executor: Any = None
    variants: list[ModelVariant] = field(default_factory=list)
    wanted: set[str] = field(default_factory=set)   # keys of the generations this config asks for
    analysis: "Analysis | None" = None
    env: dict = field(default_factory=dict)

    @property
    def cfg(self):
        return self.plan.loaded.config

    @cached_property
    def grader(self) -> Grader:
        return make_grader(self.cfg.grading)


# ------------------------------------------------------------------------------------------------- stages

def quantize_stage(ctx: RunContext) -> QuantizationSummary:
    """The base variant plus each quantized one (made, or reused from the checkpoint cache)."""
    plan = ctx.plan
    base = ModelVariant(key=content_key("variant", ctx.cfg.model.name, plan.base.fingerprint), name=ctx.cfg.model.name,
                        base_model=plan.base.spec, base_fingerprint=plan.base.fingerprint, method="none",
                        path=plan.base.path, fingerprint=plan.base.fingerprint, reused=True, created_at=now_iso())
    ctx.variants = [base] + ctx.executor.quantize(
        [(plan.base, spec, variant_name(spec), None, plan.loaded.base_dir) for spec in ctx.cfg.quantize])
    ctx.store.variants.append(ctx.variants)
    made = ctx.variants[1:]
    return QuantizationSummary(
        variants=[QuantizedVariant(name=v.name, method=v.method, reused=v.reused, seconds=v.quantize_seconds,
                                   path=v.path, versions=v.versions) for v in made],
        quantized=sum(not v.reused for v in made), reused=sum(v.reused for v in made))


def generate_stage(ctx: RunContext) -> GenerationSummary:
    """Quantized variants first, the base last (a local engine then stays up for curation)."""
    jobs, planned = [], 0
    for v in ctx.variants[1:] + ctx.variants[:1]:
        model = ResolvedModel(v.name, v.path, v.fingerprint, "variant")
        requests = ctx.plan.requests_for(v.name, model)
        planned += len(requests)
        ctx.wanted |= {r.key for r in requests}
        todo = [r for r in requests if r.key not in ctx.store.generations]
        log.info("%s: %d generations planned, %d to do", v.name, len(requests), len(todo))
        if todo:
            jobs.append((model, todo))
    stats = ctx.executor.generate(ctx.store.generations, jobs, ctx.cfg.sampling,
                                  {v.fingerprint: v.name for v in ctx.variants})
    return GenerationSummary(planned=planned, cached=planned - stats.produced - stats.failed,
                             produced=stats.produced, failed=stats.failed, seconds=round(stats.seconds, 2))


def grade_stage(ctx: RunContext) -> list:
    generations = [g for g in ctx.store.generations.all() if g.key in ctx.wanted]
    ctx.summary.grades_written = run_grading(ctx.store, ctx.grader, generations)
    keys = {grade_key(g.key) for g in generations}
    return accuracy_table([g for g in ctx.store.grades.all() if g.key in keys])


def judge_stage(ctx: RunContext) -> dict:
    from qreason.stages.judge import run_judging

    return run_judging(ctx.store, ctx.cfg.judge).model_dump()


def analyze_stage(ctx: RunContext) -> None:
    if not ctx.summary.results:
        log.warning("no graded generations: skipping analysis, curation and the report")
        return None
    from qreason.stages.analyze import analyze

    ctx.analysis = analyze(ctx.store, ctx.cfg.model.name, generation_keys=ctx.wanted)
    return None


def curate_stage(ctx: RunContext) -> CurateSummary | None:
    if not ctx.cfg.curate.enabled or ctx.analysis is None:
        return None
    from qreason.stages.curate import curate

    base = ctx.plan.base
    result = curate(ctx.store, ctx.cfg.curate, ctx.cfg.sampling, ctx.cfg.model.name, base.fingerprint,
                    lambda: ctx.executor.backend_for(base), ctx.grader, ctx.summary.run_id)
    return CurateSummary(candidates=result.candidates, items=result.items, dpo_pairs=result.dpo_pairs,
                         dir=str(result.out_dir) if result.out_dir else None)


def recover_stage(ctx: RunContext) -> dict | None:
    """LoRA adapters on the Silver Bullet items, re-evaluated on held-out problems (qreason/recover.py)."""
    if not ctx.cfg.recover.enabled or ctx.analysis is None:
        return None
    from qreason.stages.recover import recover

    if ctx.executor.kind == "local":
        ctx.executor.close()  # the base model's engine is not needed again: free its memory for training
    return recover(ctx.store, ctx.cfg, ctx.cfg.model.name, ctx.executor.backend_for, ctx.grader,
                   generation_keys=ctx.wanted).model_dump(mode="json")


def lm_eval_stage(ctx: RunContext) -> LmEvalSummary | None:
    """lm-eval on every variant, after the engines are closed: each variant gets a vLLM server of its own."""
    if not ctx.cfg.lm_eval.tasks:
        return None
    from qreason.stages.lm_eval import run_lm_eval, targets_for

    ctx.executor.close()
    return run_lm_eval(ctx.store, ctx.cfg.lm_eval, ctx.cfg.backend, targets_for(ctx.variants, ctx.summary.recover if ctx.cfg.lm_eval.adapters else None), ctx.cfg.model.name,
                       ctx.cfg.tasks, ctx.cfg.sampling, ctx.plan.loaded.base_dir)


def finish_stage(ctx: RunContext) -> None:
    """Engines are released and the summary is written before the report, which reads it."""
    ctx.executor.close()
    s = ctx.summary
    s.finished_at = now_iso()
    s.wall_seconds = round(time.monotonic() - ctx.env["t0"], 2)
    s.versions, s.hardware = ctx.env["versions"], ctx.env["hardware"]
    ctx.store.write_json("summary.json", s.dump())
    return None


def report_stage(ctx: RunContext) -> str | None:
    if not ctx.cfg.report.enabled or ctx.analysis is None:
        return None
    from qreason.report import build_report

    path = build_report(ctx.store, index=ctx.index, base=ctx.cfg.model.name, max_failures=ctx.cfg.report.max_failures,
                        analysis=ctx.analysis, generation_keys=ctx.wanted)
    return str(path)


def gates_stage(ctx: RunContext) -> GatesSummary:
    previous = previous_summary(ctx.index, ctx.cfg.name, ctx.summary.run_id)
    judgments = [j for j in ctx.store.judgments.all() if j.generation_key in ctx.wanted]
    tripped = check_gates(ctx.cfg.gates, ctx.summary, ctx.cfg.model.name, previous, judgments)
    return GatesSummary(tripped=tripped, passed=not tripped)


# (summary field, stage): the field receives what the stage returns, when it returns something
STAGES: list[tuple[str, Callable[[RunContext], Any]]] = [
    ("quantization", quantize_stage),
    ("generations", generate_stage),
    ("results", grade_stage),
    ("judge", judge_stage),
    ("analysis", analyze_stage),
    ("curate", curate_stage),
    ("recover", recover_stage),
    ("lm_eval", lm_eval_stage),
    ("finish", finish_stage),
    ("report", report_stage),
    ("gates", gates_stage),
]


# ------------------------------------------------------------------------------------------------- the loop

def run(config_path: str | Path, output_dir: str | Path | None = None, index: RunIndex | None = None,
        backend: Backend | None = None) -> RunSummary:
    """Run every stage for a config; returns the summary (also written to summary.json).

    ``backend``: an already started engine for the base model, used instead of starting one (the caller keeps
    ownership and closes it)."""
    t0 = time.monotonic()
    return run_plan(make_plan(config_path, output_dir), index, backend, t0)


def run_all(config_path: str | Path, output_dir: str | Path | None = None,
            index: RunIndex | None = None) -> list[RunSummary]:
    """Every run of a config: one, or one per model of a ``models:`` axis (all validated first, run in turn)."""
    return [run_plan(plan, index) for plan in make_plans(config_path, output_dir)]


def run_plan(plan: Plan, index: RunIndex | None = None, backend: Backend | None = None,
             t0: float | None = None) -> RunSummary:
    store = RunStore(plan.run_dir)
    with RunLock(store.dir):
        return _run_locked(plan, store, index or default_index(), backend, time.monotonic() if t0 is None else t0)


def _attach_log_file(run_dir: Path) -> logging.Handler:
    handler = logging.FileHandler(run_dir / "run.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    return handler


def _run_locked(plan: Plan, store: RunStore, index: RunIndex, backend: Backend | None, t0: float) -> RunSummary:
    cfg = plan.loaded.config
    handler = _attach_log_file(store.dir)
    run_id = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"
    config_hash = content_key("config", cfg.model_dump())
    mark_run_dir(store.dir, cfg.name)
    env = environment()
    store.write_json("environment.json", env)
    # the config as written: ${VAR} references stay unexpanded, so no secret or local path leaks into the run
    write_atomic(store.dir / "config.yaml", plan.loaded.text or yaml.safe_dump(cfg.model_dump(), sort_keys=False))
    index.start(run_id, store.dir, cfg.name, config_hash, env)
    summary = RunSummary(run_id=run_id, name=cfg.name, run_dir=str(store.dir), config_hash=config_hash,
                         model={"spec": plan.base.spec, "fingerprint": plan.base.fingerprint,
                                "source": plan.base.source})
    ctx = RunContext(plan, store, index, summary, env={**env, "t0": t0})
    status, failure = "failed", None
    try:
        store.problems.append(plan.problems)
        ctx.executor = make_executor(cfg, backend, plan.base.fingerprint)
        summary.executor = ctx.executor.kind
        for name, stage in STAGES:
            section = stage(ctx)
            if section is not None:
                setattr(summary, name, section)
        store.write_json("summary.json", summary.dump())
        failed = summary.generations.failed or (summary.lm_eval is not None and summary.lm_eval.failed)
        status = ("incomplete" if failed else "gated" if summary.gates.tripped else "ok")
        return summary
    except BaseException as exc:
        failure = exc
        if isinstance(exc, KeyboardInterrupt):
            status = "interrupted"
        raise
    finally:
        _finish_run(ctx.executor, index, run_id, status, summary, handler, failure)


def _finish_run(executor, index: RunIndex, run_id: str, status: str, summary: RunSummary,
                handler: logging.Handler, failure: BaseException | None) -> None:
    """Close the engines, record the outcome in the index and detach the log, each step whatever the others do.
    While an error is ending the run, a failing step (a locked index, an engine that will not close) is logged
    and that error propagates; after a successful run the first failing step's error is raised."""
    first: Exception | None = None
    steps = [("close the engines", lambda: executor is not None and executor.close()),
             ("record the run in the index", lambda: index.finish(run_id, status, summary.dump())),
             ("detach the log file", lambda: (logging.getLogger().removeHandler(handler), handler.close()))]
    for what, step in steps:
        try:
            step()
        except Exception as exc:
            log.error("could not %s after run %s: %s: %s", what, run_id, type(exc).__name__, exc)
            first = first or exc
    if first is not None and failure is None:
        raise first
