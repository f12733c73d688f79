"""Judge kind ``prm``: a process reward model scores every step; the first step scored below the threshold is
the first faulty one (-1: none is).

The steps go to the model as its training format has them: a chat of the PRM's system message, the problem
as the user's turn and the solution as the assistant's, each step followed by the model's step separator (one
token, its step tag: Qwen2.5-Math-PRM's ``<extra_0>``). vLLM returns one row of class probabilities per
separator; the last column is the probability that the step is right (``qreason.engines.pooling``). The
model runs behind a vLLM server's ``/pooling`` endpoint (``prm_engine: server``, the default) or in vLLM's
offline engine in this process (``prm_engine: vllm``). The PRM sees no reference answer (it is a blind
critic).

Scores are cached in the ReplyCache under a key of (model, separator, system message, problem, steps), which
does not include the threshold: changing the threshold, or calibrating it, asks the model nothing again. The
request key (``PRMRequest.key``, which names the verdict) covers the scores' key and the threshold.

``calibrate_threshold`` picks the threshold that maximises ProcessBench's F1 on labelled rows;
``run_calibration`` scores a ProcessBench file and writes the judge spec with that threshold (``qreason
calibrate-prm``).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from qreason import untrusted
from qreason.config.judge import JudgeSpec
from qreason.engines.openai_http import REFUSED_STATUSES, deadline_http_client, redact, short_error
from qreason.engines.pooling import (
    InvalidScores,
    pooling_body,
    pooling_url,
    post_pooling,
    read_step_scores,
    scores_from_rows,
    shared_scorer,
)
from qreason.errors import UserError
from qreason.records import content_key
from qreason.stages.judge.client import JudgeRequest, ReplyCache
from qreason.stages.judge.prompts import InvalidReply, JudgeInput, Verdict
from qreason.store import write_atomic

DEFAULT_THRESHOLD = 0.5
DEFAULT_SEPARATOR = "<extra_0>"
DEFAULT_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
PROMPT_VERSION = "prm"  # what the reply cache records as the prompt version of PRM scores


@dataclass(frozen=True)
class PRMRequest(JudgeRequest):
    """A PRM request: ``body`` is the ``/pooling`` request; ``key`` names the verdict (scores and threshold),
    ``scores_key`` the cached scores (no threshold)."""

    scores_key: str = ""
    threshold: float = DEFAULT_THRESHOLD


def first_below(scores: list[float], threshold: float) -> int:
    """The index of the first score below ``threshold``; -1 when there is none."""
    return next((i for i, s in enumerate(scores) if s < threshold), -1)


def prm_verdict(scores: list[float], threshold: float) -> Verdict:
    """The verdict for per-step scores: the first step below the threshold (no error type: a PRM does not
    classify). ``details``: the scores and the threshold."""
    step = first_below(scores, threshold)
    if step >= 0:
        why = f"step {step} scored {scores[step]:.3f} < threshold {threshold:g}"
    else:
        low = min(range(len(scores)), key=scores.__getitem__)
        why = f"every step scored >= {threshold:g} (lowest {scores[low]:.3f} at step {low})"
    return Verdict(
        first_error_step=step,
        rationale=why,
        details={"scores": list(scores), "threshold": threshold},
    )


def _judge_error(error: str, kind: str, usage: dict[str, int] | None = None) -> Verdict:
    return Verdict(status="judge_error", error=error, usage=usage or {}, details={"error_kind": kind})


class PRMJudge:
    """A process reward model as a judge (kind ``prm``); built like every kind with ``make_judge(spec,
    template, taxonomy, cache, offline=...)``. The template and taxonomy are not used (a PRM has its own
    format and names no error type). ``offline``: answer from the cache only."""

    def __init__(
        self,
        spec: JudgeSpec,
        template: Any = None,
        taxonomy: Any = None,
        cache: ReplyCache | None = None,
        offline: bool = False,
    ):
        if spec.kind != "prm":
            raise UserError(f"judge {spec.name}", f"is kind {spec.kind}, not prm")
        if cache is None:
            raise UserError(f"judge {spec.name}", "a PRM judge needs a reply cache")
        self.spec = spec
        self.template = template
        self.taxonomy = taxonomy
        self.cache = cache
        self.offline = offline
        self.threshold = DEFAULT_THRESHOLD if spec.threshold is None else spec.threshold
        self.separator = spec.step_separator or DEFAULT_SEPARATOR
        self.system = DEFAULT_SYSTEM if spec.prm_system is None else spec.prm_system
        self.engine = spec.prm_engine or "server"
        self.requests = 0  # HTTP requests sent (retries included); offline engine: inputs scored
        self.refused: str | None = None
        self._client = None
        self._sem: asyncio.Semaphore | None = None
        self._pending: list[tuple[PRMRequest, asyncio.Future]] = []
        self._flusher: asyncio.Task | None = None

    @property
    def secrets(self) -> tuple[str, ...]:
        key = os.environ.get(self.spec.api_key_env)
        return (key,) if key else ()

    # ------------------------------------------------------------------ requests
    def _clean(self, text: str | None) -> str:
        """Untrusted text without the separator (each one would add a score)."""
        return str(text or "").replace(self.separator, " ").strip()

    def request(self, item: JudgeInput) -> PRMRequest:
        steps = [self._clean(s) for s in item.steps]
        answer = "".join(s + self.separator for s in steps)
        messages = [
            {"role": "user", "content": self._clean(item.problem)},
            {"role": "assistant", "content": answer},
        ]
        if self.system:
            messages.insert(0, {"role": "system", "content": self.system})
        body = pooling_body(self.spec.model, messages)
        scores_key = content_key("prm-scores", self.spec.model, self.separator, body)
        key = content_key("prm-verdict", scores_key, self.threshold)
        return PRMRequest(
            key=key, body=body, n_steps=len(steps), scores_key=scores_key, threshold=self.threshold
        )

    def cached(self, req: PRMRequest) -> Verdict | None:
        hit = self.cache.get(req.scores_key)
        if hit is None:
            return None
        content, usage = hit
        try:
            scores = scores_from_rows(untrusted.loads(content).get("scores"), req.n_steps)
        except (InvalidScores, ValueError, AttributeError):
            return None  # not what we store: score again rather than trust it
        verdict = prm_verdict(scores, req.threshold)
        verdict.usage = {**usage, "cached": 1}
        return verdict

    def _store(self, req: PRMRequest, scores: list[float], usage: dict[str, int]) -> Verdict:
        self.cache.put(req.scores_key, self.spec.model, PROMPT_VERSION, json.dumps({"scores": scores}), usage)
        verdict = prm_verdict(scores, req.threshold)
        verdict.usage = dict(usage)
        return verdict

    def accept(self, request: PRMRequest, content: str | None, usage: dict[str, int]) -> Verdict:
        """Validate a ``/pooling`` reply body (raises ``InvalidReply``), cache its scores, return the verdict.
        The LLM judges' batch files (chat completions) do not apply to a PRM: run it live."""
        try:
            scores, tokens = read_step_scores(content, request.n_steps)
        except InvalidScores as exc:
            raise InvalidReply(str(exc)) from None
        return self._store(request, scores, {**tokens, **usage})

    # ------------------------------------------------------------------ scoring
    async def judge(self, request: PRMRequest) -> Verdict | None:
        """The verdict: from cached scores, or scored now, or a judge_error (``details["error_kind"]``:
        "transport" or "invalid"); None offline on a cache miss or once refused."""
        verdict = self.cached(request)
        if verdict is not None or self.offline or self.refused:
            return verdict
        if request.n_steps == 0:
            return _judge_error("no steps to score", "invalid")
        if self.engine == "vllm":
            return await self._judge_offline(request)
        return await self._judge_server(request)

    def _openai(self):
        if self._client is None:
            import openai

            async def count(_request) -> None:
                self.requests += 1

            self._client = openai.AsyncOpenAI(
                base_url=pooling_url(self.spec.base_url or ""),
                api_key=self.secrets[0] if self.secrets else "EMPTY",
                max_retries=self.spec.max_retries,
                timeout=self.spec.timeout_s,
                http_client=deadline_http_client(self.spec.timeout_s, {"request": [count]}),
            )
            self._sem = asyncio.Semaphore(self.spec.concurrency)
        return self._client

    async def _judge_server(self, req: PRMRequest) -> Verdict | None:
        import openai

        client = self._openai()
        attempts = 1 + self.spec.invalid_retries
        problem, kind = "no attempt made", "invalid"
        async with self._sem:
            for attempt in range(attempts):
                if self.refused:
                    return None
                if attempt:
                    await asyncio.sleep(self.spec.backoff_s * 2 ** (attempt - 1))
                try:
                    text = await post_pooling(client, req.body)
                except openai.APIStatusError as exc:
                    error = short_error(exc, self.secrets)
                    if exc.status_code == 400:  # this input (too long for the model, ...): final for it
                        return _judge_error(f"the server rejected the input: {error}", "invalid")
                    if exc.status_code in REFUSED_STATUSES:
                        self.refused = self.refused or (
                            f"judge {self.spec.name}: the endpoint refused the request ({error}); nothing "
                            "was recorded for it, fix the judge spec and re-run"
                        )
                        return None
                    return _judge_error(error, "transport", {"attempts": attempt + 1})
                except openai.APIConnectionError as exc:  # already retried with backoff by the client
                    return _judge_error(
                        short_error(exc, self.secrets), "transport", {"attempts": attempt + 1}
                    )
                except Exception as exc:  # noqa: BLE001 - an unreadable body: try again
                    problem, kind = f"unreadable response ({short_error(exc, self.secrets)})", "transport"
                    continue
                try:
                    verdict = self.accept(req, text, {})
                except InvalidReply as exc:
                    problem, kind = str(exc), "invalid"
                    if " step scores for " in problem or "score of step" in problem:
                        break  # a well-formed reply that does not fit: asking again gives the same
                    continue
                verdict.usage["attempts"] = attempt + 1
                return verdict
        return _judge_error(
            redact(f"no valid reply after {attempt + 1} attempt(s): {problem}", self.secrets),
            kind,
            {"attempts": attempt + 1},
        )

    async def _judge_offline(self, req: PRMRequest) -> Verdict | None:
        """Score through the shared offline engine; the requests of one event-loop tick go as one batch."""
        fut = asyncio.get_running_loop().create_future()
        self._pending.append((req, fut))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.ensure_future(self._flush())
        result = await fut
        if result is None:
            return None
        if isinstance(result, str):
            return _judge_error(result, "transport" if result.startswith("vLLM engine error") else "invalid")
        rows, n_tokens = result
        try:
            scores = scores_from_rows(rows, req.n_steps)
        except InvalidScores as exc:
            return _judge_error(str(exc), "invalid")
        return self._store(req, scores, {"prompt_tokens": n_tokens})

    async def _flush(self) -> None:
        while self._pending:
            await asyncio.sleep(0)  # let the other judge() calls of this tick queue up
            batch, self._pending = self._pending, []
            try:
                scorer = await asyncio.to_thread(shared_scorer, self.spec.model, self.separator)
                prompts = await asyncio.to_thread(
                    lambda: [scorer.encode(r.body["messages"]) for r, _ in batch]
                )
                self.requests += len(prompts)
                scored = await asyncio.to_thread(scorer.score, prompts)
                results: list[Any] = [
                    r if isinstance(r, str) else (r, len(p)) for r, p in zip(scored, prompts)
                ]
            except UserError as exc:  # the spec does not fit the model: stop asking, report it once
                self.refused = self.refused or f"judge {self.spec.name}: {exc}"
                results = [None] * len(batch)
            except Exception as exc:  # noqa: BLE001 - becomes each input's judge_error
                results = [f"vLLM engine error: {type(exc).__name__}: {str(exc)[:200]}"] * len(batch)
            for (_, fut), res in zip(batch, results):
                if not fut.done():
                    fut.set_result(res)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None


