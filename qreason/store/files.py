"""Small files of a run directory written whole: atomic writes, JSONL input reading, the run-directory
marker (qreason's one ownership marker) and the check that an output directory is ours to write."""

from __future__ import annotations

import json
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Iterator

from qreason.errors import UserError


def cache_dir() -> Path:
    """qreason's cache outside any run directory (converted models, quantized checkpoints, adapters):
    ``$QREASON_CACHE``, else ``~/.cache/qreason``."""
    return Path(os.environ.get("QREASON_CACHE", Path.home() / ".cache" / "qreason"))


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


