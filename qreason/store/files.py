"""Files and directories written whole, and what qreason owns: atomic writes of files (``write_atomic``) and
of directories (``staging`` + ``publish``), file hashes, JSONL input reading, the one ownership marker that
says a directory is qreason's (a run directory, an exported dataset) and the check that an output directory is
ours to write. qreason deletes or replaces only directories that carry the marker."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Iterator

from qreason import untrusted
from qreason.errors import UserError


def cache_dir() -> Path:
    """qreason's cache outside any run directory (converted models, quantized checkpoints, adapters):
    ``$QREASON_CACHE``, else ``~/.cache/qreason``."""
    return Path(os.environ.get("QREASON_CACHE", Path.home() / ".cache" / "qreason"))


# the cache's areas of artifacts named by their cache key (CACHE/AREA/KEY); records and summaries store full
# paths to them, which ``relocated`` resolves again when they are read
CACHE_AREAS = ("quantized", "recover/dense", "recover/merged", "models")


def relocated(path: str) -> str:
    """Where a stored path to a cached artifact points now: the cache may have moved since the path was
    written (another ``QREASON_CACHE``, the cache copied elsewhere), so an artifact of a cache area is looked
    up by its area and key (its last component) in the present cache first; any other path, or one the
    present cache does not hold, is returned as stored."""
    p = Path(path)
    for area in CACHE_AREAS:
        parts = tuple(area.split("/"))
        if p.parent.parts[-len(parts) :] == parts:
            here = cache_dir().joinpath(*parts, p.name)
            if here.exists():
                return str(here)
    return str(path)


def cache_ref(path: str | Path) -> str | None:
    """A cached artifact's reference: its path inside the cache (``AREA/KEY``), None for a path outside it."""
    try:
        return Path(path).resolve().relative_to(cache_dir().resolve()).as_posix()
    except ValueError:
        return None


