"""``qreason run``: a plan (``plan.py``), then the stages in order over one run context:

    quantize -> generate -> grade -> noise -> judge -> analyze -> curate -> recover -> lm_eval -> (finish)
    -> report -> gates

Every stage follows one contract (``qreason.stages.base``): ``enabled(cfg)``, then ``run(ctx)`` returns its
typed section of the ``RunSummary`` (or None), which the loop stores under the stage's ``section``. The work
lives in each stage's module; the per-stage CLI commands call the same ``stage.run(ctx)`` on
``RunContext.open(run_dir)``.
"""

from __future__ import annotations

import logging
import secrets
import time
from datetime import datetime, timezone
from pathlib import Path

import yaml

from qreason import console
from qreason.config.schema import RunConfig
from qreason.engines import Backend
from qreason.errors import UserError
from qreason.inputs.models import stand_in_note
from qreason.pipeline.executor import make_executor
from qreason.pipeline.plan import Plan, default_index, make_plan, make_plans
from qreason.pipeline.provenance import environment, run_settings, scrub
from qreason.records import content_key
from qreason.report import ReportStage
from qreason.stages.analyze import AnalyzeStage
from qreason.stages.base import RunContext, Stage, run_stage
from qreason.stages.curate import CurateStage
from qreason.stages.gates import GatesStage
from qreason.stages.generate import GenerateStage
from qreason.stages.grade import GradeStage
from qreason.stages.judge import JudgeStage
from qreason.stages.lm_eval import LmEvalStage
from qreason.stages.noise import NoiseStage
from qreason.stages.quantize import QuantizeStage
from qreason.stages.recover import RecoverStage
from qreason.store import RunIndex, RunLock, RunStore, mark_run_dir, now_iso, write_atomic
from qreason.summary import RunSummary
from qreason.workers.launch import WorkerFailed

log = logging.getLogger(__name__)


class FinishStage:
    """Engines released and timing recorded before the report, which shows them."""

    name = "finish"
    section = None

    def __init__(self, t0: float, env: dict):
        self.t0, self.env = t0, env

    def enabled(self, cfg: RunConfig) -> bool:
        return True

    def run(self, ctx: RunContext) -> None:
        if ctx.engines is not None:
            ctx.engines.close()
        self.env.update(run_settings(ctx.cfg))
        engines = {**getattr(ctx.engines, "engine_settings", {}), **ctx.engine_settings}
        if engines:
            self.env["engines"] = scrub(engines)
        ctx.store.write_json("environment.json", self.env)
        s = ctx.summary
        s.finished_at = now_iso()
        s.wall_seconds = round(time.monotonic() - self.t0, 2)
        s.versions, s.hardware = self.env["versions"], self.env["hardware"]
        return None


# Stages whose failure (bad input found late, a worker that failed) ends only that stage: no later stage needs
# their output to run.
SKIPPABLE = {"curate", "recover", "lm_eval"}


def stages(t0: float, env: dict) -> list[Stage]:
    """The stages of ``qreason run``, in order. A new stage: its module, its typed section, one line here."""
    return [
        QuantizeStage(),
        GenerateStage(),
        GradeStage(),
        NoiseStage(),
        JudgeStage(),
        AnalyzeStage(),
        CurateStage(),
        RecoverStage(),
        LmEvalStage(),
        FinishStage(t0, env),
        ReportStage(),
        GatesStage(),
    ]


# ------------------------------------------------------------------------------------------------- the loop


def run(
    config_path: str | Path,
    output_dir: str | Path | None = None,
    index: RunIndex | None = None,
    backend: Backend | None = None,
) -> RunSummary:
    """Run every stage for a config; returns the summary (also written to summary.json).

    ``backend``: an already started engine for the base model, used instead of starting one (the caller keeps
    ownership and closes it)."""
    t0 = time.monotonic()
    return run_plan(make_plan(config_path, output_dir), index, backend, t0)


def run_all(
    config_path: str | Path,
    output_dir: str | Path | None = None,
    index: RunIndex | None = None,
    preflight: bool = True,
) -> list[RunSummary]:
    """Every run of a config: one, or one per model of a ``models:`` axis (all validated first, run in
    turn). ``preflight``: check the machine (``preflight.py``) before any work."""
    t0 = time.monotonic()
    plans = checked_plans(config_path, output_dir, preflight)
    return [run_plan(plan, index, t0=t0 if i == 0 else None) for i, plan in enumerate(plans)]


