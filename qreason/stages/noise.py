"""The noise floor: is a quantized variant's drop larger than what moves when nothing that matters moves?

The base model is re-run on the run's problems and seeds under perturbations that should not change its
answers (another batch size, request order, prefix caching toggled, another tensor-parallel size: the
``noise:`` section). Each perturbation is a variant of its own, ``BASE~NAME``, stored in ``RUN_DIR/noise/``
apart from the run's tables, so the variant tables, judging and curation never see it. From those records:

- base-vs-base flips per perturbation (lost: right in the base, wrong when perturbed; gained: the reverse);
- per quantized variant and task, its discordance with the base (lost + gained over paired cells) against the
  noise's (all perturbations pooled), with a one-sided Fisher exact test (``qreason.stats.exceeds_rate``);
- per-problem stability over repetitions (seeds x the base and its perturbations): a stable flip is a problem
  the base solves in (nearly) every repetition and the variant in (nearly) none. Curation prefers them.
"""

from __future__ import annotations

import logging
import random
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Iterable, Iterator

from qreason import console
from qreason.config.schema import NoiseConfig, Perturbation, RunConfig, StabilityConfig, noise_variant
from qreason.engines import Backend, Completion, GenerationRequest, make_backend
from qreason.flips import latest_grades
from qreason.inputs.models import ResolvedModel
from qreason.records import Grade, content_key
from qreason.stages.base import RunContext
from qreason.stages.generate import run_generation
from qreason.stages.grade import grade_key, run_grading
from qreason.stats import exceeds_rate
from qreason.summary import NoiseSummary, PerturbationNoise, VariantVsNoise

if TYPE_CHECKING:
    from qreason.config.schema import SamplingConfig
    from qreason.store import RunStore

log = logging.getLogger(__name__)

Cell = tuple[str, str, int]  # (task, problem_id, seed)


class ChunkedBackend:
    """A backend whose engine calls hold at most ``size`` requests (vLLM batches the requests of one call
    together, so this sets the batch composition); the inner backend is not closed here."""

    def __init__(self, inner: Backend, size: int):
        self.inner, self.size = inner, size
        self.name, self.versions = inner.name, inner.versions

    def generate(
        self, requests: list[GenerationRequest], sampling: SamplingConfig
    ) -> Iterator[tuple[GenerationRequest, Completion]]:
        for start in range(0, len(requests), self.size):
            yield from self.inner.generate(requests[start : start + self.size], sampling)

    def close(self) -> None:
        pass


def settings(p: Perturbation) -> dict:
    """What a perturbation changes (its identity in generation keys, and what the summary shows)."""
    return p.model_dump(exclude={"name"}, exclude_defaults=True)


def perturbed_requests(
    requests: list[GenerationRequest], base: str, p: Perturbation
) -> list[GenerationRequest]:
    """The base's requests as variant BASE~NAME, keyed by the perturbation too, in its order."""
    variant = noise_variant(base, p.name)
    ident = {"name": p.name, **settings(p)}
    out = [replace(r, key=content_key("noise", r.key, ident), variant=variant) for r in requests]
    if p.order == "reverse":
        out.reverse()
    elif p.order == "shuffle":
        random.Random(content_key("order", p.name)).shuffle(out)
    return out


def _own_engine(cfg: RunConfig, p: Perturbation) -> bool:
    return cfg.executor.kind == "local" and (
        p.changes_engine() or (p.batch_size or 0) > cfg.backend.batch_size
    )


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:
        return 0


def _perturbed_backend_cfg(cfg: RunConfig, p: Perturbation):
    update: dict = {"batch_size": p.batch_size or cfg.backend.batch_size}
    if cfg.backend.kind == "vllm":
        update["engine_args"] = {**cfg.backend.engine_args, **p.engine_args}
        if p.tensor_parallel_size is not None:
            update["tensor_parallel_size"] = p.tensor_parallel_size
    return cfg.backend.model_copy(update=update)


# ---------------------------------------------------------------------------------------------- statistics


def _by_cell(grades: Iterable[Grade]) -> dict[str, dict[Cell, bool]]:
    out: dict[str, dict[Cell, bool]] = defaultdict(dict)
    for g in grades:
        out[g.variant][(g.task, g.problem_id, g.seed)] = g.status == "correct"
    return out


@dataclass
class Stability:
    base_rate: float
    base_reps: int
    variant_rate: float
    variant_reps: int
    stable: bool | None  # None: the base has fewer than two repetitions

    def as_dict(self) -> dict:
        return {
            "base_rate": round(self.base_rate, 4),
            "base_reps": self.base_reps,
            "variant_rate": round(self.variant_rate, 4),
            "variant_reps": self.variant_reps,
            "stable": self.stable,
        }


