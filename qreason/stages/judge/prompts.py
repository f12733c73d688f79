"""The error taxonomy and the judge prompt templates (both data in judge_prompts/), rendering and reply
checking.

Model text is untrusted. Every piece of it goes into the prompt between tags whose names end in a nonce, and
any tag-like text inside it (``<step``, ``</problem``, ... or the nonce itself) is neutralised first, so a
solution cannot close its own block or open a new one. The nonce is a hash of the whole input: it is the same
for the same input (so replies can be cached) and cannot be predicted by the text it protects (the text would
have to contain a hash of itself). Templates are filled in a single pass, so substituted text is never scanned
for placeholders.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from qreason import untrusted
from qreason.config.schema import DEFAULT_PROMPT_VERSION
from qreason.errors import UserError
from qreason.inputs import resources
from qreason.records import content_key

NONE = "none"  # what the reply schema uses for "no error" in the type fields
OUTCOME = "Outcome"  # error_type of the outcomes the rule checks detect

TAG_NAMES = ("problem", "reference-answer", "reference-solution", "step")
# Anything that could open or close one of our blocks: "<step", "</ problem", "< reference-answer", ...
_TAGLIKE = re.compile(r"<(\s*/?\s*)(problem|reference|step|paragraph)", re.IGNORECASE)
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


# --------------------------------------------------------------------------------------------------- taxonomy


class SubType(BaseModel):
    model_config = ConfigDict(extra="forbid")
    description: str
    capabilities: list[str] = Field(min_length=1)


class ErrorType(BaseModel):
    model_config = ConfigDict(extra="forbid")
    description: str
    sub_types: dict[str, SubType] = Field(min_length=1)


class Outcome(BaseModel):
    model_config = ConfigDict(extra="forbid")
    description: str
    grade_status: str | None = None


class Taxonomy(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int
    error_types: dict[str, ErrorType] = Field(min_length=1)
    capabilities: dict[str, str] = Field(min_length=1)
    outcomes: dict[str, Outcome] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> "Taxonomy":
        seen: dict[str, str] = {}
        for tname, etype in self.error_types.items():
            for sname, sub in etype.sub_types.items():
                if sname in seen:
                    raise ValueError(f"sub-type {sname!r} is listed under both {seen[sname]} and {tname}")
                seen[sname] = tname
                unknown = [c for c in sub.capabilities if c not in self.capabilities]
                if unknown:
                    raise ValueError(f"sub-type {sname!r} names unknown capabilities {unknown}")
        return self

    @property
    def sub_type_parent(self) -> dict[str, str]:
        return {s: t for t, e in self.error_types.items() for s in e.sub_types}

    def sub_type(self, name: str) -> SubType:
        return self.error_types[self.sub_type_parent[name]].sub_types[name]

    def render_types(self) -> str:
        lines = []
        for tname, etype in self.error_types.items():
            lines.append(f"- {tname}: {etype.description}")
            for sname, sub in etype.sub_types.items():
                lines.append(
                    f"  - {sname}: {sub.description} (usual capabilities: {', '.join(sub.capabilities)})"
                )
        return "\n".join(lines)

    def render_capabilities(self) -> str:
        return "\n".join(f"- {name}: {desc}" for name, desc in self.capabilities.items())


def _load_yaml(path: Path) -> Any:
    if not path.is_file():
        raise UserError(str(path), "file not found")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise UserError(str(path), f"invalid YAML ({getattr(exc, 'problem', None) or exc})") from None


def _validate(model: type[BaseModel], data: Any, path: Path):
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(map(str, err["loc"])) or "(top level)"
        raise UserError(str(path), f"{where}: {err['msg']}") from None


@lru_cache(maxsize=8)
def load_taxonomy(path: Path | None = None) -> Taxonomy:
    path = Path(path) if path else resources.find("judge_prompts", "taxonomy.yaml")
    return _validate(Taxonomy, _load_yaml(path), path)


# --------------------------------------------------------------------------------------------------- template


class PromptTemplate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: str
    system: str
    user: str
    step: str
    reference_solution_block: str = ""
    no_reference_answer: str = "(not given)"
    rationale_max_chars: int = Field(default=300, gt=0)
    max_tokens: int = Field(default=400, gt=0)


@lru_cache(maxsize=8)
def load_template(version: str = DEFAULT_PROMPT_VERSION) -> PromptTemplate:
    """A judge prompt template by version (``judge-v1`` is judge_prompts/judge_v1.yaml) or by path."""
    path = (
        Path(version)
        if version.endswith((".yaml", ".yml"))
        else resources.find("judge_prompts", f"{version.replace('-', '_')}.yaml")
    )
    if path is None or not path.is_file():
        known = [
            p.stem.replace("_", "-")
            for p in resources.listing("judge_prompts", "*.yaml")
            if p.stem != "taxonomy"
        ]
        raise UserError(f"prompt version {version!r}", f"no such judge prompt (known: {', '.join(known)})")
    tpl = _validate(PromptTemplate, _load_yaml(path), path)
    if not version.endswith((".yaml", ".yml")) and tpl.version != version:
        raise UserError(str(path), f"version is {tpl.version!r} but the file is named for {version!r}")
    return tpl


def render(template: str, values: dict[str, str]) -> str:
    """Fill ``{{name}}`` placeholders in one pass (substituted text is not scanned again)."""

    def sub(m: re.Match) -> str:
        if m.group(1) not in values:
            raise KeyError(f"judge template uses an unknown placeholder {{{{{m.group(1)}}}}}")
        return values[m.group(1)]

    return _PLACEHOLDER.sub(sub, template)


def neutralise(text: str, nonce: str) -> str:
    """Untrusted text made safe to put between our tags: no tag-like sequence and no nonce survives."""
    text = text.replace(nonce, "[nonce]")
    return _TAGLIKE.sub(lambda m: "&lt;" + m.group(1) + m.group(2), text)


@dataclass(frozen=True)
class JudgeInput:
    """What a judge sees: the problem, the reference (when known) and the solution's steps."""

    problem: str
    steps: list[str]
    reference_answer: str | None = None
    reference_solution: str | None = None

    def nonce(self) -> str:
        return content_key("nonce", self.problem, self.reference_answer, self.reference_solution, self.steps)[
            :16
        ]


