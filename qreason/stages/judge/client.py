"""An LLM judge behind any OpenAI-compatible endpoint: structured replies, validation, retries, a reply cache
and the OpenAI batch file format.

- The request asks for a JSON-schema structured reply (``response_format={"type": "json_schema", ...}``); the
  reply is checked with pydantic and against the taxonomy and the number of steps (``prompts.parse_reply``).
- Transport failures (408/409/429/5xx, timeouts, dropped connections) are retried by the ``openai`` client
  with exponential backoff, honouring Retry-After. A reply that is malformed or off-schema is retried here, at
  most ``invalid_retries`` more times, with a doubling wait and at ``retry_temperature``. What still fails
  becomes a judge_error verdict (``details["error_kind"]``: "transport" or "invalid"): the run goes on.
- Every valid reply is cached in SQLite under a key of (model, prompt version, full request body), so a re-run
  sends nothing for work already answered. Failures are not cached: a re-run retries them.
- The API key is read from the environment variable the spec names and is never logged or stored.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from qreason.config.judge import JudgeSpec
from qreason.engines.openai_http import (
    REFUSED_STATUSES,
    deadline_http_client,
    read_reply,
    redact,
    short_error,
)
from qreason.errors import UserError
from qreason.records import content_key
from qreason.stages.judge.prompts import (
    InvalidReply,
    JudgeInput,
    PromptTemplate,
    Taxonomy,
    Verdict,
    build_messages,
    parse_reply,
    reply_schema,
    response_format,
)
from qreason.store import iter_jsonl, write_atomic

BATCH_URL = "/v1/chat/completions"
USAGE_FIELDS = ("prompt_tokens", "completion_tokens", "total_tokens")


def reply_usage(reply) -> dict[str, int]:
    """The token counts a Reply (``generate.openai_backend.read_reply``) carried."""
    return {f: getattr(reply, f) for f in USAGE_FIELDS if getattr(reply, f) is not None}


def add_usage(total: dict[str, int], usage: Any) -> dict[str, int]:
    """Sum token usage (an openai usage object or a dict) into ``total``."""
    if usage is None:
        return total
    for f in USAGE_FIELDS:
        v = usage.get(f) if isinstance(usage, dict) else getattr(usage, f, None)
        if isinstance(v, int):
            total[f] = total.get(f, 0) + v
    return total


class ReplyCache:
    """Valid judge replies by request key, in one SQLite file (safe to share between runs and processes)."""

    SCHEMA = """CREATE TABLE IF NOT EXISTS replies (
        key TEXT PRIMARY KEY, model TEXT NOT NULL, prompt_version TEXT NOT NULL,
        content TEXT NOT NULL, usage TEXT NOT NULL, created_at REAL NOT NULL)"""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, timeout=30, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        with self.db:
            self.db.execute(self.SCHEMA)

    def get(self, key: str) -> tuple[str, dict[str, int]] | None:
        row = self.db.execute("SELECT content, usage FROM replies WHERE key = ?", (key,)).fetchone()
        return (row[0], json.loads(row[1])) if row else None

    def put(self, key: str, model: str, prompt_version: str, content: str, usage: dict[str, int]) -> None:
        with self.db:
            self.db.execute(
                "INSERT OR REPLACE INTO replies VALUES (?, ?, ?, ?, ?, ?)",
                (key, model, prompt_version, content, json.dumps(usage), time.time()),
            )

    def __len__(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM replies").fetchone()[0]

    def close(self) -> None:
        self.db.close()


@dataclass(frozen=True)
class JudgeRequest:
    key: str  # cache key: (model, prompt version, request body)
    body: dict  # the chat completion request, as sent (and as written to batch files)
    n_steps: int


class JudgeClient:
    """One judge spec: builds requests, answers them from the cache or the endpoint, and counts HTTP
    requests."""

    def __init__(
        self,
        spec: JudgeSpec,
        template: PromptTemplate,
        taxonomy: Taxonomy,
        cache: ReplyCache,
        offline: bool = False,
    ):
        self.spec = spec
        self.template = template
        self.taxonomy = taxonomy
        self.cache = cache
        self.offline = offline  # answer from the cache only (batch read mode)
        self.requests = 0  # HTTP requests sent, retries included
        self.refused: str | None = None  # why the endpoint refused a request outright (then nothing is sent)
        self._client = None
        self._sem: asyncio.Semaphore | None = None

    # ------------------------------------------------------------------ requests
    def request(self, inp: JudgeInput) -> JudgeRequest:
        n = len(inp.steps)
        body: dict[str, Any] = {
            "model": self.spec.model,
            "messages": build_messages(inp, self.template, self.taxonomy),
            "response_format": response_format(
                reply_schema(self.taxonomy, n, self.template, self.spec.schema_limits)
            ),
            "temperature": self.spec.temperature,
            "max_completion_tokens": self.spec.max_tokens or self.template.max_tokens,
        }
        if self.spec.seed is not None:
            body["seed"] = self.spec.seed
        return JudgeRequest(content_key("judge-reply", self.spec.model, self.template.version, body), body, n)

    def cached(self, req: JudgeRequest) -> Verdict | None:
        hit = self.cache.get(req.key)
        if hit is None:
            return None
        content, usage = hit
        try:
            verdict = parse_reply(content, req.n_steps, self.taxonomy)
        except InvalidReply:
            return None  # cannot happen for what we stored; re-ask rather than trust it
        verdict.usage = {**usage, "cached": 1}
        return verdict

    def accept(self, req: JudgeRequest, content: str | None, usage: dict[str, int]) -> Verdict:
        """Validate a reply (raises InvalidReply) and cache it."""
        verdict = parse_reply(content, req.n_steps, self.taxonomy)
        self.cache.put(req.key, self.spec.model, self.template.version, content or "", usage)
        return verdict

    # ------------------------------------------------------------------ network
    def _openai(self):
        if self._client is None:
            import openai

            async def count(_request) -> None:
                self.requests += 1

            self._client = openai.AsyncOpenAI(
                base_url=self.spec.base_url,
                api_key=self.secrets[0] if self.secrets else "EMPTY",
                max_retries=self.spec.max_retries,
                timeout=self.spec.timeout_s,
                http_client=deadline_http_client(self.spec.timeout_s, {"request": [count]}),
            )
            self._sem = asyncio.Semaphore(self.spec.concurrency)
        return self._client

    @property
    def secrets(self) -> tuple[str, ...]:
        key = os.environ.get(self.spec.api_key_env)
        return (key,) if key else ()

    async def judge(self, req: JudgeRequest) -> Verdict | None:
        """The verdict for a request: cached, fetched, or judge_error. None offline on a cache miss, and once
        the endpoint has refused a request outright (400/401/403/404: ``self.refused`` says why, once per
        run)."""
        verdict = self.cached(req)
        if verdict is not None or self.offline or self.refused:
            return verdict
        import openai

        client = self._openai()
        usage: dict[str, int] = {}
        problem, kind = "no attempt made", "invalid"  # kind of the last problem: invalid reply or transport
        details: dict[str, Any] = {}
        attempts = 1 + self.spec.invalid_retries
        async with self._sem:
            for attempt in range(attempts):
                if self.refused:
                    return None
                if attempt:
                    await asyncio.sleep(self.spec.backoff_s * 2 ** (attempt - 1))
                body = (
                    req.body
                    if attempt == 0
                    else {**req.body, "temperature": max(self.spec.temperature, self.spec.retry_temperature)}
                )
                try:
                    resp = await client.chat.completions.create(**body)
                except openai.APIStatusError as exc:
                    if exc.status_code in REFUSED_STATUSES:
                        self.refused = self.refused or (
                            f"judge {self.spec.name}: the endpoint refused the request "
                            f"({short_error(exc, self.secrets)}); nothing was recorded for it, fix the judge "
                            "spec "
                            "and re-run"
                        )
                        return None
                    return self._transport_error(short_error(exc, self.secrets), usage, attempt)
                except openai.APIConnectionError as exc:
                    # the client has already retried these with backoff; give up on this input
                    return self._transport_error(short_error(exc, self.secrets), usage, attempt)
                except Exception as exc:  # noqa: BLE001 - an unreadable response body: retry like a bad reply
                    problem, kind = f"unreadable response ({short_error(exc, self.secrets)})", "transport"
                    continue
                reply = read_reply(resp)
                add_usage(usage, reply_usage(reply))
                if reply.problem:  # no choices, no message, content that is not text: the endpoint's fault
                    problem, kind = reply.problem, "transport"
                    continue
                if reply.refusal is not None:
                    problem, kind = f"the judge refused: {reply.refusal[:300]!r}", "invalid"
                    details = {"refusal": reply.refusal[:1000]}
                    continue
                try:
                    verdict = self.accept(req, reply.content, dict(usage))
                except InvalidReply as exc:
                    problem, kind = str(exc), "invalid"
                    if reply.finish_reason == "length":
                        problem += " (the reply hit max_tokens)"
                    continue
                verdict.usage = {**usage, "attempts": attempt + 1}
                return verdict
        return Verdict(
            status="judge_error",
            error=redact(f"no valid reply after {attempts} attempts: {problem}", self.secrets),
            usage={**usage, "attempts": attempts},
            details={"error_kind": kind, **details},
        )

    @staticmethod
    def _transport_error(error: str, usage: dict[str, int], attempt: int) -> Verdict:
        return Verdict(
            status="judge_error",
            error=error,
            usage={**usage, "attempts": attempt + 1},
            details={"error_kind": "transport"},
        )

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None


# ---------------------------------------------------------------------------------------------- batch files


def write_batch(path: Path, requests: Iterable[JudgeRequest]) -> int:
    """Write requests in the OpenAI batch input format (one line each: custom_id, method, url, body); the same
    file works with the OpenAI Batch API and ``vllm run-batch``. Returns the number of lines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    lines = []
    for r in requests:
        if r.key in seen:
            continue
        seen.add(r.key)
        lines.append(
            json.dumps(
                {"custom_id": r.key, "method": "POST", "url": BATCH_URL, "body": r.body}, ensure_ascii=False
            )
        )
    write_atomic(path, "".join(line + "\n" for line in lines))
    return len(lines)


