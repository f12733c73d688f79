"""The run store: a run directory with one append-only JSONL table per record type, plus a SQLite run index.

Durability rules:
- a table is appended in whole lines with one write, then flushed and fsynced;
- on open, a torn last line (a kill -9 in the middle of a write) is cut off, so the table stays valid JSONL;
- keys are unique: ``append`` skips records whose key is already stored, so a resumed run never duplicates;
- every other file (config, summary, environment) is written to a temporary name and renamed into place.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import tempfile
from contextlib import closing
from datetime import datetime, timezone
from pathlib import Path
from typing import Generic, Iterable, Iterator, TypeVar

from pydantic import ValidationError

from .errors import UserError
from .records import Generation, Grade, Judgment, LmEvalResult, ModelVariant, Problem, Record

R = TypeVar("R", bound=Record)


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see either the old file or the complete new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def iter_jsonl(path: Path, not_object: str = "each line must be a JSON object") -> Iterator[tuple[str, dict]]:
    """``(file:line, row)`` for every non-blank line of a JSONL file someone else wrote (task data, batch
    outputs): a missing file, invalid JSON or a line that is not an object is a UserError naming the place."""
    path = Path(path)
    if not path.is_file():
        raise UserError(str(path), "data file not found")
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(where, f"invalid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(row, dict):
                raise UserError(where, not_object)
            yield where, row


class Table(Generic[R]):
    """An append-only JSONL table of records of one type, unique by key."""

    def __init__(self, path: Path, record_type: type[R]):
        self.path = path
        self.record_type = record_type
        self._rows: dict[str, R] | None = None

    def _load(self) -> dict[str, R]:
        if self._rows is not None:
            return self._rows
        rows: dict[str, R] = {}
        if self.path.exists():
            data = self.path.read_bytes()
            end = data.rfind(b"\n") + 1
            if end < len(data):  # torn last line from an interrupted write: drop it
                with open(self.path, "r+b") as fh:
                    fh.truncate(end)
                data = data[:end]
            for lineno, line in enumerate(data.decode("utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    rec = self.record_type.model_validate_json(line)
                except ValidationError as exc:
                    first = exc.errors()[0]
                    raise UserError(f"{self.path}:{lineno}", f"corrupt {self.record_type.__name__} record "
                                    f"({'.'.join(map(str, first['loc']))}: {first['msg']})") from None
                rows.setdefault(rec.key, rec)
        self._rows = rows
        return rows

    def __contains__(self, key: str) -> bool:
        return key in self._load()

    def __len__(self) -> int:
        return len(self._load())

    def get(self, key: str) -> R | None:
        return self._load().get(key)

    def all(self) -> list[R]:
        return list(self._load().values())

    def append(self, records: Iterable[R]) -> int:
        """Store the records whose keys are new; returns how many were written."""
        rows = self._load()
        new: list[R] = list({r.key: r for r in records if r.key not in rows}.values())
        if not new:
            return 0
        blob = "".join(r.model_dump_json() + "\n" for r in new).encode("utf-8")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "ab") as fh:
            fh.write(blob)
            fh.flush()
            os.fsync(fh.fileno())
        for r in new:
            rows[r.key] = r
        return len(new)


class RunStore:
    """One run directory: the tables of every stage and the run's metadata files."""

    def __init__(self, run_dir: Path):
        self.dir = Path(run_dir)
        self.problems: Table[Problem] = Table(self.dir / "problems.jsonl", Problem)
        self.generations: Table[Generation] = Table(self.dir / "generations.jsonl", Generation)
        self.grades: Table[Grade] = Table(self.dir / "grades.jsonl", Grade)
        self.variants: Table[ModelVariant] = Table(self.dir / "variants.jsonl", ModelVariant)
        self.judgments: Table[Judgment] = Table(self.dir / "judgments.jsonl", Judgment)
        # curation: full-precision continuations of quantized prefixes, and their grades
        self.continuations: Table[Generation] = Table(self.dir / "continuations.jsonl", Generation)
        self.continuation_grades: Table[Grade] = Table(self.dir / "continuation_grades.jsonl", Grade)
        self.lm_eval: Table[LmEvalResult] = Table(self.dir / "lm_eval_results.jsonl", LmEvalResult)

    def write_json(self, name: str, obj) -> Path:
        path = self.dir / name
        write_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")
        return path

    def read_json(self, name: str):
        path = self.dir / name
        return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


class RunLock:
    """An exclusive lock on a run directory, so two runs never write the same tables. The operating system
    releases it when the process ends, however it ends (a kill -9 leaves nothing to clean up)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"
        self.fd: int | None = None

    def __enter__(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise UserError(str(self.path.parent), f"another qreason run (pid {holder}) is using this run "
                                                   "directory; wait for it to finish or choose another output_dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


class RunIndex:
    """A SQLite index of every invocation of every run, for ``qreason runs`` and history."""

    SCHEMA = """
    CREATE TABLE IF NOT EXISTS runs (
        run_id TEXT PRIMARY KEY,
        run_dir TEXT NOT NULL,
        name TEXT NOT NULL,
        config_hash TEXT NOT NULL,
        started_at TEXT NOT NULL,
        finished_at TEXT,
        status TEXT NOT NULL,
        summary TEXT,
        environment TEXT
    )"""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with closing(self._connect()) as db, db:
            db.execute(self.SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30)
        db.row_factory = sqlite3.Row
        return db

    def start(self, run_id: str, run_dir: Path, name: str, config_hash: str, environment: dict) -> None:
        with closing(self._connect()) as db, db:
            db.execute(
                "INSERT INTO runs (run_id, run_dir, name, config_hash, started_at, status, environment) "
                "VALUES (?, ?, ?, ?, ?, 'running', ?)",
                (run_id, str(Path(run_dir).resolve()), name, config_hash, now_iso(), json.dumps(environment)),
            )

    def finish(self, run_id: str, status: str, summary: dict | None) -> None:
        with closing(self._connect()) as db, db:
            db.execute(
                "UPDATE runs SET finished_at = ?, status = ?, summary = ? WHERE run_id = ?",
                (now_iso(), status, json.dumps(summary, default=str) if summary is not None else None, run_id),
            )

    def forget(self, run_dir: str) -> None:
        with closing(self._connect()) as db, db:
            db.execute("DELETE FROM runs WHERE run_dir = ?", (str(run_dir),))

    def list(self, name: str | None = None) -> list[dict]:
        query = "SELECT * FROM runs" + (" WHERE name = ?" if name else "") + " ORDER BY started_at, run_id"
        with closing(self._connect()) as db:
            rows = db.execute(query, (name,) if name else ()).fetchall()
        out = []
        for row in rows:
            item = dict(row)
            for field in ("summary", "environment"):
                item[field] = json.loads(item[field]) if item[field] else None
            out.append(item)
        return out
