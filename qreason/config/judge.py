"""Reading judge configuration from the command line and from files. The schemas themselves (judge specs,
which failures to judge, the prompt version, batch mode) live in ``qreason.config`` with every other
schema."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from pydantic import ValidationError

from qreason.config.schema import PANEL_JUDGE, RULES_JUDGE, BatchConfig, JudgeConfig, JudgeSpec
from qreason.errors import UserError
from qreason.untrusted import loads as untrusted_loads

__all__ = [
    "BatchConfig",
    "JudgeConfig",
    "JudgeSpec",
    "PANEL_JUDGE",
    "RULES_JUDGE",
    "load_judge_config",
    "parse_judge_spec",
]


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
            data = untrusted_loads(text)
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
        raise UserError(
            where, "expected 'rules', key=value pairs (name=..,base_url=..,model=..), JSON or a YAML file"
        )
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
