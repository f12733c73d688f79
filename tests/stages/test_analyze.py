"""Statistics against hand-computed cases, and the analysis tables on a small hand-built run."""

import math

import numpy as np
import pytest
from run_builders import build_run

from qreason.stages.analyze import analyze
from qreason.stats import bootstrap_diff_ci, mcnemar_exact


@pytest.mark.parametrize(
    "lost, gained, p",
    [
        (0, 0, 1.0),
        (5, 0, 2 / 32),  # 2 * (1/2)^5
        (1, 0, 1.0),  # 2 * 1/2
        (6, 1, 2 * (1 + 7) / 128),  # 2 * (C(7,0) + C(7,1)) / 2^7 = 0.125
        (3, 3, 1.0),
        (10, 2, 2 * (1 + 12 + 66) / 4096),  # 0.03857...
    ],
)
def test_mcnemar_exact_matches_hand_computation(lost, gained, p):
    assert mcnemar_exact(lost, gained) == pytest.approx(p)
    assert mcnemar_exact(gained, lost) == pytest.approx(p)


def test_bootstrap_bounds_on_a_known_sample():
    # identical outcomes: the difference is exactly 0 in every resample
    same = np.array([1, 0, 1, 1, 0])
    assert bootstrap_diff_ci(same, same) == (0.0, 0.0)
    # every pair flips from right to wrong: the difference is exactly -1 in every resample
    assert bootstrap_diff_ci(np.ones(20), np.zeros(20)) == (-1.0, -1.0)
    # 20 of 100 pairs lost, none gained: diff = -0.2, bootstrap sd = sqrt(.2*.8/100) = 0.04, so the 95 %
    # interval is close to -0.2 ± 1.96 * 0.04
    base, variant = np.ones(100), np.r_[np.zeros(20), np.ones(80)]
    lo, hi = bootstrap_diff_ci(base, variant, n_boot=4000, seed=1)
    assert lo == pytest.approx(-0.2 - 1.96 * 0.04, abs=0.02) and hi == pytest.approx(
        -0.2 + 1.96 * 0.04, abs=0.02
    )
    assert bootstrap_diff_ci(base, variant, n_boot=4000, seed=1) == (lo, hi)  # seeded: reproducible


def test_analysis_tables_on_a_hand_built_run(tmp_path):
    store = build_run(tmp_path)
    a = analyze(store)
    deg = a.degradation.set_index("variant")
    assert deg.loc["base", "accuracy"] == pytest.approx(7 / 8)
    assert deg.loc["rtn-w4a16", "accuracy"] == pytest.approx(4 / 8)
    # per-seed accuracies of the variant: seed 0 -> 3/4, seed 1 -> 1/4; std (ddof=1) = sqrt(0.125)
    assert deg.loc["rtn-w4a16", "accuracy_std"] == pytest.approx(math.sqrt(0.125))
    assert deg.loc["rtn-w4a16", "abs_drop"] == pytest.approx(3 / 8)
    assert deg.loc["rtn-w4a16", "recovery_pct"] == pytest.approx(100 * 4 / 7)
    (flip,) = a.flips.to_dict("records")
    assert (flip["lost"], flip["gained"], flip["pairs"]) == (3, 0, 8)
    assert flip["mcnemar_p"] == pytest.approx(0.25) and flip["ci_high"] <= 0
    et = a.error_types.set_index("variant")
    assert et.loc["rtn-w4a16", "count"] == 4 and et.loc["rtn-w4a16", "share"] == 1.0
    fe = a.first_errors.set_index("variant")
    assert fe.loc["rtn-w4a16", "mean_step"] == 2 and fe.loc["rtn-w4a16", "mean_relative"] == pytest.approx(
        0.5
    )
    ln = a.lengths.set_index("variant")
    assert ln.loc["base", "mean_tokens"] == pytest.approx((7 * 10 + 30) / 8)
    diff = a.difficulty[
        (a.difficulty["variant"] == "rtn-w4a16") & (a.difficulty["dimension"] == "difficulty")
    ]
    assert set(diff["bucket"]) == {"1", "2"}
    for name in a.tables:
        assert (store.dir / "analysis" / f"{name}.csv").exists()