def shown_path(path: str | Path, run_dir: Path | None = None) -> str:
    """A path as an artifact may show it, without this machine's directories: inside the cache as
    ``$QREASON_CACHE/...``, inside the run directory as ``RUN_DIR/...``, elsewhere its last component only."""
    p = Path(path)
    for root, name in ((cache_dir(), "$QREASON_CACHE"), (run_dir, "RUN_DIR")):
        if root is not None:
            try:
                return f"{name}/{p.resolve().relative_to(Path(root).resolve()).as_posix()}"
            except ValueError:
                pass
    return p.name or str(p)


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's content, read in blocks (checkpoints are large)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextmanager
def staging(dest: Path, suffix: str = ".partial", kind: str | None = None) -> Iterator[Path]:
    """A new temporary directory beside ``dest`` to build it in; removed at the end unless ``publish`` moved
    it into place. ``kind``: mark it as qreason's from the start (``mark_owned``), so that a killed build's
    leftover, and the published directory, can be deleted by ``prune``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=suffix))
    try:
        if kind is not None:
            mark_owned(tmp, kind, dest.name)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish(tmp: Path, dest: Path, replace: bool = False) -> bool:
    """Rename the finished directory ``tmp`` to ``dest`` in one step. ``replace``: an existing ``dest`` (the
    caller checked that it is qreason's) is renamed aside first, put back if the rename fails, and deleted
    only once the new one is in place. Without ``replace``, False when ``dest`` exists (another process
    finished it first: the caller uses that one)."""
    tmp.chmod(0o755)  # mkdtemp makes it private; what qreason publishes is an ordinary directory
    old = None
    if replace and dest.exists():
        old = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.old."))
        os.replace(dest, old / dest.name)
    try:
        os.replace(tmp, dest)
    except OSError:
        if old is not None:
            os.replace(old / dest.name, dest)  # put the previous one back
            shutil.rmtree(old, ignore_errors=True)
            raise
        if dest.is_dir() and any(dest.iterdir()):
            return False
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return True


COMPLETE_MARKER = ".qreason-complete"  # {relative path: size} of every file, written last


def _file_sizes(directory: Path) -> dict[str, int]:
    return {
        str(p.relative_to(directory)): p.stat().st_size
        for p in sorted(directory.rglob("*"))
        if p.is_file() and not p.is_symlink() and p.name not in (COMPLETE_MARKER, OWNER_MARKER)
    }


def seal(directory: Path) -> None:
    """Mark a finished cached directory (a checkpoint) complete: the size of each of its files, written last,
    so that ``is_sealed`` can tell a whole copy from one that lost or truncated a file since."""
    write_atomic(Path(directory) / COMPLETE_MARKER, json.dumps(_file_sizes(Path(directory)), indent=1) + "\n")


def is_sealed(directory: Path) -> bool:
    """Whether ``directory`` is complete: sealed, with every file it was sealed with at its size."""
    directory = Path(directory)
    try:
        sizes = json.loads((directory / COMPLETE_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(sizes, dict) and bool(sizes) and sizes == _file_sizes(directory)


def child_path(parent: Path, name: str) -> Path:
    """``parent / name`` for a name that comes from input (a variant name in a file name): one path component
    that stays inside ``parent``, never a separator, ``..`` or a link out."""
    parent = Path(parent)
    path = parent / name
    if (
        not name
        or name in (".", "..")
        or "/" in name
        or "\\" in name
        or "\0" in name
        or path.resolve().parent != parent.resolve()
    ):
        raise UserError(str(parent), f"{name!r} cannot name a file here (one path component inside it)")
    return path


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
        os.fchmod(fd, 0o644)  # mkstemp makes it private; a run's files (report.html) are ordinary files
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
                raise UserError(
                    where,
                    f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}); "
                    "save the file as UTF-8",
                ) from None
            if not line.strip():
                continue
            try:
                row = untrusted.loads(line)  # bounded: a deep or huge-integer line is one error, not a crash
            except untrusted.UnsafeJSON as exc:
                raise UserError(where, f"refused JSON ({exc.msg})") from None
            except json.JSONDecodeError as exc:
                raise UserError(where, f"invalid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(row, dict):
                raise UserError(where, not_object)
            yield where, row


OWNER_MARKER = ".qreason"  # {"kind": "run" | "dataset", "name": ..., "created_at": ...}
_LEGACY_MARKERS = {"run": ".qreason-run", "dataset": ".qreason-dataset"}  # written by qreason before 0.2
_OWN_FILES = {".lock", OWNER_MARKER, *_LEGACY_MARKERS.values()}


def mark_owned(directory: Path, kind: str, name: str) -> None:
    """Mark ``directory`` as qreason's (once): ``prune`` deletes, and re-exports replace, only marked
    directories, so a path once used by qreason and since reused for other files is safe."""
    marker = Path(directory) / OWNER_MARKER
    if not marker.exists():
        write_atomic(marker, json.dumps({"kind": kind, "name": name, "created_at": now_iso()}) + "\n")


def owned_as(directory: Path) -> str | None:
    """What qreason made ``directory`` as (``run``, ``dataset``), from its marker; None when unmarked."""
    directory = Path(directory)
    try:
        return json.loads((directory / OWNER_MARKER).read_text(encoding="utf-8"))["kind"]
    except (OSError, ValueError, KeyError, TypeError):
        return next(
            (kind for kind, legacy in _LEGACY_MARKERS.items() if (directory / legacy).is_file()), None
        )


def mark_run_dir(run_dir: Path, name: str) -> None:
    """Mark a directory as a qreason run directory (at the start of its first run)."""
    mark_owned(run_dir, "run", name)


def is_run_dir(path: Path) -> bool:
    """A directory qreason ran in: it carries the marker, or (runs from before markers existed) it holds the
    config and problem table every run writes first."""
    path = Path(path)
    return owned_as(path) == "run" or (
        (path / "config.yaml").is_file() and (path / "problems.jsonl").is_file()
    )


def check_output_dir(path: Path, children: Iterable[str] = ()) -> None:
    """Refuse, before anything is written, an output directory that holds someone else's files: a run writes
    and ``prune`` deletes there. Allowed: no directory, an empty one, a qreason run directory; ``children``:
    names of entries that are allowed (the sub-run directories of a ``models:`` axis, each checked on its
    own)."""
    path = Path(path)
    if not path.exists():
        return
    if not path.is_dir():
        raise UserError(str(path), "the output directory is a file; choose another output_dir")
    if is_run_dir(path):
        return
    foreign = sorted(
        p.name for p in path.iterdir() if p.name not in _OWN_FILES and p.name not in set(children)
    )
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise UserError(
            str(path),
            f"not a qreason run directory and not empty (holds {foreign[0]!r}{more}); "
            "choose another output_dir, or empty it",
        )
