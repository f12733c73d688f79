"""The recover stage trains on exactly the rows curation exports: a user who trains the exported train split
with TRL elsewhere trains on the same examples."""

from __future__ import annotations

import json

from qreason.records import SilverBulletItem, content_key
from qreason.stages.curate import export
from qreason.stages.recover.data import control_set, targeted_set


def _item(i: int, split: str, pair: bool) -> SilverBulletItem:
    messages = [{"role": "user", "content": f"What is {i} + 1?"}]
    return SilverBulletItem(
        key=content_key("item", i),
        task="t",
        problem_id=f"p{i}",
        variant="rtn",
        method="rtn-w4a16",
        seed=0,
        messages=messages,
        sft_solution=f"Step 1: {i} + 1 = {i + 1}.\nThe final answer is \\boxed{{{i + 1}}}.",
        prefix="Step 1: " if pair else None,
        chosen=f"Step 1: {i} + 1 = {i + 1}." if pair else None,
        rejected=f"Step 1: {i} + 1 = 0." if pair else None,
        first_error_step=0,
        error_type="Execution",
        judge="rules",
        split=split,
    )


def test_targeted_rows_are_the_exported_train_rows(tmp_path):
    items = [
        _item(0, "train", True),
        _item(1, "train", False),
        _item(2, "test", True),
        _item(3, "train", True),
    ]
    out = export(items, tmp_path / "silver_bullet", {})

    def rows(kind):
        return [json.loads(x) for x in (out / kind / "train.jsonl").read_text().splitlines()]

    data = targeted_set([it for it in items if it.split == "train"])
    assert data.sft == rows("sft") and len(data.sft) == 3
    assert data.dpo == rows("dpo") and len(data.dpo) == 2
    assert all(
        r["prefix"] == "Step 1: " and r["chosen"][0]["content"].startswith(r["prefix"]) for r in data.dpo
    )
    assert data.rows_for("kd") == 5 and data.rows_for("sft") == 3 and data.rows_for("dpo") == 2


def test_the_kd_control_has_as_many_rows_and_no_frontier():
    from run_builders import generation

    items = [_item(i, "train", True) for i in range(2)]
    target = targeted_set(items)
    correct_base = {
        ("t", f"q{i}", 0): generation(f"g{i}", "base", f"q{i}", "right", task="t") for i in range(8)
    }
    ctl = control_set("rtn", target, items, correct_base, {}, 0, "kd")
    assert len(ctl.sft) == target.rows_for("kd") == 4 and not ctl.dpo
    assert not {p for _, p in ctl.problems} & {it.problem_id for it in items}
