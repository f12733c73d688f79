"""Distillation of the full-precision model into a LoRA on the quantized model (``mode: kd``), in the training
environment; called by ``qreason.workers.train``. Imports only the standard library, torch, transformers and
PEFT.

Examples are the recover stage's rows: the base's verified solutions (SFT rows, loss on the whole answer)
and the failure frontier (the DPO rows' ``chosen`` answer: the quantized model's own steps before its first
faulty step, ``prefix``, followed by the base's verified continuation; loss on the continuation only).

The loss is the forward KL from the teacher (the full-precision model) to the student (the dense copy of the
quantized grid + LoRA) at every loss position, over the teacher's top-k tokens plus one bucket holding the
rest of the vocabulary: exact KL between the two distributions coarsened to k + 1 outcomes, so the teacher's
output per position is k log-probabilities and k token ids instead of the whole vocabulary.

Memory stays bounded for large models:
- the teacher runs first, alone (no gradients), and its top-k per example is written to a cache keyed by
  content (teacher, token ids, loss positions, k); the student is loaded only after the teacher is freed,
  and a re-run (another learning rate, seed or arm with the same rows) reads the cache without loading it;
- logits are never formed for the whole sequence at once: the final hidden states are projected onto the
  vocabulary in chunks of ``chunk`` positions (teacher: inside ``no_grad``; student: each chunk under
  activation checkpointing, so one chunk's vocabulary-wide logits live at a time in the backward pass too).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
import time

from qreason.workers.protocol import progress

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


def train_kd(model, tokenizer, run: dict, job: dict, device: str, seed: int, label: str):
    """LoRA on ``model`` (the dense copy) distilled from ``job['teacher']``. Returns (the PEFT model, the
    loss curve [(step, loss)], teacher stats)."""
    import torch
    from peft import get_peft_model

    from qreason.workers.train import lora_config

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
    model = get_peft_model(model, lora_config(h))
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
