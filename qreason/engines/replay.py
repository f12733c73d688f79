"""Generations made elsewhere, replayed from a JSONL file: another harness's outputs, lm-eval's
``--log_samples`` file, an earlier run's ``generations.jsonl``. Each row is matched to a problem of the run
(by id or by question text) and handed to the stage as if a model had just written it, so grading, judging,
curation and the report work on outputs qreason did not generate. A problem with no row is a failed generation
(reported, not stored).

    backend: {kind: replay, path: samples.jsonl, text_field: resps.0.0, question_field: doc.question}
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from qreason.engines.base import Completion, GenerationRequest, no_adapter
from qreason.errors import UserError
from qreason.inputs.models import ResolvedModel
from qreason.records import content_key
from qreason.store import iter_jsonl

if TYPE_CHECKING:
    from qreason.config.schema import ModelConfig, ReplayConfig, SamplingConfig

_MISSING = object()


def field(row: Any, dotted: str) -> Any:
    """``row["a"]["b"][0]`` for ``a.b.0``; ``_MISSING`` where the path does not exist."""
    for part in dotted.split("."):
        if isinstance(row, dict) and part in row:
            row = row[part]
        elif isinstance(row, list) and part.isdigit() and int(part) < len(row):
            row = row[int(part)]
        else:
            return _MISSING
    return row


def normalize_question(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().casefold()


def _file_path(cfg: ReplayConfig, base_dir: Path | None) -> Path:
    path = Path(cfg.path).expanduser()
    return path if path.is_absolute() or base_dir is None else (base_dir / path).resolve()


def read_rows(cfg: ReplayConfig, path: Path) -> dict[tuple[str, int | None], dict]:
    """The file's rows by (match key, seed); a row without them is an error naming the file and line."""
    rows: dict[tuple[str, int | None], dict] = {}
    for where, row in iter_jsonl(path):
        key_field = cfg.question_field or cfg.id_field
        key = field(row, key_field)
        if key is _MISSING or not isinstance(key, (str, int)):
            raise UserError(where, f"no {key_field!r} (a string or integer) to match the row to a problem")
        key = normalize_question(str(key)) if cfg.question_field else str(key)
        text = field(row, cfg.text_field)
        if text is _MISSING or not isinstance(text, str):
            raise UserError(where, f"no {cfg.text_field!r} (a string): the solution text")
        seed = None
        if cfg.seed_field:
            seed = field(row, cfg.seed_field)
            if not isinstance(seed, int):
                raise UserError(where, f"{cfg.seed_field!r} must be an integer seed")
        if (key, seed) in rows:
            raise UserError(
                where,
                f"a second row for {key_field} {key[:60]!r}" + (f" seed {seed}" if seed is not None else ""),
            )
        finish = field(row, cfg.finish_reason_field) if cfg.finish_reason_field else "stop"
        rows[(key, seed)] = {"text": text, "finish_reason": finish if isinstance(finish, str) else "stop"}
    return rows


class ReplayBackend:
    """Answers each request from the file's row for its problem (and seed, when ``seed_field`` is set)."""

    def __init__(self, cfg: ReplayConfig, model: ResolvedModel):
        no_adapter("replay", model)
        self.cfg = cfg
        self.path = Path(model.path)
        self.name = f"replay:{self.path.name}"
        self.versions: dict[str, str] = {}
        self.rows = read_rows(cfg, self.path)

    @staticmethod
    def resolve_base(cfg: ReplayConfig, model: ModelConfig, base_dir: Path | None = None) -> ResolvedModel:
        """The 'model' is the file: its content hash is the fingerprint, so edited outputs are new
        generations."""
        path = _file_path(cfg, base_dir)
        if not path.is_file():
            raise UserError(f"backend.path {cfg.path}", "replay file not found")
        read_rows(cfg, path)  # a bad row is bad input: reported before the run directory is touched
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        matching = cfg.model_dump(exclude={"path", "batch_size"})
        return ResolvedModel(model.path, str(path), content_key("replay", digest, matching), "replay")

    def generate(
        self, requests: list[GenerationRequest], sampling: SamplingConfig
    ) -> Iterator[tuple[GenerationRequest, Completion]]:
        for req in requests:
            key = normalize_question(req.question) if self.cfg.question_field else req.problem_id
            row = self.rows.get((key, req.seed if self.cfg.seed_field else None))
            if row is None:
                yield (
                    req,
                    Completion(
                        error=f"{self.path.name} has no row for {req.task}/{req.problem_id}"
                        + (f" seed {req.seed}" if self.cfg.seed_field else "")
                    ),
                )
            else:
                yield req, Completion(text=row["text"], finish_reason=row["finish_reason"])

    def close(self) -> None:
        pass
