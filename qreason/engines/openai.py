"""An OpenAI-compatible endpoint as a generation backend (OpenAI, vLLM serve, SGLang, ...).

Requests run concurrently (at most ``concurrency`` in flight) on an asyncio loop in a helper thread; each
result is handed back as soon as it arrives. The ``openai`` client retries 408/409/429/5xx and connection
errors with exponential backoff and honours Retry-After; malformed replies are retried here with backoff; a
request that still fails is reported, not stored.
Replies are read defensively (any shape: a recorded, retried error, never a crash); each HTTP request has a
total deadline of ``timeout_s`` and a body size cap; a 400/401/403/404 stops the stage with one error instead
of one per request. The API key is read from the environment variable named in the config and never logged or
stored; URLs and error texts are redacted before they reach a record or a log.
"""

from __future__ import annotations

import asyncio
import importlib.metadata as md
import logging
import queue
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from qreason.engines.base import Completion, GenerationRequest, no_adapter
from qreason.engines.openai_http import (
    REFUSED_STATUSES,
    api_key,
    make_async_client,
    read_reply,
    redact,
    short_error,
)
from qreason.errors import UserError
from qreason.inputs.models import ResolvedModel
from qreason.records import content_key

if TYPE_CHECKING:
    from qreason.config.schema import ModelConfig, OpenAIConfig, SamplingConfig

_DONE = object()
log = logging.getLogger(__name__)
# An endpoint may ignore max_tokens: more characters than this many per requested token cannot come from
# honouring it, so the text is cut there (finish_reason "length", like any reply cut at its budget).
MAX_CHARS_PER_TOKEN = 64


def capped(text: str, finish_reason: str | None, max_tokens: int) -> tuple[str, str | None]:
    """A reply's text within its token budget (``MAX_CHARS_PER_TOKEN`` characters per token), and its finish
    reason ("length" when it was cut: the grade then says truncated)."""
    limit = max_tokens * MAX_CHARS_PER_TOKEN
    if len(text) <= limit:
        return text, finish_reason
    log.warning(
        "the endpoint ignored max_tokens %d: a reply of %d characters was cut to the first %d",
        max_tokens,
        len(text),
        limit,
    )
    return text[:limit], "length"


def continuation_args(messages: list[dict[str, str]]) -> dict | None:
    """A conversation ending in an assistant message asks to continue it (vLLM and SGLang servers accept these
    chat-template options)."""
    if messages and messages[-1]["role"] == "assistant":
        return {"continue_final_message": True, "add_generation_prompt": False}
    return None


class OpenAIBackend:
    def __init__(self, cfg: OpenAIConfig, model: ResolvedModel):
        no_adapter("openai", model)
        self.cfg = cfg
        self.model_name = cfg.model or model.path  # the served name (the runner puts it in path)
        self.secrets = tuple(k for k in (api_key(cfg.api_key_env),) if k)
        self.name = f"openai-compatible:{redact(cfg.base_url, self.secrets)}"
        self.versions = {"openai": md.version("openai")}
        self.refused: str | None = None  # set by the first 400/401/403/404: the run stops with this one error

    @staticmethod
    def resolve_base(cfg: OpenAIConfig, model: ModelConfig, base_dir: Path | None = None) -> ResolvedModel:
        """An endpoint serves one fixed model: it is identified by the endpoint and the served name."""
        served = cfg.model or model.path
        return ResolvedModel(model.path, served, content_key("endpoint", cfg.base_url, served), "endpoint")

    async def _one(
        self, client, sem: asyncio.Semaphore, req: GenerationRequest, sampling: SamplingConfig
    ) -> Completion:
        from openai import APIConnectionError, APIStatusError

        async with sem:
            t0 = time.monotonic()
            problem = "no attempt made"
            for attempt in range(self.cfg.max_retries + 1):
                if self.refused:
                    return Completion(error=self.refused, seconds=time.monotonic() - t0)
                if attempt:  # a reply the client accepted but that carried no readable text: ask again
                    await asyncio.sleep(min(0.5 * 2 ** (attempt - 1), 8.0))
                try:
                    resp = await client.chat.completions.create(
                        model=self.model_name,
                        messages=req.messages,
                        temperature=sampling.temperature,
                        top_p=sampling.top_p,
                        max_tokens=sampling.max_tokens,
                        seed=req.seed,
                        extra_body=continuation_args(req.messages),
                    )
                except APIStatusError as exc:
                    if exc.status_code in REFUSED_STATUSES:
                        self.refused = self.refused or (
                            "the endpoint refused the request: " + short_error(exc, self.secrets)
                        )
                        return Completion(error=self.refused, seconds=time.monotonic() - t0)
                    return Completion(error=short_error(exc, self.secrets), seconds=time.monotonic() - t0)
                except (
                    APIConnectionError
                ) as exc:  # after the client's own retries (timeouts, connection, 5xx)
                    return Completion(error=short_error(exc, self.secrets), seconds=time.monotonic() - t0)
                except Exception as exc:  # noqa: BLE001 - a malformed reply: the client does not retry these
                    problem = f"unreadable response ({short_error(exc, self.secrets)})"
                    continue
                reply = read_reply(resp)
                if reply.problem:
                    problem = reply.problem
                    continue
                refused = reply.refusal is not None  # the model declined: kept as its answer, marked as such
                text, finish = capped(
                    reply.refusal if refused else reply.content or "",
                    "refusal" if refused else reply.finish_reason,
                    sampling.max_tokens,
                )
                return Completion(
                    text=text,
                    finish_reason=finish,
                    prompt_tokens=reply.prompt_tokens,
                    completion_tokens=reply.completion_tokens,
                    seconds=time.monotonic() - t0,
                )
            return Completion(error=redact(problem, self.secrets), seconds=time.monotonic() - t0)

    async def _all(self, requests, sampling, out: queue.Queue) -> None:
        client = make_async_client(
            self.cfg.base_url, self.cfg.api_key_env, self.cfg.max_retries, self.cfg.timeout_s
        )
        sem = asyncio.Semaphore(self.cfg.concurrency)

        async def task(req):
            out.put((req, await self._one(client, sem, req, sampling)))

        try:
            await asyncio.gather(*(task(r) for r in requests))
        finally:
            await client.close()

    def generate(
        self, requests: list[GenerationRequest], sampling: SamplingConfig
    ) -> Iterator[tuple[GenerationRequest, Completion]]:
        out: queue.Queue = queue.Queue()
        failure: list[BaseException] = []

        def worker():
            try:
                asyncio.run(self._all(requests, sampling, out))
            except BaseException as exc:  # surfaced in the caller's thread below
                failure.append(exc)
            finally:
                out.put(_DONE)

        thread = threading.Thread(target=worker, name="qreason-openai", daemon=True)
        thread.start()
        while (item := out.get()) is not _DONE:
            if self.refused is None or item[1].error != self.refused:  # reported once, below
                yield item
        thread.join()
        if failure:
            raise failure[0]
        if self.refused:
            raise UserError(f"backend {redact(self.cfg.base_url, self.secrets)}", self.refused)

    def close(self) -> None:
        pass
