"""The judge registry: LLM judge kinds looked up by ``JudgeSpec.kind``.

A judge kind is a class constructed as ``cls(spec, template, taxonomy, cache, offline=...)`` with the interface of
``client.JudgeClient`` (``request`` builds a cacheable request for one failure, ``ask`` answers it, ``close``);
it registers itself with ``@register_judge("kind")``. The rule checks are not a kind: they always run, offline.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from qreason.errors import UserError

if TYPE_CHECKING:
    from qreason.config.schema import JudgeSpec

JUDGES: dict[str, type] = {}


def register_judge(kind: str) -> Callable[[type], type]:
    def add(cls: type) -> type:
        JUDGES[kind] = cls
        return cls

    return add


def make_judge(spec: JudgeSpec, *args, **kwargs):
    """The judge for one spec (its kind's class, built with the stage's template, taxonomy and reply cache)."""
    if spec.kind not in JUDGES:
        raise UserError(f"judge {spec.name}", f"no judge kind {spec.kind!r} (have {', '.join(sorted(JUDGES))})")
    return JUDGES[spec.kind](spec, *args, **kwargs)
