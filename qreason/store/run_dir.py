"""A run directory: its tables and metadata files (``RunStore``) and the lock that keeps one writer."""

from __future__ import annotations

import fcntl
import json
import os
import threading
from pathlib import Path

from qreason.errors import UserError
from qreason.records import Generation, Grade, Judgment, LmEvalResult, ModelVariant, Problem
from qreason.store.files import cache_ref, child_path, relocated, write_atomic
from qreason.store.table import Table


class _Variants(Table[ModelVariant]):
    """The variants table: a checkpoint's path is resolved again when read (``relocated``), so a run reads
    its cached checkpoints where the cache is now, not where it was when the record was written."""

    def _parse(self, line: bytes) -> ModelVariant:
        v = super()._parse(line)
        here = relocated(v.path)
        return v if here == v.path else v.model_copy(update={"path": here})


_REFS_LOCK = threading.Lock()


class RunStore:
    """One run directory: the tables of every stage and the run's metadata files."""

    def __init__(self, run_dir: Path):
        self.dir = Path(run_dir)
        self.problems: Table[Problem] = Table(self.dir / "problems.jsonl", Problem)
        self.generations: Table[Generation] = Table(self.dir / "generations.jsonl", Generation)
        self.grades: Table[Grade] = Table(self.dir / "grades.jsonl", Grade)
        self.variants: Table[ModelVariant] = _Variants(self.dir / "variants.jsonl", ModelVariant)
        self.judgments: Table[Judgment] = Table(self.dir / "judgments.jsonl", Judgment)
        # curation: full-precision continuations of quantized prefixes, and their grades
        self.continuations: Table[Generation] = Table(self.dir / "continuations.jsonl", Generation)
        self.continuation_grades: Table[Grade] = Table(self.dir / "continuation_grades.jsonl", Grade)
        self.lm_eval: Table[LmEvalResult] = Table(self.dir / "lm_eval_results.jsonl", LmEvalResult)
        # the recover stage's re-evaluation of adapters, kept apart from the run's own tables so that judging,
        # curation and analysis never mistake recovered variants for the config's
        self.recovery_generations: Table[Generation] = Table(
            self.recovery_dir / "generations.jsonl", Generation, self.dir
        )
        self.recovery_grades: Table[Grade] = Table(self.recovery_dir / "grades.jsonl", Grade, self.dir)
        self.recovery_judgments: Table[Judgment] = Table(
            self.recovery_dir / "judgments.jsonl", Judgment, self.dir
        )
        # the noise floor's perturbed base variants (BASE~NAME), apart from the run's tables likewise
        self.noise_generations: Table[Generation] = Table(
            self.noise_dir / "generations.jsonl", Generation, self.dir
        )
        self.noise_grades: Table[Grade] = Table(self.noise_dir / "grades.jsonl", Grade, self.dir)

    # the run directory's other places (every path of a run directory is named here)
    @property
    def recovery_dir(self) -> Path:
        return self.dir / "recovery"

    @property
    def noise_dir(self) -> Path:
        return self.dir / "noise"

    @property
    def dataset_dir(self) -> Path:
        """The Silver Bullet dataset (``curate``)."""
        return self.dir / "silver_bullet"

    @property
    def analysis_dir(self) -> Path:
        return self.dir / "analysis"

    @property
    def lm_eval_dir(self) -> Path:
        return self.dir / "lm_eval"

    @property
    def servers_dir(self) -> Path:
        """Records of the model servers a run started (pid, port), so a re-run can stop a leftover one."""
        return self.lm_eval_dir / "servers"

    @property
    def report_path(self) -> Path:
        return self.dir / "report.html"

    @property
    def cache_refs_path(self) -> Path:
        """The cached artifacts (outside the run directory) this run uses, by cache reference (``AREA/KEY``),
        written before the run makes or uses them, so ``prune`` keeps them whatever stage the run is at."""
        return self.dir / "cache_refs.json"

    def refer(self, paths) -> None:
        """Record that this run uses the cached artifacts at ``paths`` (any outside the cache is ignored)."""
        refs = {r for r in map(cache_ref, paths) if r is not None}
        with _REFS_LOCK:
            known = self.cache_refs() or set()
            if refs <= known:
                return
            write_atomic(self.cache_refs_path, json.dumps(sorted(known | refs), indent=1) + "\n")

    def cache_refs(self) -> set[str] | None:
        """The references ``refer`` recorded; None when the run recorded none (a run of an older qreason, or
        an unreadable file: it may use anything)."""
        try:
            refs = json.loads(self.cache_refs_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return {r for r in refs if isinstance(r, str)} if isinstance(refs, list) else None

    def place(self, *parts: str) -> Path:
        """A path inside the run directory built from names that may come from input (variant names): each
        part one path component, the result inside the run directory."""
        path = self.dir
        for part in parts:
            path = child_path(path, part)
        return path

    def write_json(self, name: str, obj) -> Path:
        path = self.dir / name
        write_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")
        return path

    def tables(self) -> list[Table]:
        return [t for t in vars(self).values() if isinstance(t, Table)]

    def repair(self) -> dict[str, int]:
        """Repair every table of the run, the recovery tables included (see ``Table.repair``); the table's
        path in the run directory -> lines moved aside. Hold the run lock."""
        return {str(t.path.relative_to(self.dir)): t.repair() for t in self.tables() if t.path.exists()}

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
            raise UserError(
                str(self.path.parent),
                f"another qreason run (pid {holder}) is using this run "
                "directory; wait for it to finish or choose another output_dir",
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
