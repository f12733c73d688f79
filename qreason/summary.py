"""Accuracy per variant and task: per seed, and mean ± std across seeds, with outcome counts."""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict

from .records import Grade

STATUSES = ("correct", "wrong", "no_answer", "truncated", "grader_error")


def accuracy_table(grades: list[Grade]) -> list[dict]:
    """One row per (variant, task). Accuracy counts every outcome but ``correct`` as a failure."""
    cells: dict[tuple[str, str], dict[int, list[Grade]]] = defaultdict(lambda: defaultdict(list))
    for g in grades:
        cells[(g.variant, g.task)][g.seed].append(g)
    rows = []
    for (variant, task), by_seed in sorted(cells.items()):
        per_seed = {seed: sum(g.status == "correct" for g in gs) / len(gs) for seed, gs in sorted(by_seed.items())}
        accs = list(per_seed.values())
        counts = Counter(g.status for gs in by_seed.values() for g in gs)
        rows.append({
            "variant": variant, "task": task,
            "n_problems": len({g.problem_id for gs in by_seed.values() for g in gs}),
            "seeds": list(per_seed), "accuracy_per_seed": per_seed,
            "accuracy_mean": statistics.fmean(accs),
            "accuracy_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "outcomes": {s: counts.get(s, 0) for s in STATUSES},
        })
    return rows


def format_table(rows: list[dict]) -> str:
    head = ["variant", "task", "problems", "seeds", "accuracy", *STATUSES]
    body = [[r["variant"], r["task"], str(r["n_problems"]), str(len(r["seeds"])),
             f"{100 * r['accuracy_mean']:.1f} ± {100 * r['accuracy_std']:.1f} %",
             *(str(r["outcomes"][s]) for s in STATUSES)] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*head), fmt.format(*("-" * w for w in widths)), *(fmt.format(*b) for b in body)])
