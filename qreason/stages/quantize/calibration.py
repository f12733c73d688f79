"""Calibration samples: the text a calibrating method (GPTQ, AWQ, SmoothQuant) runs through the model.

Three sources, chosen by the calibration spec:
- ``generic``: varied paragraphs written for qreason (``calibration_text.txt`` in this package);
- ``jsonl``: rows of a local JSONL file, e.g. a task's train split (question/answer rows become a chat
  exchange, ``text`` rows are used as they are, ``messages`` rows as chat);
- ``traces``: the full-precision model's own answers to a task's problems, generated with the vLLM backend.

Every source is checked by ``plan_calibration`` before anything is created or started, and identified by a
content description (``CalibrationPlan.identity``) that goes into the quantized checkpoint's cache key.
Samples are chosen with a seeded shuffle, so the same spec always selects the same rows.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from qreason.errors import UserError
from qreason.store import file_sha256

if TYPE_CHECKING:
    from qreason.config.schema import CalibrationSpec
    from qreason.inputs.models import ResolvedModel

GENERIC_TEXT = Path(__file__).with_name("calibration_text.txt")
# Row layouts a JSONL calibration file may use, tried in order: (fields, how the row becomes a sample).
PAIR_FIELDS = (("question", "answer"), ("problem", "solution"), ("prompt", "response"), ("input", "output"))


def generic_paragraphs() -> list[str]:
    text = GENERIC_TEXT.read_text(encoding="utf-8")
    return [p.strip() for p in text.split("\n\n") if p.strip()]


def _resolve_path(path: str, base_dir: Path | None) -> Path:
    p = Path(path).expanduser()
    if not p.is_absolute() and base_dir is not None:
        p = base_dir / p
    return p.resolve()


def _row_to_sample(row: dict, fields: tuple[str, str] | None) -> dict | None:
    """A JSONL row as a calibration sample, or None when it has none of the known layouts."""
    if fields is None:
        if isinstance(row.get("text"), str) and row["text"].strip():
            return {"text": row["text"]}
        if isinstance(row.get("messages"), list) and row["messages"]:
            return {"messages": row["messages"]}
        fields = next((f for f in PAIR_FIELDS if all(isinstance(row.get(k), str) for k in f)), None)
        if fields is None:
            return None
    user, assistant = (row.get(k) for k in fields)
    if not isinstance(user, str) or not isinstance(assistant, str):
        return None
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def _read_jsonl(path: Path) -> list[dict]:
    from qreason.inputs.tasks import read_jsonl  # a bad line is reported with file and line

    return read_jsonl(path)


@dataclass
class CalibrationPlan:
    """A checked calibration spec: what it will read, and how to identify it for the cache."""

    spec: "CalibrationSpec"
    path: Path | None  # the JSONL file (jsonl) or the task's local data (traces), resolved
    fields: tuple[str, str] | None
    identity: dict
    base_dir: Path | None = None  # where relative task paths are resolved

    def build(self, base: "ResolvedModel", echo: Callable[[str], None] = print) -> list[dict]:
        """The chosen samples, each ``{"text": ...}`` or ``{"messages": [...]}`` plus ``origin``."""
        s = self.spec
        if s.source == "generic":
            paragraphs = generic_paragraphs()
            order = list(range(len(paragraphs)))
            random.Random(s.seed).shuffle(order)
            if s.n_samples > len(order):
                echo(f"only {len(order)} generic paragraphs exist; using all of them ({s.n_samples} asked)")
            return [{"text": paragraphs[i], "origin": {"generic": i}} for i in order[: s.n_samples]]
        if s.source == "jsonl":
            rows = _read_jsonl(self.path)
            order = list(range(len(rows)))
            random.Random(s.seed).shuffle(order)
            samples = []
            for i in order:
                sample = _row_to_sample(rows[i], self.fields)
                if sample is not None:
                    samples.append({**sample, "origin": {"file": str(self.path), "line": i + 1}})
                if len(samples) == s.n_samples:
                    break
            if len(samples) < s.n_samples:
                echo(
                    f"{self.path} has only {len(samples)} usable rows; "
                    f"using all of them ({s.n_samples} asked)"
                )
            return samples
        return generate_traces(self, base, echo)


def plan_calibration(spec: "CalibrationSpec", base_dir: Path | None = None) -> CalibrationPlan:
    """Check a calibration spec without building anything; errors are one-line UserErrors."""
    common = {
        "source": spec.source,
        "n_samples": spec.n_samples,
        "max_seq_len": spec.max_seq_len,
        "seed": spec.seed,
    }
    if spec.source == "generic":
        return CalibrationPlan(
            spec, None, None, {**common, "text_sha256": file_sha256(GENERIC_TEXT)}, base_dir
        )
    if spec.source == "jsonl":
        if not spec.path:
            raise UserError(
                "calibration", "source jsonl needs path: a local JSONL file (e.g. a task's train split)"
            )
        path = _resolve_path(spec.path, base_dir)
        if not path.is_file():
            raise UserError(str(path), "calibration file not found")
        fields = None
        if spec.task:
            from qreason.inputs.tasks import load_spec

            task = load_spec(spec.task, base_dir)
            fields = (task.fields.question, task.fields.answer)
        rows = _read_jsonl(path)
        if not rows:
            raise UserError(str(path), "the calibration file has no rows")
        if _row_to_sample(rows[0], fields) is None:
            wanted = (
                f"{fields[0]!r} and {fields[1]!r}"
                if fields
                else "'text', 'messages', or a pair such as 'question'/'answer' or 'problem'/'solution'"
            )
            raise UserError(f"{path}:1", f"a calibration row needs {wanted} (this row has {sorted(rows[0])})")
        return CalibrationPlan(
            spec, path, fields, {**common, "file_sha256": file_sha256(path), "fields": fields}, base_dir
        )
    # traces: the task must load now, so that a bad task fails before the model is started
    if not spec.task:
        raise UserError("calibration", "source traces needs task: the task whose problems the model answers")
    path = _resolve_path(spec.path, base_dir) if spec.path else None
    if path is not None and not path.is_file():
        raise UserError(str(path), "task data file not found")
    from qreason.inputs.tasks import load_spec

    load_spec(spec.task, base_dir)
    return CalibrationPlan(
        spec,
        path,
        None,
        {**common, "task": spec.task, "data_sha256": file_sha256(path) if path else None, "temperature": 0.0},
        base_dir,
    )


def generate_traces(plan: CalibrationPlan, base: "ResolvedModel", echo: Callable[[str], None]) -> list[dict]:
    """Answers of the full-precision model to ``n_samples`` problems of the task, as chat samples."""
    from qreason.config.schema import SamplingConfig, TaskConfig, VLLMConfig
    from qreason.engines import make_backend, make_request
    from qreason.inputs.tasks import build_messages, load_problems
    from qreason.stages.quantize.shapes import read_config

    s = plan.spec
    task_cfg = TaskConfig(name=s.task, data=str(plan.path) if plan.path else None)
    task_spec, problems = load_problems(task_cfg, plan.base_dir or Path.cwd())
    random.Random(s.seed).shuffle(problems)
    chosen = problems[: s.n_samples]
    sampling = SamplingConfig(temperature=0.0, max_tokens=s.max_seq_len, seeds=[s.seed])
    positions = read_config(base.path).get("max_position_embeddings") or 4096
    backend_cfg = VLLMConfig(max_model_len=min(int(positions), s.max_seq_len + 2048))
    requests = [
        make_request("calibration", base, p, build_messages(task_spec, p, False), sampling, s.seed)
        for p in chosen
    ]
    echo(f"generating {len(requests)} calibration traces with the full-precision model on task {s.task}")
    samples = []
    backend = make_backend(backend_cfg, base)
    try:
        for req, done in backend.generate(requests, sampling):
            if done.error is None and done.text.strip():
                samples.append(
                    {
                        "messages": req.messages + [{"role": "assistant", "content": done.text}],
                        "origin": {
                            "task": s.task,
                            "problem_id": req.problem_id,
                            "finish_reason": done.finish_reason,
                        },
                    }
                )
    finally:
        backend.close()
    if not samples:
        raise UserError(f"calibration traces on {s.task}", "the model produced no usable answers")
    return samples


def write_samples(samples: list[dict], path: Path) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for sample in samples:
            fh.write(json.dumps(sample, ensure_ascii=False) + "\n")
