"""The quantization worker: runs inside the quantization environment (.venv-quant), never in the main one.

    python -m qreason.workers.quantize JOB.json

The main process (``qreason.workers.launch``) writes a job file, starts this module as a subprocess and reads
its stdout. The job names the base checkpoint, the output directory, the llm-compressor modifiers to apply
(already rendered from the recipe registry) and the calibration samples. This module imports only the standard
library, torch, transformers, datasets and llm-compressor: nothing of qreason that needs vLLM, because the two
environments pin different versions of the libraries both use.

The protocol with the parent (progress lines, result file, one error line) is ``qreason.workers.protocol``;
the result holds versions, sample count and seconds.
"""

from __future__ import annotations

import json
import sys
import time

from qreason.workers.protocol import progress, versions, worker_main

# Modifier names allowed in a recipe, and where llm-compressor 0.14 keeps them.
MODIFIERS = {
    "QuantizationModifier": "llmcompressor.modifiers.quantization",
    "GPTQModifier": "llmcompressor.modifiers.gptq",
    "AWQModifier": "llmcompressor.modifiers.transform",
    "SmoothQuantModifier": "llmcompressor.modifiers.transform",
}
VERSIONED = ("torch", "transformers", "llmcompressor", "compressed-tensors", "accelerate", "datasets")


def build_modifiers(specs: list[dict]) -> list:
    """Instantiate ``[{"type": "GPTQModifier", "args": {...}}, ...]`` as llm-compressor modifier objects."""
    import importlib

    modifiers = []
    for spec in specs:
        kind = spec["type"]
        if kind not in MODIFIERS:
            raise ValueError(f"unknown modifier {kind!r} (known: {', '.join(MODIFIERS)})")
        cls = getattr(importlib.import_module(MODIFIERS[kind]), kind)
        modifiers.append(cls(**spec.get("args", {})))
    return modifiers


def render_sample(sample: dict, tokenizer) -> str:
    """A calibration sample as the text the model sees: chat messages go through the chat template."""
    if "text" in sample:
        return sample["text"]
    messages = sample["messages"]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def calibration_dataset(path: str, tokenizer, max_seq_len: int):
    """The samples of ``calibration.jsonl`` tokenized and truncated, as a ``datasets.Dataset``."""
    from datasets import Dataset

    with open(path, encoding="utf-8") as fh:
        samples = [json.loads(line) for line in fh if line.strip()]
    texts = [render_sample(s, tokenizer) for s in samples]
    # Chat-templated text already carries its special tokens; plain text gets the tokenizer's usual ones.
    columns: dict[str, list] = {"input_ids": [], "attention_mask": []}
    for sample, text in zip(samples, texts, strict=True):
        enc = tokenizer(text, truncation=True, max_length=max_seq_len, add_special_tokens="text" in sample)
        columns["input_ids"].append(enc["input_ids"])
        columns["attention_mask"].append(enc["attention_mask"])
    tokens = sum(len(ids) for ids in columns["input_ids"])
    return Dataset.from_dict(columns), len(samples), tokens


def neutralise_pin_memory() -> None:
    """AWQ pins cached activations for faster host-to-GPU copies; without CUDA that fails and is useless."""
    from llmcompressor.pipelines.cache import IntermediatesCache

    IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None


def report_layer_progress(model) -> None:
    """Report which decoder layer calibration has reached: llm-compressor's sequential pipeline runs the
    layers one after the other, so the first call of each layer marks progress (at most one line per 5 s)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or not len(layers):
        return
    total = len(layers)
    state = {"layer": None, "shown": 0.0, "pass": 0}

    def make_hook(index: int):
        def hook(module, args):
            if state["layer"] == index:
                return
            state["layer"] = index
            state["pass"] += index == 0  # each modifier that calibrates makes its own pass over the layers
            now = time.monotonic()
            if index in (0, total - 1) or now - state["shown"] >= 5:
                state["shown"] = now
                progress(f"calibration pass {state['pass']}: layer {index + 1}/{total}")

        return hook

    for i, layer in enumerate(layers):
        layer.register_forward_pre_hook(make_hook(i))


def quieten_library_logs() -> None:
    """llm-compressor logs through loguru: keep its INFO lines (they go to the log file), drop DEBUG."""
    try:
        from loguru import logger
    except ImportError:
        return
    logger.remove()
    logger.add(sys.stdout, level="INFO", format="{time:HH:mm:ss} {level} {name}: {message}", colorize=False)


def run(job: dict) -> dict:
    progress("starting: importing torch, transformers and llm-compressor")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(job.get("seed", 0))
    quieten_library_logs()
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        neutralise_pin_memory()
    progress(f"loading {job['model']} on {'cuda' if on_gpu else 'cpu'}")
    tokenizer = AutoTokenizer.from_pretrained(job["model"])
    # Loaded on the CPU: llm-compressor moves layers to the accelerator itself, one at a time if need be.
    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype="auto")
    modifiers = build_modifiers(job["modifiers"])
    kwargs: dict = {}
    n_samples = tokens = 0
    calibration = job.get("calibration")
    if calibration:
        dataset, n_samples, tokens = calibration_dataset(
            calibration["file"], tokenizer, calibration["max_seq_len"]
        )
        kwargs = {
            "dataset": dataset,
            "num_calibration_samples": n_samples,
            "max_seq_length": calibration["max_seq_len"],
            "shuffle_calibration_samples": False,
        }
        progress(f"calibrating on {n_samples} samples ({tokens} tokens)")
        report_layer_progress(model)
    names = " + ".join(m["type"] for m in job["modifiers"])
    progress(f"applying {names}")
    from llmcompressor import oneshot

    t0 = time.monotonic()
    oneshot(model=model, processor=tokenizer, recipe=modifiers, **kwargs)
    seconds = time.monotonic() - t0
    progress(f"{names} done in {seconds:.1f} s; saving the compressed checkpoint")
    model.save_pretrained(job["output_dir"], save_compressed=True)
    tokenizer.save_pretrained(job["output_dir"])
    return {
        "versions": versions(VERSIONED),
        "n_samples": n_samples,
        "tokens": tokens,
        "oneshot_seconds": round(seconds, 2),
        "device": "cuda" if on_gpu else "cpu",
    }


def main(argv: list[str] | None = None) -> int:
    return worker_main(run, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
