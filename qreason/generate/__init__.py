"""Generation stage: requests in, ``Generation`` records out, stored as each batch completes.

A backend is anything with ``name``, ``versions`` and ``generate(requests, sampling)`` yielding
``(request, Completion)`` pairs as they finish. Two exist: the vLLM offline engine and an OpenAI-compatible
endpoint. The stage itself is backend-agnostic: it skips requests whose key is stored, converts completions to
records, and appends them durably in small groups so a killed run loses at most the group in flight.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Iterator, Protocol

from tqdm.auto import tqdm

from ..models import ResolvedModel
from ..records import Generation, Problem, content_key
from ..steps import split_steps
from ..store import Table, now_iso

if TYPE_CHECKING:  # config imports the judge package, which uses this one: no runtime import here
    from ..config import BackendConfig, SamplingConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationRequest:
    key: str
    variant: str
    model_fingerprint: str
    task: str
    problem_id: str
    messages: list[dict[str, str]]
    seed: int

    @property
    def prompt_hash(self) -> str:
        return content_key("messages", self.messages)


@dataclass
class Completion:
    text: str = ""
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None
    seconds: float = 0.0
    error: str | None = None  # set when the backend gave up on this request; nothing is stored for it


class Backend(Protocol):
    name: str
    versions: dict[str, str]

    def generate(self, requests: list[GenerationRequest],
                 sampling: SamplingConfig) -> Iterator[tuple[GenerationRequest, Completion]]: ...

    def close(self) -> None: ...


def sampling_identity(sampling: SamplingConfig) -> dict:
    """The sampling settings that change a single generation (seeds are per request)."""
    return sampling.model_dump(exclude={"seeds"})


def make_request(variant: str, model: ResolvedModel, problem: Problem, messages: list[dict[str, str]],
                 sampling: SamplingConfig, seed: int) -> GenerationRequest:
    key = content_key("generation", model.fingerprint, problem.task, problem.problem_id, problem.key,
                      content_key("messages", messages), sampling_identity(sampling), seed)
    return GenerationRequest(key=key, variant=variant, model_fingerprint=model.fingerprint, task=problem.task,
                             problem_id=problem.problem_id, messages=messages, seed=seed)


def make_backend(cfg: BackendConfig, model: ResolvedModel) -> Backend:
    if cfg.kind == "openai":
        from .openai_backend import OpenAIBackend

        return OpenAIBackend(cfg, model)
    from .vllm_backend import VLLMBackend

    return VLLMBackend(cfg, model)


def to_record(req: GenerationRequest, done: Completion, backend: Backend, sampling: SamplingConfig) -> Generation:
    return Generation(
        key=req.key, variant=req.variant, model_fingerprint=req.model_fingerprint, task=req.task,
        problem_id=req.problem_id, seed=req.seed, prompt_hash=req.prompt_hash, messages=req.messages,
        text=done.text, steps=split_steps(done.text), prompt_tokens=done.prompt_tokens,
        completion_tokens=done.completion_tokens, finish_reason=done.finish_reason, backend=backend.name,
        versions=backend.versions, sampling={**sampling_identity(sampling), "seed": req.seed},
        seconds=round(done.seconds, 4), created_at=now_iso())


@dataclass
class GenerationStats:
    produced: int = 0
    failed: int = 0
    seconds: float = 0.0


def run_generation(table: Table[Generation], requests: Iterable[GenerationRequest], backend: Backend,
                   sampling: SamplingConfig, flush_every: int = 16, flush_seconds: float = 5.0,
                   desc: str = "generate") -> GenerationStats:
    """Generate every request whose key is not in ``table`` yet; store records durably as they complete."""
    todo = [r for r in requests if r.key not in table]
    stats = GenerationStats()
    if not todo:
        return stats
    start = last_flush = time.monotonic()
    pending: list[Generation] = []
    with tqdm(total=len(todo), desc=desc, unit="gen", dynamic_ncols=True) as bar:
        for req, done in backend.generate(todo, sampling):
            bar.update(1)
            if done.error is not None:
                stats.failed += 1
                log.warning("generation failed for %s/%s seed %s: %s", req.task, req.problem_id,
                            req.seed, done.error)
                continue
            pending.append(to_record(req, done, backend, sampling))
            if len(pending) >= flush_every or time.monotonic() - last_flush >= flush_seconds:
                stats.produced += table.append(pending)
                pending, last_flush = [], time.monotonic()
        stats.produced += table.append(pending)
    stats.seconds = time.monotonic() - start
    return stats
