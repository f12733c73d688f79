"""The noise floor: perturbed base variants kept apart, flips against the noise with an exact test,
per-problem stability in curation, noise-aware gates, and the environment differences `qreason compare`
prints first."""

import json
import os

import pytest
from conftest import write_config
from fault_server import FaultServer
from run_builders import build_run, generation
from scipy.stats import fisher_exact

from qreason.config.schema import CurateConfig, GatesConfig, NoiseConfig, Perturbation, parse_config
from qreason.errors import UserError
from qreason.inputs.synthetic import generate as synthetic_rows
from qreason.records import Grade, Judgment, Problem
from qreason.stages.curate import build_items, export, find_candidates
from qreason.stages.gates import check_gates
from qreason.stages.noise import noise_summary, perturbed_requests, problem_stability
from qreason.store import RunStore
from qreason.summary import NoiseSummary, ResultRow, RunSummary, VariantVsNoise

BASE_CFG = "name: n\ntasks: [{name: synthetic, limit: 4}]\n"


def grade(variant: str, pid: str, ok: bool, seed: int = 0, task: str = "synthetic") -> Grade:
    return Grade(
        key=f"g-{variant}-{task}-{pid}-{seed}",
        generation_key=f"{variant}-{task}-{pid}-{seed}",
        variant=variant,
        task=task,
        problem_id=pid,
        seed=seed,
        status="correct" if ok else "wrong",
        extracted="1",
        reference="1",
        grader="t",
    )


# ---------------------------------------------------------------------------------------------- the config


def test_noise_config_and_reserved_names():
    cfg = parse_config(BASE_CFG + "noise: true\n", "c.yaml")
    assert cfg.noise.enabled and [p.name for p in cfg.noise.perturbations] == ["batch16"]
    with pytest.raises(UserError, match="may not contain '~'"):
        parse_config(BASE_CFG + "quantize: [{method: rtn-w4a16, name: base~x}]\n", "c.yaml")
    with pytest.raises(UserError, match=r"c.yaml:4: noise.perturbations.0.name: .*slug"):
        parse_config(BASE_CFG + "noise:\n  perturbations: [{name: 'a b'}]\n", "c.yaml")
    with pytest.raises(UserError, match="must be unique"):
        parse_config(BASE_CFG + "noise: {perturbations: [{name: a}, {name: a}]}\n", "c.yaml")
    with pytest.raises(UserError, match="drop_over_noise needs the noise floor"):
        parse_config(BASE_CFG + "gates: {drop_over_noise: true}\n", "c.yaml")
    with pytest.raises(UserError, match="need backend vllm"):
        parse_config(
            BASE_CFG + "backend: {kind: openai, base_url: 'http://x'}\n"
            "noise: {perturbations: [{name: nocache, engine_args: {enable_prefix_caching: false}}]}\n",
            "c.yaml",
        )


def test_perturbed_requests_have_their_own_variant_and_keys():
    from qreason.engines import GenerationRequest

    reqs = [GenerationRequest(f"k{i}", "base", "fp", "t", str(i), [], 0) for i in range(4)]
    same = perturbed_requests(reqs, "base", Perturbation(name="same"))
    rev = perturbed_requests(reqs, "base", Perturbation(name="rev", order="reverse"))
    assert {r.variant for r in same} == {"base~same"} and {r.variant for r in rev} == {"base~rev"}
    assert not {r.key for r in same} & {r.key for r in reqs} and not {r.key for r in same} & {
        r.key for r in rev
    }
    assert [r.problem_id for r in rev] == ["3", "2", "1", "0"]
    assert perturbed_requests(reqs, "base", Perturbation(name="same")) == same  # stable keys: re-runs skip


# ---------------------------------------------------------------------------------------------- statistics


