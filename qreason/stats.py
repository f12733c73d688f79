"""Paired statistics of 0/1 outcomes: McNemar's exact test on discordant pairs and a percentile bootstrap of
the difference in means (seeded, so reports are reproducible)."""

from __future__ import annotations

import math

import numpy as np


def format_p(p: float | None) -> str:
    """A p-value as every screen shows it: two decimals from 0.01, four below, scientific notation below 1e-4
    (never a "0.0000" that reads as impossible); "–" for none."""
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "–"
    if p >= 0.01:
        return f"{p:.2f}"
    if p >= 1e-4:
        return f"{p:.4f}"
    return f"{p:.1e}"


def mcnemar_exact(lost: int, gained: int) -> float:
    """Two-sided exact McNemar p-value for discordant counts (binomial test with p = 1/2)."""
    n = lost + gained
    if n == 0:
        return 1.0
    k = min(lost, gained)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def exceeds_rate(hits: int, n: int, ref_hits: int, ref_n: int) -> float:
    """One-sided Fisher exact p-value that the rate ``hits / n`` exceeds ``ref_hits / ref_n`` (for a
    variant's discordant cells against the noise's: cells are treated as independent trials)."""
    from scipy.stats import fisher_exact

    if n == 0 or ref_n == 0:
        return 1.0
    table = [[hits, n - hits], [ref_hits, ref_n - ref_hits]]
    return float(fisher_exact(table, alternative="greater").pvalue)


def bootstrap_diff_ci(
    base: np.ndarray, variant: np.ndarray, n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap CI of mean(variant) - mean(base) over paired items (0/1 arrays)."""
    base, variant = np.asarray(base, float), np.asarray(variant, float)
    if len(base) == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(base), size=(n_boot, len(base)))
    diffs = variant[idx].mean(axis=1) - base[idx].mean(axis=1)
    lo, hi = np.quantile(diffs, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def paired_bootstrap_ci(
    statistic, arrays: tuple[np.ndarray, ...], n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float | None, float | None]:
    """Percentile bootstrap interval (scipy) of ``statistic(*arrays, axis)`` over paired items. Resamples
    where the statistic is undefined (NaN: a ratio with a zero denominator) are left out; None when most
    are."""
    import warnings

    from scipy.stats import bootstrap

    if not len(arrays[0]):
        return (None, None)
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.simplefilter("ignore")
        res = bootstrap(
            tuple(np.asarray(a, float) for a in arrays),
            statistic,
            paired=True,
            vectorized=True,
            n_resamples=n_boot,
            method="percentile",
            random_state=np.random.default_rng(seed),
        )
    dist = np.asarray(res.bootstrap_distribution, float)
    dist = dist[np.isfinite(dist)]
    if len(dist) < n_boot / 2:
        return (None, None)
    lo, hi = np.quantile(dist, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)
