"""A checkpoint's fingerprint is its content: weights, config and tokenizer, not what its maker measured."""

import json

from qreason.inputs.models import fingerprint_dir


def test_a_checkpoint_made_again_has_the_same_fingerprint(tmp_path, monkeypatch):
    monkeypatch.setenv("QREASON_CACHE", str(tmp_path / "cache"))
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"hidden_size": 16}))
    (ckpt / "model.safetensors").write_bytes(b"weights")
    (ckpt / "qreason-quant.json").write_text(json.dumps({"wall_seconds": 17.1, "created_at": "day one"}))
    first = fingerprint_dir(ckpt)
    # made again elsewhere: another wall time and date, the same model
    (ckpt / "qreason-quant.json").write_text(json.dumps({"wall_seconds": 52.0, "created_at": "day two"}))
    assert fingerprint_dir(ckpt) == first
    (ckpt / "config.json").write_text(json.dumps({"hidden_size": 32}))
    assert fingerprint_dir(ckpt) != first
    (ckpt / "config.json").write_text(json.dumps({"hidden_size": 16}))
    (ckpt / "model.safetensors").write_bytes(b"other weights")
    assert fingerprint_dir(ckpt) != first