# ---------------------------------------------------------------------------------------------- calibration


def _f1(acc_err: float | None, acc_cor: float | None) -> float | None:
    if acc_err is None or acc_cor is None:
        return None
    return 2 * acc_err * acc_cor / (acc_err + acc_cor) if acc_err + acc_cor else 0.0


def threshold_metrics(
    labels: list[int], scores: list[list[float] | None], threshold: float
) -> dict[str, Any]:
    """ProcessBench's metric for PRM scores at one threshold (a row without scores counts as wrong)."""
    err = [(lab, s) for lab, s in zip(labels, scores) if lab != -1]
    cor = [s for lab, s in zip(labels, scores) if lab == -1]
    acc_err = (
        sum(s is not None and first_below(s, threshold) == lab for lab, s in err) / len(err) if err else None
    )
    acc_cor = sum(s is not None and first_below(s, threshold) == -1 for s in cor) / len(cor) if cor else None
    r = lambda x: None if x is None else round(x, 4)  # noqa: E731
    return {
        "n": len(labels),
        "n_erroneous": len(err),
        "n_correct": len(cor),
        "unscored": sum(s is None for s in scores),
        "acc_erroneous": r(acc_err),
        "acc_correct": r(acc_cor),
        "f1": r(_f1(acc_err, acc_cor)),
    }


