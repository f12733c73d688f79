"""HTTP helpers shared by everything that talks to an OpenAI-compatible endpoint (the ``openai`` generation
backend and the LLM judges): a client with a total deadline and a body cap, defensive reading of replies,
short error texts, and redaction of secrets from anything that reaches a record or a log."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import sys
import zlib
from dataclasses import dataclass

from qreason.records import clean_text

MAX_BODY_BYTES = 16 << 20  # a reply body larger than this is an error, not something to hold in memory
REFUSED_STATUSES = {400, 401, 403, 404}  # the endpoint refuses the request itself: asking again cannot help

_URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@'\"]+@")
_URL_QUERY = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^\s?#'\"]*)\?[^\s#'\"]*")
_BEARER = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]{4,}")
_KEY_PARAM = re.compile(
    r"(?i)\b((?:api[-_]?key|access[-_]?token|token|key|password|secret)[\"']?\s*[=:]\s*[\"']?)"
    r"[^\s&'\",}]{4,}"
)


def redact(text: str, secrets: tuple[str, ...] | list[str] = ()) -> str:
    """``text`` without credentials: URL user info and query strings, bearer tokens, ``api-key=...`` pairs and
    every occurrence of the given secret values (the configured API key) become ``***``. Applied to everything
    an endpoint can echo back (error bodies, URLs) before it reaches a record, a log line or a report."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    text = _URL_USERINFO.sub(r"\1***@", text)
    text = _URL_QUERY.sub(r"\1?***", text)
    text = _BEARER.sub(r"\1 ***", text)
    return _KEY_PARAM.sub(r"\1***", text)


