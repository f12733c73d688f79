"""Typed records passed between stages, and the content keys that identify them.

Every record carries a stable ``key``: a hash of everything that produced it. A stage that finds a record with
the key it is about to compute skips the work, which is how re-runs are free and interrupted runs resume.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, model_validator

_SURROGATE = re.compile("[\ud800-\udfff]")


def content_key(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable parts (dict order does not matter)."""
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8", "surrogatepass")).hexdigest()[:24]


def clean_text(value: Any) -> Any:
    """``value`` with every lone UTF-16 surrogate (``"\\ud800"`` in a JSON reply or task file) replaced by
    U+FFFD, in strings nested in lists and dicts too. Such text cannot be written as UTF-8, so it is cleaned
    on the way in; unchanged values are returned as they are (no copy)."""
    if isinstance(value, str):
        if value.isascii():
            return value
        try:
            value.encode("utf-8")  # fast: only a surrogate makes this fail
            return value
        except UnicodeEncodeError:
            return _SURROGATE.sub("\ufffd", value)
    if isinstance(value, list):
        out = [clean_text(v) for v in value]
        return value if all(a is b for a, b in zip(out, value)) else out
    if isinstance(value, dict):
        items = [(clean_text(k), clean_text(v)) for k, v in value.items()]
        return (
            value
            if all(k is k0 and v is v0 for (k, v), (k0, v0) in zip(items, value.items()))
            else dict(items)
        )
    return value


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid")
    key: str

    @model_validator(mode="before")
    @classmethod
    def _clean_text(cls, data: Any, info: ValidationInfo) -> Any:
        # JSON input is a table line qreason wrote, which cannot hold a surrogate: skip the walk (reads stay
        # fast)
        return data if info.mode == "json" else clean_text(data)


class Problem(Record):
    task: str
    problem_id: str
    question: str
    answer: str
    answer_type: Literal["number", "latex", "integer"]
    meta: dict[str, Any] = Field(default_factory=dict)


class Generation(Record):
    variant: str
    model_fingerprint: str
    task: str
    problem_id: str
    seed: int
    prompt_hash: str
    messages: list[dict[str, str]]
    text: str
    steps: list[str]
    prompt_tokens: int | None
    completion_tokens: int | None
    finish_reason: str | None
    backend: str
    versions: dict[str, str]
    sampling: dict[str, Any]
    seconds: float
    created_at: str


GradeStatus = Literal["correct", "wrong", "no_answer", "truncated", "grader_error"]


class Grade(Record):
    generation_key: str
    variant: str
    task: str
    problem_id: str
    seed: int
    status: GradeStatus
    extracted: str | None
    reference: str
    grader: str
    detail: str | None = None
    # What a reader takes when no marker states the answer (see qreason/grade.py); None in grades written by
    # grader revision 1. status "no_answer" with lenient_status "correct" is a format failure.
    lenient_status: GradeStatus | None = None
    lenient_extracted: str | None = None


class ModelVariant(Record):
    """A model under comparison: the full-precision base or a quantized (or imported) checkpoint of it."""

    name: str  # variant label used in every later record ("base", "gptq-w4a16", ...)
    base_model: str  # the base model spec from the config
    base_fingerprint: str
    method: str  # "none" for the base, a recipe name, or "import" for a given checkpoint
    recipe: dict[str, Any] = Field(default_factory=dict)
    recipe_hash: str | None = None
    path: str
    fingerprint: str
    bits: int | None = None
    size_bytes: int | None = None
    quantize_seconds: float | None = None
    peak_memory_mb: float | None = None
    reused: bool = False  # True when an existing cached checkpoint was used
    versions: dict[str, str] = Field(default_factory=dict)
    created_at: str


class Judgment(Record):
    """A verdict on one failed generation: by one judge, by the rule checks, or the panel's vote."""

    generation_key: str
    variant: str
    task: str
    problem_id: str
    seed: int
    judge: str  # "rules", a judge model id, or "panel"
    prompt_version: str | None = None
    status: Literal["ok", "judge_error"] = "ok"
    first_error_step: int | None = None  # 0-based step index; -1 = no faulty step found
    error_type: str | None = None
    sub_type: str | None = None
    capability: str | None = None
    rationale: str | None = None
    flip: bool = False  # the base variant solved this problem with this seed; this variant did not
    votes: dict[str, Any] = Field(default_factory=dict)
    usage: dict[str, int] = Field(default_factory=dict)
    error: str | None = None
    created_at: str


class SilverBulletItem(Record):
    """One item of the recovery dataset: an SFT example and, when a verified continuation exists, a DPO
    pair."""

    task: str
    problem_id: str
    variant: str  # the quantized variant whose failure this item repairs
    method: str
    seed: int
    messages: list[dict[str, str]]  # the prompt (as the models saw it)
    sft_solution: str  # a verified-correct full-precision solution
    prefix: str | None = None  # the quantized model's own steps before the first faulty one
    chosen: str | None = None  # full-precision continuation of the prefix, graded correct
    rejected: str | None = None  # the quantized model's steps from the first faulty one on
    first_error_step: int
    error_type: str | None = None
    sub_type: str | None = None
    capability: str | None = None
    judge: str
    split: Literal["train", "test"] = "train"
    provenance: dict[str, Any] = Field(default_factory=dict)
    # the flip's stability over repetitions (base_rate, base_reps, variant_rate, variant_reps, stable); None
    # where the run has one repetition per problem (one seed, no noise floor)
    stability: dict[str, Any] | None = None


class LmEvalResult(Record):
    """One lm-eval task's result for one model: a variant, or a variant with a recovery adapter. The key
    covers the model's fingerprint, the task (and the files of qreason-owned tasks), the lm-eval version and
    every argument, so a re-run finds it and makes no model calls. A non-finite metric (lm-eval reports NaN
    for a metric of an empty or degenerate sample) is stored as the JSON string "NaN", "Infinity" or
    "-Infinity" and read back as that float."""

    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="strings")

    variant: str
    model_fingerprint: str
    adapter_fingerprint: str | None = None
    task: str
    lm_eval_version: str
    args: dict[str, Any]  # lm-eval arguments and engine settings that shaped the result
    metrics: dict[str, float]  # "acc", "acc_norm", "exact_match:strict-match" (metric:filter), ...
    stderr: dict[str, float | None] = Field(default_factory=dict)
    higher_is_better: dict[str, bool] = Field(default_factory=dict)
    n_samples: int
    n_docs: int | None = None
    task_version: str | None = None
    samples_file: str  # lm-eval's per-sample log, relative to the run directory
    seconds: float
    created_at: str
