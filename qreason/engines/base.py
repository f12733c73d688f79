"""What every generation backend shares: requests, completions, the backend protocol and the registry.

A backend is a class with ``name``, ``versions``, ``generate(requests, sampling)`` yielding ``(request,
Completion)`` pairs as they finish, and ``close()``; ``resolve_base`` says which model a run's base variant is
(``Backend`` below). Its kind is one line in ``qreason.registry.BACKENDS``; its settings are a schema in
``qreason.config.schema`` (one member of the ``BackendConfig`` union).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Protocol

from qreason.errors import UserError
from qreason.inputs.models import ResolvedModel
from qreason.records import Problem, content_key
from qreason.registry import BACKENDS

if TYPE_CHECKING:
    from qreason.config.schema import BackendConfig, ModelConfig, RunConfig, SamplingConfig


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
    """A generation backend, registered in ``qreason.registry.BACKENDS`` under its config's ``kind`` and built
    as ``cls(cfg, model)``; ``model.adapter`` asks for a LoRA adapter on every request (a backend that cannot
    apply one refuses it with a ``UserError``)."""

    name: str
    versions: dict[str, str]

    @staticmethod
    def resolve_base(cfg: BackendConfig, model: ModelConfig, base_dir: Path | None = None) -> ResolvedModel:
        """The model behind a run's base variant, as this backend sees it."""
        ...

    def generate(
        self, requests: list[GenerationRequest], sampling: SamplingConfig
    ) -> Iterator[tuple[GenerationRequest, Completion]]: ...

    def close(self) -> None: ...


def no_adapter(kind: str, model: ResolvedModel) -> None:
    """What a backend that cannot serve LoRA adapters says when asked to."""
    if model.adapter:
        raise UserError(
            "backend.kind",
            f"the {kind} backend cannot apply a LoRA adapter; evaluate a merged "
            "checkpoint instead (recover.eval_mode: merged)",
        )


def sampling_identity(sampling: SamplingConfig) -> dict:
    """The sampling settings that change a single generation (seeds are per request)."""
    return sampling.model_dump(exclude={"seeds"})


def requests_for(
    cfg: RunConfig, variant: str, model: ResolvedModel, prompts: list[tuple[Problem, list[dict[str, str]]]]
) -> list[GenerationRequest]:
    """Every (problem, seed) request of the config for one variant: the problems of each task whose
    ``variants`` admit it (every task when unset)."""
    return [
        make_request(variant, model, p, messages, cfg.sampling, seed)
        for p, messages in prompts
        if generates_on(cfg, variant, p.task)
        for seed in cfg.sampling.seeds
    ]


def generates_on(cfg: RunConfig, variant: str, task: str) -> bool:
    """Whether ``variant`` is generated on ``task`` (the task's ``variants``; every variant when unset)."""
    return next((variant in t.variants for t in cfg.tasks if t.name == task and t.variants), True)


def make_request(
    variant: str,
    model: ResolvedModel,
    problem: Problem,
    messages: list[dict[str, str]],
    sampling: SamplingConfig,
    seed: int,
) -> GenerationRequest:
    # a generation belongs to a variant: its name and its checkpoint's fingerprint (two variants of one recipe
    # share a checkpoint but not their generations; a renamed variant is generated again under its new name)
    key = content_key(
        "generation",
        variant,
        model.fingerprint,
        problem.task,
        problem.problem_id,
        problem.key,
        content_key("messages", messages),
        sampling_identity(sampling),
        seed,
    )
    return GenerationRequest(
        key=key,
        variant=variant,
        model_fingerprint=model.fingerprint,
        task=problem.task,
        problem_id=problem.problem_id,
        messages=messages,
        seed=seed,
        question=problem.question,
    )


def make_backend(cfg: BackendConfig, model: ResolvedModel) -> Backend:
    return BACKENDS.get(cfg.kind, "backend.kind")(cfg, model)


def resolve_base(cfg: BackendConfig, model: ModelConfig, base_dir: Path | None = None) -> ResolvedModel:
    """The model behind a run's base variant, as the configured backend sees it."""
    return BACKENDS.get(cfg.kind, "backend.kind").resolve_base(cfg, model, base_dir)
