"""Retention for long-lived installs: forget old runs and delete quantized checkpoints no kept run uses."""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path

from qreason.store import RunIndex, RunStore, owned_as
from qreason.store.files import cache_dir


def prune(index: RunIndex, older_than_days: float, dry_run: bool = True) -> dict[str, list[str]]:
    """Run directories whose newest invocation finished more than ``older_than_days`` ago are deleted (with
    their index rows) if they carry qreason's run marker (others are listed as ``skipped`` and left alone);
    then cached quantized checkpoints that no remaining run directory refers to, and
    leftover staging directories of killed quantizations.
    Returns what was (or, with ``dry_run``, would be) removed."""
    cutoff = datetime.now(timezone.utc) - timedelta(days=older_than_days)
    newest: dict[str, datetime] = {}
    for r in index.list():
        when = datetime.fromisoformat(r["finished_at"] or r["started_at"])
        newest[r["run_dir"]] = max(when, newest.get(r["run_dir"], when))
    old_dirs = sorted(d for d, when in newest.items() if when < cutoff)
    # a directory indexed once but no longer a run (emptied and reused for other files) is never deleted
    skipped = [d for d in old_dirs if Path(d).exists() and owned_as(d) != "run"]
    old_dirs = [d for d in old_dirs if d not in skipped]
    kept_dirs = [d for d in newest if d not in old_dirs]
    used = {
        str(Path(v.path).resolve())
        for d in kept_dirs
        if Path(d).is_dir()
        for v in RunStore(Path(d)).variants.all()
        if v.method != "none"
    }
    quant_root = cache_dir() / "quantized"
    entries = [p for p in quant_root.iterdir() if p.is_dir()] if quant_root.is_dir() else []
    stale = sorted(str(p) for p in entries if not p.name.startswith(".") and str(p.resolve()) not in used)
    # staging directories of quantizations that were killed (SIGKILL leaves no chance to clean up); a running
    # quantization's own is younger than the cutoff
    stale += sorted(
        str(p)
        for p in entries
        if p.name.endswith(".partial") and datetime.fromtimestamp(p.stat().st_mtime, timezone.utc) < cutoff
    )
    stale += _stale_recover_copies([Path(d) for d in kept_dirs if Path(d).is_dir()])
    if not dry_run:
        for d in old_dirs:
            shutil.rmtree(d, ignore_errors=True)
            index.forget(d)
        for p in stale:
            shutil.rmtree(p, ignore_errors=True)
    return {"run_dirs": old_dirs, "checkpoints": stale, "skipped": skipped}


def _stale_recover_copies(kept: list[Path]) -> list[str]:
    """The recover stage's cached copies no kept run uses: dense copies (named by the fingerprint of the
    quantized checkpoint) and merged checkpoints (named in a run's ``recovery/summary.json``). When a kept
    run's recovery summary cannot be read, no merged checkpoint is listed."""
    root = cache_dir() / "recover"
    fingerprints = {v.fingerprint for d in kept for v in RunStore(d).variants.all()}
    out = []
    dense = root / "dense"
    if dense.is_dir():
        out += sorted(str(p) for p in dense.iterdir() if p.is_dir() and p.name not in fingerprints)
    merged_root = root / "merged"
    if not merged_root.is_dir():
        return out
    used: set[str] = set()
    for d in kept:
        path = RunStore(d).recovery_dir / "summary.json"
        if not path.is_file():
            continue
        try:
            summary = json.loads(path.read_text(encoding="utf-8"))
            used |= {
                str(Path(v["merged_checkpoint"]).name)
                for v in summary.get("variants", [])
                if v.get("merged_checkpoint")
            }
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            return out  # not sure what it uses: keep every merged checkpoint
    return out + sorted(str(p) for p in merged_root.iterdir() if p.is_dir() and p.name not in used)
