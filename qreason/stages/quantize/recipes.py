"""The recipe registry: quantization methods as data (``recipes.yaml``), resolved with the user's overrides.

A recipe names llm-compressor modifiers and the parameters a user may change. Resolving a recipe checks every
override against the parameter's declared type, choices and bounds, then substitutes the values into the
modifier arguments, giving the exact list of modifiers the worker instantiates. Nothing here imports
llm-compressor: the main environment only handles the recipe as data.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from qreason.errors import UserError
from qreason.records import content_key

RECIPES_PATH = Path(__file__).with_name("recipes.yaml")
_REF = re.compile(r"^\$([A-Za-z_][A-Za-z0-9_]*)$")
_RECIPE_KEYS = {"description", "calibration", "bits", "params", "modifiers"}
_PARAM_KEYS = {"default", "help", "choices", "min", "max"}


@dataclass(frozen=True)
class Param:
    name: str
    default: Any
    help: str
    choices: tuple | None = None
    min: float | None = None
    max: float | None = None

    def describe(self) -> str:
        extra = f"; one of {', '.join(_show(c) for c in self.choices)}" if self.choices else ""
        return f"{self.name}={_show(self.default)}  {self.help}{extra}"


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    calibration: bool
    bits: Any  # an int, or "$param"
    params: dict[str, Param]
    modifiers: list[dict]  # [{ClassName: {arg: value or "$param"}}], as written in the YAML


@dataclass(frozen=True)
class ResolvedRecipe:
    """A recipe with its parameter values fixed: what the worker runs and what the cache key hashes."""

    name: str
    description: str
    calibration: bool
    bits: int | None
    params: dict[str, Any]
    modifiers: list[dict] = field(default_factory=list)  # [{"type": "GPTQModifier", "args": {...}}]
    overrides: dict[str, Any] = field(default_factory=dict)

    def identity(self) -> dict:
        """Everything about the recipe that changes the quantized weights."""
        return {"name": self.name, "params": self.params, "modifiers": self.modifiers}

    @property
    def hash(self) -> str:
        return content_key("recipe", self.identity())


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _substitute(node: Any, values: dict[str, Any]) -> Any:
    """Replace every string "$name" in a nested structure by ``values[name]``."""
    if isinstance(node, str) and (m := _REF.match(node)):
        return values[m.group(1)]
    if isinstance(node, dict):
        return {k: _substitute(v, values) for k, v in node.items()}
    if isinstance(node, list):
        return [_substitute(v, values) for v in node]
    return node


def _references(node: Any) -> set[str]:
    if isinstance(node, str) and (m := _REF.match(node)):
        return {m.group(1)}
    if isinstance(node, dict):
        return set().union(*(_references(v) for v in node.values())) if node else set()
    if isinstance(node, list):
        return set().union(*(_references(v) for v in node)) if node else set()
    return set()


def _parse_recipe(name: str, data: Any, where: str) -> Recipe:
    if not isinstance(data, dict):
        raise UserError(where, f"recipe {name!r} must be a mapping")
    unknown = set(data) - _RECIPE_KEYS
    if unknown:
        raise UserError(
            where, f"recipe {name!r}: unknown keys {sorted(unknown)} (allowed: {sorted(_RECIPE_KEYS)})"
        )
    params = {}
    for pname, pdata in (data.get("params") or {}).items():
        if not isinstance(pdata, dict) or "default" not in pdata or set(pdata) - _PARAM_KEYS:
            raise UserError(
                where,
                f"recipe {name!r}: parameter {pname!r} needs a mapping with 'default' "
                f"(and optionally {sorted(_PARAM_KEYS - {'default'})})",
            )
        choices = pdata.get("choices")
        params[pname] = Param(
            pname,
            pdata["default"],
            str(pdata.get("help", "")),
            tuple(choices) if choices is not None else None,
            pdata.get("min"),
            pdata.get("max"),
        )
    modifiers = data.get("modifiers")
    if (
        not isinstance(modifiers, list)
        or not modifiers
        or not all(isinstance(m, dict) and len(m) == 1 for m in modifiers)
    ):
        raise UserError(
            where, f"recipe {name!r}: modifiers must be a non-empty list of {{ModifierClass: args}}"
        )
    missing = (_references(modifiers) | _references(data.get("bits"))) - set(params)
    if missing:
        raise UserError(where, f"recipe {name!r} refers to undefined parameters {sorted(missing)}")
    return Recipe(
        name=name,
        description=str(data.get("description", "")),
        calibration=bool(data.get("calibration")),
        bits=data.get("bits"),
        params=params,
        modifiers=modifiers,
    )


@lru_cache(maxsize=4)
def load_registry(path: Path = RECIPES_PATH) -> dict[str, Recipe]:
    """Every recipe in the registry file, validated."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise UserError(str(path), f"cannot read the recipe registry ({exc})") from None
    if not isinstance(data, dict) or not data:
        raise UserError(str(path), "the recipe registry must be a non-empty mapping of name to recipe")
    return {name: _parse_recipe(name, body, str(path)) for name, body in data.items()}


