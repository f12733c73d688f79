"""Tasks as data: a YAML spec in tasks/ says where problems come from, which fields hold what, the answer type
and the prompt. This module turns a spec (plus optional local data) into validated ``Problem`` records and
turns a problem into chat messages."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from qreason.config.schema import TaskConfig, check_slug
from qreason.errors import UserError, decode_utf8
from qreason.inputs import resources, synthetic
from qreason.records import Problem, content_key
from qreason.store import iter_jsonl


class HubSource(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str
    name: str | None = None
    split: str = "test"


class Source(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hub: HubSource | None = None
    synthetic: dict[str, Any] | None = None


class Fields(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str | None = None
    question: str = "question"
    answer: str = "answer"


class TaskPrompt(BaseModel):
    model_config = ConfigDict(extra="forbid")
    system: str | None = None
    user: str
    example: dict[str, str] | None = None


class TaskSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    description: str = ""
    answer_type: Literal["number", "latex", "integer"]
    source: Source
    fields: Fields = Field(default_factory=Fields)
    answer_pattern: str | None = None
    reference_solution: str | None = None
    meta: list[str] = Field(default_factory=list)
    prompt: str = "general"

    # the name goes into records, file names and lm-eval task names: a slug only
    _slug = field_validator("name")(lambda name: check_slug(name))

    @field_validator("answer_pattern")
    @classmethod
    def _answer_group(cls, pattern: str | None) -> str | None:
        """The pattern is applied to every row: check it compiles and names the answer before any row is
        read."""
        if pattern is None:
            return None
        try:
            compiled = re.compile(pattern, re.MULTILINE | re.DOTALL)
        except re.error as exc:
            raise ValueError(f"invalid regular expression ({exc})") from None
        if "answer" not in compiled.groupindex:
            raise ValueError("needs a group (?P<answer>...) that captures the answer")
        return pattern


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(decode_utf8(path.read_bytes(), str(path)))
    except yaml.YAMLError as exc:
        raise UserError(str(path), f"invalid YAML ({exc})") from None


def load_spec(name: str, base_dir: Path | None = None) -> TaskSpec:
    """A task spec by name (tasks/NAME.yaml) or by path to a YAML file."""
    candidate = Path(name)
    if not candidate.is_absolute() and base_dir is not None:
        candidate = base_dir / candidate
    path = candidate if name.endswith((".yaml", ".yml")) else resources.find("tasks", f"{name}.yaml")
    if path is None or not path.is_file():
        known = task_names()
        raise UserError(
            f"task {name!r}", f"no such task (known: {', '.join(known)}; or give a path to a task YAML)"
        )
    try:
        return TaskSpec.model_validate(_read_yaml(path))
    except ValidationError as exc:
        err = exc.errors()[0]
        raise UserError(str(path), f"{'.'.join(map(str, err['loc']))}: {err['msg']}") from None


def task_names() -> list[str]:
    """The tasks on the search path (built-in and the user's directories)."""
    return [p.stem for p in resources.listing("tasks") if p.stem != "prompts"]


def load_prompt(name: str) -> TaskPrompt:
    """A prompt by name from the ``prompts.yaml`` files on the task search path (the user's first)."""
    files = [d / "prompts.yaml" for d in resources.search_path("tasks") if (d / "prompts.yaml").is_file()]
    for path in files:
        prompts = _read_yaml(path) or {}
        if name in prompts:
            return TaskPrompt.model_validate(prompts[name])
    raise UserError(" / ".join(map(str, files)) or "prompts.yaml", f"no prompt named {name!r}")


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSONL file; a bad line is an error naming file and line."""
    return [row for _, row in iter_jsonl(path)]


def _hub_rows(spec: TaskSpec) -> list[dict]:
    src = spec.source.hub
    try:
        import datasets

        ds = datasets.load_dataset(src.path, src.name, split=src.split)
    except Exception as exc:  # offline, missing dataset, auth: all end the same way for the user
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"task {spec.name}",
            f"could not load {src.path} from the Hugging Face hub ({first[:200]}); "
            "set data: PATH.jsonl in the task config to read a local file",
        ) from None
    return [dict(r) for r in ds]


def _check_scalar(value: Any, field: str, where: str, text_only: bool) -> None:
    """A question must be text; an answer or id may be text or a finite number (JSON allows NaN and Infinity,
    which would otherwise become the text "nan")."""
    if text_only and not isinstance(value, str):
        raise UserError(
            where, f"field {field!r}: the question must be text, got {type(value).__name__} {value!r}"
        )
    if (
        isinstance(value, bool)
        or not isinstance(value, (str, int, float))
        or (isinstance(value, float) and not math.isfinite(value))
    ):
        raise UserError(where, f"field {field!r} must be text or a finite number, got {value!r}")


def _problem(spec: TaskSpec, row: dict, index: int, where: str) -> Problem:
    f = spec.fields
    for field in (f.question, f.answer) + ((f.id,) if f.id else ()):
        if field not in row or row[field] is None or str(row[field]).strip() == "":
            raise UserError(
                where,
                f"missing field {field!r} (task {spec.name} expects "
                f"{', '.join(x for x in (f.id, f.question, f.answer) if x)})",
            )
        _check_scalar(row[field], field, where, text_only=field == f.question)
    raw_answer = str(row[f.answer])
    answer = raw_answer
    meta: dict[str, Any] = {k: row[k] for k in spec.meta if k in row}
    if spec.answer_pattern:
        m = re.search(spec.answer_pattern, raw_answer, re.MULTILINE | re.DOTALL)
        if not m:
            raise UserError(where, f"field {f.answer!r} does not match the task's answer pattern")
        answer = m.group("answer").replace(",", "").strip()
    if spec.reference_solution and spec.reference_solution in row:
        solution = str(row[spec.reference_solution])
        if spec.answer_pattern:
            solution = re.sub(spec.answer_pattern, "", solution, flags=re.MULTILINE | re.DOTALL)
        solution = re.sub(r"<<[^<>]*>>", "", solution).strip()  # GSM8K calculator annotations
        meta["reference_solution"] = solution
        steps = [s.strip() for s in solution.splitlines() if s.strip()]
        meta.setdefault("reference_steps", steps)
        meta.setdefault("n_reference_steps", len(steps))
    if "reference_steps" in row:
        steps = row["reference_steps"]
        if not isinstance(steps, list) or not all(isinstance(x, str) for x in steps):
            raise UserError(where, "field 'reference_steps' must be a list of strings (one per step)")
        meta["reference_steps"] = steps
        meta["n_reference_steps"] = len(steps)
    if "steps" in row and isinstance(row["steps"], int):
        meta["difficulty"] = row["steps"]
    if spec.answer_type == "integer":
        try:
            answer = str(int(answer))
        except ValueError:
            raise UserError(where, f"answer {answer!r} is not an integer (task {spec.name})") from None
    pid = str(row[f.id]) if f.id else str(index)
    question = str(row[f.question])
    return Problem(
        key=content_key("problem", spec.name, pid, question, answer),
        task=spec.name,
        problem_id=pid,
        question=question,
        answer=answer,
        answer_type=spec.answer_type,
        meta=meta,
    )


def load_problems(
    task: TaskConfig, base_dir: Path, places: dict[str, str] | None = None
) -> tuple[TaskSpec, list[Problem]]:
    """Validated problems for one task of a run config (first ``limit`` rows); relative paths (a task YAML, a
    data file) are resolved against ``base_dir``, the config file's directory. ``places``, if given, receives
    each problem's key -> where it was read (``file:line``), for errors found later in planning."""
    spec = load_spec(task.name, base_dir)
    return spec, spec_problems(spec, task, base_dir, places)


def spec_problems(
    spec: TaskSpec, task: TaskConfig, base_dir: Path, places: dict[str, str] | None = None
) -> list[Problem]:
    """The problems of a loaded spec for one task config (its data file, synthetic params and limit)."""
    if task.data:
        path = (base_dir / Path(task.data).expanduser()).resolve()
        rows, where = [(f"line {line.rsplit(':', 1)[1]}", row) for line, row in iter_jsonl(path)], str(path)
    elif spec.source.synthetic is not None:
        params = {**spec.source.synthetic, **task.params}
        if task.limit:
            params["n"] = task.limit
        try:
            rows = [(f"row {i}", row) for i, row in enumerate(synthetic.generate(**params))]
        except (TypeError, ValueError) as exc:
            raise UserError(f"task {task.name}", f"bad synthetic params ({exc})") from None
        where = f"synthetic task {task.name}"
    elif spec.source.hub is not None:
        rows = [(f"row {i}", row) for i, row in enumerate(_hub_rows(spec))]
        where = f"hub dataset {spec.source.hub.path}"
    else:
        raise UserError(f"task {spec.name}", "the spec names no source; set data: PATH.jsonl")
    if task.limit:
        rows = rows[: task.limit]
    if not rows:
        raise UserError(where, "no problems")
    problems, seen = [], {}
    for i, (place, row) in enumerate(rows):  # place: "line N" of a data file, "row N" of a generated/hub set
        here = f"{where}:{place.split()[1]}" if place.startswith("line") else f"{where} {place}"
        problem = _problem(spec, row, i, here)
        if problem.problem_id in seen:  # one pass with a dict: 20k rows take milliseconds, not seconds
            raise UserError(
                here, f"duplicate problem id {problem.problem_id!r} (first on {seen[problem.problem_id]})"
            )
        seen[problem.problem_id] = place
        problems.append(problem)
        if places is not None:
            places[problem.key] = here
    return problems


def build_messages(spec: TaskSpec, problem: Problem, format_example: bool) -> list[dict[str, str]]:
    """The chat messages for one problem: optional system prompt, optional worked example, the question."""
    tmpl = load_prompt(spec.prompt)
    messages = []
    if tmpl.system:
        messages.append({"role": "system", "content": tmpl.system})
    if format_example and tmpl.example:
        messages.append(
            {"role": "user", "content": tmpl.user.replace("{question}", tmpl.example["question"])}
        )
        messages.append({"role": "assistant", "content": tmpl.example["solution"]})
    messages.append({"role": "user", "content": tmpl.user.replace("{question}", problem.question)})
    return messages