def problem_stability(
    grades: Iterable[Grade], noise_grades: Iterable[Grade], base: str, cfg: StabilityConfig
) -> dict[tuple[str, str, str], Stability]:
    """(variant, task, problem_id) -> the problem's correct-rate for the base (its seeds and its perturbed
    re-runs together) and for the variant (its seeds), and whether a flip there is stable."""
    base_hits: dict[tuple[str, str], list[bool]] = defaultdict(list)
    var_hits: dict[tuple[str, str, str], list[bool]] = defaultdict(list)
    for g in list(grades) + list(noise_grades):
        ok = g.status == "correct"
        if g.variant == base or g.variant.startswith(noise_variant(base, "")):
            base_hits[(g.task, g.problem_id)].append(ok)
        else:
            var_hits[(g.variant, g.task, g.problem_id)].append(ok)
    out = {}
    for (variant, task, pid), hits in var_hits.items():
        b = base_hits.get((task, pid), [])
        if not b:
            continue
        base_rate, var_rate = sum(b) / len(b), sum(hits) / len(hits)
        stable = (
            None if len(b) < 2 else base_rate >= cfg.base_min - 1e-9 and var_rate <= cfg.variant_max + 1e-9
        )
        out[(variant, task, pid)] = Stability(base_rate, len(b), var_rate, len(hits), stable)
    return out


def store_stability(
    store: RunStore, base: str, cfg: StabilityConfig
) -> dict[tuple[str, str, str], Stability]:
    """``problem_stability`` over a run directory's latest grades (the run's and the noise floor's)."""
    return problem_stability(
        latest_grades(store.grades.all()).values(),
        latest_grades(store.noise_grades.all()).values(),
        base,
        cfg,
    )


def _pair(base: dict[Cell, bool], other: dict[Cell, bool], task: str) -> tuple[int, int, int]:
    cells = [c for c in base if c[0] == task and c in other]
    lost = sum(base[c] and not other[c] for c in cells)
    gained = sum(other[c] and not base[c] for c in cells)
    return len(cells), lost, gained


def noise_summary(
    main: list[Grade],
    noise: list[Grade],
    texts: dict[tuple[str, Cell], str],
    base: str,
    variants: list[str],
    cfg: NoiseConfig,
) -> NoiseSummary:
    """The noise section from the graded records: ``main`` the run's (base and quantized variants), ``noise``
    the perturbed base's; ``texts`` (variant, cell) -> generated text, for how many texts changed at all."""
    cells = _by_cell(main)
    noisy = _by_cell(noise)
    base_cells = cells.get(base, {})
    # the tasks the base was re-run on (noise.tasks; a task with no perturbed cells has no floor to compare)
    tasks = sorted({c[0] for c in base_cells} & {c[0] for got in noisy.values() for c in got})
    out = NoiseSummary(base=base, alpha=cfg.alpha, stability=cfg.stability.model_dump())
    for p in cfg.perturbations:
        name = noise_variant(base, p.name)
        got = noisy.get(name, {})
        for task in tasks:
            n, lost, gained = _pair(base_cells, got, task)
            paired = [c for c in base_cells if c[0] == task and c in got]
            out.perturbations.append(
                PerturbationNoise(
                    name=p.name,
                    variant=name,
                    task=task,
                    settings=settings(p),
                    cells=n,
                    lost=lost,
                    gained=gained,
                    text_changed=sum(texts.get((base, c)) != texts.get((name, c)) for c in paired),
                    accuracy=sum(got[c] for c in paired) / n if n else 0.0,
                    base_accuracy=sum(base_cells[c] for c in paired) / n if n else 0.0,
                )
            )
    for task in tasks:
        rows = [r for r in out.perturbations if r.task == task and r.cells]
        out.floor[task] = max((abs(r.accuracy - r.base_accuracy) for r in rows), default=0.0)
    stability = problem_stability(main, noise, base, cfg.stability)
    for variant in variants:
        got = cells.get(variant, {})
        for task in tasks:
            n, lost, gained = _pair(base_cells, got, task)
            rows = [r for r in out.perturbations if r.task == task]
            noise_cells, noise_flips = sum(r.cells for r in rows), sum(r.flips for r in rows)
            p_value = exceeds_rate(lost + gained, n, noise_flips, noise_cells)
            flipped = {c[1] for c in got if c[0] == task and base_cells.get(c) and not got[c]}
            known = [stability.get((variant, task, pid)) for pid in flipped]
            out.variants.append(
                VariantVsNoise(
                    variant=variant,
                    task=task,
                    cells=n,
                    lost=lost,
                    gained=gained,
                    noise_cells=noise_cells,
                    noise_flips=noise_flips,
                    discordance=(lost + gained) / n if n else 0.0,
                    noise_discordance=noise_flips / noise_cells if noise_cells else 0.0,
                    p_value=p_value,
                    p_by_perturbation={
                        r.name: exceeds_rate(lost + gained, n, r.flips, r.cells) for r in rows
                    },
                    exceeds_noise=p_value < cfg.alpha,
                    stable_flips=None
                    if any(s is None or s.stable is None for s in known)
                    else sum(s.stable for s in known),
                )
            )
    seeds = {c[2] for c in base_cells}
    out.repetitions = {base: len(seeds) * (1 + len(cfg.perturbations))} | {v: len(seeds) for v in variants}
    return out


