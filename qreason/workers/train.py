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
2. for each run (the targeted one and the control): a LoRA adapter trained on the dense copy with TRL (SFT on
   completions only, DPO with the frozen quantized model as reference, or SFT then DPO) or distilled from the
   full-precision model (``kd``, below), seeded; saved in PEFT format, and, when asked,
   merged into a dense checkpoint for engines that cannot serve the adapter. A run with its own ``model_dir``
   (the full-precision arm) trains on that checkpoint instead of the dense copy.

The protocol with the parent (progress lines, result file, one error line) is ``qreason.workers.protocol``;
the result holds versions, device, and per run: seconds and the loss curve.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
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
        # TRL turns recomputation on by default: it saves GPU memory, and on a CPU costs a third more time
        # for nothing (SmolLM2-135M sft, 2 cores: 8.4 s a step without it, 11 s with it; 2026-12-05)
        "gradient_checkpointing": device == "cuda",
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


def train_run(run: dict, job: dict, device: str, seed: int) -> dict:
    """Train one adapter as ``run`` says; save it (and the merged checkpoint when asked). The model is the
    job's dense copy, or the run's own ``model_dir`` (the full-precision arm: the base checkpoint); what the
    saved files say of it is ``base_name`` (the run's, else the job's), never a path of this machine."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

    set_seed(seed)
    dense_dir = run.get("model_dir") or job["dense_dir"]
    base_name = run.get("base_name") or job.get("base_name") or "quantized-model"
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
        return merge(model, tokenizer, run, label) or {}
    t0 = time.monotonic()
    curves: dict[str, list] = {}
    extra: dict = {}
    if run["mode"] == "kd":
        model, curves["kd"], extra = train_kd(model, tokenizer, run, job, device, seed, label, lora_config(h))
    phases = {"sft": ["sft"], "dpo": ["dpo"], "sft+dpo": ["sft", "dpo"], "kd": []}[run["mode"]]
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
    steps = sum(len(c) for c in curves.values())
    return {"train_seconds": round(seconds, 2), "loss": curves, "steps": steps, **extra}


# --- kd: distillation of the full-precision model into a LoRA on the quantized model ---------------------
#
# Examples are the recover stage's rows: the base's verified solutions (SFT rows, loss on the whole answer)
# and the failure frontier (the DPO rows' ``chosen`` answer: the quantized model's own steps before its first
# faulty step, ``prefix``, followed by the base's verified continuation; loss on the continuation only).
#
# The loss is the forward KL from the teacher (the full-precision model) to the student (the dense copy of the
# quantized grid + LoRA) at every loss position, over the teacher's top-k tokens plus one bucket holding the
# rest of the vocabulary: exact KL between the two distributions coarsened to k + 1 outcomes, so the teacher's
# output per position is k log-probabilities and k token ids instead of the whole vocabulary.
#
# Memory stays bounded for large models:
# - the teacher runs first, alone (no gradients), and its top-k per example is written to a cache keyed by
#   content (teacher, token ids, loss positions, k); the student is loaded only after the teacher is freed,
#   and a re-run (another learning rate, seed or arm with the same rows) reads the cache without loading it;
# - logits are never formed for the whole sequence at once: the final hidden states are projected onto the
#   vocabulary in chunks of ``chunk`` positions (teacher: inside ``no_grad``; student: each chunk under
#   activation checkpointing, so one chunk's vocabulary-wide logits live at a time in the backward pass too).

CACHE_VERSION = 1


def encode(tokenizer, prompt: list[dict], answer: str, prefix: str, max_length: int) -> dict:
    """Token ids of the conversation (prompt + the assistant's ``answer``) and the positions the loss covers:
    the tokens of the answer after ``prefix`` (and the template's end of turn), cut at ``max_length``."""
    if prefix and not answer.startswith(prefix):
        raise ValueError("a frontier row's answer does not start with its prefix")
    text = tokenizer.apply_chat_template(
        [*prompt, {"role": "assistant", "content": answer}], tokenize=False, add_generation_prompt=False
    )
    at, lead = text.rfind(answer), 0
    if at < 0:  # a template that trims the message
        lead = len(answer) - len(answer.lstrip())
        at = text.rfind(answer.strip())
    if at < 0:
        raise ValueError("the chat template changed the answer's text")
    start = at + max(len(prefix) - lead, 0)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"][:max_length]
    offsets = enc["offset_mapping"][: len(ids)]
    # position t predicts token t+1: the loss covers positions whose next token starts at or after ``start``
    targets = [t for t in range(len(ids) - 1) if offsets[t + 1][0] >= start]
    if not targets:
        raise ValueError(f"no answer tokens within max_length {max_length}")
    return {"ids": ids, "targets": targets}


def example_key(teacher_key: str, ex: dict, k: int) -> str:
    blob = json.dumps([CACHE_VERSION, teacher_key, ex["ids"], ex["targets"], k], separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def _hidden(model, ids):
    """Final hidden states (1, T, H) of the model's body, without the vocabulary projection."""
    return model.get_decoder()(input_ids=ids).last_hidden_state


def teacher_topk(examples: list[dict], teacher_dir: str, teacher_key: str, cache: str, h: dict, device: str):
    """Each example's teacher top-k (log-probabilities, token ids) at its loss positions: from the cache, or
    computed once (the teacher loaded only when an example is missing). Returns (list, computed, cached)."""
    import torch

    k, chunk = int(h["kd_top_k"]), int(h["kd_chunk"])
    os.makedirs(cache, exist_ok=True)
    out: list = [None] * len(examples)
    todo = []
    for i, ex in enumerate(examples):
        path = os.path.join(cache, example_key(teacher_key, ex, k) + ".pt")
        if os.path.isfile(path):
            out[i] = torch.load(path, weights_only=True)
        else:
            todo.append((i, path))
    if todo:
        from transformers import AutoModelForCausalLM

        progress(f"teacher: top-{k} of {len(todo)} examples ({len(examples) - len(todo)} cached)")
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=dtype).to(device).eval()
        head = teacher.get_output_embeddings()
        with torch.no_grad():
            for i, path in todo:
                ex = examples[i]
                hidden = _hidden(teacher, torch.tensor([ex["ids"]], device=device))[0]
                pos = torch.tensor(ex["targets"], device=device)
                vals, idx = [], []
                for s in range(0, len(pos), chunk):
                    logp = torch.log_softmax(head(hidden[pos[s : s + chunk]]).float(), dim=-1)
                    v, j = logp.topk(k, dim=-1)
                    vals.append(v.cpu())
                    idx.append(j.to(torch.int32).cpu())
                out[i] = {"logp": torch.cat(vals), "ids": torch.cat(idx)}
                fd, tmp = tempfile.mkstemp(dir=cache, suffix=".tmp")
                os.close(fd)
                torch.save(out[i], tmp)
                os.replace(tmp, path)
        del teacher, head
        if device == "cuda":
            torch.cuda.empty_cache()
    return out, len(todo), len(examples) - len(todo)


def kd_loss(model, ex: dict, teacher: dict, chunk: int, device: str):
    """Mean over the loss positions of KL(teacher || student) on the teacher's top-k tokens + the rest."""
    import torch
    from torch.utils.checkpoint import checkpoint

    hidden = _hidden(model, torch.tensor([ex["ids"]], device=device))[0]
    head = model.get_output_embeddings()
    pos = torch.tensor(ex["targets"], device=device)
    t_logp_all, t_ids_all = teacher["logp"].to(device), teacher["ids"].to(device).long()

    def chunk_kl(hid, t_logp, t_ids):
        s_logp = torch.log_softmax(head(hid).float(), dim=-1).gather(-1, t_ids)
        t_rest = torch.log1p(-t_logp.exp().sum(-1).clamp(max=1 - 1e-6))
        s_rest = torch.log1p(-s_logp.exp().sum(-1).clamp(max=1 - 1e-6))
        kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1) + t_rest.exp() * (t_rest - s_rest)
        return kl.sum()

    total = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, len(pos), chunk):
        e = s + chunk
        total = total + checkpoint(
            chunk_kl, hidden[pos[s:e]], t_logp_all[s:e], t_ids_all[s:e], use_reentrant=False
        )
    return total / len(pos)


