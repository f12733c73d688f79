"""A tiny random-weight process reward model for the PRM judge tests: vLLM's ``Qwen2ForProcessRewardModel``
(2 layers, hidden 64) with the default model's tokenizer plus Qwen2.5-Math-PRM's step tag ``<extra_0>`` as a
special token. Its scores mean nothing; the tests check behaviour, not values."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

from run_builders import REAL_CACHE

SEPARATOR = "<extra_0>"
SERVED_NAME = "tiny-prm"


def make_tiny_prm(path: Path) -> Path:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, Qwen2Config, Qwen2Model

    from qreason.inputs.models import convert_embedded

    default = convert_embedded(
        Path(REAL_CACHE or Path.home() / ".cache" / "qreason") / "models" / "smollm2-135m-instruct"
    )
    path.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(default)
    tok.add_special_tokens({"additional_special_tokens": [SEPARATOR]})
    tok.save_pretrained(path)
    config = Qwen2Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=49216,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        initializer_range=0.2,
        num_labels=2,
    )
    torch.manual_seed(0)
    weights = {
        f"model.{k}": v.contiguous() for k, v in Qwen2Model(config).to(torch.bfloat16).state_dict().items()
    }
    gen = torch.Generator().manual_seed(1)
    for name, shape in (("score.0", (64, 64)), ("score.2", (2, 64))):  # Linear, ReLU, Linear
        weights[f"{name}.weight"] = (torch.randn(*shape, generator=gen) * 0.3).to(torch.bfloat16)
        weights[f"{name}.bias"] = torch.zeros(shape[0], dtype=torch.bfloat16)
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    data = config.to_dict()
    data.update(architectures=["Qwen2ForProcessRewardModel"], torch_dtype="bfloat16")
    (path / "config.json").write_text(json.dumps(data, indent=1), encoding="utf-8")
    return path


def separator_id(path: Path) -> int:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path).convert_tokens_to_ids(SEPARATOR)


@contextmanager
def prm_server(model: Path, log: Path):
    """vLLM's OpenAI-compatible server running the tiny PRM (STEP pooling on ``<extra_0>``); yields the
    base URL (with /v1, as users write it)."""
    from conftest import free_port, wait_http

    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model),
        "--served-model-name",
        SERVED_NAME,
        "--runner",
        "pooling",
        "--pooler-config",
        json.dumps({"tok_pooling_type": "STEP", "step_tag_id": separator_id(model)}),
        "--max-model-len",
        "2048",
        "--kv-cache-memory-bytes",
        str(1 << 30),
        "--enforce-eager",
        "--distributed-executor-backend",
        "uni",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc, timeout=600)
        yield f"http://127.0.0.1:{port}/v1"
    except Exception:
        print(log.read_text(errors="replace")[-3000:])
        raise
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
