"""An OpenAI-compatible endpoint as a generation backend (OpenAI, vLLM serve, SGLang, ...).

Requests run concurrently (at most ``concurrency`` in flight) on an asyncio loop in a helper thread; each
result is handed back as soon as it arrives. The ``openai`` client retries 408/409/429/5xx and connection
errors with exponential backoff and honours Retry-After; malformed replies are retried here with backoff; a
request that still fails is reported, not stored.
The API key is read from the environment variable named in the config and never logged or stored.
"""

from __future__ import annotations

import asyncio
import importlib.metadata as md
import os
import queue
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from ..models import ResolvedModel
from ..records import content_key
from .base import Completion, GenerationRequest, register_backend

if TYPE_CHECKING:
    from ..config import ModelConfig, OpenAIConfig, SamplingConfig

_DONE = object()


def make_async_client(base_url: str, api_key_env: str, max_retries: int, timeout_s: float):
    from openai import AsyncOpenAI

    return AsyncOpenAI(base_url=base_url, api_key=os.environ.get(api_key_env) or "EMPTY",
                       max_retries=max_retries, timeout=timeout_s)


def short_error(exc: BaseException) -> str:
    """One line describing an API failure, without request bodies or headers (no secrets)."""
    status = getattr(exc, "status_code", None)
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}{f' {status}' if status else ''}: {text[:200]}"


def continuation_args(messages: list[dict[str, str]]) -> dict | None:
    """A conversation ending in an assistant message asks to continue it (vLLM and SGLang servers accept these
    chat-template options)."""
    if messages and messages[-1]["role"] == "assistant":
        return {"continue_final_message": True, "add_generation_prompt": False}
    return None


@register_backend("openai")
class OpenAIBackend:
    def __init__(self, cfg: OpenAIConfig, model: ResolvedModel):
        self.cfg = cfg
        self.model_name = cfg.model or model.path  # the served name (the runner puts it in path)
        self.name = f"openai-compatible:{cfg.base_url}"
        self.versions = {"openai": md.version("openai")}

    @staticmethod
    def resolve_base(cfg: OpenAIConfig, model: ModelConfig, base_dir: Path | None = None) -> ResolvedModel:
        """An endpoint serves one fixed model: it is identified by the endpoint and the served name."""
        served = cfg.model or model.path
        return ResolvedModel(model.path, served, content_key("endpoint", cfg.base_url, served), "endpoint")

    async def _one(self, client, sem: asyncio.Semaphore, req: GenerationRequest,
                   sampling: SamplingConfig) -> Completion:
        from openai import APIResponseValidationError

        async with sem:
            t0 = time.monotonic()
            for attempt in range(self.cfg.max_retries + 1):
                try:
                    resp = await client.chat.completions.create(
                        model=self.model_name, messages=req.messages, temperature=sampling.temperature,
                        top_p=sampling.top_p, max_tokens=sampling.max_tokens, seed=req.seed,
                        extra_body=continuation_args(req.messages))
                    break
                except (ValueError, APIResponseValidationError) as exc:  # a malformed reply: the client won't retry
                    if attempt == self.cfg.max_retries:
                        return Completion(error=short_error(exc), seconds=time.monotonic() - t0)
                    await asyncio.sleep(min(0.5 * 2**attempt, 8.0))
                except Exception as exc:  # after the client's own retries (429/5xx/timeouts/connection)
                    return Completion(error=short_error(exc), seconds=time.monotonic() - t0)
            if not resp.choices:
                return Completion(error="reply had no choices", seconds=time.monotonic() - t0)
            choice = resp.choices[0]
            usage = resp.usage
            return Completion(text=choice.message.content or "", finish_reason=choice.finish_reason,
                              prompt_tokens=usage.prompt_tokens if usage else None,
                              completion_tokens=usage.completion_tokens if usage else None,
                              seconds=time.monotonic() - t0)

    async def _all(self, requests, sampling, out: queue.Queue) -> None:
        client = make_async_client(self.cfg.base_url, self.cfg.api_key_env, self.cfg.max_retries,
                                   self.cfg.timeout_s)
        sem = asyncio.Semaphore(self.cfg.concurrency)

        async def task(req):
            out.put((req, await self._one(client, sem, req, sampling)))

        try:
            await asyncio.gather(*(task(r) for r in requests))
        finally:
            await client.close()

    def generate(self, requests: list[GenerationRequest],
                 sampling: SamplingConfig) -> Iterator[tuple[GenerationRequest, Completion]]:
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
            yield item
        thread.join()
        if failure:
            raise failure[0]

    def close(self) -> None:
        pass