# --------------------------------------------------------------------------------------------------- stage


class NoiseStage:
    """Re-run the base under each perturbation, grade it, and compare (``noise:`` in the config)."""

    name = "noise"
    section = "noise"

    def enabled(self, cfg: RunConfig) -> bool:
        return cfg.noise is not None and cfg.noise.enabled

    def run(self, ctx: RunContext) -> NoiseSummary:
        cfg, store, t0 = ctx.cfg, ctx.store, time.monotonic()
        noise = cfg.noise
        base = ctx.base_record
        model = ResolvedModel(base.name, base.path, base.fingerprint, "variant")
        requests = [r for r in ctx.requests_for(base.name, model) if r.task in (noise.tasks or [r.task])]
        wanted: set[str] = set()
        planned = produced = failed = 0
        n_gpus = _gpu_count() if any(p.tensor_parallel_size for p in noise.perturbations) else 0
        skipped = {
            p.name: f"tensor_parallel_size {p.tensor_parallel_size} needs as many GPUs; here: {n_gpus}"
            for p in noise.perturbations
            if p.tensor_parallel_size and p.tensor_parallel_size > max(1, n_gpus)
        }
        for name, why in skipped.items():
            log.warning("noise perturbation %s skipped: %s", name, why)
        # perturbations the base engine can serve first; those needing an engine of their own after
        runnable = [p for p in noise.perturbations if p.name not in skipped]
        for p in sorted(runnable, key=lambda p: _own_engine(cfg, p)):
            todo = perturbed_requests(requests, base.name, p)
            planned += len(todo)
            wanted |= {r.key for r in todo}
            todo = [r for r in todo if r.key not in store.noise_generations]
            log.info(
                "noise %s: %d generations planned, %d to do",
                p.name,
                len(requests),
                len(todo),
                extra=console.LOG_ONLY,
            )
            if not todo:
                continue
            own = None
            if _own_engine(cfg, p):
                ctx.need_engines().close()  # one engine at a time: the run's is started again when needed
                own = make_backend(_perturbed_backend_cfg(cfg, p), model)
                if getattr(own, "settings", None):
                    ctx.engine_settings[noise_variant(base.name, p.name)] = own.settings
                backend: Backend = own
            else:
                backend = ChunkedBackend(
                    ctx.need_engines().backend_for(model), p.batch_size or cfg.backend.batch_size
                )
            try:
                stats = run_generation(
                    store.noise_generations, todo, backend, cfg.sampling, desc=f"noise {p.name}"
                )
            finally:
                if own is not None:
                    own.close()
            produced, failed = produced + stats.produced, failed + stats.failed
        gens = [g for g in store.noise_generations.all() if g.key in wanted]
        run_grading(store, ctx.grader, gens, out=store.noise_grades, transient=True, desc="noise: grade")
        gid = ctx.grader.grader
        noise_keys = {grade_key(g.key, gid) for g in gens}
        main_keys = {grade_key(k, gid) for k in ctx.wanted}
        main = [g for g in store.grades.all() if g.key in main_keys]
        noisy = [g for g in store.noise_grades.all() if g.key in noise_keys]
        texts = {
            (g.variant, (g.task, g.problem_id, g.seed)): g.text
            for g in [*store.generations.all(), *gens]
            if g.key in ctx.wanted or g.key in wanted
        }
        section = noise_summary(
            main,
            noisy,
            texts,
            base.name,
            [v.name for v in ctx.variants if v.name != base.name],
            noise.model_copy(update={"perturbations": runnable}),
        )
        section.skipped = skipped
        section.planned, section.produced, section.failed = planned, produced, failed
        section.cached = planned - produced - failed
        section.seconds = round(time.monotonic() - t0, 2)
        return section
