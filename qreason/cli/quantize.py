"""``qreason quantize``: make (or reuse) a quantized variant of a model from the command line.

``register(subparsers)`` adds the sub-command to qreason's parser (``qreason.cli``).
"""

from __future__ import annotations

import argparse
import json

from qreason.errors import UserError

DESCRIPTION = """\
Quantize a model with a named method (a recipe of llm-compressor modifiers) and print the resulting variant.
The work runs in the quantization environment (`qreason setup quant`; .venv-quant in a checkout).
A checkpoint is cached under $QREASON_CACHE/quantized/KEY, keyed by the base model's content, the method with
its parameters and the calibration data: asking again reuses it. A failed or interrupted run leaves no
checkpoint behind (the worker's log stays beside the cache entry).

Examples:
  qreason quantize --list
  qreason quantize --method rtn-w4a16 --set group_size=64
  qreason quantize --method gptq-w4a16 --set group_size=64 --calibration jsonl \\
      --calibration-path ../shared/data/gsm8k_train.jsonl --samples 128
  qreason quantize --method awq-w4a16 --set group_size=64 --set n_grid=5 --samples 16
  qreason quantize --method import --path ./my-model-AWQ
"""


def _format_methods(methods: list[dict]) -> str:
    lines = []
    for m in methods:
        lines.append(f"{m['name']}  ({'calibrates' if m['calibration'] else 'no calibration'})")
        lines.append(f"    {m['description']}")
        for pname, p in m["params"].items():
            default = json.dumps(p["default"])
            choices = f" [{', '.join(json.dumps(c) for c in p['choices'])}]" if "choices" in p else ""
            lines.append(f"    --set {pname}={default}{choices}  {p['help']}")
    return "\n".join(lines)


def _overrides(pairs: list[str]) -> dict:
    from qreason.stages.quantize.recipes import parse_override

    out = {}
    for text in pairs:
        key, value = parse_override(text)
        out[key] = value
    return out


def run_command(args: argparse.Namespace) -> int:
    from qreason.stages.quantize import QuantizeSpec, list_methods, quantize

    if args.list:
        print(_format_methods(list_methods()))
        return 0
    if not args.method:
        raise UserError("qreason quantize", "--method is required (see --list for the methods)")
    from pydantic import ValidationError

    from qreason.inputs.models import resolve_model

    try:
        spec = QuantizeSpec(
            method=args.method,
            overrides=_overrides(args.set),
            path=args.path,
            calibration={
                "source": args.calibration,
                "path": args.calibration_path,
                "task": args.calibration_task,
                "n_samples": args.samples,
                "max_seq_len": args.max_seq_len,
                "seed": args.seed,
            },
        )
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        message = err["msg"].removeprefix("Value error, ")
        raise UserError("qreason quantize", f"{field}: {message}" if field else message) from None
    base = resolve_model(args.model)
    variant = quantize(base, spec, name=args.name, out_dir=args.out)  # a failed worker: WorkerFailed, exit 1
    if args.json:
        print(variant.model_dump_json(indent=2))
    else:
        size = f"{variant.size_bytes / 2**20:.1f} MiB" if variant.size_bytes is not None else "?"
        if variant.reused:
            how = "reused from the cache"
        elif variant.method == "import":
            how = "imported"
        else:
            how = f"{variant.quantize_seconds:.1f} s, peak {variant.peak_memory_mb:.0f} MB"
        print(f"{variant.name}: {variant.method}, {variant.bits} bits, {size} ({how})\n{variant.path}")
    return 0


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``quantize`` to qreason's sub-commands; the parser's ``fn`` default runs it."""
    q = subparsers.add_parser(
        "quantize",
        help="quantize a model with a named method (or import a quantized one)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    q.add_argument(
        "--model",
        default="default",
        help="the full-precision model: 'default' (the embedded SmolLM2-135M-Instruct), a local "
        "checkpoint directory or a hub id (default: default)",
    )
    q.add_argument(
        "--method",
        help="a method from --list, or 'import' to register an existing quantized "
        "checkpoint given with --path",
    )
    q.add_argument(
        "--path",
        help="with --method import: the quantized checkpoint (AutoAWQ, AutoGPTQ/GPTQModel or "
        "compressed-tensors format), a local directory or a hub id",
    )
    q.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a method parameter, repeatable; the value is read as YAML, e.g. "
        "--set group_size=64 --set ignore='[lm_head]' --set actorder=null (--list shows each "
        "method's parameters)",
    )
    q.add_argument(
        "--calibration",
        choices=["generic", "jsonl", "traces"],
        default="generic",
        help="calibration samples for methods that calibrate: 'generic' (varied text shipped with "
        "qreason), 'jsonl' (rows of --calibration-path), 'traces' (the model's own answers to "
        "--calibration-task, generated with vLLM) (default: generic)",
    )
    q.add_argument(
        "--calibration-path",
        metavar="FILE",
        help="jsonl: the JSONL file (rows with text, messages, or question/answer fields); "
        "traces: local data for the task (otherwise the task's own source)",
    )
    q.add_argument(
        "--calibration-task",
        metavar="TASK",
        help="traces: the task whose problems the model answers (see 'qreason tasks'); jsonl: read "
        "the rows with that task's field names",
    )
    q.add_argument("--samples", type=int, default=64, metavar="N", help="calibration samples (default 64)")
    q.add_argument(
        "--max-seq-len",
        type=int,
        default=512,
        metavar="TOKENS",
        help="tokens per calibration sample; longer samples are truncated (default 512)",
    )
    q.add_argument("--seed", type=int, default=0, help="seed that picks the calibration samples (default 0)")
    q.add_argument("--name", help="the variant's label in later records (default: the method's name)")
    q.add_argument(
        "--out",
        metavar="DIR",
        help="write the checkpoint to DIR instead of the cache (DIR must be "
        "empty, absent, or hold a checkpoint made from the same inputs)",
    )
    q.add_argument("--list", action="store_true", help="list the methods with their parameters and exit")
    q.add_argument("--json", action="store_true", help="print the variant record as JSON")
    q.set_defaults(fn=run_command)
    return q