def build_messages(inp: JudgeInput, tpl: PromptTemplate, taxonomy: Taxonomy) -> list[dict[str, str]]:
    nonce = inp.nonce()

    def safe(text: str | None) -> str:
        return neutralise(str(text or "").strip(), nonce)

    steps = "\n\n".join(
        render(tpl.step, {"nonce": nonce, "index": str(i), "text": safe(s)}) for i, s in enumerate(inp.steps)
    )
    ref_block = ""
    if inp.reference_solution and str(inp.reference_solution).strip():
        ref_block = render(
            tpl.reference_solution_block, {"nonce": nonce, "reference_solution": safe(inp.reference_solution)}
        )
    system = render(
        tpl.system,
        {"nonce": nonce, "taxonomy": taxonomy.render_types(), "capabilities": taxonomy.render_capabilities()},
    )
    user = render(
        tpl.user,
        {
            "nonce": nonce,
            "problem": safe(inp.problem),
            "reference_answer": safe(inp.reference_answer)
            if inp.reference_answer
            else tpl.no_reference_answer,
            "reference_solution_block": ref_block,
            "n_steps": str(len(inp.steps)),
            "last_step": str(max(len(inp.steps) - 1, 0)),
            "steps": steps,
        },
    )
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


# --------------------------------------------------------------------------------------------------- replies


