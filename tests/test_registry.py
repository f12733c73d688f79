"""The one registry of kinds: built-in kinds load lazily, unknown kinds are one-line errors naming the config
field, a kind registered from a user's module is found, and config validates kinds against the registry."""

from __future__ import annotations

import pytest

from qreason.config.schema import GradingConfig, parse_config
from qreason.errors import UserError
from qreason.registry import BACKENDS, GRADERS, JUDGES, Registry


def test_lazy_entries_load_on_first_use_and_unknown_kinds_name_the_field():
    # a kind whose module does not exist: listing kinds imports nothing, only asking for it does
    reg = Registry("thing", {"hsv": "colorsys:rgb_to_hsv", "ghost": "qreason_no_such_module:Thing"})
    assert reg.kinds() == ["ghost", "hsv"]
    assert reg.get("hsv", "x.kind")(1, 0, 0) == (0.0, 1.0, 1)
    with pytest.raises(ModuleNotFoundError):
        reg.get("ghost", "x.kind")
    with pytest.raises(UserError, match=r"^x\.kind: no thing 'nope' \(have ghost, hsv\)$"):
        reg.get("nope", "x.kind")


def test_a_kind_registered_by_a_decorator_is_found():
    reg = Registry("grader")

    @reg.register("exact")
    class Exact:
        pass

    assert reg.get("exact", "grading.kind") is Exact and reg.kinds() == ["exact"]


def test_the_built_in_kinds():
    assert BACKENDS.kinds() == ["openai", "replay", "vllm"]
    assert GRADERS.kinds() == ["math-verify"] and JUDGES.kinds() == ["openai", "prm"]
    assert BACKENDS.get("replay", "backend.kind").__name__ == "ReplayBackend"
    assert JUDGES.get("prm", "judge.kind").__name__ == "PRMJudge"


def test_config_refuses_a_kind_the_registry_does_not_have():
    assert GradingConfig().kind == "math-verify"
    with pytest.raises(UserError, match="no grader 'llm'"):
        parse_config("name: x\ntasks: [{name: synthetic}]\ngrading: {kind: llm}\n", "c.yaml")
    with pytest.raises(UserError, match="no judge kind 'anthropic'"):
        parse_config(
            "name: x\ntasks: [{name: synthetic}]\njudge: {judges: [{kind: anthropic, name: a, "
            "base_url: 'http://x/v1', model: m}]}\n",
            "c.yaml",
        )
