"""The stage contract: what every stage of a run is, and the context the stages share.

A stage is an object with a ``name`` (the ``RunSummary`` field its section fills), ``enabled(cfg)`` (whether
the run config asks for it) and ``run(ctx)`` (reads the run store and what earlier stages left in the context,
appends its own records, returns its typed summary section or None). ``qreason run`` is a loop over the stages
(``qreason.pipeline.runner.STAGES``); a per-stage command (``qreason grade RUN_DIR``, ``qreason judge
RUN_DIR``,
...) opens the context of an existing run with ``RunContext.open`` (so it uses that run's stored config),
applies its flags to ``ctx.cfg`` and calls the same ``stage.run(ctx)``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterator, Protocol

from qreason.config.schema import RunConfig, SamplingConfig, parse_config
from qreason.engines import Backend, GenerationRequest, requests_for
from qreason.errors import UserError, decode_utf8
from qreason.inputs.models import ResolvedModel
from qreason.records import ModelVariant, Problem
from qreason.registry import GRADERS
from qreason.store import RunIndex, RunLock, RunStore, Table
from qreason.summary import ResultRow, RunSummary, Section, accuracy_table

if TYPE_CHECKING:
    from qreason.records import Generation, Grade

log = logging.getLogger(__name__)


class Grader(Protocol):
    """A grader, registered in ``qreason.registry.GRADERS`` under ``grading.kind`` and built as
    ``cls(timeout_s, workers)`` (``qreason.stages.grade.grader.Grader`` is Math-Verify's)."""

    grader: str  # the grader's id: part of every grade's key, so two graders never share grades

    def grade(self, jobs: list) -> Iterator[Grade]:
        """One ``Grade`` per ``GradeJob`` (generation, problem, key), in completion order."""
        ...


class Engines(Protocol):
    """What stages need of the executor (``qreason.pipeline.executor``): quantization jobs, generation jobs
    and a backend for one model, all released by ``close``."""

    kind: str

    def quantize(self, jobs: list[tuple]) -> list[ModelVariant]: ...

    def generate(
        self,
        table: Table[Generation],
        jobs: list[tuple[ResolvedModel, list[GenerationRequest]]],
        sampling: SamplingConfig,
        names: dict[str, str],
    ) -> Any: ...

    def backend_for(self, model: ResolvedModel) -> Backend: ...

    def close(self) -> None: ...


@dataclass
class RunContext:
    """What the stages of one run share. ``qreason run`` builds it from a plan; ``RunContext.open`` from a run
    directory. ``wanted``: the keys of the generations this config asks for (a run directory can hold more,
    from earlier configs); ``variants``: the base variant first, then the quantized ones."""

    cfg: RunConfig
    store: RunStore
    summary: RunSummary
    base: ResolvedModel
    index: RunIndex | None = None
    engines: Engines | None = None
    base_dir: Path | None = None  # where relative paths of the config point
    prompts: list[tuple[Problem, list[dict[str, str]]]] = field(default_factory=list)
    variants: list[ModelVariant] = field(default_factory=list)
    wanted: set[str] = field(default_factory=set)
    analysis: Any = None  # the analyze stage's Analysis (qreason.stages.analyze.analysis_for)
    engine_settings: dict[str, dict] = field(default_factory=dict)  # engines a stage started itself
    _grader: Grader | None = None

    @classmethod
    def open(
        cls,
        run_dir: str | Path,
        *,
        engines: Engines | None = None,
        index: RunIndex | None = None,
        graded: bool = False,
    ) -> RunContext:
        """The context of a run directory written by ``qreason run``, with that run's stored config
        (``${VAR}`` references whose variable is unset now stay unexpanded: few per-stage commands need them).
        ``graded``: the command needs grades; a run stopped before grading is told so."""
        store = RunStore(Path(run_dir))
        config = store.dir / "config.yaml"
        if not (store.dir / "generations.jsonl").exists() or not config.exists():
            raise UserError(str(store.dir), "not a run directory (needs generations.jsonl and config.yaml)")
        cfg = parse_config(decode_utf8(config.read_bytes(), str(config)), str(config), keep_unset=True)
        if graded and not len(store.grades):
            raise UserError(
                str(store.dir),
                f"no graded generations (the run stopped before grading); run "
                f"`qreason grade {store.dir}` or re-run the config first",
            )
        variants = store.variants.all()
        base = next((v for v in variants if v.name == cfg.model.name), None)
        model = (
            ResolvedModel(base.name, base.path, base.fingerprint, "variant")
            if base is not None
            else ResolvedModel(cfg.model.name, cfg.model.path, "", "config")
        )
        summary = RunSummary.read(store.read_json("summary.json")) or RunSummary(
            name=cfg.name, run_dir=str(store.dir)
        )
        ordered = ([base] if base is not None else []) + [v for v in variants if v is not base]
        if not summary.results and len(store.grades):  # a run stopped before its summary was written
            summary.results = [ResultRow(**row) for row in accuracy_table(store.grades.all())]
        return cls(
            cfg=cfg,
            store=store,
            summary=summary,
            base=model,
            index=index,
            engines=engines,
            variants=ordered,
            wanted={g.key for g in store.generations.all()},
        )

    @property
    def base_name(self) -> str:
        """The base (full-precision) variant: every flip and degradation is measured against it."""
        return self.cfg.model.name

    @property
    def base_record(self) -> ModelVariant:
        found = next((v for v in self.variants if v.name == self.base_name), None)
        if found is None:
            raise UserError(
                str(self.store.dir), f"no record of the base variant {self.base_name!r} in variants.jsonl"
            )
        return found

    @property
    def grader(self) -> Grader:
        """The grader the run's ``grading:`` section configures (built once)."""
        if self._grader is None:
            g = self.cfg.grading
            self._grader = GRADERS.get(g.kind, "grading.kind")(g.timeout_s, g.workers)
        return self._grader

    def requests_for(self, variant: str, model: ResolvedModel) -> list[GenerationRequest]:
        """Every (problem, seed) request of the config for one model."""
        return requests_for(self.cfg, variant, model, self.prompts)

    def need_engines(self) -> Engines:
        if self.engines is None:
            raise RuntimeError("this stage needs engines: open the context with engines=...")
        return self.engines


class Stage(Protocol):
    """One stage of a run (see the module docstring)."""

    name: ClassVar[str]
    section: ClassVar[str | None]  # the RunSummary field its result fills (None: it fills none)

    def enabled(self, cfg: RunConfig) -> bool: ...

    def run(self, ctx: RunContext) -> Section | list | None: ...


def run_stage(stage: Stage, ctx: RunContext, force: bool = False) -> None:
    """Run one stage if the config enables it (``force``: a per-stage command runs it anyway); its section
    goes into the summary, written at once."""
    if not (force or stage.enabled(ctx.cfg)):
        return
    ctx.summary.stage_failures.pop(stage.name, None)  # an earlier failure of this stage is redone now
    section = stage.run(ctx)
    if section is not None and stage.section is not None:
        setattr(ctx.summary, stage.section, section)
    ctx.store.write_json("summary.json", ctx.summary.dump())


def run_stage_command(
    run_dir: str | Path,
    stage: Stage,
    update: Callable[[RunConfig], None] | None = None,
    engines: Callable[[RunConfig], Engines] | None = None,
    graded: bool = False,
) -> RunContext:
    """A per-stage command: open the run's context (its stored config), apply the command's flags to the
    config (``update(cfg)``), give the stage engines made for that config (``engines(cfg)``), run it under the
    run lock, store its section in the run's summary.json and close the engines."""
    ctx = RunContext.open(run_dir, graded=graded)
    if update is not None:
        update(ctx.cfg)
    ctx.engines = engines(ctx.cfg) if engines is not None else None
    try:
        with RunLock(ctx.store.dir):  # a writer: only the lock holder appends (and cuts a torn tail)
            run_stage(stage, ctx, force=True)
    finally:
        if ctx.engines is not None:
            ctx.engines.close()
    return ctx