def calibrate_threshold(labels: list[int], scores: list[list[float] | None]) -> dict[str, Any]:
    """The threshold that maximises ProcessBench's F1 on labelled rows (label: the first faulty step, -1 for
    none; scores: the PRM's per-step scores, None for a row it could not score), with its metrics.

    A row is predicted right for the thresholds in one interval: label -1 for t <= its lowest score, label L
    for (score of L) < t <= (lowest score before L). Both accuracies are constant between consecutive scores,
    so every score (and one value above them all) is a candidate; of the best region (the lowest one on a
    tie) the midpoint is returned, the choice least sensitive to new data."""
    if len(labels) != len(scores):
        raise ValueError("labels and scores differ in length")
    scored = [(lab, s) for lab, s in zip(labels, scores) if s]
    if not scored:
        raise UserError("calibration", "no labelled row has scores")
    values = sorted({v for _, s in scored for v in s})
    candidates = values + [min(values[-1] + 1e-6, 1.0) if values[-1] < 1.0 else 1.0 + 1e-6]
    n_err = sum(lab != -1 for lab in labels)
    n_cor = len(labels) - n_err
    intervals = []  # (lo exclusive, hi inclusive, erroneous?)
    for lab, s in scored:
        if lab == -1:
            intervals.append((float("-inf"), min(s), False))
        elif lab < len(s):
            before = min(s[:lab]) if lab else float("inf")
            if s[lab] < before:
                intervals.append((s[lab], before, True))
    best, best_i = (-1.0, -1.0), 0
    for i, t in enumerate(candidates):
        e = sum(lo < t <= hi for lo, hi, er in intervals if er)
        c = sum(lo < t <= hi for lo, hi, er in intervals if not er)
        f1 = _f1(e / n_err if n_err else None, c / n_cor if n_cor else None)
        key = (f1 if f1 is not None else (e + c) / len(labels), (e + c) / len(labels))
        if key > best:
            best, best_i = key, i
    lower = candidates[best_i - 1] if best_i else 0.0
    threshold = (lower + candidates[best_i]) / 2 if best_i else candidates[0]
    threshold = min(max(threshold, 0.0), 1.0)
    return {"threshold": threshold, **threshold_metrics(labels, scores, threshold)}