def checked_plans(config_path: str | Path, output_dir: str | Path | None, preflight: bool) -> list[Plan]:
    """``make_plans`` with the preflight checks: the device first (from the config alone, in well under a
    second), the rest once the plans are validated."""
    from qreason.config.schema import load_config
    from qreason.pipeline import preflight as checks

    loaded = load_config(config_path)
    if preflight:
        checks.check_device(loaded)
    try:
        plans = make_plans(config_path, output_dir)
    except UserError as exc:
        if exc.where.split(":")[0] not in ("lm_eval", "lm_eval.tasks", "lm_eval.include_paths"):
            raise
        # the lm-eval stage names the config key: here the file and line are known
        raise UserError(loaded.place(*exc.where.split(":")[0].split(".")), exc.message) from None
    if preflight:
        for plan in plans[:1]:  # the sub-runs of a models: axis share backend, judges and environments
            checks.preflight(plan)
    return plans


def run_plan(
    plan: Plan, index: RunIndex | None = None, backend: Backend | None = None, t0: float | None = None
) -> RunSummary:
    store = RunStore(plan.run_dir)
    with RunLock(store.dir):
        return _run_locked(
            plan, store, index or default_index(), backend, time.monotonic() if t0 is None else t0
        )


def _attach_log_file(run_dir: Path) -> logging.Handler:
    """The run's log: every log record, and (``console.capture``) everything libraries write to standard
    error."""
    console.capture(run_dir / "run.log", start=False)
    handler = logging.FileHandler(run_dir / "run.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    return handler


def _run_locked(
    plan: Plan, store: RunStore, index: RunIndex, backend: Backend | None, t0: float
) -> RunSummary:
    cfg = plan.loaded.config
    run_id = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"
    config_hash = content_key("config", cfg.model_dump())
    env = environment()
    # first, so that an index that cannot be written (corrupt, locked, on a full disk) stops the run before
    # anything is written into its directory
    index.start(run_id, store.dir, cfg.name, config_hash, env)
    handler = _attach_log_file(store.dir)
    mark_run_dir(store.dir, cfg.name)
    store.write_json("environment.json", env)
    # the config as written: ${VAR} references stay unexpanded, so no secret or local path leaks into the run
    write_atomic(
        store.dir / "config.yaml", plan.loaded.text or yaml.safe_dump(cfg.model_dump(), sort_keys=False)
    )
    summary = RunSummary(
        run_id=run_id,
        name=cfg.name,
        run_dir=str(store.dir),
        config_hash=config_hash,
        model={
            "spec": plan.base.spec,
            "fingerprint": plan.base.fingerprint,
            "source": plan.base.source,
            **({"note": note} if (note := stand_in_note(plan.base.path)) else {}),
        },
    )
    ctx = RunContext(
        cfg=cfg,
        store=store,
        summary=summary,
        base=plan.base,
        index=index,
        base_dir=plan.loaded.base_dir,
        prompts=plan.prompts,
    )
    status, failure = "failed", None
    try:
        store.problems.append(plan.problems)
        ctx.engines = make_executor(cfg, backend, plan.base.fingerprint)
        summary.executor = ctx.engines.kind
        for stage in stages(t0, env):
            try:
                run_stage(stage, ctx)  # writes summary.json after each stage
            except (UserError, WorkerFailed) as exc:
                if stage.name not in SKIPPABLE:
                    raise
                # what the other stages need is there: record why this one did not run and go on, so the
                # run still ends with its summary, report and gates
                log.error("stage %s could not run: %s", stage.name, exc)
                summary.stage_failures[stage.name] = str(exc)
                store.write_json("summary.json", summary.dump())
        failed = (
            (summary.generations is not None and summary.generations.failed)
            or (summary.noise is not None and summary.noise.failed)
            or (summary.lm_eval is not None and summary.lm_eval.failed)
            or summary.stage_failures
        )
        status = "incomplete" if failed else "gated" if summary.gates.tripped else "ok"
        return summary
    except BaseException as exc:
        failure = exc
        if isinstance(exc, KeyboardInterrupt):
            status = "interrupted"
        raise
    finally:
        _finish_run(ctx.engines, index, run_id, status, summary, handler, failure)


def _finish_run(
    executor,
    index: RunIndex,
    run_id: str,
    status: str,
    summary: RunSummary,
    handler: logging.Handler,
    failure: BaseException | None,
) -> None:
    """Close the engines, record the outcome in the index and detach the log, each step whatever the others
    do. While an error is ending the run, a failing step (a locked index, an engine that will not close) is
    logged and that error propagates; after a successful run the first failing step's error is raised."""
    first: Exception | None = None
    steps = [
        ("close the engines", lambda: executor is not None and executor.close()),
        ("record the run in the index", lambda: index.finish(run_id, status, summary.dump())),
        ("detach the log file", lambda: (logging.getLogger().removeHandler(handler), handler.close())),
    ]
    for what, step in steps:
        try:
            step()
        except Exception as exc:
            log.error("could not %s after run %s: %s: %s", what, run_id, type(exc).__name__, exc)
            first = first or exc
    if first is not None and failure is None:
        raise first
