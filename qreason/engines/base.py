"""What every generation backend shares: requests, completions, the backend protocol and the registry.

A backend is a class with ``name``, ``versions``, ``generate(requests, sampling)`` yielding ``(request,
Completion)`` pairs as they finish, and ``close()``; ``resolve_base`` says which model a run's base variant is.
It registers itself under its config's ``kind`` with ``@register_backend("kind")``; its settings are a schema in
``qreason.config`` (one member of the ``BackendConfig`` union).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Protocol

from qreason.errors import UserError
from qreason.inputs.models import ResolvedModel, resolve_model
from qreason.records import Problem, content_key

if TYPE_CHECKING:
    from qreason.config.schema import BackendConfig, ModelConfig, SamplingConfig


@dataclass(frozen=True)
class GenerationRequest:
    key: str
    variant: str
    model_fingerprint: str
    task: str
    problem_id: str
    messages: list[dict[str, str]]
    seed: int
    question: str = ""  # the problem's question as the task states it (not part of the key)

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
                             problem_id=problem.problem_id, messages=messages, seed=seed,
                             question=problem.question)


BACKENDS: dict[str, type] = {}


def register_backend(kind: str) -> Callable[[type], type]:
    """Class decorator: the backend for configs with ``kind: KIND``."""
    def add(cls: type) -> type:
        BACKENDS[kind] = cls
        return cls

    return add


def backend_class(cfg: BackendConfig) -> type:
    if cfg.kind not in BACKENDS:
        raise UserError("backend.kind", f"no backend registered for {cfg.kind!r} (have {', '.join(sorted(BACKENDS))})")
    return BACKENDS[cfg.kind]


def make_backend(cfg: BackendConfig, model: ResolvedModel) -> Backend:
    return backend_class(cfg)(cfg, model)


def resolve_base(cfg: BackendConfig, model: ModelConfig, base_dir: Path | None = None) -> ResolvedModel:
    """The model behind a run's base variant, as the configured backend sees it."""
    resolve = getattr(backend_class(cfg), "resolve_base", None)
    return resolve(cfg, model, base_dir) if resolve else resolve_model(model.path, model.revision, base_dir)