def _parity(row_id: Any, where: str) -> int:
    m = re.search(r"(\d+)\s*$", str(row_id))
    if m is None:
        raise UserError(where, f"row id {row_id!r} ends in no number (needed to split even and odd ids)")
    return int(m.group(1)) % 2


@dataclass
class Calibration:
    """What ``run_calibration`` found and wrote."""

    result: dict[str, Any]
    spec_path: Path
    scores_path: Path
    errors: list[str] = field(default_factory=list)


def score_rows(judge: PRMJudge, rows: list[dict]) -> list[Verdict]:
    """The PRM's verdicts on ProcessBench rows (problem, steps), cached scores reused."""

    async def run() -> list[Verdict]:
        try:
            reqs = [judge.request(JudgeInput(problem=r["problem"], steps=list(r["steps"]))) for r in rows]
            got = await asyncio.gather(*(judge.judge(q) for q in reqs))
            return [v or _judge_error(judge.refused or "not scored (cache only)", "invalid") for v in got]
        finally:
            await judge.aclose()

    return asyncio.run(run())


def run_calibration(
    spec: JudgeSpec, data: Path, out: Path, fit: str = "all", limit: int | None = None
) -> Calibration:
    """Score a ProcessBench file with the PRM of ``spec``, fit the threshold on the rows ``fit`` selects
    ("all", or "even" / "odd" ids: the other half is held out and scored with the fitted threshold), write
    OUT/prm_scores.jsonl, OUT/calibration.json and OUT/NAME.yaml (the spec with the threshold). The scores
    are cached in OUT/judge_cache.sqlite."""
    from qreason.stages.judge.bench import load_processbench

    if spec.kind != "prm":
        raise UserError(f"judge {spec.name}", f"is kind {spec.kind}; calibrate-prm needs kind prm")
    if fit not in ("all", "even", "odd"):
        raise UserError("--fit", f"expected all, even or odd, got {fit!r}")
    t0 = time.monotonic()
    rows = load_processbench(Path(data), limit)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cache = ReplyCache(out / "judge_cache.sqlite")
    judge = PRMJudge(spec, cache=cache)
    try:
        verdicts = score_rows(judge, rows)
    finally:
        cache.close()
    if judge.refused:
        raise UserError(f"judge {spec.name}", judge.refused)
    scores = [v.details.get("scores") if v.ok else None for v in verdicts]
    labels = [r["label"] for r in rows]
    if fit == "all":
        chosen = list(range(len(rows)))
    else:
        want = 0 if fit == "even" else 1
        chosen = [i for i, r in enumerate(rows) if _parity(r["id"], str(data)) == want]
    held = sorted(set(range(len(rows))) - set(chosen))
    fitted = calibrate_threshold([labels[i] for i in chosen], [scores[i] for i in chosen])
    threshold = fitted["threshold"]
    result = {
        "data": str(data),
        "judge": spec.name,
        "model": spec.model,
        "threshold": threshold,
        "fit": fit,
        "fitted": {k: v for k, v in fitted.items() if k != "threshold"},
        "held_out": threshold_metrics([labels[i] for i in held], [scores[i] for i in held], threshold)
        if held
        else None,
        "judge_errors": sum(not v.ok for v in verdicts),
        "requests": judge.requests,
        "seconds": round(time.monotonic() - t0, 2),
    }
    lines = [
        json.dumps({"id": r["id"], "label": r["label"], "scores": s, "error": v.error}, ensure_ascii=False)
        for r, s, v in zip(rows, scores, verdicts)
    ]
    scores_path = out / "prm_scores.jsonl"
    write_atomic(scores_path, "".join(line + "\n" for line in lines))
    spec_path = out / f"{spec.name.replace('/', '_')}.yaml"
    calibrated = spec.model_copy(update={"threshold": threshold})
    write_atomic(spec_path, yaml.safe_dump(calibrated.model_dump(exclude_defaults=True), sort_keys=False))
    result["spec"] = str(spec_path)
    write_atomic(out / "calibration.json", json.dumps(result, indent=2) + "\n")
    errors = sorted({v.error for v in verdicts if not v.ok and v.error})[:5]
    return Calibration(result, spec_path, scores_path, errors)
