"""Where quantized checkpoints live, how they are keyed, and how one is put in place, never partial.

A checkpoint is keyed by what produced it: the base model's fingerprint, the resolved recipe (overrides
included) and the calibration spec (for methods that calibrate). It lives in ``cache_dir()/quantized/KEY``
(or a directory the user names) next to ``qreason-quant.json``, its provenance. It is built in a hidden
temporary directory beside its final place and renamed into place only when complete; on any failure, Ctrl-C
included, the temporary directory is removed, so a directory that exists is a finished checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from qreason.records import content_key
from qreason.store import OWNER_MARKER, cache_dir
from qreason.store import publish as store_publish

PROVENANCE = "qreason-quant.json"
CALIBRATION_FILE = "calibration.jsonl"
LOG_FILE = "quantize.log"
# Files qreason adds beside the checkpoint; they are not part of its size on disk.
QREASON_FILES = {PROVENANCE, CALIBRATION_FILE, LOG_FILE, OWNER_MARKER}
KEY_VERSION = 1  # bump when the worker changes what it writes for the same inputs


def cache_root() -> Path:
    return cache_dir() / "quantized"


def quant_key(base_fingerprint: str, recipe_identity: dict, calibration_identity: dict | None) -> str:
    return content_key("quantized", KEY_VERSION, base_fingerprint, recipe_identity, calibration_identity)


def read_provenance(directory: Path) -> dict | None:
    """The provenance of a finished checkpoint in ``directory``, or None when there is none."""
    path = Path(directory) / PROVENANCE
    if not (Path(directory) / "config.json").is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "key" in data else None


def checkpoint_size(directory: Path) -> int:
    """Bytes of the checkpoint's own files (weights, config, tokenizer), without qreason's records."""
    return sum(
        p.stat().st_size for p in Path(directory).rglob("*") if p.is_file() and p.name not in QREASON_FILES
    )


def worker_log_path(dest: Path) -> Path:
    """Where the worker's output is written while it runs: beside ``dest``, so that it outlives a failed
    attempt; a successful one moves it into the checkpoint as ``quantize.log``."""
    return dest.parent / f"{dest.name}.quantize.log"


def publish(tmp: Path, dest: Path) -> bool:
    """Move the worker log into the finished ``tmp`` and rename ``tmp`` to ``dest``. False when another
    process put a checkpoint there first (the caller then uses that one)."""
    log = worker_log_path(dest)
    if log.is_file():
        shutil.move(log, tmp / LOG_FILE)
    return store_publish(tmp, dest)
