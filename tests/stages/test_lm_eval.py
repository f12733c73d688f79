"""The lm-eval stage and the lm-eval export: config checks, content keys and resume, the exported tasks
loading in lm-eval, a real run of lm-eval against a real vLLM server, and the agreement of lm-eval's score
with qreason's on the same generations.

lm-eval lives in its own environment (.venv-bench, made by scripts/setup-bench-env.sh; `make test` creates
it):
tests that need it run it as a subprocess and are skipped, with the reason, only where it is missing."""

from __future__ import annotations

import json
import subprocess
import threading

import pytest
from conftest import REPO, write_config

from qreason.config.schema import LmEvalConfig, parse_config
from qreason.engines.vllm_server import VLLMServer
from qreason.errors import UserError

BENCH_PYTHON = REPO / ".venv-bench" / "bin" / "python"
needs_bench = pytest.mark.skipif(
    not BENCH_PYTHON.is_file(),
    reason="lm-eval's environment .venv-bench is missing (scripts/setup-bench-env.sh)",
)


def bench(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    from qreason.stages.lm_eval.stage import lm_eval_env

    return subprocess.run(
        [str(BENCH_PYTHON), *args],
        capture_output=True,
        text=True,
        env=lm_eval_env(),
        timeout=timeout,
        cwd=REPO,
    )


# ------------------------------------------------------------------------------------------------ config


def test_lm_eval_config_validation_names_the_line():
    ok = parse_config("name: x\ntasks: [{name: synthetic}]\nlm_eval: [qreason_synthetic_mc]\n", "c.yaml")
    assert ok.lm_eval.tasks == ["qreason_synthetic_mc"] and ok.lm_eval.limit is None
    bad = {
        "lm_eval: {tasks: [a, a]}": "c.yaml:3: lm_eval.tasks: Value error, tasks must be unique",
        "lm_eval: {tasks: [a], limit: 0}": "c.yaml:3: lm_eval.limit:",
        "lm_eval: {tasks: [a], model_args: {base_url: http://x}}": "base_url",
        "lm_eval: {tasks: [a], bogus: 1}": "lm_eval.bogus",
        "lm_eval: {tasks: ['a b']}": "lm-eval task names",
        "backend: {kind: openai, base_url: 'http://x/v1'}\nlm_eval: [a]": "lm_eval needs backend.kind vllm",
        "lm_eval: {tasks: [a], variants: [gptq]}": "lm_eval.variants names no quantized variant",
    }
    for text, message in bad.items():
        with pytest.raises(UserError) as err:
            parse_config(f"name: x\ntasks: [{{name: synthetic}}]\n{text}\n", "c.yaml")
        assert message in str(err.value), (text, str(err.value))


def test_gate_on_lm_eval_metric_drop():
    from qreason.config.schema import GatesConfig
    from qreason.stages.gates import check_gates
    from qreason.summary import LmEvalSummary, RunSummary

    section = {
        "primary_metric": {"mc": "acc", "ppl": "word_perplexity"},
        "higher_is_better": {"mc": True, "ppl": False},
        "variants": {
            "base": {"mc": {"acc": 0.50}, "ppl": {"word_perplexity": 10.0}},
            "q": {"mc": {"acc": 0.42}, "ppl": {"word_perplexity": 10.03}},
            "r": {"mc": {"acc": 0.48}, "ppl": {"word_perplexity": 13.0}},
        },
    }
    summary = RunSummary(lm_eval=LmEvalSummary(**section))
    tripped = check_gates(GatesConfig(max_lm_eval_drop=0.05), summary, "base", None, [])
    assert len(tripped) == 2
    assert tripped[0].startswith("q/lm-eval mc: acc 0.42 is 0.08 worse than base")
    assert tripped[1].startswith("r/lm-eval ppl: word_perplexity 13 is 3 worse")
    assert check_gates(GatesConfig(max_lm_eval_drop=5), summary, "base", None, []) == []


def test_metric_names_and_recovery():
    from qreason.stages.lm_eval.stage import recovery_percent, split_metrics

    metrics, stderr = split_metrics(
        {
            "alias": "t",
            "acc,none": 0.5,
            "acc_stderr,none": 0.1,
            "exact_match,strict-match": 0.25,
            "exact_match_stderr,strict-match": "N/A",
        }
    )
    assert metrics == {"acc": 0.5, "exact_match:strict-match": 0.25}
    assert stderr == {"acc": 0.1, "exact_match:strict-match": None}
    assert recovery_percent(0.4, 0.5, True) == 80.0
    assert recovery_percent(12.5, 10.0, False) == 80.0
    assert recovery_percent(0.4, 0.0, True) is None


# --------------------------------------------------------------------------------------- keys and resume


@needs_bench
def test_stored_results_are_not_evaluated_again(tmp_path, monkeypatch):
    """Content keys: a (model, task) whose record is stored costs nothing; only the missing ones go to
    lm-eval, and changing an argument (the limit) makes new work."""
    import qreason.stages.lm_eval.stage as stage
    from qreason.config.schema import VLLMConfig
    from qreason.records import LmEvalResult
    from qreason.store import RunStore

    store = RunStore(tmp_path / "run")
    cfg = LmEvalConfig(tasks=["t1", "t2"], limit=5)
    backend = VLLMConfig()
    targets = [stage.LmEvalTarget("base", "/m", "fp-base"), stage.LmEvalTarget("q", "/q", "fp-q")]
    calls = []
    barrier = None

    def fake_evaluate(target, todo, cfg, backend, python, paths, version, args, store, lock, note=None):
        calls.append((target.name, [t for t, _ in todo]))
        if barrier is not None:
            barrier.wait()  # returns only once the other target is being evaluated too
        with lock:  # as the real _evaluate: the targets evaluated at once share the results table
            _store_fake(store, target, todo, version, args)
        return []

    def _store_fake(store, target, todo, version, args):
        store.lm_eval.append(
            [
                LmEvalResult(
                    key=key,
                    variant=target.name,
                    model_fingerprint=target.fingerprint,
                    task=task,
                    lm_eval_version=version,
                    args=args,
                    metrics={"acc": 0.5 if target.name == "base" else 0.4},
                    higher_is_better={"acc": True},
                    n_samples=5,
                    samples_file="x",
                    seconds=1.0,
                    created_at="now",
                )
                for task, key in todo
            ]
        )

    monkeypatch.setattr(stage, "_evaluate", fake_evaluate)
    first = stage.run_lm_eval(store, cfg, backend, targets, "base")
    assert calls == [("base", ["t1", "t2"]), ("q", ["t1", "t2"])] and first.evaluated == 4
    assert first.recovery == {"q": {"t1": 80.0, "t2": 80.0}} and first.primary_metric == {
        "t1": "acc",
        "t2": "acc",
    }
    calls.clear()
    again = stage.run_lm_eval(store, cfg, backend, targets, "base")
    assert calls == [] and again.evaluated == 0 and again.cached == 4 and again.variants == first.variants
    # a killed run that stored only some results resumes with the rest
    kept = [r for r in store.lm_eval.all() if not (r.variant == "q" and r.task == "t2")]
    store.lm_eval.path.write_text("".join(r.model_dump_json() + "\n" for r in kept))
    store = RunStore(tmp_path / "run")
    stage.run_lm_eval(store, cfg, backend, targets, "base")
    assert calls == [("q", ["t2"])]
    calls.clear()
    stage.run_lm_eval(store, cfg.model_copy(update={"limit": 6}), backend, targets[:1], "base")
    assert calls == [("base", ["t1", "t2"])]
    # parallel: 2 evaluates both models at once (each would wait forever for the other if they ran in turn)
    # and stores every result as one at a time does
    calls.clear()
    barrier = threading.Barrier(2, timeout=60)
    both = stage.run_lm_eval(
        store, cfg.model_copy(update={"limit": 7, "parallel": 2}), backend, targets, "base"
    )
    assert sorted(calls) == [("base", ["t1", "t2"]), ("q", ["t1", "t2"])] and both.evaluated == 4
    assert both.recovery == first.recovery and len(RunStore(tmp_path / "run").lm_eval.all()) == 10


def test_recovered_adapters_are_evaluated_as_merged_checkpoints(tmp_path):
    """After recovery, each variant's targeted adapter becomes an lm-eval target of its own, ``VARIANT+sb``:
    the dense checkpoint with the adapter merged in (vLLM 0.32 cannot compute prompt logprobs with a LoRA),
    keyed by the adapter, so its results never mix with the variant's. A recovery without a merged checkpoint
    (or whose checkpoint is gone) adds nothing."""
    import qreason.stages.lm_eval.stage as stage
    from qreason.config.schema import VLLMConfig
    from qreason.records import ModelVariant
    from qreason.store import seal
    from qreason.summary import RecoverySummary, VariantRecovery

    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "config.json").write_text("{}")
    seal(merged)
    variants = [
        ModelVariant(
            key=f"k{n}",
            name=n,
            base_model="m",
            base_fingerprint="fb",
            method=m,
            path=f"/ck/{n}",
            fingerprint=f"fp-{n}",
            created_at="now",
        )
        for n, m in (("base", "none"), ("rtn", "rtn-w4a16"))
    ]
    arms = [
        VariantRecovery.model_construct(
            variant="rtn", eval_variant=name, adapter_key=key, merged_checkpoint=path
        )
        for name, key, path in (
            ("rtn+sb", "ak1", str(merged)),
            ("rtn+gone", "ak2", str(tmp_path / "gone")),
            ("rtn+lora-only", "ak3", None),
        )
    ]
    recovery = RecoverySummary(variants=arms)
    targets = stage.targets_for(variants, recovery)
    assert [t.name for t in targets] == ["base", "rtn", "rtn+sb"]
    rec = targets[-1]
    assert (rec.path, rec.adapter_fingerprint) == (str(merged), "ak1") and rec.fingerprint != "fp-rtn"
    assert stage.result_key(rec, "t", "0.4.13", {}) != stage.result_key(targets[1], "t", "0.4.13", {})
    cmd = VLLMServer(VLLMConfig(), rec.path, rec.name, tmp_path / "log").command()
    assert "--enable-lora" not in cmd and cmd[cmd.index("--model") + 1] == str(merged)
    assert stage.targets_for(variants, None) == targets[:2]
    # lm_eval.variants: only the named variants (the stage adds the base); an adapter only with its variant
    assert [t.name for t in stage.targets_for(variants, recovery, {"base"})] == ["base"]
    assert [t.name for t in stage.targets_for(variants, recovery, {"base", "rtn"})] == [
        "base",
        "rtn",
        "rtn+sb",
    ]


