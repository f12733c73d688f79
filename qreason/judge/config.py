"""Configuration of the judge stage: the judge specs, which failures to judge, the prompt version, batch mode."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import UserError
from .prompts import DEFAULT_PROMPT_VERSION
from .rules import RULES_JUDGE

PANEL_JUDGE = "panel"
RESERVED_NAMES = {RULES_JUDGE, PANEL_JUDGE}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class JudgeSpec(Strict):
    """One LLM judge: a model behind an OpenAI-compatible endpoint."""

    name: str                              # label stored in Judgment.judge; unique within a panel
    base_url: str                          # e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1
    model: str
    api_key_env: str = "OPENAI_API_KEY"    # the variable holding the key (unset: "EMPTY", for local servers)
    concurrency: int = Field(default=4, ge=1)
    timeout_s: float = Field(default=120.0, gt=0)
    max_retries: int = Field(default=4, ge=0)       # transport retries: 408/409/429/5xx, timeouts, dropped connections
    invalid_retries: int = Field(default=2, ge=0)   # further attempts after a malformed or off-schema reply
    backoff_s: float = Field(default=1.0, ge=0)     # first wait before an invalid-reply retry (doubles each time)
    temperature: float = Field(default=0.0, ge=0)
    retry_temperature: float = Field(default=0.7, ge=0)  # used for invalid-reply retries (a greedy judge would
                                                         # repeat the same reply)
    max_tokens: int | None = Field(default=None, gt=0)   # default: the prompt template's max_tokens
    seed: int | None = None
    schema_limits: bool = True    # put maxLength/minimum/maximum into the reply schema (turn off for endpoints
                                  # whose strict mode rejects them)

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._:/-]*", name):
            raise ValueError("must be a slug (letters, digits, '.', '_', ':', '/', '-')")
        if name in RESERVED_NAMES:
            raise ValueError(f"{name!r} is reserved")
        return name


class BatchConfig(Strict):
    """Batch mode: ``write`` writes one OpenAI batch input file per judge (requests not answered yet) and makes
    no requests; ``read`` loads the matching output files (OpenAI Batch API or ``vllm run-batch``) into the cache
    and judges from the cache only. Files: DIR/JUDGE.batch_input.jsonl and DIR/JUDGE.batch_output.jsonl."""

    mode: Literal["off", "write", "read"] = "off"
    dir: str | None = None        # default: RUN_DIR/judge_batch


class JudgeConfig(Strict):
    """The judge stage. No judges: the rule checks are the only (offline) judge."""

    judges: list[JudgeSpec] = Field(default_factory=list)
    which: Literal["failures", "flips"] = "failures"
    statuses: list[Literal["wrong", "no_answer", "truncated", "grader_error"]] = \
        Field(default_factory=lambda: ["wrong", "no_answer", "truncated"], min_length=1)
    base_variant: str = "base"
    prompt_version: str = DEFAULT_PROMPT_VERSION
    llm_for_outcomes: bool = False   # also send no-answer / truncated / collapsed solutions to the LLM judges
    retry_invalid: bool = False      # ask again where a judge gave no valid reply in an earlier run (transport
                                     # failures are always retried)
    cache_path: str | None = None    # default: RUN_DIR/judge_cache.sqlite
    batch: BatchConfig = Field(default_factory=BatchConfig)

    @model_validator(mode="after")
    def _unique(self) -> "JudgeConfig":
        names = [j.name for j in self.judges]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"judge names must be unique (repeated: {', '.join(dup)})")
        return self


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(map(str, err["loc"])) or "(top level)"
    return f"{loc}: {err['msg']}"


def parse_judge_spec(text: str) -> JudgeSpec | None:
    """A judge spec from the command line: ``rules`` (None: the rule checks only), ``key=value,key=value``
    (name, base_url, model, ...), inline JSON, or a YAML/JSON file holding one spec."""
    text = text.strip()
    where = f"--judge {text[:60]!r}"
    if text == RULES_JUDGE:
        return None
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(where, f"invalid JSON ({exc.msg})") from None
    elif Path(text).suffix in (".yaml", ".yml", ".json") and Path(text).is_file():
        try:
            data = yaml.safe_load(Path(text).read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise UserError(text, f"invalid YAML ({getattr(exc, 'problem', None) or exc})") from None
        where = text
    elif "=" in text:
        data = {}
        for part in text.split(","):
            key, sep, value = part.partition("=")
            if not sep or not key.strip():
                raise UserError(where, f"expected key=value, got {part!r}")
            data[key.strip()] = value.strip()
    else:
        raise UserError(where, "expected 'rules', key=value pairs (name=..,base_url=..,model=..), JSON or a "
                               "YAML file")
    if not isinstance(data, dict):
        raise UserError(where, "a judge spec must be a mapping")
    try:
        return JudgeSpec.model_validate(data)
    except ValidationError as exc:
        raise UserError(where, _first_error(exc)) from None


def load_judge_config(path: str | Path) -> JudgeConfig:
    """A JudgeConfig from a YAML file (the mapping itself, or under a top-level ``judge:`` key)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(str(path), "judge config not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise UserError(str(path), f"invalid YAML ({getattr(exc, 'problem', None) or exc})") from None
    if isinstance(data, dict) and isinstance(data.get("judge"), dict):
        data = data["judge"]
    if not isinstance(data, dict):
        raise UserError(str(path), "a judge config must be a YAML mapping")
    try:
        return JudgeConfig.model_validate(data)
    except ValidationError as exc:
        raise UserError(str(path), _first_error(exc)) from None
