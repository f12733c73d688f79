#!/usr/bin/env python
"""The recover stage's training worker on a CUDA GPU: a check of the code path, not a benchmark.

vLLM on CUDA cannot be tried from this project's machines (no CUDA vLLM wheel fits what travels to a lent
GPU), so this checks the part of the loop that runs in the training environment: the dense copy of a real
compressed-tensors checkpoint, LoRA training in every mode (sft, dpo, sft+dpo, kd with its teacher cache), the
full-precision arm, and the merged checkpoint, each with ``device: cuda`` (bfloat16 there).

    # here, in the main environment (quantizes a tiny random Llama with .venv-quant; a few MB):
    .venv/bin/python bench/cuda_train_check.py prepare DIR
    # on the GPU machine, with trl, peft, transformers, datasets and compressed-tensors importable:
    python3 bench/cuda_train_check.py run DIR [--device cuda]

``run`` writes the worker's job, runs ``python -m qreason.workers.train`` as the recover stage does, and
prints one line per adapter (device, steps, first and last loss, seconds) and the versions; it exits 1 when
any adapter or merged checkpoint is missing, a loss is not finite, or the worker did not use the device asked
for.
The model is random: the losses say that training ran, not that it helps.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = [
    (f"Ana has {a} pens and buys {b} more. How many pens does she have?", a, b)
    for a, b in [(2, 3), (4, 5), (1, 7), (6, 2), (3, 3), (5, 4)]
]


def rows() -> tuple[list[dict], list[dict]]:
    """SFT rows (the base's verified solutions) and frontier rows (the quantized model's steps up to its
    first faulty step, ``prefix``, then the verified continuation), in the recover stage's TRL formats."""
    sft, dpo = [], []
    for q, a, b in QUESTIONS:
        prompt = [{"role": "user", "content": q}]
        good = f"Step 1: {a} + {b} = {a + b}.\nThe final answer is \\boxed{{{a + b}}}."
        bad = f"Step 1: {a} + {b} = {a + b + 1}.\nThe final answer is \\boxed{{{a + b + 1}}}."
        sft.append({"prompt": prompt, "completion": [{"role": "assistant", "content": good}]})
        dpo.append(
            {
                "prompt": prompt,
                "chosen": [{"role": "assistant", "content": good}],
                "rejected": [{"role": "assistant", "content": bad}],
                "prefix": f"Step 1: {a} + {b}",
            }
        )
    return sft, dpo


def prepare(out: Path) -> int:
    sys.path.insert(0, str(REPO / "tests"))
    from run_builders import make_tiny_model

    from qreason.inputs.models import ResolvedModel, fingerprint_dir
    from qreason.stages.quantize import QuantizeSpec, quantize

    out.mkdir(parents=True, exist_ok=True)
    tiny = make_tiny_model(out / "base")
    base = ResolvedModel("tiny", str(tiny), fingerprint_dir(tiny), "local")
    spec = QuantizeSpec(method="rtn-w4a16", overrides={"group_size": 32})
    variant = quantize(base, spec, "rtn", out_dir=out / "rtn", echo=print)
    sft, dpo = rows()
    (out / "rows.json").write_text(json.dumps({"sft": sft, "dpo": dpo}), encoding="utf-8")
    print(f"prepared {out}: base, rtn ({variant.fingerprint[:12]}), {len(sft)} sft and {len(dpo)} dpo rows")
    return 0


def run(out: Path, device: str) -> int:
    data = json.loads((out / "rows.json").read_text(encoding="utf-8"))
    work = out / "work"
    hyper = {
        "rank": 8,
        "alpha": 16,
        "dropout": 0.0,
        "learning_rate": 1e-3,
        "epochs": 2,
        "batch_size": 2,
        "max_length": 256,
        "beta": 0.1,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "kd_top_k": 8,
        "kd_chunk": 16,
    }

    def arm(name: str, mode: str, **extra) -> dict:
        return {
            "name": name,
            "mode": mode,
            "sft": data["sft"],
            "dpo": data["dpo"],
            "hyper": hyper,
            "adapter_dir": str(work / f"{name}.adapter"),
            "merged_dir": str(work / f"{name}.merged"),
            **extra,
        }

    runs = [
        arm("sft", "sft"),
        arm("dpo", "dpo"),
        arm("sft+dpo", "sft+dpo"),
        arm("kd", "kd"),
        arm("kd-again", "kd"),
        arm("fp", "sft", model_dir=str(out / "base"), base_name="tiny@base"),
    ]
    job = {
        "checkpoint": str(out / "rtn"),
        "dense_dir": str(work / "dense"),
        "base_name": "rtn@check",
        "device": device,
        "seed": 0,
        "threads": None,
        "runs": runs,
        "teacher": str(out / "base"),
        "teacher_key": "tiny-base",
        "teacher_cache": str(work / "teacher-cache"),
        "result_file": str(work / "result.json"),
    }
    work.mkdir(parents=True, exist_ok=True)
    (work / "job.json").write_text(json.dumps(job, indent=1), encoding="utf-8")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    proc = subprocess.run([sys.executable, "-m", "qreason.workers.train", str(work / "job.json")], env=env)
    if proc.returncode != 0 or not (work / "result.json").is_file():
        print(f"FAILED: the worker exited with code {proc.returncode}")
        return 1
    result = json.loads((work / "result.json").read_text(encoding="utf-8"))
    problems = []
    if result["device"] != device:
        problems.append(f"the worker trained on {result['device']}, not {device}")
    print(f"device {result['device']}; dense copy {result['dense_seconds']} s; versions {result['versions']}")
    for r in runs:
        got = result["runs"][r["name"]]
        losses = [loss for curve in got["loss"].values() for _, loss in curve]
        first, last = (losses[0], losses[-1]) if losses else (float("nan"), float("nan"))
        extra = {k: got[k] for k in ("teacher_computed", "teacher_cached") if k in got}
        print(
            f"{r['name']:9} {r['mode']:8} steps {got['steps']:3}  loss {first:.4f} -> {last:.4f}  "
            f"{got['train_seconds']:.1f} s {extra or ''}"
        )
        if not all(math.isfinite(x) for x in losses) or not losses:
            problems.append(f"{r['name']}: no finite loss curve")
        for key in ("adapter_dir", "merged_dir"):
            if (
                not (Path(r[key]) / "config.json").is_file()
                and not (Path(r[key]) / "adapter_config.json").is_file()
            ):
                problems.append(f"{r['name']}: nothing written to {key}")
    if result["runs"]["kd-again"].get("teacher_computed") != 0:
        problems.append("kd-again computed the teacher again instead of reading its cache")
    for p in problems:
        print(f"FAILED: {p}")
    print("OK" if not problems else f"{len(problems)} problems")
    return 1 if problems else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("step", choices=["prepare", "run"])
    p.add_argument("dir")
    p.add_argument("--device", default="cuda")
    args = p.parse_args()
    return prepare(Path(args.dir)) if args.step == "prepare" else run(Path(args.dir), args.device)


if __name__ == "__main__":
    sys.exit(main())
