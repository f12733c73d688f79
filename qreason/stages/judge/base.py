"""LLM judge kinds, looked up by ``JudgeSpec.kind`` in ``qreason.registry.JUDGES``.

A judge kind is a class constructed as ``cls(spec, template, taxonomy, cache, offline=...)`` with the
interface of ``Judge`` below (``client.JudgeClient`` is the one built in). The rule checks are not a kind:
they always run, offline.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from qreason.registry import JUDGES

if TYPE_CHECKING:
    from qreason.config.schema import JudgeSpec
    from qreason.stages.judge.client import JudgeRequest, ReplyCache
    from qreason.stages.judge.prompts import JudgeInput, Verdict


class Judge(Protocol):
    """One LLM judge of the panel."""

    spec: JudgeSpec
    cache: ReplyCache  # replies by request key: a re-run asks nothing twice
    requests: int  # HTTP requests sent, retries included
    refused: str | None  # why the endpoint refused outright (the run reports it and stops asking)
    secrets: tuple[str, ...]  # values to redact from anything recorded

    def request(self, item: JudgeInput) -> JudgeRequest:
        """The cacheable request (messages and its content key) for one failure."""
        ...

    def accept(self, request: JudgeRequest, content: str | None, usage: dict[str, int]) -> Verdict:
        """Validate a reply (raises ``InvalidReply``) and cache it (batch outputs come through here)."""
        ...

    async def judge(self, request: JudgeRequest) -> Verdict | None:
        """The verdict: cached, fetched or a judge_error; None offline on a cache miss or once refused."""
        ...

    async def aclose(self) -> None: ...


def make_judge(spec: JudgeSpec, *args, **kwargs) -> Judge:
    """The judge for one spec (its kind's class, built with the stage's template, taxonomy and reply
    cache)."""
    return JUDGES.get(spec.kind, f"judge {spec.name}")(spec, *args, **kwargs)