def test_noise_summary_counts_flips_and_tests_the_variant_against_the_noise():
    n = 20
    main = [grade("base", str(i), True) for i in range(n)]
    main += [grade("rtn", str(i), i >= 8) for i in range(n)]  # 8 lost
    main += [grade("gptq", str(i), i != 0) for i in range(n)]  # 1 lost
    noise = [grade("base~b16", str(i), i != 5) for i in range(n)]  # 1 lost
    noise += [grade("base~same", str(i), True) for i in range(n)]  # none
    texts = {("base", ("synthetic", str(i), 0)): "t" for i in range(n)}
    texts |= {("base~b16", ("synthetic", str(i), 0)): "t" if i > 1 else "other" for i in range(n)}
    texts |= {("base~same", ("synthetic", str(i), 0)): "t" for i in range(n)}
    cfg = NoiseConfig(perturbations=[Perturbation(name="b16", batch_size=16), Perturbation(name="same")])
    s = noise_summary(main, noise, texts, "base", ["rtn", "gptq"], cfg)
    b16, same = s.perturbations
    assert (b16.variant, b16.cells, b16.lost, b16.gained, b16.text_changed) == ("base~b16", n, 1, 0, 2)
    assert b16.settings == {"batch_size": 16} and b16.accuracy == pytest.approx(19 / 20)
    assert (same.flips, same.text_changed, same.settings) == (0, 0, {})
    assert s.floor == {"synthetic": pytest.approx(0.05)}
    rtn, gptq = s.variants
    assert (rtn.variant, rtn.lost, rtn.gained, rtn.noise_flips, rtn.noise_cells) == ("rtn", 8, 0, 1, 2 * n)
    assert rtn.p_value == pytest.approx(fisher_exact([[8, 12], [1, 39]], alternative="greater").pvalue)
    assert rtn.p_by_perturbation["same"] == pytest.approx(
        fisher_exact([[8, 12], [0, 20]], alternative="greater").pvalue
    )
    assert rtn.exceeds_noise and not gptq.exceeds_noise
    # one seed: the base has three repetitions (itself and two re-runs), the variants one each
    assert s.repetitions == {"base": 3, "rtn": 1, "gptq": 1}
    # rtn's flip on problem 5 is unstable: the base failed it when re-run with batch 16
    assert rtn.stable_flips == 7 and gptq.stable_flips == 1
    # problem 5 flipped under noise: its base rate is 2/3, below the 0.9 of a stable flip
    main.append(grade("rtn", "5", False, seed=1))
    stab = problem_stability(main, noise, "base", cfg.stability)
    assert stab[("rtn", "synthetic", "5")].stable is False and stab[("rtn", "synthetic", "6")].stable is True
    assert problem_stability(main, [], "base", cfg.stability)[("rtn", "synthetic", "6")].stable is None


# ----------------------------------------------------------------------------------- curation with stability


def flips_store(tmp_path, n: int, unstable: set[int]) -> RunStore:
    """``n`` problems the base solves and rtn fails (judged, first faulty step 1); the base re-run under a
    perturbation fails the problems in ``unstable`` (their flips are noise)."""
    store = RunStore(tmp_path / "run")
    failed = "Step 1: Start.\nStep 2: 2 + 2 = 5.\nThe final answer is \\boxed{5}."
    for i in range(n):
        pid = str(i)
        store.problems.append(
            [
                Problem(
                    key=f"p{i}",
                    task="synthetic",
                    problem_id=pid,
                    question="q",
                    answer="4",
                    answer_type="number",
                )
            ]
        )
        store.generations.append(
            [
                generation(f"base-synthetic-{pid}-0", "base", pid, "Step 1: 2 + 2 = 4.\n\\boxed{4}"),
                generation(f"rtn-synthetic-{pid}-0", "rtn", pid, failed),
            ]
        )
        store.grades.append([grade("base", pid, True), grade("rtn", pid, False)])
        store.noise_grades.append([grade("base~b16", pid, i not in unstable)])
        store.judgments.append(
            [
                Judgment(
                    key=f"j{i}",
                    generation_key=f"rtn-synthetic-{pid}-0",
                    variant="rtn",
                    task="synthetic",
                    problem_id=pid,
                    seed=0,
                    judge="rules",
                    first_error_step=1,
                    error_type="Execution",
                    capability="numerical computation",
                    flip=True,
                    created_at="now",
                )
            ]
        )
    return store


