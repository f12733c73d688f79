"""The one registry: every pluggable kind (generation backend, grader, LLM judge) looked up by the ``kind``
its config section names.

Built-in kinds are lazy ``"module:attr"`` entries, imported the first time they are asked for (a run that uses
the OpenAI backend never imports vLLM); a new kind is one module plus one line in the table below, or a class
decorated with ``@REGISTRY.register("kind")`` in a module the user imports.
"""

from __future__ import annotations

import importlib
from typing import Callable, Generic, TypeVar

from qreason.errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    """Kinds of one thing (``what``: "backend", "grader", "judge kind") by name."""

    def __init__(self, what: str, lazy: dict[str, str] | None = None):
        self.what = what
        self._lazy = dict(lazy or {})
        self._loaded: dict[str, T] = {}

    def register(self, kind: str) -> Callable[[T], T]:
        """Decorator: ``obj`` is the ``kind``."""

        def add(obj: T) -> T:
            self._loaded[kind] = obj
            return obj

        return add

    def kinds(self) -> list[str]:
        return sorted(self._lazy.keys() | self._loaded.keys())

    def get(self, kind: str, where: str) -> T:
        """The ``kind``; one that is not registered is a ``UserError`` naming ``where`` (the config field)."""
        if kind not in self._loaded and kind in self._lazy:
            module, _, attr = self._lazy[kind].partition(":")
            self._loaded[kind] = getattr(importlib.import_module(module), attr)
        if kind not in self._loaded:
            raise UserError(where, f"no {self.what} {kind!r} (have {', '.join(self.kinds())})")
        return self._loaded[kind]


BACKENDS: Registry[type] = Registry(
    "backend",
    {
        "vllm": "qreason.engines.vllm:VLLMBackend",
        "openai": "qreason.engines.openai:OpenAIBackend",
        "replay": "qreason.engines.replay:ReplayBackend",
    },
)
GRADERS: Registry[type] = Registry(
    "grader",
    {
        "math-verify": "qreason.stages.grade.grader:Grader",
    },
)
JUDGES: Registry[type] = Registry(
    "judge kind",
    {
        "openai": "qreason.stages.judge.client:JudgeClient",
        "prm": "qreason.stages.judge.prm:PRMJudge",
    },
)
