"""The run store: a run directory with one append-only JSONL table per record type, plus a SQLite run index.

Durability rules:
- a table is appended in whole lines with one write, then fsynced; a write that fails (a full disk, a file
  size limit) is undone: the table is cut back to its last complete line and the failure reported;
- readers never change a table: a torn last line (a kill -9 in the middle of a write, or a write in progress
  in another process) is ignored; the next writer, who holds the run lock, cuts it off before appending;
- a corrupt line in the middle is reported with its file and line; ``qreason repair RUN_DIR`` (under the run
  lock) moves such lines into a ``.corrupt-*`` file beside the table and keeps every valid line;
- keys are unique: ``append`` skips records whose key is already stored, so a resumed run never duplicates;
- every other file (config, summary, environment) is written to a temporary name and renamed into place.
"""

from __future__ import annotations

from qreason.store.files import (
    OWNER_MARKER,
    cache_dir,
    cache_ref,
    check_output_dir,
    child_path,
    file_sha256,
    is_run_dir,
    is_sealed,
    iter_jsonl,
    mark_owned,
    mark_run_dir,
    now_iso,
    owned_as,
    publish,
    relocated,
    seal,
    shown_path,
    staging,
    write_atomic,
    write_bytes_atomic,
)
from qreason.store.index import RunIndex, owner_gone, process_started
from qreason.store.run_dir import RunLock, RunStore
from qreason.store.table import Table

__all__ = [
    "OWNER_MARKER",
    "RunIndex",
    "RunLock",
    "RunStore",
    "Table",
    "cache_dir",
    "cache_ref",
    "check_output_dir",
    "child_path",
    "file_sha256",
    "is_run_dir",
    "is_sealed",
    "iter_jsonl",
    "mark_owned",
    "mark_run_dir",
    "owned_as",
    "publish",
    "relocated",
    "seal",
    "shown_path",
    "staging",
    "now_iso",
    "owner_gone",
    "process_started",
    "write_atomic",
    "write_bytes_atomic",
]
