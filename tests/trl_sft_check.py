"""Run inside the training environment by tests/stages/test_sft_export.py: TRL's own SFTTrainer with its
default settings on an exported SFT file, as a user of the dataset would run it.

    python tests/trl_sft_check.py DATA.jsonl MODEL_DIR WORK_DIR

Prints JSON: for the file as exported (``exported``) and for its ``messages`` column alone
(``messages_only``), per row the text of the tokens that carry loss (labels from the trainer's own collator,
not -100) and of those that do not, and the loss of one training step.
"""

from __future__ import annotations

import json
import math
import sys

from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer


def trained_tokens(data, model_dir: str, work: str) -> dict:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    args = SFTConfig(output_dir=work, max_steps=1, per_device_train_batch_size=2, report_to=[], use_cpu=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    rows = []
    for example in trainer.train_dataset:
        batch = trainer.data_collator([example])
        ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
        rows.append(
            {
                "trained": tokenizer.decode([t for t, lab in zip(ids, labels) if lab != -100]),
                "masked": tokenizer.decode([t for t, lab in zip(ids, labels) if lab == -100]),
            }
        )
    loss = trainer.train().training_loss
    assert math.isfinite(loss), loss
    return {"rows": rows, "loss": loss}


def main() -> None:
    data_file, model_dir, work = sys.argv[1:]
    data = load_dataset("json", data_files=data_file, split="train")
    out = {
        "exported": trained_tokens(data, model_dir, f"{work}/exported"),
        "messages_only": trained_tokens(data.select_columns(["messages"]), model_dir, f"{work}/messages"),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
