"""Retention for long-lived installs: forget old runs and delete cached checkpoints no kept run uses.

What may be deleted follows the one rule of ``store.ownership``: only what carries qreason's marker, never
what a live run holds."""

from __future__ import annotations

import json
import math
from datetime import datetime, timedelta, timezone
from pathlib import Path

from qreason.errors import UserError
from qreason.store.files import cache_dir, relocated
from qreason.store.index import RunIndex
from qreason.store.ownership import is_owned, live_runs, remove_owned
from qreason.store.run_dir import RunStore

# the cache areas prune looks in: quantized checkpoints, and the recover stage's dense and merged copies
AREAS = ("quantized", "recover/dense", "recover/merged")


def prune(index: RunIndex, older_than_days: float, dry_run: bool = True) -> dict[str, list[str]]:
    """Run directories whose newest invocation finished more than ``older_than_days`` (> 0) ago are deleted
    (with their index rows) if they carry qreason's run marker (others are listed as ``skipped``) and no live
    run holds them (``live``: a run still running, or its lock held); then cached checkpoints that carry
    qreason's marker and that no remaining run directory refers to, and leftover staging directories of
    killed quantizations. While a run is live, no cached checkpoint is deleted (it may be about to record
    one). Cache folders without the marker are listed as ``unmarked`` and left alone.
    Returns what was (or, with ``dry_run``, would be) removed."""
    if not (
        isinstance(older_than_days, (int, float)) and math.isfinite(older_than_days) and older_than_days > 0
    ):
        raise UserError("--older-than", f"must be a positive number of days (got {older_than_days})")
    cutoff = datetime.now(timezone.utc) - timedelta(days=older_than_days)
    rows = index.list()
    newest: dict[str, datetime] = {}
    for r in rows:
        when = datetime.fromisoformat(r["finished_at"] or r["started_at"])
        newest[r["run_dir"]] = max(when, newest.get(r["run_dir"], when))
    live = live_runs(rows)
    old_dirs = sorted(d for d, when in newest.items() if when < cutoff and d not in live)
    # a directory indexed once but no longer a run (emptied and reused for other files) is never deleted
    skipped = [d for d in old_dirs if Path(d).exists() and not is_owned(Path(d), "run")]
    old_dirs = [d for d in old_dirs if d not in skipped]
    kept = [Path(d) for d in newest if d not in old_dirs and Path(d).is_dir()]
    entries = [p for area in AREAS for p in _entries(cache_dir() / area)]
    unmarked = sorted(str(p) for p in entries if not is_owned(p))
    stale: list[str] = []
    if not live:
        used = _used(kept)
        stale = sorted(
            str(p) for p in entries if is_owned(p) and not p.name.startswith(".") and _ref(p) not in used
        )
        # staging directories of quantizations that were killed (SIGKILL leaves no chance to clean up)
        stale += sorted(
            str(p)
            for p in entries
            if p.name.endswith(".partial")
            and is_owned(p)
            and datetime.fromtimestamp(p.stat().st_mtime, timezone.utc) < cutoff
        )
    removed_dirs = old_dirs
    if not dry_run:
        removed_dirs = []
        for d in old_dirs:
            if remove_owned(Path(d), "run"):  # the rule is checked again just before deleting
                index.forget(d)
                removed_dirs.append(d)
        stale = [p for p in stale if remove_owned(Path(p))]
    return {
        "run_dirs": removed_dirs,
        "checkpoints": stale,
        "skipped": skipped,
        "live": sorted(live),
        "unmarked": unmarked,
    }


def _entries(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def _ref(path: Path) -> str:
    """A cache entry's reference: its area and key."""
    return Path(path).resolve().relative_to(cache_dir().resolve()).as_posix()


def _used(kept: list[Path]) -> set[str]:
    """The cache references (``AREA/KEY``) the kept run directories use: those they recorded
    (``RunStore.refer``), their variants' checkpoints (where the cache is now) and dense copies; for a run
    that recorded no references (an older qreason) whose merged checkpoints cannot be told from its recovery
    summary, every merged checkpoint."""
    used: set[str] = set()
    root = cache_dir().resolve()
    for d in kept:
        store = RunStore(d)
        variants = store.variants.all()
        for v in variants:
            try:
                used.add(Path(relocated(v.path)).resolve().relative_to(root).as_posix())
            except ValueError:
                pass  # not in the cache (the base model, an imported checkpoint)
            used.add(f"recover/dense/{v.fingerprint}")
        refs = store.cache_refs()
        if refs is not None:
            used |= refs
        elif store.recovery_dir.exists():
            merged = _legacy_merged(store)
            if merged is None:
                merged = {f"recover/merged/{p.name}" for p in _entries(cache_dir() / "recover" / "merged")}
            used |= merged
    return used


def _legacy_merged(store: RunStore) -> set[str] | None:
    """The merged checkpoints a run of an older qreason names in its recovery summary; None when that cannot
    tell all of them: no summary yet (the stage is running or was stopped), an unreadable one, or arms
    besides the targeted one evaluated merged (their checkpoints are not named)."""
    path = store.recovery_dir / "summary.json"
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
        out = set()
        for v in summary.get("variants", []):
            if any((v.get(arm) or {}).get("eval_mode") == "merged" for arm in ("control", "fp_arm")):
                return None
            if v.get("merged_checkpoint"):
                out.add(f"recover/merged/{Path(v['merged_checkpoint']).name}")
        return out
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None
