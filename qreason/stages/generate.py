"""Generation stage: requests in, ``Generation`` records out, stored as each batch completes.

Backends (``qreason.engines``) are looked up by the config's ``kind``: the vLLM offline
engine (``vllm``), an OpenAI-compatible endpoint (``openai``) and generations made elsewhere read from a file
(``replay``). The stage itself is backend-agnostic: it skips requests whose key is stored, converts
completions to records, and appends them durably in small groups so a killed run loses at most the group in
flight.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

from qreason import console
from qreason.config.schema import RunConfig
from qreason.engines import Backend, Completion, GenerationRequest, sampling_identity
from qreason.inputs.steps import split_steps
from qreason.records import Generation
from qreason.stages.base import RunContext
from qreason.store import Table, now_iso
from qreason.summary import GenerationSummary

if TYPE_CHECKING:
    from qreason.config.schema import SamplingConfig

__all__ = ["GenerationStats", "run_generation", "to_record"]

log = logging.getLogger(__name__)


def to_record(
    req: GenerationRequest, done: Completion, backend: Backend, sampling: SamplingConfig
) -> Generation:
    return Generation(
        key=req.key,
        variant=req.variant,
        model_fingerprint=req.model_fingerprint,
        task=req.task,
        problem_id=req.problem_id,
        seed=req.seed,
        prompt_hash=req.prompt_hash,
        messages=req.messages,
        text=done.text,
        steps=split_steps(done.text),
        prompt_tokens=done.prompt_tokens,
        completion_tokens=done.completion_tokens,
        finish_reason=done.finish_reason,
        backend=backend.name,
        versions=backend.versions,
        sampling={**sampling_identity(sampling), "seed": req.seed},
        seconds=round(done.seconds, 4),
        created_at=now_iso(),
    )


@dataclass
class GenerationStats:
    produced: int = 0
    failed: int = 0
    seconds: float = 0.0


def _greedy_once(todo: list[GenerationRequest]) -> tuple[list[GenerationRequest], dict[str, list]]:
    """The requests to send when decoding is greedy: one per (model, prompt); the other seeds' requests
    become copies of its result (by the sent request's key)."""
    first: dict[tuple, GenerationRequest] = {}
    copies: dict[str, list[GenerationRequest]] = {}
    for r in todo:
        k = (r.model_fingerprint, r.task, r.problem_id, r.prompt_hash)
        if k in first:
            copies.setdefault(first[k].key, []).append(r)
        else:
            first[k] = r
    return list(first.values()), copies


def run_generation(
    table: Table[Generation],
    requests: Iterable[GenerationRequest],
    backend: Backend,
    sampling: SamplingConfig,
    flush_every: int = 16,
    flush_seconds: float = 5.0,
    desc: str = "generate",
    transient: bool = False,
) -> GenerationStats:
    """Generate every request whose key is not in ``table`` yet; store records durably as they complete. At
    temperature 0 (greedy decoding) the seeds of one prompt give one text: it is generated once and stored
    under each seed. ``transient``: the progress line of a sub-step (``console.progress``)."""
    todo = [r for r in requests if r.key not in table]
    stats = GenerationStats()
    if not todo:
        return stats
    todo, copies = _greedy_once(todo) if sampling.temperature == 0 else (todo, {})
    start = last_flush = time.monotonic()
    pending: list[Generation] = []
    with console.progress(len(todo), desc, "gen", transient=transient) as bar:
        try:
            for req, done in backend.generate(todo, sampling):
                bar.update(1)
                if done.error is not None:
                    stats.failed += 1 + len(copies.get(req.key, ()))
                    log.warning(
                        "generation failed for %s/%s seed %s: %s",
                        req.task,
                        req.problem_id,
                        req.seed,
                        done.error,
                    )
                    continue
                pending += [to_record(r, done, backend, sampling) for r in [req, *copies.get(req.key, ())]]
                if len(pending) >= flush_every or time.monotonic() - last_flush >= flush_seconds:
                    batch, pending, last_flush = pending, [], time.monotonic()
                    stats.produced += table.append(batch)
        finally:  # also when the backend stops the stage (an endpoint refusing every request): keep what came
            batch, pending = pending, []
            stats.produced += table.append(batch)
    stats.seconds = time.monotonic() - start
    return stats


class GenerateStage:
    """Every (variant, problem, seed) of the config; quantized variants first, the base last (a local engine
    then stays up for curation)."""

    name = "generate"
    section = "generations"

    def enabled(self, cfg: RunConfig) -> bool:
        return True

    def run(self, ctx: RunContext) -> GenerationSummary:
        from qreason.inputs.models import ResolvedModel

        jobs, planned, reused = [], 0, {}
        seeds = ctx.cfg.sampling.seeds
        if ctx.cfg.sampling.temperature == 0 and len(seeds) > 1:
            log.warning(
                "sampling: %d seeds at temperature 0 (greedy decoding) give one text per prompt: each prompt "
                "is generated once and stored under every seed (sample with temperature > 0 for a spread)",
                len(seeds),
            )
        for v in ctx.variants[1:] + ctx.variants[:1]:
            model = ResolvedModel(v.name, v.path, v.fingerprint, "variant")
            requests = ctx.requests_for(v.name, model)
            planned += len(requests)
            ctx.wanted |= {r.key for r in requests}
            todo = [r for r in requests if r.key not in ctx.store.generations]
            reused[v.name] = len(requests) - len(todo)
            log.info(
                "%s: %d generations planned, %d reused from earlier runs, %d to do",
                v.name,
                len(requests),
                reused[v.name],
                len(todo),
                extra=console.LOG_ONLY,
            )
            if todo:
                jobs.append((model, todo))
        stats = ctx.need_engines().generate(
            ctx.store.generations, jobs, ctx.cfg.sampling, {v.fingerprint: v.name for v in ctx.variants}
        )
        return GenerationSummary(
            planned=planned,
            cached=planned - stats.produced - stats.failed,
            cached_by_variant=reused,
            produced=stats.produced,
            failed=stats.failed,
            seconds=round(stats.seconds, 2),
        )
