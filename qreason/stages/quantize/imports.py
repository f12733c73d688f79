"""Importing an existing quantized checkpoint: read its ``quantization_config`` to learn what it is.

Understood formats: compressed-tensors (llm-compressor's output), AutoAWQ (``quant_method: awq``),
AutoGPTQ / GPTQModel (``quant_method: gptq``), FP8 (``quant_method: fp8``) and bitsandbytes. qreason depends
on none of the libraries that wrote them: vLLM loads AWQ and GPTQ checkpoints with its own kernels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from qreason.errors import UserError


@dataclass(frozen=True)
class ImportedFormat:
    format: str  # compressed-tensors | awq | gptq | fp8 | bitsandbytes
    bits: int | None
    group_size: int | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def as_recipe(self, quantization_config: dict) -> dict:
        return {
            "format": self.format,
            "bits": self.bits,
            "group_size": self.group_size,
            **self.details,
            "quantization_config": quantization_config,
        }


def _int(value: Any) -> int | None:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _compressed_tensors(qc: dict, where: str) -> ImportedFormat:
    groups = qc.get("config_groups") or {}
    weights = [
        g.get("weights")
        for g in groups.values()
        if isinstance(g, dict) and isinstance(g.get("weights"), dict)
    ]
    if not weights:
        raise UserError(where, "compressed-tensors quantization_config has no config_groups with weights")
    bits = min(_int(w.get("num_bits")) or 16 for w in weights)
    first = weights[0]
    activations = [g.get("input_activations") for g in groups.values() if isinstance(g, dict)]
    act_bits = next((_int(a.get("num_bits")) for a in activations if isinstance(a, dict)), None)
    return ImportedFormat(
        "compressed-tensors",
        bits,
        _int(first.get("group_size")),
        {
            "scheme": f"W{bits}A{act_bits or 16}",
            "weight_type": first.get("type"),
            "strategy": first.get("strategy"),
            "symmetric": first.get("symmetric"),
            "storage_format": qc.get("format"),
            "ignore": qc.get("ignore") or [],
        },
    )


def describe_quantization(qc: Any, where: str) -> ImportedFormat:
    """What a ``quantization_config`` says: format, weight bits, group size and format-specific details."""
    if not isinstance(qc, dict):
        raise UserError(
            where,
            "config.json has no quantization_config: this is not a quantized checkpoint "
            "(use it as the base model instead)",
        )
    method = str(qc.get("quant_method", "")).lower()
    if method == "compressed-tensors":
        return _compressed_tensors(qc, where)
    if method == "awq":
        return ImportedFormat(
            "awq",
            _int(qc.get("bits", qc.get("w_bit"))),
            _int(qc.get("group_size", qc.get("q_group_size"))),
            {"zero_point": qc.get("zero_point"), "version": qc.get("version")},
        )
    if method == "gptq":
        return ImportedFormat(
            "gptq",
            _int(qc.get("bits")),
            _int(qc.get("group_size")),
            {
                "desc_act": qc.get("desc_act"),
                "sym": qc.get("sym"),
                "checkpoint_format": qc.get("checkpoint_format", "gptq"),
            },
        )
    if method == "fp8":
        return ImportedFormat("fp8", 8, None, {"activation_scheme": qc.get("activation_scheme")})
    if method == "bitsandbytes":
        bits = 4 if qc.get("load_in_4bit") else 8 if qc.get("load_in_8bit") else None
        return ImportedFormat("bitsandbytes", bits, None, {"quant_type": qc.get("bnb_4bit_quant_type")})
    raise UserError(
        where,
        f"unsupported quant_method {qc.get('quant_method')!r} "
        "(understood: compressed-tensors, awq, gptq, fp8, bitsandbytes)",
    )