def test_curation_picks_only_stable_flips_when_there_are_enough(tmp_path):
    store = flips_store(tmp_path, 6, unstable={1, 4})
    cands = find_candidates(store, "base")
    assert len(cands) == 6

    def items(**cfg):
        return build_items(store, cands, {}, "base", CurateConfig(test_fraction=0.0, **cfg), {}, "r")

    enough = items(min_stable_items=4)
    assert sorted(it.problem_id for it in enough) == ["0", "2", "3", "5"]
    assert all(it.stability == {**it.stability, "stable": True, "base_reps": 2} for it in enough)
    few = items(min_stable_items=5)  # not enough stable flips: all of them, stable ones first
    assert len(few) == 6 and [it.stability["stable"] for it in few[:4]] == [True] * 4
    assert sorted(it.problem_id for it in items(stability="only", min_stable_items=50)) == [
        "0",
        "2",
        "3",
        "5",
    ]
    assert len(items(stability="off", min_stable_items=1)) == 6
    provenance = {"candidates": 6, "stable_candidates": 4, "stability": "prefer"}
    out = export(few, tmp_path / "sb", provenance)
    card = (out / "README.md").read_text()
    assert "Stability: 4 of 6 items are stable flips" in card
    rows = [json.loads(line) for line in (out / "sft" / "train.jsonl").read_text().splitlines()]
    assert sorted(r["stable"] for r in rows) == [False, False, True, True, True, True]


def test_curation_without_repetitions_says_stability_is_unknown(tmp_path):
    store = flips_store(tmp_path, 2, unstable=set())
    store.noise_grades.path.unlink()
    store = RunStore(store.dir)
    got = build_items(store, find_candidates(store, "base"), {}, "base", CurateConfig(), {}, "r")
    assert len(got) == 2 and all(it.stability is None for it in got)
    card = (export(got, tmp_path / "sb", {}) / "README.md").read_text()
    assert "Stability: unknown" in card


# -------------------------------------------------------------------------------------------------- gates


def row(variant: str, acc: float) -> ResultRow:
    return ResultRow(
        variant=variant,
        task="synthetic",
        n_problems=20,
        seeds=[0],
        accuracy_per_seed={0: acc},
        accuracy_mean=acc,
        accuracy_std=0.0,
        outcomes={},
    )


def test_drop_over_noise_holds_a_drop_the_noise_explains():
    vs = VariantVsNoise(variant="rtn", task="synthetic", cells=20, lost=2, p_value=0.3, exceeds_noise=False)
    summary = RunSummary(
        results=[row("base", 0.5), row("rtn", 0.4)],
        noise=NoiseSummary(base="base", floor={"synthetic": 0.02}, variants=[vs]),
    )
    gates = GatesConfig(max_drop=0.05, drop_over_noise=True)
    held: list[str] = []
    assert check_gates(gates, summary, "base", None, [], held) == []
    assert "does not exceed the noise's" in held[0] and "p = 0.3" in held[0]
    summary.noise.floor = {"synthetic": 0.15}
    held = []
    assert check_gates(gates, summary, "base", None, [], held) == [] and "within the noise floor" in held[0]
    summary.noise.floor = {"synthetic": 0.02}
    summary.noise.variants = [vs.model_copy(update={"exceeds_noise": True, "p_value": 0.001})]
    assert len(check_gates(gates, summary, "base", None, [])) == 1
    assert len(check_gates(GatesConfig(max_drop=0.05), summary, "base", None, [])) == 1


def test_trend_gate_is_banded_by_the_base_spread_over_recent_runs():
    history = [
        RunSummary(run_id=f"r{i}", results=[row("base", a), row("rtn", 0.5)])
        for i, a in enumerate([0.5, 0.6])
    ]
    previous = history[-1]
    today = RunSummary(run_id="now", results=[row("base", 0.52), row("rtn", 0.42)])  # rtn 8 points down
    gates = GatesConfig(max_drop_vs_previous=0.05, trend_band_runs=3)
    held: list[str] = []
    assert check_gates(gates, today, "base", previous, [], held, history) == []
    base_line, rtn_line = held  # the base itself fell 8 points too, within its own band
    assert base_line.startswith("base/synthetic") and rtn_line.startswith("rtn/synthetic: accuracy 42.0%")
    assert "within the band of the base's spread over the last 3 runs (10.0 points)" in rtn_line
    assert len(check_gates(GatesConfig(max_drop_vs_previous=0.05), today, "base", previous, [])) == 2
    today.results[1] = row("rtn", 0.3)  # 20 points down: beyond the band
    tripped = check_gates(gates, today, "base", previous, [], [], history)
    assert tripped == [t for t in tripped if "rtn/synthetic" in t] and "base's band 10.0" in tripped[0]


