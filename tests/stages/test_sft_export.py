"""The exported SFT set trains the way qreason trains on it: TRL's own SFTTrainer, default settings, on the
exported files puts the loss on the answer only (the prompt-completion form), and the training worker hands
TRL the same rows. Runs TRL in the training environment (.venv-train) on a tiny random-weight model with the
default model's tokenizer and chat template."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
from run_builders import make_tiny_model

from qreason.errors import UserError
from qreason.inputs.tasks import build_messages, load_spec
from qreason.records import SilverBulletItem, content_key
from qreason.stages.curate import export

REPO = Path(__file__).resolve().parents[2]
SOLUTIONS = {
    "What is 3 + 4?": "Step 1: 3 + 4 = 7.\n\\boxed{7}",
    "What is 12 + 9?": "Step 1: 12 + 9 = 21.\n\\boxed{21}",
}


@pytest.fixture(scope="module")
def train_python():
    from qreason.workers.launch import TRAIN

    try:
        return TRAIN.python()
    except UserError:
        pytest.skip("the training environment (.venv-train) is not installed")


def _items() -> list[SilverBulletItem]:
    spec = load_spec("synthetic")
    return [
        SilverBulletItem(
            key=content_key("item", i),
            task="synthetic",
            problem_id=f"s-{i}",
            variant="rtn-w4a16",
            method="rtn-w4a16",
            seed=0,
            messages=build_messages(spec, SimpleNamespace(question=question), format_example=True),
            sft_solution=solution,
            first_error_step=1,
            judge="rules",
        )
        for i, (question, solution) in enumerate(SOLUTIONS.items())
    ]


def _trl(python: Path, data: Path, model: Path, work: Path) -> dict:
    from qreason.workers.launch import side_env_vars

    done = subprocess.run(
        [str(python), str(REPO / "tests" / "trl_sft_check.py"), str(data), str(model), str(work)],
        capture_output=True,
        text=True,
        env=side_env_vars(),
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_trl_trains_the_exported_sft_set_on_the_answers_only(tmp_path, train_python):
    items = _items()
    out = export(items, tmp_path / "sb", {"run_id": "r"})
    data = out / "sft" / "train.jsonl"
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    for row, item in zip(rows, items):  # both forms of the same conversation
        assert (
            row["messages"]
            == row["prompt"] + row["completion"]
            == [
                *item.messages,
                {"role": "assistant", "content": item.sft_solution},
            ]
        )
    model = make_tiny_model(tmp_path / "tiny")
    got = _trl(train_python, data, model, tmp_path / "work")
    exported, chats = got["exported"], got["messages_only"]
    example = items[0].messages[1]["content"]  # the worked example's question, in every prompt
    for row, item in zip(exported["rows"], items):
        question = item.messages[-1]["content"]
        assert row["trained"].startswith(item.sft_solution), row  # the answer (and the end-of-turn tokens)
        assert len(row["trained"]) < len(item.sft_solution) + 20, row  # ... and nothing else
        assert question in row["masked"] and example in row["masked"]
    # The same chats as `messages` alone: TRL trains on every token (why the export carries prompt/completion)
    assert items[0].messages[-1]["content"] in chats["rows"][0]["trained"]


def test_the_training_worker_gets_the_rows_the_export_holds():
    from qreason.stages.curate import item_rows
    from qreason.stages.recover.data import targeted_set

    items = _items()
    exported = [item_rows(it)["sft"] for it in items]
    trained = targeted_set(items).sft
    assert exported == trained  # the whole exported rows, both forms and the metadata fields
    assert all({"prompt", "completion", "messages"} <= set(r) for r in trained)
