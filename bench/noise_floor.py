#!/usr/bin/env python
"""How much do greedy outputs move when nothing that should matter moves, and how many of the demo's
quantization flips survive that noise?

The demo config (configs/demo.yaml: SmolLM2-135M-Instruct, RTN and GPTQ 4-bit, 80 synthetic additions,
greedy) is run with its base re-run under these perturbations (``noise:``), all on the same problems and
seeds:

- ``same``: identical settings on the same engine (64 prompts per engine call, the demo's default);
- ``batch16`` / ``batch1``: 16 prompts per call, and one at a time;
- ``nocache``: prefix caching switched off (an engine of its own; the demo's engine has vLLM's default).

It prints base-vs-base flips per perturbation, and per quantized variant its flips, how many of them are
stable (the base right in every repetition, the variant wrong) and the exact test against the noise. The
results (with the machine: CPU model and flags count, vLLM build, date) go to bench/out/noise_floor.json.
Recover and lm-eval are left out (they do not change the flips); the demo's checkpoints are reused from the
cache when they exist.

    .venv/bin/python bench/noise_floor.py [--limit 80] [--out DIR] [--smoke]

--smoke: 4 problems, 16 tokens, RTN only, so that a test runs every code path (the numbers mean nothing).
Timings are not the point here, but a shared machine does not disturb the counts only if vLLM's kernels do
not depend on load; they should not (thread counts are fixed), yet say so when you quote the numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

OUT = REPO / "bench" / "out"
PERTURBATIONS = [
    {"name": "same"},
    {"name": "batch16", "batch_size": 16},
    {"name": "batch1", "batch_size": 1},
    {"name": "nocache", "engine_args": {"enable_prefix_caching": False}},
]


def bench_config(out: Path, limit: int, smoke: bool) -> Path:
    """configs/demo.yaml with this benchmark's noise section, its own run directory, no recover/lm-eval."""
    cfg = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text(encoding="utf-8"))
    cfg["name"] = "noise-floor"
    cfg["output_dir"] = str(out / "run")
    cfg["model"]["path"] = "default"
    cfg["tasks"][0]["limit"] = limit
    cfg["noise"] = {"perturbations": PERTURBATIONS}
    cfg["recover"] = {"enabled": False}
    cfg.pop("lm_eval", None)
    cfg["report"] = {"enabled": False}
    if smoke:
        cfg["quantize"] = cfg["quantize"][:1]
        cfg["sampling"]["max_tokens"] = 16
    path = out / "noise_floor.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=80)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    limit = 4 if args.smoke else args.limit

    from qreason.pipeline.provenance import environment
    from qreason.pipeline.runner import run
    from qreason.summary import format_noise

    summary = run(bench_config(out, limit, args.smoke))
    noise = summary.noise
    env = json.loads((Path(summary.run_dir) / "environment.json").read_text(encoding="utf-8"))
    hw = environment()["hardware"]
    print("qreason noise-floor benchmark (configs/demo.yaml)")
    isa = [name for flag, name in (("avx512f", "AVX-512"), ("amx_tile", "AMX")) if flag in hw["cpu_flags"]]
    vllm = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if k.startswith("vllm"))
    print(
        f"machine: {hw['cpu']} x{hw['cpu_count']}, {len(hw['cpu_flags'])} CPU flags"
        f"{''.join(', ' + n for n in isa)}; {vllm}"
    )
    base_engine = env.get("engines", {}).get("base", {})
    print(
        f"base engine: {base_engine.get('batch_size')} prompts per call, max_num_seqs "
        f"{base_engine.get('max_num_seqs')}, prefix caching {base_engine.get('enable_prefix_caching')}, "
        f"dtype {base_engine.get('dtype')}"
    )
    print()
    head = ("perturbation", "cells", "flips", "lost", "gained", "texts changed", "accuracy")
    print(f"{head[0]:<14} " + " ".join(f"{h:>{max(len(h), 5)}}" for h in head[1:]))
    for p in noise.perturbations:
        print(
            f"{p.name:<14} {p.cells:>5} {p.flips:>5} {p.lost:>5} {p.gained:>6} {p.text_changed:>13} "
            f"{100 * p.accuracy:>7.1f}%"
        )
    base_acc = noise.perturbations[0].base_accuracy if noise.perturbations else 0.0
    print(f"{'(base)':<14} {'':>5} {'':>5} {'':>5} {'':>6} {'':>13} {100 * base_acc:>7.1f}%")
    print()
    print(f"{'variant':<14} {'flips':>5} {'lost':>4} {'stable':>6} {'p vs noise':>10}")
    for v in noise.variants:
        stable = "-" if v.stable_flips is None else str(v.stable_flips)
        print(f"{v.variant:<14} {v.lost + v.gained:>5} {v.lost:>4} {stable:>6} {v.p_value:>10.3g}")
    print()
    print(format_noise(noise))
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "cpu": hw["cpu"],
            "cpu_count": hw["cpu_count"],
            "cpu_flags": hw["cpu_flags"],
            "gpus": hw["gpus"],
        },
        "versions": env["versions"],
        "engines": env.get("engines", {}),
        "limit": limit,
        "smoke": args.smoke,
        "noise": noise.model_dump(mode="json"),
    }
    (out / "noise_floor.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"\nresults: {out / 'noise_floor.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
