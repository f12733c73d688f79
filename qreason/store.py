"""The run store: a run directory with one append-only JSONL table per record type, plus a SQLite run index.

Durability rules:
- a table is appended in whole lines with one write, then fsynced; a write that fails (a full disk, a file size
  limit) is undone: the table is cut back to its last complete line and the failure reported;
- readers never change a table: a torn last line (a kill -9 in the middle of a write, or a write in progress in
  another process) is ignored; the next writer, who holds the run lock, cuts it off before appending;
- a corrupt line in the middle is reported with its file and line; ``qreason repair RUN_DIR`` (under the run
  lock) moves such lines into a ``.corrupt-*`` file beside the table and keeps every valid line;
- keys are unique: ``append`` skips records whose key is already stored, so a resumed run never duplicates;
- every other file (config, summary, environment) is written to a temporary name and renamed into place.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
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
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the complete new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
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
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise UserError(where, f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}); "
                                       "save the file as UTF-8") from None
            if not line.strip():
                continue
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

    def _read_lines(self) -> tuple[list[bytes], bytes]:
        """(complete lines, torn tail) of the file; a reader never changes it."""
        data = self.path.read_bytes() if self.path.exists() else b""
        end = data.rfind(b"\n") + 1
        return data[:end].split(b"\n")[:-1], data[end:]

    def _parse(self, line: bytes) -> R:
        """One record; raises ValueError (with the reason) on a corrupt line."""
        try:
            return self.record_type.model_validate_json(line.decode("utf-8"))
        except UnicodeDecodeError:
            raise ValueError("not UTF-8") from None
        except ValidationError as exc:
            first = exc.errors()[0]
            raise ValueError(f"{'.'.join(map(str, first['loc']))}: {first['msg']}") from None

    def _load(self) -> dict[str, R]:
        if self._rows is not None:
            return self._rows
        rows: dict[str, R] = {}
        lines, _torn = self._read_lines()
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rec = self._parse(line)
            except ValueError as exc:
                raise UserError(f"{self.path}:{lineno}", f"corrupt {self.record_type.__name__} record ({exc}); "
                                f"`qreason repair {self.path.parent}` moves corrupt lines aside") from None
            rows.setdefault(rec.key, rec)
        self._rows = rows
        return rows

    def repair(self) -> int:
        """Move corrupt lines (and a torn tail) into ``TABLE.corrupt-TIME`` beside the table and rewrite the table
        with the valid lines; returns how many lines were moved. The caller must hold the run lock."""
        lines, torn = self._read_lines()
        good, bad = [], []
        for line in lines:
            if not line.strip():
                continue
            try:
                self._parse(line)
                good.append(line)
            except ValueError:
                bad.append(line)
        if torn:
            bad.append(torn)
        if not bad:
            return 0
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        with open(aside, "xb") as fh:
            fh.write(b"".join(line + b"\n" for line in bad))
            fh.flush()
            os.fsync(fh.fileno())
        write_bytes_atomic(self.path, b"".join(line + b"\n" for line in good))
        self._rows = None
        return len(bad)

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
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            end = _complete_end(fd)
            if end < os.fstat(fd).st_size:  # a torn tail from an interrupted write: the writer cuts it off
                os.ftruncate(fd, end)
            try:
                view = memoryview(blob)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            except OSError as exc:
                restored = _restore(fd, end)
                after = ("the table was restored to its last complete line" if restored else
                         "restoring it failed too: run `qreason repair` once the disk has room")
                raise UserError(str(self.path), f"could not append {len(new)} records "
                                                f"({exc.strerror or exc}); {after}") from None
        finally:
            os.close(fd)
        for r in new:
            rows[r.key] = r
        return len(new)


def _complete_end(fd: int, chunk: int = 1 << 16) -> int:
    """The size of the file up to and including its last newline (0 when it has none)."""
    pos = os.fstat(fd).st_size
    while pos > 0:
        start = max(0, pos - chunk)
        i = os.pread(fd, pos - start, start).rfind(b"\n")
        if i >= 0:
            return start + i + 1
        pos = start
    return 0


def _restore(fd: int, size: int) -> bool:
    """Cut a file back to ``size`` after a failed write; whether that worked."""
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
        return True
    except OSError:
        return False


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

    def tables(self) -> list[Table]:
        return [t for t in vars(self).values() if isinstance(t, Table)]

    def repair(self) -> dict[str, int]:
        """Repair every table (see ``Table.repair``); table file name -> lines moved aside. Hold the run lock."""
        return {t.path.name: t.repair() for t in self.tables() if t.path.exists()}

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


RUN_MARKER = ".qreason-run"
_OWN_FILES = {".lock", RUN_MARKER}


def mark_run_dir(run_dir: Path, name: str) -> None:
    """Mark a directory as a qreason run directory (once, at the start of its first run). ``prune`` deletes only
    directories that carry this marker, so a path once indexed and since reused for other files is safe."""
    marker = Path(run_dir) / RUN_MARKER
    if not marker.exists():
        write_atomic(marker, json.dumps({"qreason_run": name, "created_at": now_iso()}) + "\n")


def is_run_dir(path: Path) -> bool:
    """A directory qreason ran in: it carries the marker, or (runs from before markers existed) it holds the
    config and problem table every run writes first."""
    path = Path(path)
    return (path / RUN_MARKER).is_file() or ((path / "config.yaml").is_file() and (path / "problems.jsonl").is_file())


def check_output_dir(path: Path, children: Iterable[str] = ()) -> None:
    """Refuse, before anything is written, an output directory that holds someone else's files: a run writes and
    ``prune`` deletes there. Allowed: no directory, an empty one, a qreason run directory; ``children``: names of
    entries that are allowed (the sub-run directories of a ``models:`` axis, each checked on its own)."""
    path = Path(path)
    if not path.exists():
        return
    if not path.is_dir():
        raise UserError(str(path), "the output directory is a file; choose another output_dir")
    if is_run_dir(path):
        return
    foreign = sorted(p.name for p in path.iterdir() if p.name not in _OWN_FILES and p.name not in set(children))
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise UserError(str(path), f"not a qreason run directory and not empty (holds {foreign[0]!r}{more}); "
                                   "choose another output_dir, or empty it")


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

    # added after the first release: which process runs a row, so a row whose process is gone can be told apart
    OWNER_COLUMNS = {"host": "TEXT", "pid": "INTEGER", "pid_started": "TEXT"}

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with closing(self._connect()) as db:
            # a write-ahead log: readers (`qreason runs`, reports) never block a run's writes, and a crash
            # mid-write cannot leave a half-written page in the main file (the mode is stored in the file)
            db.execute("PRAGMA journal_mode=WAL")
            with db:
                db.execute(self.SCHEMA)
                have = {row["name"] for row in db.execute("PRAGMA table_info(runs)")}
                for column, kind in self.OWNER_COLUMNS.items():
                    if column not in have:
                        db.execute(f"ALTER TABLE runs ADD COLUMN {column} {kind}")

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30)
        db.row_factory = sqlite3.Row
        return db

    def start(self, run_id: str, run_dir: Path, name: str, config_hash: str, environment: dict) -> None:
        """Record a run as ``running``, owned by this process (host, pid and the pid's start time)."""
        with closing(self._connect()) as db, db:
            db.execute(
                "INSERT INTO runs (run_id, run_dir, name, config_hash, started_at, status, environment, host, pid, "
                "pid_started) VALUES (?, ?, ?, ?, ?, 'running', ?, ?, ?, ?)",
                (run_id, str(Path(run_dir).resolve()), name, config_hash, now_iso(), json.dumps(environment),
                 socket.gethostname(), os.getpid(), process_started(os.getpid())),
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
            if item["status"] == "running" and owner_gone(item):
                item["status"] = "killed"  # killed without a chance to record it (kill -9, power loss, OOM)
            out.append(item)
        return out


def process_started(pid: int) -> str | None:
    """When a process started (clock ticks since boot, from /proc), to tell a live run from a new process that
    reuses its pid; None where /proc is not available or the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, counted after the parenthesised command name


def owner_gone(row: dict) -> bool:
    """Whether the process that started an index row has ended. Only rows of this host can be checked (a row
    from another machine, or from an index without owner columns, is taken as still running)."""
    pid = row.get("pid")
    if not pid or row.get("host") != socket.gethostname():
        return False
    if Path("/proc/self/stat").exists():
        started = process_started(pid)
        return started is None or (row.get("pid_started") is not None and started != row["pid_started"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
