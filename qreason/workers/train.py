"""The training worker of the recover stage: runs inside the training environment (.venv-train), never in the
main one.

    python -m qreason.workers.train JOB.json

``qreason.stages.recover`` writes a job file, starts this module as a subprocess (through the same launcher
as the quantization worker) and reads its stdout. This module imports only the standard library, torch,
transformers, PEFT and TRL: the environments pin different versions of the libraries they share.

What one job does:
1. the dense copy: a compressed-tensors checkpoint is decompressed, its scale/zero-point/shape tensors are
   dropped and the weights (the quantization grid, exactly) are loaded into the plain model class built from
   the config without ``quantization_config``. PEFT cannot wrap packed layers, and the decompressed-but-still-
   quantized modules run the slow compressed path; the dense copy computes the same function and trains
   normally. Written once per quantized checkpoint (``dense_dir``), reused after.
2. for each run (the targeted one and the control): a LoRA adapter trained with TRL on the dense copy (SFT on
   completions only, DPO with the frozen quantized model as reference, or SFT then DPO), seeded; saved in PEFT
   format, and, when asked, merged into a dense checkpoint for engines that cannot serve the adapter.

The protocol with the parent (progress lines, result file, one error line) is ``qreason.workers.protocol``;
the result holds versions, device, and per run: seconds and the loss curve.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time

from qreason.workers.protocol import progress, versions, worker_main

VERSIONED = ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "compressed-tensors")
# Per-tensor companions of a compressed weight; the dense copy keeps only the weight itself.
QUANT_SUFFIXES = (
    "weight_scale",
    "weight_zero_point",
    "weight_shape",
    "weight_g_idx",
    "weight_global_scale",
    "input_scale",
    "input_zero_point",
    "input_global_scale",
    "output_scale",
    "output_zero_point",
)


def pick_device(wanted: str) -> str:
    import torch

    if wanted == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if wanted == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device cuda requested but torch sees no GPU in the training environment")
    return wanted


def build_dense(checkpoint: str, dest: str) -> float:
    """Write the dense copy of a compressed-tensors checkpoint to ``dest`` (atomically); returns seconds."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    t0 = time.monotonic()
    config = AutoConfig.from_pretrained(checkpoint)
    qcfg = getattr(config, "quantization_config", None)
    kwargs: dict = {}
    if qcfg is not None:
        from transformers.utils.quantization_config import CompressedTensorsConfig

        kwargs["quantization_config"] = CompressedTensorsConfig(run_compressed=False)
        del config.quantization_config
    progress(f"building the dense copy of {checkpoint}")
    dtype = getattr(config, "dtype", None) or torch.bfloat16
    loaded = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype, **kwargs)
    state = {k: v for k, v in loaded.state_dict().items() if k.rsplit(".", 1)[-1] not in QUANT_SUFFIXES}
    dense = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = dense.load_state_dict(state, strict=False)
    tied = set(getattr(dense, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied and not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(
            f"the dense copy does not match the model class (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]})"
        )
    parent = os.path.dirname(os.path.abspath(dest))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".dense.")
    try:
        dense.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(checkpoint).save_pretrained(tmp)
        os.chmod(tmp, 0o755)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return time.monotonic() - t0


def progress_callback(label: str):
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        """One progress line per logged step (at most one every 5 s, plus the first and the last)."""

        shown = 0.0

        def on_log(self, args, state, control, logs=None, **kwargs):
            now = time.monotonic()
            loss = (logs or {}).get("loss")
            if loss is None:
                return
            if state.global_step in (1, state.max_steps) or now - self.shown >= 5:
                self.shown = now
                progress(f"{label}: step {state.global_step}/{state.max_steps}, loss {loss:.4f}")

    return Progress()


def common_args(h: dict, device: str, out: str, seed: int) -> dict:
    """TrainingArguments shared by SFT and DPO: seeded, deterministic, no checkpoints, every step logged."""
    return {
        "output_dir": out,
        "num_train_epochs": h["epochs"],
        "per_device_train_batch_size": h["batch_size"],
        "gradient_accumulation_steps": 1,
        "learning_rate": h["learning_rate"],
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "seed": seed,
        "data_seed": seed,
        "bf16": device == "cuda",
        "use_cpu": device == "cpu",
        "disable_tqdm": True,
        "max_length": h["max_length"],
        "dataloader_num_workers": 0,
        "remove_unused_columns": True,
    }


def lora_config(h: dict):
    from peft import LoraConfig

    return LoraConfig(
        r=h["rank"],
        lora_alpha=h["alpha"],
        lora_dropout=h["dropout"],
        bias="none",
        target_modules=h["target_modules"],
        task_type="CAUSAL_LM",
    )


def train_phase(
    kind: str, model, tokenizer, rows: list[dict], h: dict, device: str, seed: int, label: str, work: str
):
    """One TRL phase (sft or dpo) on ``model`` (a plain model: a LoRA is added; a PEFT model: trained
    further). Returns (the trained PEFT model, [(step, loss)])."""
    from datasets import Dataset
    from peft import PeftModel

    args = common_args(h, device, os.path.join(work, kind), seed)
    peft_config = None if isinstance(model, PeftModel) else lora_config(h)
    if kind == "sft":
        from trl import SFTConfig, SFTTrainer

        # The rows as the export holds them (``curate.sft_row``): TRL picks prompt/completion over messages
        # and masks the prompt by itself, as it does for anyone training on the exported files.
        data = Dataset.from_list(rows)
        trainer = SFTTrainer(
            model=model,
            args=SFTConfig(**args),
            train_dataset=data,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=[progress_callback(f"{label} sft")],
        )
    else:
        from trl import DPOConfig, DPOTrainer

        data = Dataset.from_list(
            [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in rows]
        )
        trainer = DPOTrainer(
            model=model,
            args=DPOConfig(**args, beta=h["beta"]),
            train_dataset=data,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=[progress_callback(f"{label} dpo")],
        )
    trainer.train()
    curve = [(int(e["step"]), float(e["loss"])) for e in trainer.state.log_history if "loss" in e]
    return trainer.model, curve


def portable(paths: list[str], dense_dir: str, base_name: str) -> None:
    """What a saved directory says of its base model, made portable: any path of the dense copy (a cache
    directory of this machine) left in its configs and model card becomes ``base_name``."""
    for root in paths:
        for name in os.listdir(root):
            path = os.path.join(root, name)
            if name.endswith((".json", ".md")):
                with open(path, encoding="utf-8") as fh:
                    text = fh.read()
                if dense_dir in text:
                    with open(path, "w", encoding="utf-8") as fh:
                        fh.write(text.replace(dense_dir, base_name))


def train_run(run: dict, dense_dir: str, device: str, seed: int, base_name: str) -> dict:
    """Train one adapter as ``run`` says; save it (and the merged checkpoint when asked)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

    set_seed(seed)
    h = run["hyper"]
    label = run["name"]
    tokenizer = AutoTokenizer.from_pretrained(dense_dir)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # CPUs train faster and exactly in fp32
    model = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=dtype).to(device)
    # What PEFT and TRL write as the base model (adapter config, model card tags): a name, not this path.
    model.config.name_or_path = tokenizer.name_or_path = base_name
    if run.get("load_adapter"):  # a finished adapter, loaded to be merged
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, run["load_adapter"])
        merge(model, tokenizer, run, label)
        return {}
    phases = {"sft": ["sft"], "dpo": ["dpo"], "sft+dpo": ["sft", "dpo"]}[run["mode"]]
    t0 = time.monotonic()
    curves: dict[str, list] = {}
    with tempfile.TemporaryDirectory(prefix="qreason-train-") as work:
        for kind in phases:
            rows = run["sft"] if kind == "sft" else run["dpo"]
            if not rows:
                raise ValueError(f"{label}: no {kind} rows to train on")
            progress(
                f"{label}: {kind} on {len(rows)} examples, {h['epochs']} epochs, batch {h['batch_size']}"
            )
            model, curves[kind] = train_phase(kind, model, tokenizer, rows, h, device, seed, label, work)
    seconds = time.monotonic() - t0
    if "ref" in getattr(model, "peft_config", {}):
        model.delete_adapter("ref")  # DPO after SFT keeps a frozen copy of the SFT adapter as its reference
    for config in model.peft_config.values():
        config.base_model_name_or_path = base_name
    model.save_pretrained(run["adapter_dir"])
    tokenizer.save_pretrained(run["adapter_dir"])
    portable([run["adapter_dir"]], dense_dir, base_name)
    progress(f"{label}: adapter saved ({seconds:.1f} s of training)")
    merge(model, tokenizer, run, label)
    return {"train_seconds": round(seconds, 2), "loss": curves, "steps": sum(len(c) for c in curves.values())}


def merge(model, tokenizer, run: dict, label: str) -> None:
    """The dense checkpoint (grid weights + adapter merged, bfloat16) for engines that cannot serve the
    adapter."""
    import torch

    if not run.get("merged_dir"):
        return
    merged = model.merge_and_unload().to(torch.bfloat16)
    merged.save_pretrained(run["merged_dir"])
    tokenizer.save_pretrained(run["merged_dir"])
    progress(f"{label}: merged checkpoint written")


def run(job: dict) -> dict:
    progress("starting: importing torch, transformers, peft and trl")
    import torch

    device = pick_device(job.get("device", "auto"))
    seed = int(job.get("seed", 0))
    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    dense_seconds = None
    if not os.path.isfile(os.path.join(job["dense_dir"], "config.json")):
        dense_seconds = round(build_dense(job["checkpoint"], job["dense_dir"]), 2)
    base_name = job.get("base_name") or "quantized-model"
    runs = {r["name"]: train_run(r, job["dense_dir"], device, seed, base_name) for r in job["runs"]}
    return {
        "versions": versions(VERSIONED),
        "device": device,
        "threads": torch.get_num_threads(),
        "dense_seconds": dense_seconds,
        "runs": runs,
    }


def main(argv: list[str] | None = None) -> int:
    return worker_main(run, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
