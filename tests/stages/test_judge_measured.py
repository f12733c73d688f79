"""The prior's step per task family: chosen on labelled development data and stored with the measurements;
the config's judge.prior_step, when set, wins for every task."""

import dataclasses

from qreason.stages.judge import measured
from qreason.stages.judge.stack import DEFAULT_PRIOR_STEP


def test_the_prior_step_comes_from_the_task_family_unless_the_config_sets_it(monkeypatch):
    gsm = dataclasses.replace(measured.MEASURED["gsm8k"], prior_step=1)
    monkeypatch.setitem(measured.MEASURED, "gsm8k", gsm)
    assert measured.prior_step_for("gsm8k", None) == 1
    assert measured.prior_step_for("gsm8k-train", None) == 1  # the same family
    assert measured.prior_step_for("math500", None) == measured.MEASURED["competition"].prior_step
    assert measured.prior_step_for("synthetic", None) == DEFAULT_PRIOR_STEP  # no family measured
    assert measured.prior_step_for("gsm8k", 4) == 4  # judge.prior_step set in the config
