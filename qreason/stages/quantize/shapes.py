"""Layer widths from a checkpoint's config.json, and the group-size check made before any quantization starts.

Group-wise quantization gives every ``group_size`` consecutive input channels of a Linear layer one scale, so
each quantized layer's input width must divide by the group size. The widths follow from the config alone
(no weights loaded): q/k/v and the MLP's gate/up projections read ``hidden_size`` channels, the attention
output projection reads ``num_attention_heads * head_dim`` and the MLP's down projection ``intermediate_size``
(``moe_intermediate_size`` and ``shared_expert_intermediate_size`` for mixture-of-experts models).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from qreason.errors import UserError


def read_config(model_path: str | Path) -> dict:
    """A checkpoint's config.json; for multimodal models, the language model's part (``text_config``)."""
    path = Path(model_path) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(str(path), f"cannot read the model config ({exc})") from None
    if isinstance(config.get("text_config"), dict) and "hidden_size" not in config:
        config = {**config["text_config"], "quantization_config": config.get("quantization_config")}
    return config


def linear_input_widths(config: dict) -> dict[str, int]:
    """The input widths of the model's Linear layers, named by the config field they come from."""
    widths: dict[str, int] = {}
    for key in (
        "hidden_size",
        "intermediate_size",
        "moe_intermediate_size",
        "shared_expert_intermediate_size",
    ):
        value = config.get(key)
        if isinstance(value, int) and value > 0:
            widths[key] = value
    heads = config.get("num_attention_heads")
    hidden = config.get("hidden_size")
    head_dim = config.get("head_dim") or (hidden // heads if isinstance(hidden, int) and heads else None)
    if isinstance(heads, int) and isinstance(head_dim, int) and heads * head_dim != hidden:
        widths["num_attention_heads*head_dim"] = heads * head_dim
    return widths


def largest_fitting_group(widths: list[int], at_most: int) -> int | None:
    """The largest power of two, at most ``at_most``, that divides every width (None below 8)."""
    common = math.gcd(*widths)
    size = 1 << (min(common & -common, max(at_most, 1)).bit_length() - 1)
    return size if size >= 8 else None


def default_group_size(model_path: str | Path, default: int) -> int:
    """The group size a recipe uses when the user set none: its ``default`` where that divides every layer,
    else the largest power of two that does (SmolLM2-135M's 576-wide layers take 64, not 128); ``default``
    where nothing fits (``check_group_size`` then says so)."""
    widths = list(linear_input_widths(read_config(model_path)).values())
    if not widths or all(w % default == 0 for w in widths):
        return default
    return largest_fitting_group(widths, default) or default


def check_group_size(model_path: str | Path, group_size: int, method: str) -> None:
    """A UserError naming the layers and suggesting a size when ``group_size`` does not divide them all."""
    widths = linear_input_widths(read_config(model_path))
    if not widths:
        return  # an unusual config: llm-compressor checks the real layers itself, and the worker reports it
    bad = {k: v for k, v in widths.items() if v % group_size}
    if not bad:
        return
    layers = ", ".join(f"{k} {v}" for k, v in bad.items())
    fit = largest_fitting_group(list(widths.values()), group_size)
    hint = (
        f"the largest group size that fits is {fit}: set group_size={fit} (--set group_size={fit})"
        if fit
        else "no power-of-two group size of 8 or more divides them all; choose another method"
    )
    raise UserError(
        f"method {method}",
        f"group_size {group_size} does not divide the input width of every "
        f"quantized layer of {model_path} ({layers}); {hint}",
    )