def test_lm_eval_variants_picks_the_models_the_stage_evaluates(monkeypatch):
    from types import SimpleNamespace

    import qreason.stages.lm_eval.stage as stage
    from qreason.config.schema import RunConfig
    from qreason.records import ModelVariant

    seen = {}
    from qreason.summary import LmEvalSummary

    def fake_run(store, cfg, backend, targets, *rest):
        seen["t"] = targets
        return LmEvalSummary()

    monkeypatch.setattr(stage, "run_lm_eval", fake_run)
    variants = [
        ModelVariant(
            key=n,
            name=n,
            base_model="m",
            base_fingerprint="fb",
            method="x",
            path=f"/{n}",
            fingerprint=n,
            created_at="now",
        )
        for n in ("base", "rtn", "gptq")
    ]
    for picked, names in ((None, ["base", "rtn", "gptq"]), (["gptq"], ["base", "gptq"])):
        cfg = RunConfig.model_validate(
            {
                "name": "x",
                "tasks": [{"name": "synthetic"}],
                "quantize": [
                    {"method": "rtn-w4a16", "name": "rtn"},
                    {"method": "gptq-w4a16", "name": "gptq"},
                ],
                "lm_eval": {"tasks": ["t"], "variants": picked},
            }
        )
        ctx = SimpleNamespace(
            engines=None,
            cfg=cfg,
            summary=SimpleNamespace(recover=None),
            store=None,
            variants=variants,
            base_name="base",
            base_dir=None,
        )
        stage.LmEvalStage().run(ctx)
        assert [t.name for t in seen.pop("t")] == names