def read_batch(path: Path, client: JudgeClient, requests: dict[str, JudgeRequest]) -> dict[str, Verdict]:
    """Load a batch output file (OpenAI Batch API or ``vllm run-batch``): valid replies go into the cache; the
    verdicts of lines that carry an error or an invalid reply are returned by custom_id (as judge_error).
    Lines for requests not in ``requests`` are ignored."""

    failures: dict[str, Verdict] = {}
    not_batch = "not a batch output line (needs custom_id and response or error)"
    for where, row in iter_jsonl(Path(path), not_batch):
        if not isinstance(row.get("custom_id"), str):
            raise UserError(where, not_batch)
        req = requests.get(row["custom_id"])
        if req is None:
            continue
        response = row.get("response") or {}
        body = response.get("body") if isinstance(response, dict) else None
        status = response.get("status_code") if isinstance(response, dict) else None
        if row.get("error") or status != 200 or not isinstance(body, dict):
            err = row.get("error")
            if not err and isinstance(body, dict):
                err = body.get("error")
            msg = err.get("message") if isinstance(err, dict) else err
            failures[req.key] = Verdict(
                status="judge_error",
                error=redact(f"batch: status {status}: {str(msg or 'no response')[:200]}", client.secrets),
                details={"error_kind": "transport", "batch": True},
            )
            continue
        reply = read_reply(body)
        usage = reply_usage(reply)
        if reply.problem or reply.refusal is not None:
            what = reply.problem or f"the judge refused: {reply.refusal[:300]!r}"
            failures[req.key] = Verdict(
                status="judge_error",
                error=f"batch: {what}",
                usage=usage,
                details={"error_kind": "invalid", "batch": True},
            )
            continue
        try:
            client.accept(req, reply.content, usage)
        except InvalidReply as exc:
            failures[req.key] = Verdict(
                status="judge_error",
                error=f"batch: {exc}",
                usage=usage,
                details={"error_kind": "invalid", "batch": True},
            )
    return failures