def reply_schema(taxonomy: Taxonomy, n_steps: int, tpl: PromptTemplate, limits: bool = True) -> dict:
    """The JSON schema of a reply. ``limits`` adds maxLength/minimum/maximum (not every endpoint accepts
    them)."""
    step: dict[str, Any] = {"type": "integer"}
    rationale: dict[str, Any] = {"type": "string"}
    if limits:
        step.update(minimum=-1, maximum=max(n_steps - 1, -1))
        rationale["maxLength"] = tpl.rationale_max_chars
    subs = [s for e in taxonomy.error_types.values() for s in e.sub_types]
    return {
        "type": "object",
        "properties": {
            "rationale": rationale,
            "first_error_step": step,
            "error_type": {"type": "string", "enum": [NONE, *taxonomy.error_types]},
            "sub_type": {"type": "string", "enum": [NONE, *subs]},
            "capability": {"type": "string", "enum": [NONE, *taxonomy.capabilities]},
        },
        "required": ["rationale", "first_error_step", "error_type", "sub_type", "capability"],
        "additionalProperties": False,
    }


def response_format(schema: dict) -> dict:
    return {
        "type": "json_schema",
        "json_schema": {"name": "first_error_verdict", "strict": True, "schema": schema},
    }


class InvalidReply(ValueError):
    """A judge reply that is not JSON, or not the schema, or not consistent with the taxonomy and the
    input."""


class ReplyModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rationale: str
    first_error_step: int
    error_type: str
    sub_type: str
    capability: str

    @field_validator("first_error_step", mode="before")
    @classmethod
    def _not_a_boolean(cls, value: Any) -> Any:
        if isinstance(value, bool):  # JSON true is not step 1
            raise ValueError("must be an integer, not true or false")
        return value


@dataclass
class Verdict:
    """One judge's verdict on one input (a parsed reply, or the reason there is none)."""

    status: str = "ok"  # ok | judge_error
    first_error_step: int | None = None
    error_type: str | None = None
    sub_type: str | None = None
    capability: str | None = None
    rationale: str | None = None
    error: str | None = None
    usage: dict[str, int] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


_FENCE = re.compile(r"^\s*```(?:json)?\s*\n?(.*?)\n?\s*```\s*$", re.DOTALL)


def parse_reply(content: str | None, n_steps: int, taxonomy: Taxonomy) -> Verdict:
    """A validated verdict from reply text; raises InvalidReply with a one-line reason."""
    if content is not None and not isinstance(content, str):
        raise InvalidReply(f"the reply is a {type(content).__name__}, not text")
    if content is None or not content.strip():
        raise InvalidReply("empty reply")
    m = _FENCE.match(content)
    text = m.group(1) if m else content
    try:
        data = untrusted.loads(text)  # bounded: nesting and integer size (one bad reply, one error)
    except untrusted.UnsafeJSON as exc:
        raise InvalidReply(f"refused JSON ({exc.msg})") from None
    except json.JSONDecodeError as exc:
        raise InvalidReply(f"malformed JSON ({exc.msg} at char {exc.pos})") from None
    if not isinstance(data, dict):
        raise InvalidReply("off-schema: the reply is not a JSON object")
    try:
        r = ReplyModel.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise InvalidReply(f"off-schema: {'.'.join(map(str, err['loc'])) or 'reply'}: {err['msg']}") from None
    step = r.first_error_step
    if not -1 <= step < n_steps:
        raise InvalidReply(
            f"off-schema: first_error_step {step} is not -1 or a step index (0..{n_steps - 1})"
        )
    rationale = r.rationale.strip()[:1000]
    if step == -1:
        return Verdict(first_error_step=-1, rationale=rationale)
    parents = taxonomy.sub_type_parent
    if r.error_type not in taxonomy.error_types:
        raise InvalidReply(f"off-schema: error_type {r.error_type!r} with first_error_step {step}")
    if parents.get(r.sub_type) != r.error_type:
        raise InvalidReply(f"off-schema: sub_type {r.sub_type!r} is not a sub-type of {r.error_type}")
    if r.capability not in taxonomy.capabilities:
        raise InvalidReply(f"off-schema: capability {r.capability!r} with first_error_step {step}")
    return Verdict(
        first_error_step=step,
        error_type=r.error_type,
        sub_type=r.sub_type,
        capability=r.capability,
        rationale=rationale,
    )
