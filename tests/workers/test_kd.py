"""The distillation worker's pieces on a tiny random model, in this environment (torch and transformers only):
the loss covers the continuation after the prefix and nothing before it, the teacher's top-k is computed once
and then read from its cache, and the KL is zero for the teacher itself and positive for another model."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from run_builders import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


PROMPT = [{"role": "user", "content": "What is 2 + 3?"}]
PREFIX = "Step 1: 2 + 3"
ANSWER = PREFIX + " = 5.\nThe final answer is \\boxed{5}."
H = {"kd_top_k": 8, "kd_chunk": 4, "max_length": 256}


def test_the_loss_covers_the_continuation_only(tiny):
    from transformers import AutoTokenizer

    from qreason.workers.train import encode

    tok = AutoTokenizer.from_pretrained(tiny)
    whole = encode(tok, PROMPT, ANSWER, "", 256)
    frontier = encode(tok, PROMPT, ANSWER, PREFIX, 256)
    assert whole["ids"] == frontier["ids"]
    predicted = tok.decode([frontier["ids"][t + 1] for t in frontier["targets"]])
    assert predicted.startswith(" = 5") and "2 + 3" not in predicted and "user" not in predicted
    assert predicted.rstrip().endswith("<|im_end|>")  # the model learns to stop
    assert tok.decode([whole["ids"][t + 1] for t in whole["targets"]]).startswith("Step 1")
    with pytest.raises(ValueError):
        encode(tok, PROMPT, ANSWER, "Step 2", 256)


def test_teacher_outputs_are_cached_and_kl_is_zero_for_the_teacher(tiny, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qreason.workers.train import encode, kd_loss, teacher_topk

    tok = AutoTokenizer.from_pretrained(tiny)
    examples = [encode(tok, PROMPT, ANSWER, PREFIX, 256), encode(tok, PROMPT, ANSWER, "", 256)]
    cache = str(tmp_path / "cache")
    first, computed, cached = teacher_topk(examples, str(tiny), "tiny-fp", cache, H, "cpu")
    assert (computed, cached) == (2, 0) and first[0]["logp"].shape == (len(examples[0]["targets"]), 8)
    again, computed, cached = teacher_topk(examples, str(tiny), "tiny-fp", cache, H, "cpu")
    assert (computed, cached) == (0, 2) and torch.equal(again[1]["ids"], first[1]["ids"])
    # another teacher (its key) or another k is another entry
    _, computed, _ = teacher_topk(examples, str(tiny), "other", cache, H, "cpu")
    assert computed == 2
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    assert kd_loss(model, examples[0], first[0], 4, "cpu").item() == pytest.approx(0.0, abs=1e-5)
    with torch.no_grad():  # a perturbed student is away from its teacher, and the loss has a gradient
        model.get_decoder().layers[0].mlp.down_proj.weight.mul_(3.0)
    loss = kd_loss(model, examples[0], first[0], 4, "cpu")
    loss.backward()
    assert loss.item() > 1e-4 and model.get_decoder().layers[1].mlp.up_proj.weight.grad.abs().sum() > 0