# ------------------------------------------------------------------------------------------------ export


def test_export_refuses_unknown_task(tmp_path, capsys):
    from qreason.cli import main

    assert main(["export-lm-eval", "--out", str(tmp_path / "x"), "--task", "nope"]) == 2
    assert "no task 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@needs_bench
def test_export_loads_in_lm_eval_task_manager(tmp_path):
    """The exported tasks load with TaskManager(include_path=DIR) and give qreason's problems and prompts."""
    from qreason.cli import main
    from qreason.config.schema import load_config
    from qreason.inputs.tasks import build_messages, load_problems

    config = write_config(
        tmp_path / "run.yaml",
        """
name: e
tasks:
  - {name: synthetic, limit: 7, format_example: true, params: {min_steps: 2, max_steps: 3, seed: 4}}
sampling: {max_tokens: 77}
""",
    )
    out = tmp_path / "export"
    assert main(["export-lm-eval", "--out", str(out), "--config", str(config)]) == 0
    # the task files, utils.py and the marker that makes the directory qreason's (a re-export may rewrite it)
    assert sorted(p.name for p in out.iterdir()) == [".qreason", "qreason_synthetic.yaml", "utils.py"]
    probe = tmp_path / "probe.py"
    probe.write_text("""
import json, sys
from lm_eval.tasks import TaskManager, get_task_dict
manager = TaskManager(include_path=sys.argv[1])
task = get_task_dict(["qreason_synthetic"], manager)["qreason_synthetic"]
docs = list(task.test_docs())
metrics = [m["metric"] for m in task.config.metric_list]
print(json.dumps({"n": len(docs), "first": docs[0], "gen": task.config.generation_kwargs,
                  "fewshot": task.config.num_fewshot, "metrics": metrics, "text": task.doc_to_text(docs[0])}))
""")
    done = bench(str(probe), str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    loaded = load_config(config)
    spec, problems = load_problems(loaded.config.tasks[0], loaded.base_dir)
    assert got["n"] == 7 and got["first"]["problem_id"] == problems[0].problem_id
    assert got["first"]["answer"] == problems[0].answer and got["first"]["question"] == problems[0].question
    assert got["text"] == build_messages(spec, problems[0], True)[-1]["content"]
    assert got["gen"]["max_gen_toks"] == 77 and got["gen"]["until"] == [] and got["fewshot"] == 1
    assert got["metrics"] == ["acc_strict", "acc_lenient"]


# ------------------------------------------------------------------------------- real runs (vLLM, lm-eval)


@pytest.fixture(scope="module")
def lm_run(vllm_backend, tmp_path_factory):
    """One qreason run of the synthetic task with an lm_eval section (qreason's own multiple-choice task, a
    few documents) on the base model: generation on the shared engine, lm-eval against a vLLM server."""
    if not BENCH_PYTHON.is_file():
        pytest.skip("lm-eval's environment .venv-bench is missing (scripts/setup-bench-env.sh)")
    from qreason.pipeline.runner import run

    tmp = tmp_path_factory.mktemp("lm")
    cfg = write_config(
        tmp / "run.yaml",
        """
name: lm
output_dir: out
tasks:
  - {name: synthetic, limit: 16, format_example: true, params: {min_steps: 1, max_steps: 2, ops: [add, sub]}}
sampling: {max_tokens: 64, seeds: [0]}
backend: {batch_size: 16, max_model_len: 2048}
curate: {enabled: false}
lm_eval: {tasks: [qreason_synthetic_mc], limit: 6, batch_size: 8}
""",
    )
    summary = run(cfg, backend=vllm_backend)
    return cfg, tmp / "out", summary


@pytest.mark.vllm
@pytest.mark.server
def test_run_records_lm_eval_and_rerun_makes_no_model_calls(lm_run, monkeypatch):
    from qreason.pipeline.runner import run
    from qreason.store import RunStore

    cfg, run_dir, summary = lm_run
    lm = summary.dump()["lm_eval"]
    assert lm["tasks"] == ["qreason_synthetic_mc"] and lm["evaluated"] == 1 and lm["failed"] == []
    metrics = lm["variants"]["base"]["qreason_synthetic_mc"]
    assert set(metrics) == {"acc", "acc_norm"} and 0.0 <= metrics["acc"] <= 1.0
    assert lm["primary_metric"] == {"qreason_synthetic_mc": "acc_norm"} and lm["n_samples"] == {
        "qreason_synthetic_mc": 6
    }
    (record,) = RunStore(run_dir).lm_eval.all()
    assert record.variant == "base" and record.lm_eval_version == "0.4.13" and record.args["limit"] == 6
    samples = (run_dir / record.samples_file).read_text().splitlines()
    assert len(samples) == 6 and "resps" in json.loads(samples[0])
    assert (run_dir / "lm_eval" / "logs" / "base.server.log").exists()
    report = (run_dir / "report.html").read_text()
    assert 'id="lm-eval"' in report and "qreason_synthetic_mc" in report

    def no_server(self):
        raise AssertionError("a re-run must not start a server")

    monkeypatch.setattr(VLLMServer, "__enter__", no_server)
    again = run(cfg).lm_eval
    assert again.evaluated == 0 and again.cached == 1 and again.variants == lm["variants"]


@pytest.mark.vllm
def test_lm_eval_scores_qreason_generations_exactly_like_qreason(lm_run, default_model, tmp_path):
    """Agreement: lm-eval, running the exported qreason_synthetic task on this run's own generations
    (replayed by an lm-eval model that serves only prompts qreason sent), gives every problem the score
    qreason gave it."""
    from qreason.cli import main
    from qreason.store import RunStore

    cfg, run_dir, summary = lm_run
    out = tmp_path / "export"
    assert main(["export-lm-eval", "--out", str(out), "--config", str(cfg)]) == 0
    result = tmp_path / "replay.json"
    done = bench(
        str(REPO / "tests" / "lm_eval_replay.py"),
        str(run_dir / "generations.jsonl"),
        str(out),
        "qreason_synthetic",
        default_model.path,
        str(result),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(result.read_text())
    grades = {g.problem_id: g for g in RunStore(run_dir).grades.all()}
    assert got["served"] == 16 and len(got["per_problem"]) == 16
    assert got["per_problem"] == {
        pid: [float(g.status == "correct"), float(g.lenient_status == "correct")] for pid, g in grades.items()
    }
    (row,) = summary.results
    assert got["metrics"]["acc_strict,none"] == pytest.approx(row.accuracy_mean, abs=1e-12)


@needs_bench
def test_unknown_lm_eval_task_is_refused_before_the_run_directory_exists(tmp_path):
    from qreason.pipeline.runner import make_plan

    cfg = write_config(
        tmp_path / "run.yaml",
        """
name: u
output_dir: out
tasks: [{name: synthetic, limit: 2}]
lm_eval: {tasks: [qreason_synthetic_mc, no_such_lm_eval_task]}
""",
    )
    with pytest.raises(UserError) as err:
        make_plan(cfg)
    assert str(err.value) == "lm_eval.tasks: no_such_lm_eval_task: lm-eval knows no task of this name"
    assert not (tmp_path / "out").exists()
