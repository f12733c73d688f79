"""Quantize the default model (SmolLM2-135M-Instruct) with every registered method; print the time and memory.

    python bench/quantize_methods.py                       # all methods, 64 generic calibration samples
    python bench/quantize_methods.py --methods rtn-w4a16 gptq-w4a16 --samples 16
    python bench/quantize_methods.py --set awq-w4a16:n_grid=5
    python bench/quantize_methods.py --smoke                # rtn-w4a16 on 2 samples of 64 tokens: does it
    run?

Each method runs fresh into a temporary directory (the cache is neither read nor written unless --keep DIR is
given), so the numbers are the cost of one real quantization: wall time of the whole call (calibration
sampling, worker start-up with its ~10 s llm-compressor import, the method, saving) and the worker's peak
resident memory. Needs .venv-quant (scripts/setup-quant-env.sh).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from qreason.errors import UserError
    from qreason.inputs.models import resolve_model
    from qreason.stages.quantize import CalibrationSpec, QuantizeSpec, list_methods, quantize
    from qreason.stages.quantize.recipes import get_recipe, parse_override
    from qreason.stages.quantize.shapes import largest_fitting_group, linear_input_widths, read_config

    names = [m["name"] for m in list_methods()]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model", default="default", help="model to quantize (default: the embedded SmolLM2-135M)"
    )
    p.add_argument(
        "--methods",
        nargs="+",
        default=names,
        choices=names,
        metavar="METHOD",
        help=f"methods to run (default: all: {', '.join(names)})",
    )
    p.add_argument("--samples", type=int, default=64, help="calibration samples (default 64)")
    p.add_argument("--max-seq-len", type=int, default=512, help="tokens per calibration sample (default 512)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="METHOD:KEY=VALUE",
        help="override one method's parameter, e.g. awq-w4a16:n_grid=5 (repeatable)",
    )
    p.add_argument("--keep", metavar="DIR", help="write the checkpoints to DIR/METHOD and keep them")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="a quick check that the script runs: --methods rtn-w4a16 --samples 2 --max-seq-len 64",
    )
    args = p.parse_args(argv)
    if args.smoke:
        args.methods, args.samples, args.max_seq_len = ["rtn-w4a16"], 2, 64

    base = resolve_model(args.model)
    widths = list(linear_input_widths(read_config(base.path)).values())
    per_method: dict[str, dict] = {m: {} for m in args.methods}
    for item in args.set:
        method, _, rest = item.partition(":")
        if method not in per_method:
            p.error(f"--set {item}: {method!r} is not one of the methods being run")
        key, value = parse_override(rest)
        per_method[method][key] = value

    out_root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="qreason-bench-"))
    rows = []
    print(
        f"model {base.spec} ({base.path}); {args.samples} calibration samples "
        f"of at most {args.max_seq_len} tokens",
        flush=True,
    )
    try:
        for method in args.methods:
            overrides = dict(per_method[method])
            if "group_size" in get_recipe(method).params and "group_size" not in overrides:
                default = get_recipe(method).params["group_size"].default
                if any(w % default for w in widths):
                    overrides["group_size"] = largest_fitting_group(widths, default)
            spec = QuantizeSpec(
                method=method,
                overrides=overrides,
                calibration=CalibrationSpec(n_samples=args.samples, max_seq_len=args.max_seq_len),
            )
            try:
                v = quantize(base, spec, out_dir=out_root / method)
            except UserError as exc:
                print(f"{method}: FAILED: {exc}", file=sys.stderr)
                rows.append({"method": method, "overrides": overrides, "error": str(exc)})
                continue
            prov = json.loads((Path(v.path) / "qreason-quant.json").read_text())
            rows.append(
                {
                    "method": method,
                    "overrides": overrides,
                    "seconds": v.quantize_seconds,
                    "cpu_seconds": prov.get("worker_cpu_seconds"),
                    "method_seconds": prov.get("oneshot_seconds"),
                    "load_average": round(os.getloadavg()[0], 1),
                    "peak_memory_mb": v.peak_memory_mb,
                    "size_mib": round(v.size_bytes / 2**20, 1),
                    "bits": v.bits,
                    "reused": v.reused,
                    "path": v.path,
                }
            )
    finally:
        if not args.keep:
            shutil.rmtree(out_root, ignore_errors=True)

    print(
        f"\n{'method':<18} {'overrides':<26} {'wall s':>7} {'method s':>8} {'CPU s':>7} {'peak MB':>8} "
        f"{'MiB':>6} {'load':>5}"
    )
    for r in rows:
        over = ",".join(f"{k}={v}" for k, v in r["overrides"].items()) or "-"
        if "error" in r:
            print(f"{r['method']:<18} {over:<26} {'failed':>7}")
            continue
        print(
            f"{r['method']:<18} {over:<26} {r['seconds']:>7.1f} {r['method_seconds']:>8.1f} "
            f"{r['cpu_seconds']:>7.1f} {r['peak_memory_mb']:>8.0f} {r['size_mib']:>6.1f} "
            f"{r['load_average']:>5.1f}"
        )
    print(
        "wall s: the whole quantize() call; method s: llm-compressor's oneshot alone; CPU s: the worker's "
        "user+system time;\nload: the machine's 1-minute load average when the method finished "
        "(2 cores here: above 2, other work competed)."
    )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
