"""The SQLite run index: every invocation of every run, for ``qreason runs``, history and trends."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Iterator

from qreason.errors import UserError
from qreason.store.files import now_iso


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

    # added after the first release: which process runs a row, so a row whose process is gone can be told
    # apart
    OWNER_COLUMNS = {"host": "TEXT", "pid": "INTEGER", "pid_started": "TEXT"}

    def __init__(self, path: Path):
        """The index at ``path``. Nothing is created until a run is recorded: commands that only read
        (``qreason runs``, ``report``, ``prune`` without runs) leave no database or directory behind."""
        self.path = Path(path)
        self._ready = False

    def _ensure(self) -> None:
        """Create the database (or bring an older one's columns up to date) before the first write."""
        if self._ready:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(str(self.path), f"cannot create the run index ({exc.strerror})") from None
        with self._db() as db:
            # a write-ahead log: readers (`qreason runs`, reports) never block a run's writes, and a crash
            # mid-write cannot leave a half-written page in the main file (the mode is stored in the file)
            db.execute("PRAGMA journal_mode=WAL")
            with db:
                db.execute(self.SCHEMA)
                have = {row["name"] for row in db.execute("PRAGMA table_info(runs)")}
                for column, kind in self.OWNER_COLUMNS.items():
                    if column not in have:
                        db.execute(f"ALTER TABLE runs ADD COLUMN {column} {kind}")
        self._ready = True

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        """A connection; a corrupt, locked or full database is a one-line error naming the index."""
        try:
            with closing(self._connect()) as db:
                yield db
        except sqlite3.Error as exc:
            raise UserError(
                str(self.path),
                f"the run index cannot be used ({exc}); set QREASON_INDEX to another file or move this one "
                "aside",
            ) from None

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30)
        db.row_factory = sqlite3.Row
        return db

    def start(self, run_id: str, run_dir: Path, name: str, config_hash: str, environment: dict) -> None:
        """Record a run as ``running``, owned by this process (host, pid and the pid's start time)."""
        self._ensure()
        with self._db() as db, db:
            db.execute(
                "INSERT INTO runs (run_id, run_dir, name, config_hash, started_at, status, environment, "
                "host, pid, "
                "pid_started) VALUES (?, ?, ?, ?, ?, 'running', ?, ?, ?, ?)",
                (
                    run_id,
                    str(Path(run_dir).resolve()),
                    name,
                    config_hash,
                    now_iso(),
                    json.dumps(environment),
                    socket.gethostname(),
                    os.getpid(),
                    process_started(os.getpid()),
                ),
            )

    def finish(self, run_id: str, status: str, summary: dict | None) -> None:
        self._ensure()
        with self._db() as db, db:
            db.execute(
                "UPDATE runs SET finished_at = ?, status = ?, summary = ? WHERE run_id = ?",
                (
                    now_iso(),
                    status,
                    json.dumps(summary, default=str) if summary is not None else None,
                    run_id,
                ),
            )

    def forget(self, run_dir: str) -> None:
        if not self.path.exists():
            return
        self._ensure()
        with self._db() as db, db:
            db.execute("DELETE FROM runs WHERE run_dir = ?", (str(run_dir),))

    def list(self, name: str | None = None) -> list[dict]:
        query = "SELECT * FROM runs" + (" WHERE name = ?" if name else "") + " ORDER BY started_at, run_id"
        if not self.path.is_file():
            return []  # no run recorded here yet (and a reader creates nothing)
        self._ensure()
        with self._db() as db:
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