def train_kd(model, tokenizer, run: dict, job: dict, device: str, seed: int, label: str, lora):
    """LoRA (``lora``: its PEFT config) on ``model`` (the dense copy) distilled from ``job['teacher']``.
    Returns (the PEFT model, the loss curve [(step, loss)], teacher stats)."""
    import torch
    from peft import get_peft_model

    h = run["hyper"]
    examples = [
        encode(tokenizer, r["prompt"], r["completion"][0]["content"], "", h["max_length"]) for r in run["sft"]
    ] + [
        encode(tokenizer, r["prompt"], r["chosen"][0]["content"], r.get("prefix") or "", h["max_length"])
        for r in run["dpo"]
    ]
    if not examples:
        raise ValueError(f"{label}: no kd rows to train on")
    teacher, computed, cached = teacher_topk(
        examples, job["teacher"], job["teacher_key"], job["teacher_cache"], h, device
    )
    model = get_peft_model(model, lora)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=h["learning_rate"], weight_decay=0.0)
    rng = random.Random(seed)
    order = list(range(len(examples)))
    bs, chunk = int(h["batch_size"]), int(h["kd_chunk"])
    steps_per_epoch = (len(order) + bs - 1) // bs
    total_steps, step, curve, shown = steps_per_epoch * h["epochs"], 0, [], 0.0
    progress(f"{label}: kd on {len(examples)} examples, {h['epochs']} epochs, batch {bs}")
    for _ in range(h["epochs"]):
        rng.shuffle(order)
        for b in range(0, len(order), bs):
            batch = order[b : b + bs]
            opt.zero_grad(set_to_none=True)
            loss_sum = 0.0
            for i in batch:  # examples one at a time (no padding), gradients averaged over the batch
                loss = kd_loss(model, examples[i], teacher[i], chunk, device) / len(batch)
                loss.backward()
                loss_sum += loss.item()
            opt.step()
            step += 1
            curve.append((step, loss_sum))
            now = time.monotonic()
            if step in (1, total_steps) or now - shown >= 5:
                shown = now
                progress(f"{label} kd: step {step}/{total_steps}, loss {loss_sum:.4f}")
    model.eval()
    return model, curve, {"teacher_computed": computed, "teacher_cached": cached}


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
    runs = {r["name"]: train_run(r, job, device, seed) for r in job["runs"]}
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
