"""One append-only JSONL table of records (see ``qreason.store`` for the durability rules)."""

from __future__ import annotations

import os
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Generic, Iterable, TypeVar

from pydantic import ValidationError

from qreason.errors import UserError
from qreason.records import Record
from qreason.store.files import write_bytes_atomic

R = TypeVar("R", bound=Record)


class Table(Generic[R]):
    """An append-only JSONL table of records of one type, unique by key."""

    def __init__(self, path: Path, record_type: type[R], run_dir: Path | None = None):
        self.path = path
        self.record_type = record_type
        self.run_dir = run_dir or path.parent  # what `qreason repair` is given for this table
        self._rows: dict[str, R] | None = None
        # threads of one process appending to one table (lm-eval targets evaluated at once) take turns: a
        # write in progress would look like a torn tail to the other and be cut off
        self._lock = threading.Lock()

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
                raise UserError(
                    f"{self.path}:{lineno}",
                    f"corrupt {self.record_type.__name__} record ({exc}); "
                    f"`qreason repair {self.run_dir}` moves corrupt lines aside",
                ) from None
            rows.setdefault(rec.key, rec)
        self._rows = rows
        return rows

    def repair(self) -> int:
        """Move corrupt lines (and a torn tail) into ``TABLE.corrupt-TIME`` beside the table and rewrite the
        table with the valid lines; returns how many lines were moved. The caller must hold the run lock."""
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
        with self._lock:
            return self._append(records)

    def _append(self, records: Iterable[R]) -> int:
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
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            except OSError as exc:
                restored = _restore(fd, end)
                after = (
                    "the table was restored to its last complete line"
                    if restored
                    else "restoring it failed too: run `qreason repair` once the disk has room"
                )
                raise UserError(
                    str(self.path), f"could not append {len(new)} records ({exc.strerror or exc}); {after}"
                ) from None
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
