"""Where qreason finds its data files: task specs and prompts (``tasks``), the judge's taxonomy and prompt
templates (``judge_prompts``). They ship inside the package (``qreason/specs/``; in a checkout, the top-level
``tasks/`` and ``judge_prompts/`` are links to them, the place to read and edit them), so an installed wheel
has them too. Users add their own directories with ``QREASON_TASKS_PATH`` / ``QREASON_JUDGE_PROMPTS_PATH``
(several separated by ``os.pathsep``); a file there wins over the built-in one of the same name.
"""

from __future__ import annotations

import os
from pathlib import Path

SPECS_DIR = Path(__file__).resolve().parents[1] / "specs"
_ENV = {"tasks": "QREASON_TASKS_PATH", "judge_prompts": "QREASON_JUDGE_PROMPTS_PATH"}


def search_path(kind: str) -> list[Path]:
    """The directories searched for ``kind`` (``tasks`` or ``judge_prompts``), the user's first."""
    user = [Path(p).expanduser() for p in os.environ.get(_ENV[kind], "").split(os.pathsep) if p]
    return [*user, SPECS_DIR / kind]


def find(kind: str, filename: str) -> Path | None:
    """The first ``filename`` on the search path of ``kind``."""
    return next((d / filename for d in search_path(kind) if (d / filename).is_file()), None)


def listing(kind: str, pattern: str = "*.yaml") -> list[Path]:
    """Every file matching ``pattern`` on the search path, one per name (the user's wins), sorted by name."""
    found: dict[str, Path] = {}
    for directory in search_path(kind):
        for path in sorted(directory.glob(pattern)):
            found.setdefault(path.name, path)
    return [found[name] for name in sorted(found)]
