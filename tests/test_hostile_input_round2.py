"""Hostile and careless input, round two (issue 23): problem identity, the lm-eval export, children that
outlive a killed parent, decoded-size caps, variant names in paths, non-finite metrics, repair, and the
checks made before a run starts. Each test names the item of the issue it covers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import write_config

from qreason.errors import UserError
from qreason.pipeline.plan import make_plan
from qreason.store import RunStore, mark_run_dir


def replay_config(tmp_path: Path, tasks: str, extra: str = "") -> Path:
    """A run config on the replay backend (no model to load): plans in milliseconds."""
    (tmp_path / "replay.jsonl").write_text(json.dumps({"problem_id": "0", "text": "x"}) + "\n")
    return write_config(
        tmp_path / "run.yaml",
        f"name: r\noutput_dir: out\nbackend: {{kind: replay, path: replay.jsonl}}\ntasks:\n{tasks}{extra}",
    )


# --------------------------------------------------------------------------------- 1. problem identity


def test_item1_one_task_twice_with_other_params_is_refused_with_one_line(tmp_path):
    cfg = replay_config(
        tmp_path,
        "  - {name: synthetic, limit: 3, params: {ops: [add]}}\n"
        "  - {name: synthetic, limit: 3, params: {ops: [mul]}}\n",
    )
    with pytest.raises(UserError) as err:
        make_plan(cfg)
    assert "task entries must be unique (repeated: synthetic)" in str(err.value)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_item1_one_spec_by_name_and_by_path_is_refused(tmp_path):
    from qreason.inputs import resources

    spec = resources.find("tasks", "synthetic.yaml")
    cfg = replay_config(tmp_path, f"  - {{name: synthetic, limit: 2}}\n  - {{name: '{spec}', limit: 2}}\n")
    with pytest.raises(UserError) as err:
        make_plan(cfg)
    assert "are both task 'synthetic'" in str(err.value)


def test_item1_changed_task_params_in_an_existing_run_directory_are_refused(tmp_path):
    """The run directory's problems come from ops [add]; the config now asks for [mul]: the same problem ids
    with other questions and answers would be graded against the stored references."""
    cfg = replay_config(tmp_path, "  - {name: synthetic, limit: 3, params: {ops: [add]}}\n")
    plan = make_plan(cfg)
    mark_run_dir(plan.run_dir, "r")
    RunStore(plan.run_dir).problems.append(plan.problems)
    assert make_plan(cfg).problems == plan.problems  # the same config plans again
    replay_config(tmp_path, "  - {name: synthetic, limit: 3, params: {ops: [mul]}}\n")
    with pytest.raises(UserError) as err:
        make_plan(cfg)
    assert "holds problem synthetic/s0-00000 with another question or answer" in str(err.value)
    assert RunStore(plan.run_dir).problems.all() == plan.problems