class _RedactLogs(logging.Filter):
    """Redacts credentials in the HTTP libraries' own log lines (they log every request's full URL)."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        clean = redact(msg)
        if clean != msg:
            record.msg, record.args = clean, ()
        return True


def _redact_library_logs(*names: str) -> None:
    for name in names:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _RedactLogs) for f in logger.filters):
            logger.addFilter(_RedactLogs())


def api_key(env: str) -> str | None:
    return os.environ.get(env) or None


def make_async_client(base_url: str, api_key_env: str, max_retries: int, timeout_s: float, event_hooks=None):
    from openai import AsyncOpenAI

    return AsyncOpenAI(
        base_url=base_url,
        api_key=api_key(api_key_env) or "EMPTY",
        max_retries=max_retries,
        timeout=timeout_s,
        http_client=deadline_http_client(timeout_s, event_hooks),
    )


def deadline_http_client(timeout_s: float, event_hooks=None, max_bytes: int = MAX_BODY_BYTES):
    """The openai client's HTTP client, with a total deadline per HTTP request (connect, headers and the whole
    body: a server that drips its body cannot keep a request alive past ``timeout_s``; the client's own
    per-read timeout does not see that) and a cap on the body size. Both surface as transport errors the
    openai client retries (a timeout, a read error) with its usual backoff."""
    import openai

    hx = sys.modules[
        next(
            c for c in openai.DefaultAsyncHttpxClient.__mro__ if c.__name__ == "AsyncClient"
        ).__module__.split(".")[0]
    ]

    def too_big(request):
        return hx.ReadError(f"reply body larger than {max_bytes >> 20} MiB (decoded)", request=request)

    class BoundedStream(hx.AsyncByteStream):
        """The body within the deadline and, decoded, within ``max_bytes``: a compressed body is inflated
        here (never more than the cap), so a small gzip reply cannot expand to gigabytes in httpx."""

        def __init__(self, inner, deadline: float, request, decoder=None):
            self.inner, self.deadline, self.request, self.decoder = inner, deadline, request, decoder

        async def __aiter__(self):
            loop = asyncio.get_running_loop()
            parts = self.inner.__aiter__()
            total = 0
            while True:
                try:
                    async with asyncio.timeout(max(self.deadline - loop.time(), 0.0)):
                        chunk = await parts.__anext__()
                except StopAsyncIteration:
                    if self.decoder is not None:
                        yield self.decoder.flush()
                    return
                except TimeoutError:
                    raise hx.ReadTimeout(
                        f"no complete reply within {timeout_s:g} s", request=self.request
                    ) from None
                if self.decoder is not None:
                    try:
                        chunk = self.decoder.decompress(chunk, max_bytes - total + 1)
                    except zlib.error as exc:
                        raise hx.DecodingError(f"bad compressed body ({exc})", request=self.request) from None
                total += len(chunk)
                if total > max_bytes:
                    raise too_big(self.request)
                yield chunk

        async def aclose(self) -> None:
            await self.inner.aclose()

    class DeadlineTransport(hx.AsyncHTTPTransport):
        async def handle_async_request(self, request):
            request.headers["Accept-Encoding"] = "gzip, deflate"  # what BoundedStream can bound
            deadline = asyncio.get_running_loop().time() + timeout_s
            try:
                async with asyncio.timeout(timeout_s):
                    response = await super().handle_async_request(request)
            except TimeoutError:
                raise hx.ReadTimeout(f"no reply within {timeout_s:g} s", request=request) from None
            length = response.headers.get("content-length", "")
            if length.isdigit() and int(length) > max_bytes:
                await response.aclose()
                raise too_big(request)
            encoding = response.headers.get("content-encoding", "identity").strip().lower()
            decoder = None
            if encoding in ("gzip", "x-gzip", "deflate"):
                decoder = zlib.decompressobj(47)  # gzip or zlib header, detected
            elif encoding not in ("", "identity"):
                await response.aclose()
                raise hx.DecodingError(f"unsupported content encoding {encoding!r}", request=request)
            if decoder is not None:  # httpx must not decode again
                del response.headers["content-encoding"]
                response.headers.pop("content-length", None)
            response.stream = BoundedStream(response.stream, deadline, request, decoder)
            return response

    _redact_library_logs(hx.__name__, "httpx", "openai", "openai._base_client")
    return openai.DefaultAsyncHttpxClient(transport=DeadlineTransport(), event_hooks=event_hooks or {})


def short_error(exc: BaseException, secrets: tuple[str, ...] | list[str] = ()) -> str:
    """One line describing an API failure, without request bodies, headers or credentials (redacted)."""
    status = getattr(exc, "status_code", None)
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    cause = exc.__cause__
    if cause is not None and str(cause).strip() and str(cause).strip() not in text:
        text = f"{text} ({type(cause).__name__}: {str(cause).strip().splitlines()[0][:120]})"
    return redact(f"{type(exc).__name__}{f' {status}' if status else ''}: {text[:300]}", secrets)


@dataclass
class Reply:
    """What a chat completion carried, read defensively (the body is untrusted: any field may be missing,
    null or of another type). ``problem``: why no text could be read."""

    content: str | None = None
    refusal: str | None = None
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    problem: str | None = None


def _get(obj, name: str):
    return obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)


def _int(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def read_reply(resp) -> Reply:
    """The first choice of a chat completion (an openai response object or a plain dict from a batch file)."""
    if not isinstance(resp, dict) and not hasattr(resp, "choices") and not hasattr(resp, "model_fields_set"):
        return Reply(problem=f"unreadable response (not a chat completion: {str(resp)[:80]!r})")
    usage = _get(resp, "usage")
    out = Reply(
        prompt_tokens=_int(_get(usage, "prompt_tokens")),
        completion_tokens=_int(_get(usage, "completion_tokens")),
        total_tokens=_int(_get(usage, "total_tokens")),
    )
    choices = _get(resp, "choices")
    if not choices:
        out.problem = "reply had no choices"
        return out
    if not isinstance(choices, list):
        out.problem = f"unreadable response (choices is a {type(choices).__name__})"
        return out
    first = choices[0]
    finish = _get(first, "finish_reason")
    out.finish_reason = finish if isinstance(finish, str) else None
    message = _get(first, "message")
    if message is None or isinstance(message, (str, int, float, list)):
        out.problem = "unreadable response (the choice has no message)"
        return out
    content, refusal = _get(message, "content"), _get(message, "refusal")
    if isinstance(refusal, str) and refusal.strip() and not (isinstance(content, str) and content.strip()):
        out.refusal = clean_text(refusal)
        return out
    if content is not None and not isinstance(content, str):
        out.problem = f"unreadable response (the message content is a {type(content).__name__}, not text)"
        return out
    out.content = clean_text(content)
    return out