# ------------------------------------------------------------------------------------------------ compare


def test_compare_prints_environment_differences_first(tmp_path, capsys):
    from qreason.cli import main
    from qreason.pipeline.provenance import environment

    a, b = build_run(tmp_path / "a"), build_run(tmp_path / "b")
    env = environment()
    env_a = {**env, "hardware": {**env["hardware"], "cpu_flags": ["avx2", "fma", "sse4_2"]}}
    env_a["backend"] = {"kind": "vllm", "batch_size": 64, "engine_args": {}}
    env_b = {**env, "hardware": {**env["hardware"], "cpu_flags": ["avx2", "avx512f", "fma"]}}
    env_b["backend"] = {"kind": "vllm", "batch_size": 16, "engine_args": {}}
    a.write_json("environment.json", env_a)
    b.write_json("environment.json", env_b)
    assert main(["compare", str(a.dir), str(b.dir)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("the environments differ")
    assert "  backend.batch_size: 64 -> 16" in lines[1:3]
    assert "  hardware.cpu_flags: B adds avx512f; B lacks sse4_2" in lines[1:3]
    assert out.index("hardware.cpu_flags") < out.index("variant")  # before any number
    b.write_json("environment.json", env_a)
    assert main(["compare", str(a.dir), str(b.dir)]) == 0
    assert capsys.readouterr().out.startswith("the environments match")


# --------------------------------------------------------------------------------- a run with a noise floor

ANSWERS = {r["question"]: r["answer"] for r in synthetic_rows(n=6, seed=0)}


def reply(body: dict) -> str:
    question = body["messages"][-1]["content"].split("Problem: ", 1)[1]
    return f"Step 1: I count.\nThe final answer is \\boxed{{{ANSWERS[question]}}}."


def test_a_noise_run_keeps_its_perturbed_variants_apart_and_a_rerun_generates_nothing(tmp_path, monkeypatch):
    from qreason.pipeline.runner import run

    monkeypatch.setenv("RUN_ROOT", str(tmp_path / "out"))
    with FaultServer([], content=reply) as server:
        cfg = write_config(
            tmp_path / "noisy.yaml",
            f"""
name: noisy
output_dir: ${{RUN_ROOT}}/noisy
model: {{path: endpoint-model}}
tasks: [{{name: synthetic, limit: 6}}]
sampling: {{max_tokens: 64, seeds: [0, 1]}}
backend: {{kind: openai, base_url: "{server.base_url}", model: m, max_retries: 0, batch_size: 4}}
noise:
  perturbations: [{{name: batch1, batch_size: 1}}, {{name: shuffled, order: shuffle}}]
""",
        )
        first = run(cfg)
        n_requests = len(server.requests)
        second = run(cfg)
        assert len(server.requests) == n_requests  # nothing asked of the endpoint again
    # base and two perturbations, 6 problems each; two seeds at temperature 0 share one request per prompt
    assert n_requests == 3 * 6
    noise = first.noise
    assert [(p.variant, p.cells, p.flips) for p in noise.perturbations] == [
        ("base~batch1", 12, 0),
        ("base~shuffled", 12, 0),
    ]
    assert noise.repetitions == {"base": 6} and noise.variants == []
    assert (noise.planned, noise.produced) == (24, 24)
    assert (second.noise.produced, second.noise.cached, second.generations.produced) == (0, 24, 0)
    run_dir = tmp_path / "out" / "noisy"
    assert {r.variant for r in first.results} == {"base"}
    for table in ("generations.jsonl", "grades.jsonl", "judgments.jsonl"):
        path = run_dir / table
        variants = (
            {json.loads(x)["variant"] for x in path.read_text().splitlines()} if path.exists() else set()
        )
        assert not any("~" in v for v in variants), table
    noisy = [json.loads(x) for x in (run_dir / "noise" / "generations.jsonl").read_text().splitlines()]
    assert {g["variant"] for g in noisy} == {"base~batch1", "base~shuffled"} and len(noisy) == 24
    assert len((run_dir / "noise" / "grades.jsonl").read_text().splitlines()) == 24
    env = json.loads((run_dir / "environment.json").read_text())
    assert env["backend"]["batch_size"] == 4 and env["noise"][0] == {"name": "batch1", "batch_size": 1}
    assert env["hardware"]["cpu_flags"] == sorted(env["hardware"]["cpu_flags"])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["noise"]["perturbations"][0]["variant"] == "base~batch1"
    html = (run_dir / "report.html").read_text()
    assert 'id="noise"' in html and "base~shuffled" in html
    assert os.path.exists(run_dir / "noise" / "grades.jsonl")


# ------------------------------------------------------------------------------------- a real vLLM engine


@pytest.mark.vllm
def test_noise_floor_on_a_real_engine(vllm_backend, default_model, tmp_path):
    """The shared engine (batch 32, prefix caching off) re-runs the base: with identical settings nothing
    changes; with batch 4 the re-run is recorded as base~batch4 and nowhere else."""
    from qreason.pipeline.runner import run

    cfg = write_config(
        tmp_path / "run.yaml",
        f"""
name: noisy
output_dir: out
model: {{path: {default_model.path}}}
quantize: [{{method: rtn-w4a16, overrides: {{group_size: 64}}}}]
tasks:
  - name: synthetic
    limit: 8
    format_example: true
    params: {{min_steps: 1, max_steps: 1, ops: [add], max_number: 9}}
sampling: {{max_tokens: 48, seeds: [0]}}
backend: {{batch_size: 32, max_model_len: 2048, engine_args: {{enable_prefix_caching: false}}}}
noise:
  perturbations: [{{name: same}}, {{name: batch4, batch_size: 4}}]
""",
    )
    first = run(cfg, backend=vllm_backend)
    same, batch4 = first.noise.perturbations
    assert (same.variant, same.cells, same.flips, same.text_changed) == ("base~same", 8, 0, 0)
    assert (batch4.variant, batch4.cells, batch4.settings) == ("base~batch4", 8, {"batch_size": 4})
    (vs,) = first.noise.variants
    assert vs.variant == "rtn-w4a16" and vs.cells == 8 and 0 <= vs.p_value <= 1
    assert vs.noise_cells == 16 and vs.noise_flips == batch4.flips
    # the perturbed base is in noise/ only: not in the variant tables, judging, curation or variants.jsonl
    run_dir = tmp_path / "out"
    assert {r.variant for r in first.results} == {"base", "rtn-w4a16"}
    for name in ("generations.jsonl", "grades.jsonl", "judgments.jsonl", "variants.jsonl"):
        path = run_dir / name
        text = path.read_text() if path.exists() else ""
        assert "base~" not in text, name
    items = run_dir / "silver_bullet" / "items.jsonl"
    assert not items.exists() or "base~" not in items.read_text()
    noisy = [json.loads(x) for x in (run_dir / "noise" / "generations.jsonl").read_text().splitlines()]
    assert sorted({g["variant"] for g in noisy}) == ["base~batch4", "base~same"] and len(noisy) == 16
    env = json.loads((run_dir / "environment.json").read_text())
    assert env["engines"]["base"]["enable_prefix_caching"] is False
    assert env["engines"]["base"]["max_num_seqs"] >= 1 and env["engines"]["base"]["dtype"]
    assert env["engines"]["rtn-w4a16"]["quantization"] == "compressed-tensors"
    second = run(cfg)  # no engine given: one would start only if there were work
    assert (second.generations.produced, second.noise.produced, second.noise.cached) == (0, 0, 16)
    assert second.noise.perturbations == first.noise.perturbations


def test_environment_settings_keep_no_path_or_endpoint():
    from qreason.pipeline.provenance import run_settings

    cfg = parse_config(
        BASE_CFG + "backend: {engine_args: {download_dir: /home/me/models, max_num_seqs: 16}}\nnoise: true\n",
        "c.yaml",
    )
    got = run_settings(cfg)
    assert got["backend"]["engine_args"] == {"download_dir": "(path)", "max_num_seqs": 16}
    assert got["noise"] == [{"name": "batch16", "batch_size": 16}] and got["sampling"]["seeds"] == [0]