def get_recipe(name: str) -> Recipe:
    registry = load_registry()
    if name not in registry:
        raise UserError(
            f"method {name!r}",
            f"no such quantization method (known: {', '.join(registry)}; "
            "or 'import' for an existing quantized checkpoint)",
        )
    return registry[name]


def _same_kind(value: Any, example: Any) -> bool:
    """Whether ``value`` has the type of ``example`` (bools are not ints here; ints are fine for floats)."""
    if isinstance(example, bool) or isinstance(value, bool):
        return isinstance(example, bool) and isinstance(value, bool)
    if isinstance(example, float):
        return isinstance(value, (int, float))
    if isinstance(example, list):
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    return example is None or isinstance(value, type(example))


def check_value(recipe: Recipe, param: Param, value: Any) -> Any:
    """The override value if it fits the parameter, else a UserError that says what would."""
    where = f"method {recipe.name}"
    if param.choices is not None:
        if not any(_same_kind(value, c) and value == c for c in param.choices):
            raise UserError(
                where,
                f"{param.name}={_show(value)} is not allowed "
                f"(choose one of {', '.join(_show(c) for c in param.choices)})",
            )
        return value
    if not _same_kind(value, param.default):
        kind = {
            bool: "true or false",
            int: "an integer",
            float: "a number",
            str: "a string",
            list: "a list of strings",
        }.get(type(param.default), type(param.default).__name__)
        raise UserError(
            where, f"{param.name}={_show(value)} must be {kind} like the default {_show(param.default)}"
        )
    if isinstance(param.default, float):
        value = float(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        low = param.min if param.min is not None else (1 if isinstance(param.default, int) else None)
        if low is not None and value < low:
            raise UserError(where, f"{param.name}={value} must be at least {low}")
        if param.max is not None and value > param.max:
            raise UserError(where, f"{param.name}={value} must be at most {param.max}")
    return value


def resolve(name: str, overrides: dict[str, Any] | None = None) -> ResolvedRecipe:
    """The recipe ``name`` with ``overrides`` applied and substituted into its modifiers."""
    recipe = get_recipe(name)
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(recipe.params))
    if unknown:
        known = ", ".join(recipe.params) or "none"
        raise UserError(
            f"method {name}", f"unknown parameter {unknown[0]!r} (this method's parameters: {known})"
        )
    values = {p.name: p.default for p in recipe.params.values()}
    for key, value in overrides.items():
        values[key] = check_value(recipe, recipe.params[key], value)
    modifiers = [
        {"type": kind, "args": _substitute(args or {}, values)}
        for spec in recipe.modifiers
        for kind, args in spec.items()
    ]
    bits = _substitute(recipe.bits, values)
    return ResolvedRecipe(
        name=name,
        description=recipe.description,
        calibration=recipe.calibration,
        bits=int(bits) if bits is not None else None,
        params=values,
        modifiers=modifiers,
        overrides={k: values[k] for k in overrides},
    )


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` from the command line; the value is read as YAML (``64`` is an int, ``[a, b]`` a list,
    ``true`` a bool, ``null`` None)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UserError(f"--set {text}", "expected KEY=VALUE, e.g. --set group_size=64")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def list_methods() -> list[dict]:
    """Name, description, whether it calibrates, and the parameters (defaults, help) of every method."""
    out = []
    for r in load_registry().values():
        out.append(
            {
                "name": r.name,
                "description": r.description,
                "calibration": r.calibration,
                "params": {
                    p.name: {
                        "default": p.default,
                        "help": p.help,
                        **({"choices": list(p.choices)} if p.choices else {}),
                    }
                    for p in r.params.values()
                },
            }
        )
    return out
