"""The one rule for deleting and overwriting.

qreason deletes or replaces only a path that carries its ownership marker (``files.OWNER_MARKER``, written by
``mark_owned``; older qreason wrote the legacy markers, a seal (``.qreason-complete``, listing the files it
covers) or a quantization's provenance named after its directory), and never one a live run holds: a run
directory whose lock is held or whose index row says it is still running. A command that writes into a
directory the user names (``setup --path``, ``export-lm-eval --out``, ``judge-bench --out``, ``curate --out``)
refuses a non-empty directory it does not own with a one-line error (exit 2), unless ``--force``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from qreason.errors import UserError
from qreason.store.files import COMPLETE_MARKER, OWNER_MARKER, mark_owned, owned_as

# a quantized checkpoint made before markers existed: its provenance names its cache key, the directory's name
LEGACY_PROVENANCE = "qreason-quant.json"


def is_owned(path: Path, kind: str | None = None) -> bool:
    """Whether qreason made ``path`` (a real directory, not a link): it carries the ownership marker (of
    ``kind``, when given), or evidence only qreason writes (a seal; a quantization's provenance whose key is
    the directory's name)."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        return False
    marked = owned_as(path)
    if marked is not None:
        return kind is None or marked == kind
    if kind not in (None, "checkpoint"):
        return False
    if (path / COMPLETE_MARKER).is_file():
        return True
    try:
        provenance = json.loads((path / LEGACY_PROVENANCE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(provenance, dict) and provenance.get("key") == path.name


def lock_held(run_dir: Path) -> bool:
    """Whether a process holds the run lock of ``run_dir`` (``RunLock``), seen without taking it (taking it,
    even for an instant, could refuse a run starting then): the kernel's table of flock locks in
    /proc/locks; where that cannot be read, whether the pid the lock file names is alive."""
    lock = Path(run_dir) / ".lock"
    try:
        st = lock.stat()
    except OSError:
        return False
    try:
        table = Path("/proc/locks").read_text()
    except OSError:
        table = None
    if table is not None:
        # matched on the inode alone: some file systems (overlayfs, btrfs) show another device number there
        # than stat does, and a lock taken for a live run by mistake only keeps a directory
        return any(
            f[1] == "FLOCK" and f[5].rsplit(":", 1)[-1] == str(st.st_ino)
            for f in (line.split() for line in table.splitlines())
            if len(f) > 5
        )
    try:
        pid = int(lock.read_text().strip() or 0)
        os.kill(pid, 0)
    except (OSError, ValueError):
        return False
    return pid > 0


def live_runs(rows: list[dict]) -> set[str]:
    """The run directories of index ``rows`` that a live run holds: a row still ``running`` (its process has
    not ended; ``RunIndex.list`` marks the others ``killed``) or a directory whose lock is held."""
    live = {r["run_dir"] for r in rows if r["status"] == "running"}
    return live | {r["run_dir"] for r in rows if lock_held(Path(r["run_dir"]))}


def remove_owned(path: Path, kind: str | None = None) -> bool:
    """Delete ``path`` if the rule allows it: qreason owns it (as ``kind``) and, for a run directory, no live
    run holds it (checked again now, just before deleting). Returns whether it was deleted."""
    path = Path(path)
    if not is_owned(path, kind) or lock_held(path):
        return False
    shutil.rmtree(path, ignore_errors=True)
    return True


def check_user_dir(
    path: Path, kind: str, force: bool = False, option: str = "--out", force_ok: bool = True
) -> bool:
    """Refuse, before anything is written, a directory the user named (``option``) that holds files qreason
    did not put there: it must not exist, be empty, or carry qreason's marker of ``kind``; ``force`` writes
    anyway (``force_ok``: the command offers --force). A file in its place is always refused. Returns whether
    qreason may mark the directory as its own (``claim_user_dir``): not where ``force`` let it write among
    someone else's files."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return True
    if not path.is_dir():
        raise UserError(str(path), f"exists and is not a directory; choose another {option}")
    if is_owned(path, kind) or not any(path.iterdir()):
        return True
    if force:
        return False
    names = sorted(p.name for p in path.iterdir())
    more = f" and {len(names) - 1} more" if len(names) > 1 else ""
    what = _WHAT.get(kind, f"a {kind} directory")
    raise UserError(
        str(path),
        f"not empty and not {what} qreason wrote (holds {names[0]!r}{more}, no {OWNER_MARKER} marker); "
        f"choose an empty or new directory for {option}"
        + (", or pass --force to write into it" if force_ok else ""),
    )


_WHAT = {"dataset": "a dataset", "environment": "an environment", "lm-eval tasks": "an lm-eval export"}


def claim_user_dir(path: Path, kind: str, name: str) -> None:
    """Create the directory ``check_user_dir`` allowed (if needed) and mark it as qreason's ``kind``, so that
    a later write into it is allowed without --force."""
    Path(path).mkdir(parents=True, exist_ok=True)
    mark_owned(Path(path), kind, name)
