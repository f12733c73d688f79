#!/usr/bin/env python
"""How much does qreason cost on top of the engine, and how does it compare with lm-evaluation-harness?

One run, the same N GSM8K prompts throughout (the first N rows of the local GSM8K test file, read by qreason's
own task loader), the embedded default model, greedy decoding, the same max_tokens:

(a) generation overhead: one vLLM engine (qreason's ``VLLMBackend``), a warm-up call, then alternately
    raw ``llm.chat`` on the prompts and qreason's ``run_generation`` into a fresh run store; medians and the
    overhead in percent (target: at most 5 %). Token counts and texts of both are compared so the reader sees
    the work was the same.
(b) end to end: ``python -m qreason.cli run`` (engine start, generation, Math-Verify grading) in a fresh
    output directory against lm-eval with a task YAML rendering the same user prompt through the same chat
    template, either ``lm_eval --model hf`` or (``--lm-eval-via server``) ``vllm serve`` plus ``lm_eval
    --model local-completions``, the way a user drives vLLM from lm-eval; wall times, accuracies and the
    speed ratio (target against hf: qreason at least 4x faster).
    The prompts lm-eval actually sent are checked against qreason's.

Everything the benchmark writes (the run config, the lm-eval task, the runs, the results JSON) goes to
bench/out/ (or --out DIR). --smoke: 2 prompts, 8 tokens, one repetition, so that a test runs every code path
quickly (the numbers then mean nothing).
lm-eval lives in its own environment (.venv-bench, made by scripts/setup-bench-env.sh).

    .venv/bin/python bench/generation_overhead.py [--n 64] [--max-tokens 256] [--repeats 3] [--model M]
                                                  [--lm-eval-via hf|server]
                                                  [--skip-raw] [--skip-lm-eval] [--full-pipeline]
                                                  [--out DIR] [--smoke]

(b) runs first (its subprocesses start their own engines), then (a) in this process. Timings on a shared
machine are noisy: the load average is recorded before and after each measurement, and process CPU time next
to wall time; vLLM's CPU backend pins its threads to cores and suffers badly when other processes compete for
them.
"""

from __future__ import annotations

import argparse
import gc
import glob
import inspect
import json
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

OUT = REPO / "bench" / "out"
DEFAULT_DATA = REPO.parent / "shared" / "data" / "gsm8k_test.jsonl"
DEFAULT_LM_EVAL = REPO / ".venv-bench" / "bin" / "lm_eval"
TASK_NAME = "qreason_gsm8k_bench"
FILTER_NAME = "last_boxed"  # the accuracy compared: the last \boxed{...} against the answer after ####
FALLBACK_FILTER = (
    "last_number"  # reported beside it: the last number in the text (lm-eval's flexible-extract)
)
# The environment as it was when the script started: subprocesses get this, not what the in-process engine
# set.
BASE_ENV = dict(os.environ)
SUBPROCESS_ENV = {**BASE_ENV, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def log(msg: str = "") -> None:
    print(msg, flush=True)


def load_avg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# ---------------------------------------------------------------------------------------------------- inputs


def write_run_config(
    path: Path, data: Path, n: int, max_tokens: int, full_pipeline: bool, model: str = "default"
) -> Path:
    """The qreason run config both parts use: the gsm8k task on the local file, greedy, one seed.
    Unless ``full_pipeline``, the stages lm-eval has no counterpart for (HTML report, curation) are off."""
    import yaml

    from qreason.config.schema import RunConfig

    config: dict = {
        "name": "bench-gsm8k",
        "model": {"path": model},
        "tasks": [{"name": "gsm8k", "data": str(data), "limit": n, "format_example": False}],
        "sampling": {"temperature": 0.0, "top_p": 1.0, "max_tokens": max_tokens, "seeds": [0]},
    }
    if not full_pipeline:
        for stage in ("report", "curate"):
            if stage in RunConfig.model_fields:
                config[stage] = {"enabled": False}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "# Written by bench/generation_overhead.py; overwritten on every run.\n"
        + yaml.safe_dump(config, sort_keys=False),
        encoding="utf-8",
    )
    return path


def jinja_literal(text: str) -> str:
    """``text`` as a Jinja template that renders to exactly ``text`` (checked against lm-eval's logged
    prompts)."""
    if "endraw" in text:
        raise SystemExit("bench: the prompt template contains 'endraw'; it cannot be quoted for Jinja")
    return "{% raw %}" + text + "{% endraw %}" if text else ""


def write_lm_eval_task(task_dir: Path, data: Path, max_tokens: int) -> Path:
    """A custom lm-eval task: the local GSM8K file, qreason's user prompt, greedy, last \\boxed{} vs ####."""
    import yaml

    from qreason.inputs.tasks import load_prompt, load_spec

    tmpl = load_prompt(load_spec("gsm8k").prompt)
    if tmpl.system:
        raise SystemExit(
            "bench: the gsm8k prompt has a system message; the lm-eval task here renders only "
            "the user turn (pass it with --system_instruction)"
        )
    before, placeholder, after = tmpl.user.partition("{question}")
    if not placeholder:
        raise SystemExit("bench: the gsm8k user prompt has no {question} placeholder")
    task = {
        "task": TASK_NAME,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": jinja_literal(before) + "{{question}}" + jinja_literal(after),
        # qreason's answer: what follows '####', without thousands separators
        "doc_to_target": "{{answer.split('####')[-1].strip().replace(',', '')}}",
        "num_fewshot": 0,
        "generation_kwargs": {
            "until": [],
            "max_gen_toks": max_tokens,
            "do_sample": False,
            "temperature": 0.0,
        },
        "filter_list": [
            {
                "name": FILTER_NAME,
                "filter": [
                    {"function": "regex", "regex_pattern": r"\\boxed\{([^{}]*)\}", "group_select": -1},
                    {"function": "take_first"},
                ],
            },
            {
                "name": FALLBACK_FILTER,
                "filter": [
                    {
                        "function": "regex",
                        "regex_pattern": r"(-?[$0-9.,]{2,})|(-?[0-9]+)",
                        "group_select": -1,
                    },
                    {"function": "take_first"},
                ],
            },
        ],
        "metric_list": [
            {
                "metric": "exact_match",
                "aggregation": "mean",
                "higher_is_better": True,
                "ignore_case": True,
                "ignore_punctuation": False,
                "regexes_to_ignore": [",", r"\$", r"\.$", r"^\s+", r"\s+$"],
            }
        ],
        "metadata": {"version": 1.0},
    }
    if task_dir.exists():
        shutil.rmtree(task_dir)
    task_dir.mkdir(parents=True)
    path = task_dir / f"{TASK_NAME}.yaml"
    path.write_text(
        "# Written by bench/generation_overhead.py; overwritten on every run.\n"
        + yaml.safe_dump(task, sort_keys=False, allow_unicode=True, width=1000),
        encoding="utf-8",
    )
    return path


def build_requests(config_path: Path):
    """(config, model, requests) exactly as ``qreason run`` builds them for the base model: qreason's task
    loader, prompt builder and request keys, the model resolved from the config ('default')."""
    from qreason.config.schema import load_config
    from qreason.engines import make_request
    from qreason.inputs.models import resolve_model
    from qreason.inputs.tasks import build_messages, load_problems

    loaded = load_config(config_path)
    cfg = loaded.config
    model = resolve_model(cfg.model.path, cfg.model.revision, loaded.base_dir)
    requests = []
    for task_cfg in cfg.tasks:
        spec, problems = load_problems(task_cfg, loaded.base_dir)
        for p in problems:
            messages = build_messages(spec, p, task_cfg.format_example)
            requests.extend(
                make_request(cfg.model.name, model, p, messages, cfg.sampling, seed)
                for seed in cfg.sampling.seeds
            )
    return cfg, model, requests


def problem_id(req) -> str:
    pid = getattr(req, "problem_id", None)
    return str(pid if pid is not None else req.problem.problem_id)


# ------------------------------------------------------------------------------------ (a) generation overhead


def measure_overhead(cfg, requests: list, repeats: int, out_dir: Path) -> dict:
    """Raw ``llm.chat`` vs qreason's ``run_generation`` on one engine, alternating, after a warm-up."""
    from vllm import SamplingParams

    from qreason.engines.vllm import VLLMBackend
    from qreason.inputs.models import resolve_model
    from qreason.stages.generate import run_generation
    from qreason.store import RunStore

    sampling = cfg.sampling
    log("\n[a] starting the engine (qreason's VLLMBackend)")
    t0 = time.perf_counter()
    backend = VLLMBackend(cfg.backend, resolve_model(cfg.model.path))
    engine_start_s = time.perf_counter() - t0
    log(f"[a] engine started in {engine_start_s:.1f} s")
    messages = [r.messages for r in requests]
    params = [
        SamplingParams(
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_tokens=sampling.max_tokens,
            seed=r.seed,
        )
        for r in requests
    ]

    # run_generation takes the run store, or (newer qreason) the store's generations table
    wants_table = next(iter(inspect.signature(run_generation).parameters)) == "table"

    def raw() -> tuple[float, float, int, list[str]]:
        t, c = time.perf_counter(), time.process_time()
        outs = backend.llm.chat(messages, params, use_tqdm=False)
        dt, dc = time.perf_counter() - t, time.process_time() - c
        return dt, dc, sum(len(o.outputs[0].token_ids) for o in outs), [o.outputs[0].text for o in outs]

    def qreason() -> tuple[float, float, int, list[str]]:
        with tempfile.TemporaryDirectory(dir=out_dir, prefix="overhead-store-") as tmp:
            t, c = time.perf_counter(), time.process_time()
            store = RunStore(Path(tmp) / "run")
            stats = run_generation(store.generations if wants_table else store, requests, backend, sampling)
            dt, dc = time.perf_counter() - t, time.process_time() - c
            if stats.failed or stats.produced != len(requests):
                raise RuntimeError(
                    f"qreason produced {stats.produced} of {len(requests)} ({stats.failed} failed)"
                )
            by_key = {g.key: g for g in RunStore(Path(tmp) / "run").generations.all()}  # read back from disk
            texts = [by_key[r.key].text for r in requests]
            return dt, dc, sum(by_key[r.key].completion_tokens or 0 for r in requests), texts

    try:
        log("[a] warm-up (raw llm.chat on every prompt, not timed)")
        warm_s, _, _, _ = raw()
        log(f"[a] warm-up took {warm_s:.1f} s")
        runs: dict[str, list[dict]] = {"raw": [], "qreason": []}
        texts: dict[str, list[str]] = {}
        fns = {"raw": raw, "qreason": qreason}
        for i in range(repeats):
            order = ("raw", "qreason") if i % 2 == 0 else ("qreason", "raw")  # ABBA: drift hits both alike
            for name in order:
                dt, dc, toks, txt = fns[name]()
                runs[name].append(
                    {
                        "seconds": round(dt, 3),
                        "cpu_seconds": round(dc, 3),
                        "completion_tokens": toks,
                        "load_avg": load_avg(),
                    }
                )
                texts.setdefault(name, txt)
                if txt != texts[name]:
                    log(
                        f"[a] note: {name} repetition {i + 1} produced different texts from its first "
                        "repetition"
                    )
                log(
                    f"[a] rep {i + 1}/{repeats} {name:<8} {dt:7.2f} s wall  {dc:7.2f} s cpu  {toks} tokens  "
                    f"({toks / dt:.0f} tok/s)  load {load_avg()}"
                )
    finally:
        backend_kwargs = dict(backend.kwargs)
        backend.close()
        gc.collect()
    med = {k: statistics.median(r["seconds"] for r in v) for k, v in runs.items()}
    med_cpu = {k: statistics.median(r["cpu_seconds"] for r in v) for k, v in runs.items()}
    identical = sum(a == b for a, b in zip(texts["raw"], texts["qreason"], strict=True))
    return {
        "engine_kwargs": backend_kwargs,
        "batch_size": cfg.backend.batch_size,
        "engine_start_seconds": round(engine_start_s, 2),
        "warmup_seconds": round(warm_s, 2),
        "repeats": repeats,
        "runs": runs,
        "median_seconds": {k: round(v, 3) for k, v in med.items()},
        "min_seconds": {k: min(r["seconds"] for r in v) for k, v in runs.items()},
        "median_cpu_seconds": {k: round(v, 3) for k, v in med_cpu.items()},
        "cpu_overhead_percent": round(100 * (med_cpu["qreason"] / med_cpu["raw"] - 1), 2),
        "completion_tokens": {k: v[0]["completion_tokens"] for k, v in runs.items()},
        "identical_texts": identical,
        "n_prompts": len(requests),
        "ratio": round(med["qreason"] / med["raw"], 4),
        "overhead_percent_of_min": round(
            100 * (min(r["seconds"] for r in runs["qreason"]) / min(r["seconds"] for r in runs["raw"]) - 1), 2
        ),
        "overhead_percent": round(100 * (med["qreason"] / med["raw"] - 1), 2),
        "target_overhead_percent": 5.0,
    }


# ------------------------------------------------------------------------------------------ (b) end to end


def run_timed(cmd: list[str], log_path: Path, extra_env: dict[str, str] | None = None) -> tuple[float, int]:
    """Run a command in the repository, its output to ``log_path``; (wall seconds, exit code)."""
    log(f"    $ {shlex.join(cmd)}")
    log(f"    (output: {log_path})")
    with open(log_path, "w", encoding="utf-8") as fh:
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        t = time.perf_counter()
        rc = subprocess.call(
            cmd, cwd=REPO, env={**SUBPROCESS_ENV, **(extra_env or {})}, stdout=fh, stderr=subprocess.STDOUT
        )
        dt = time.perf_counter() - t
        ru2 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (ru2.ru_utime - ru.ru_utime) + (ru2.ru_stime - ru.ru_stime)
    log(f"    {dt:.1f} s wall, {cpu:.1f} s cpu (its processes), exit {rc}")
    return dt, cpu, rc


def tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def run_qreason_e2e(config: Path, run_dir: Path) -> dict:
    log("\n[b] qreason end to end: python -m qreason.cli run (engine start, generation, grading)")
    if run_dir.exists():
        shutil.rmtree(run_dir)
    cmd = [sys.executable, "-m", "qreason.cli", "run", str(config), "--output-dir", str(run_dir)]
    before = load_avg()
    # the bench's runs are indexed apart from the user's runs/index.sqlite
    wall, cpu, rc = run_timed(
        cmd, run_dir.parent / "qreason.log", {"QREASON_INDEX": str(run_dir.parent / "index.sqlite")}
    )
    if rc != 0:
        raise SystemExit(f"bench: qreason run failed (exit {rc}):\n{tail(run_dir.parent / 'qreason.log')}")
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    row = summary["results"][0]
    gens = [
        json.loads(line)
        for line in (run_dir / "generations.jsonl").read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]
    log(f"[b] qreason: {wall:.1f} s wall, accuracy {100 * row['accuracy_mean']:.1f} %")
    return {
        "command": shlex.join(cmd),
        "wall_seconds": round(wall, 2),
        "cpu_seconds": round(cpu, 2),
        "internal_wall_seconds": summary["wall_seconds"],
        "generation_seconds": summary["generations"]["seconds"],
        "accuracy": row["accuracy_mean"],
        "n_problems": row["n_problems"],
        "outcomes": row["outcomes"],
        "completion_tokens": sum(g.get("completion_tokens") or 0 for g in gens),
        "run_dir": str(run_dir),
        "load_avg_before": before,
        "load_avg_after": load_avg(),
    }


def lm_eval_python(lm_eval: Path) -> Path | None:
    py = lm_eval.parent / "python"
    return py if py.exists() else None


def lm_eval_versions(lm_eval: Path) -> dict:
    py = lm_eval_python(lm_eval)
    if py is None:
        return {}
    code = (
        "import importlib.metadata as m, json; v = {}\n"
        "for d in ('lm-eval', 'torch', 'transformers', 'tokenizers', 'accelerate', 'datasets'):\n"
        "    try: v[d] = m.version(d)\n"
        "    except m.PackageNotFoundError: pass\n"
        "print(json.dumps(v))"
    )
    try:
        return json.loads(
            subprocess.run(
                [str(py), "-c", code], capture_output=True, text=True, check=True, env=SUBPROCESS_ENV
            ).stdout
        )
    except (subprocess.CalledProcessError, ValueError):
        return {}


def run_lm_eval(
    lm_eval: Path,
    task_dir: Path,
    model_path: str,
    n: int,
    batch_size: int,
    device: str,
    out_dir: Path,
    server_url: str | None = None,
    max_length: int = 4096,
) -> dict:
    """lm-eval on the task: ``--model hf`` (transformers in lm-eval's process), or with ``server_url``
    ``--model local-completions`` against a vLLM server (what a user with a served model runs)."""
    how = "local-completions against vllm serve" if server_url else "hf"
    log(f"\n[b] lm-eval end to end: lm_eval --model {how} (generation, scoring)")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    if server_url:
        model = [
            "--model",
            "local-completions",
            "--model_args",
            f"base_url={server_url},model=bench,tokenizer={model_path},tokenizer_backend=huggingface,"
            f"tokenized_requests=True,max_length={max_length},num_concurrent={batch_size},max_retries=1,"
            "timeout=3600",
        ]
    else:
        model = ["--model", "hf", "--model_args", f"pretrained={model_path},dtype=bfloat16"]
        model += ["--batch_size", str(batch_size), "--device", device]
    cmd = [
        str(lm_eval),
        *model,
        "--tasks",
        TASK_NAME,
        "--include_path",
        str(task_dir),
        "--apply_chat_template",
        "--limit",
        str(n),
        "--output_path",
        str(out_dir),
        "--log_samples",
    ]
    before = load_avg()
    wall, cpu, rc = run_timed(cmd, out_dir.parent / "lm-eval.log")
    if rc != 0:
        raise SystemExit(f"bench: lm_eval failed (exit {rc}):\n{tail(out_dir.parent / 'lm-eval.log')}")
    results_files = sorted(glob.glob(str(out_dir / "**" / "results_*.json"), recursive=True))
    samples_files = sorted(glob.glob(str(out_dir / "**" / f"samples_{TASK_NAME}_*.jsonl"), recursive=True))
    if not results_files or not samples_files:
        raise SystemExit(f"bench: lm_eval wrote no results/samples under {out_dir}")
    results = json.loads(Path(results_files[-1]).read_text(encoding="utf-8"))
    acc = results["results"][TASK_NAME][f"exact_match,{FILTER_NAME}"]
    acc_fallback = results["results"][TASK_NAME].get(f"exact_match,{FALLBACK_FILTER}")
    # one line per document and filter: keep the lines of the filter compared
    samples = [
        json.loads(line)
        for line in Path(samples_files[-1]).read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]
    samples = [x for x in samples if x.get("filter", FILTER_NAME) == FILTER_NAME]
    log(f"[b] lm-eval: {wall:.1f} s wall, accuracy {100 * acc:.1f} %")
    return {
        "command": shlex.join(cmd),
        "wall_seconds": round(wall, 2),
        "cpu_seconds": round(cpu, 2),
        "internal_seconds": float(results.get("total_evaluation_time_seconds") or 0) or None,
        "accuracy": acc,
        f"accuracy_{FALLBACK_FILTER}": acc_fallback,
        "n_samples": len(samples),
        "results_file": results_files[-1],
        "samples_file": samples_files[-1],
        "load_avg_before": before,
        "load_avg_after": load_avg(),
        "_samples": samples,
    }


def lm_eval_on_server(
    lm_eval: Path, task_dir: Path, cfg, model_path: str, n: int, batch_size: int, work: Path
) -> dict:
    """``vllm serve`` (qreason's server wrapper: the same engine settings as its generate stage) and lm-eval's
    local-completions against it; the server's start-up is part of the wall time, as it is for a user."""
    from qreason.engines.vllm_server import VLLMServer

    t = time.perf_counter()
    with VLLMServer(
        cfg.backend, model_path, "bench", work / "vllm-server.log", where="bench server"
    ) as server:
        start = time.perf_counter() - t
        log(f"[b] vLLM server up in {start:.1f} s at {server.base_url}")
        lm = run_lm_eval(
            lm_eval,
            task_dir,
            model_path,
            n,
            batch_size,
            "cpu",
            work / "lm-eval",
            server.base_url,
            cfg.backend.max_model_len,
        )
    lm["server_start_seconds"] = round(start, 2)
    lm["wall_seconds"] = round(lm["wall_seconds"] + start, 2)
    return lm


def sample_prompt(sample: dict) -> str | None:
    """The prompt string lm-eval sent for one generate_until sample."""
    args = sample.get("arguments")
    if isinstance(args, dict):
        first = next(iter(args.values()), None)
        if isinstance(first, dict):
            return first.get("arg_0")
        if isinstance(first, (list, tuple)) and first:
            return first[0]
    if isinstance(args, (list, tuple)) and args:
        first = args[0]
        return first[0] if isinstance(first, (list, tuple)) else first
    return None


def check_lm_eval_prompts(samples: list[dict], requests: list, model_path: str, qreason_run: Path) -> dict:
    """Compare the prompts lm-eval sent with qreason's messages rendered by the model's chat template
    (vLLM's ``llm.chat`` renders the same template); count lm-eval's generated tokens and the completions that
    came out identical to qreason's (greedy, but HF and vLLM kernels differ, so texts may diverge)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    by_id = {problem_id(r): r for r in requests}
    qreason_texts: dict[str, str] = {}
    gen_file = qreason_run / "generations.jsonl"
    if gen_file.exists():
        for line in gen_file.read_text(encoding="utf-8").splitlines():
            if line.strip():
                g = json.loads(line)
                qreason_texts[str(g["problem_id"])] = g["text"]
    same, checked, mismatch, gen_tokens, same_text = 0, 0, None, 0, 0
    for s in samples:
        req = by_id.get(str(s.get("doc_id")))
        resp = s.get("resps") or [[""]]
        text = resp[0][0] if isinstance(resp[0], list) else resp[0]
        gen_tokens += len(tok(text, add_special_tokens=False)["input_ids"])
        same_text += qreason_texts.get(str(s.get("doc_id"))) == text
        prompt = sample_prompt(s)
        if req is None or prompt is None:
            continue
        want = tok.apply_chat_template(req.messages, tokenize=False, add_generation_prompt=True)
        checked += 1
        if prompt == want:
            same += 1
        elif mismatch is None:
            mismatch = {"doc_id": s.get("doc_id"), "lm_eval": prompt, "qreason": want}
    return {
        "prompts_checked": checked,
        "prompts_identical": same,
        "first_mismatch": mismatch,
        "completion_tokens_retokenized": gen_tokens,
        "completions_identical_to_qreason": same_text,
    }


# ---------------------------------------------------------------------------------------------------- report


def fmt_table(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(
        [
            line.format(*head),
            line.format(*("-" * w for w in widths)),
            *(line.format(*map(str, r)) for r in rows),
        ]
    )


def report(result: dict) -> None:
    c = result["config"]
    log("\n" + "=" * 78)
    log(f"qreason generation overhead benchmark  ({result['started_at']})")
    log(f"prompts: first {c['n']} rows of {c['data']} (gsm8k task, qreason prompt, no worked example)")
    log(f"sampling: greedy, max_tokens {c['max_tokens']}; model {c['model_path']}")
    log(
        f"machine: {c['machine']['cpu']} x{c['machine']['cpu_count']}, load avg at start "
        f"{c['load_avg_start']}"
    )
    a = result.get("overhead")
    if a:
        log(
            f"\n(a) qreason run_generation vs raw vllm.LLM.chat, one engine, {a['n_prompts']} prompts, "
            f"{a['repeats']} interleaved repetitions after a warm-up"
        )
        log(
            f"    engine: {json.dumps(a['engine_kwargs'], sort_keys=True)}; qreason batch_size "
            f"{a['batch_size']}"
        )
        rows = [
            [
                k,
                f"{a['median_seconds'][k]:.2f}",
                f"{a['min_seconds'][k]:.2f}",
                " ".join(f"{r['seconds']:.2f}" for r in a["runs"][k]),
                f"{a['median_cpu_seconds'][k]:.2f}",
                a["completion_tokens"][k],
                f"{a['completion_tokens'][k] / a['median_seconds'][k]:.0f}",
            ]
            for k in ("raw", "qreason")
        ]
        log(fmt_table(["path", "median s", "min s", "all s", "median cpu s", "tokens", "tok/s"], rows))
        ok = a["overhead_percent"] <= a["target_overhead_percent"]
        log(f"    identical texts: {a['identical_texts']}/{a['n_prompts']}")
        log(
            f"    qreason / raw = {a['ratio']:.3f}  ->  overhead {a['overhead_percent']:+.1f} % "
            f"(target <= {a['target_overhead_percent']:.0f} %: {'met' if ok else 'NOT met'}); "
            f"on the fastest repetitions {a['overhead_percent_of_min']:+.1f} %; "
            f"cpu-time overhead {a['cpu_overhead_percent']:+.1f} %"
        )
    b = result.get("end_to_end")
    if b:
        log(f"\n(b) end to end on the same {c['n']} prompts (wall time of the whole command)")
        q, lm = b["qreason"], b.get("lm_eval")
        rows = [
            [
                "qreason (vLLM)",
                f"{q['wall_seconds']:.1f}",
                f"{q['cpu_seconds']:.1f}",
                f"{100 * q['accuracy']:.1f} %",
                q["completion_tokens"],
                f"generation {q['generation_seconds']:.1f} s; Math-Verify; outcomes "
                + ", ".join(f"{k} {v}" for k, v in q["outcomes"].items() if v),
            ]
        ]
        via_server = c.get("lm_eval_via") == "server"
        if lm:
            rows.append(
                [
                    "lm-eval (vllm serve)" if via_server else "lm-eval (hf)",
                    f"{lm['wall_seconds']:.1f}",
                    f"{lm['cpu_seconds']:.1f}",
                    f"{100 * lm['accuracy']:.1f} %",
                    f"~{lm['prompt_check']['completion_tokens_retokenized']}",
                    (
                        f"server start {lm['server_start_seconds']:.1f} s counted, "
                        f"{c['lm_eval_batch_size']} concurrent requests"
                        if via_server
                        else f"batch_size {c['lm_eval_batch_size']}, device {c['lm_eval_device']}"
                    )
                    + "; exact_match on "
                    f"last \\boxed{{}} (on the last number instead: "
                    f"{100 * (lm.get(f'accuracy_{FALLBACK_FILTER}') or 0):.1f} %)",
                ]
            )
        log(fmt_table(["harness", "wall s", "cpu s", "accuracy", "tokens", "notes"], rows))
        if lm:
            pc = lm["prompt_check"]
            log(
                f"    prompts identical to qreason's (chat template rendered): "
                f"{pc['prompts_identical']}/{pc['prompts_checked']}; completions identical to qreason's: "
                f"{pc['completions_identical_to_qreason']}/{lm['n_samples']}"
                + ("" if via_server else " (HF vs vLLM kernels)")
            )
            if pc["first_mismatch"]:
                m = pc["first_mismatch"]
                log(
                    f"    first mismatch (doc {m['doc_id']}):\n      lm-eval: {m['lm_eval']!r}\n"
                    f"      qreason: {m['qreason']!r}"
                )
            ok = b["speedup"] >= b["target_speedup"]
            target = (
                "both drive vLLM: no target"
                if via_server
                else f"target >= {b['target_speedup']:.0f}x: {'met' if ok else 'NOT met'}"
            )
            log(
                f"    lm-eval / qreason wall time = {b['speedup']:.2f}x ({target}); "
                f"cpu time {b['cpu_speedup']:.2f}x"
            )
        else:
            log("    lm-eval skipped (--skip-lm-eval)")
    log(f"\nload avg at end {result['load_avg_end']}; results: {result['json']}")
    log("=" * 78)


# ------------------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--n", type=int, default=64, help="number of GSM8K prompts (default 64)")
    p.add_argument(
        "--model",
        default="default",
        help="the model, as a config's model.path: default (SmolLM2-135M-Instruct), a named embedded model "
        "(qwen2.5-coder-1.5b-instruct) or a checkpoint directory",
    )
    p.add_argument(
        "--lm-eval-via",
        choices=["hf", "server"],
        default="hf",
        help="lm-eval's model: hf (transformers in lm-eval's process) or server (local-completions against a "
        "vLLM OpenAI-compatible server started with qreason's engine settings; its start-up is counted)",
    )
    p.add_argument(
        "--max-tokens", type=int, default=256, help="max generated tokens per prompt (default 256)"
    )
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions of each path in (a) (default 3)")
    p.add_argument("--skip-raw", action="store_true", help="skip (a), the raw-vLLM vs qreason comparison")
    p.add_argument(
        "--skip-lm-eval", action="store_true", help="skip lm-eval in (b) (qreason end to end still runs)"
    )
    p.add_argument(
        "--full-pipeline",
        action="store_true",
        help="leave qreason's HTML report and curation stages on in (b) (default: off, as lm-eval has "
        "no counterpart)",
    )
    p.add_argument(
        "--data", type=Path, default=DEFAULT_DATA, help=f"GSM8K test JSONL (default {DEFAULT_DATA})"
    )
    p.add_argument(
        "--lm-eval",
        type=Path,
        default=None,
        help=f"lm_eval executable (default {DEFAULT_LM_EVAL.relative_to(REPO)}, else lm_eval on PATH)",
    )
    p.add_argument(
        "--lm-eval-batch-size",
        type=int,
        default=None,
        help="lm-eval --batch_size (default: qreason's engine batch size, 64)",
    )
    p.add_argument(
        "--lm-eval-device",
        default=None,
        help="lm-eval --device (default: cpu, or cuda with the CUDA build of vLLM)",
    )
    p.add_argument("--out", type=Path, default=OUT, help=f"where everything is written (default {OUT})")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny sizes for a smoke test: --n 2 --max-tokens 8 --repeats 1 (the timings mean nothing)",
    )
    args = p.parse_args(argv)
    if args.smoke:
        args.n, args.max_tokens, args.repeats = 2, 8, 1
    if args.n < 1 or args.max_tokens < 1 or args.repeats < 1:
        p.error("--n, --max-tokens and --repeats must be positive")
    return args


def find_lm_eval(arg: Path | None) -> Path:
    if arg is not None:
        cand = arg
    elif DEFAULT_LM_EVAL.exists():
        cand = DEFAULT_LM_EVAL
    else:
        found = shutil.which("lm_eval")
        cand = Path(found) if found else DEFAULT_LM_EVAL
    if not cand.exists():
        raise SystemExit(
            f"bench: lm_eval not found at {cand}; run scripts/setup-bench-env.sh "
            "(or pass --lm-eval PATH, or --skip-lm-eval)"
        )
    return cand


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from qreason.engines.vllm import installed_build
    from qreason.pipeline.provenance import environment

    data = args.data.resolve()
    if not data.is_file():
        raise SystemExit(f"bench: data file not found: {data} (pass --data PATH)")
    lm_eval = None if args.skip_lm_eval else find_lm_eval(args.lm_eval)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = out / "runs" / stamp
    work.mkdir(parents=True)

    config_path = write_run_config(
        out / "qreason_gsm8k_bench.yaml", data, args.n, args.max_tokens, args.full_pipeline, args.model
    )
    cfg, model, requests = build_requests(config_path)
    if len(requests) != args.n:
        raise SystemExit(f"bench: expected {args.n} requests, qreason built {len(requests)}")
    env = environment()
    device = args.lm_eval_device or ("cuda" if installed_build() == "vllm" else "cpu")
    lm_batch = args.lm_eval_batch_size or cfg.backend.batch_size
    result: dict = {
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": {
            "n": args.n,
            "max_tokens": args.max_tokens,
            "repeats": args.repeats,
            "data": str(data),
            "temperature": cfg.sampling.temperature,
            "top_p": cfg.sampling.top_p,
            "seeds": cfg.sampling.seeds,
            "format_example": False,
            "model_path": model.path,
            "model_fingerprint": model.fingerprint,
            "qreason_config": str(config_path),
            "backend": cfg.backend.model_dump(),
            "lm_eval_batch_size": lm_batch,
            "lm_eval_device": device,
            "lm_eval_via": args.lm_eval_via,
            "versions": env["versions"],
            "lm_eval_env_versions": lm_eval_versions(lm_eval) if lm_eval else {},
            "machine": {**env["hardware"], "platform": platform.platform()},
            "load_avg_start": load_avg(),
            "skip_raw": args.skip_raw,
            "skip_lm_eval": args.skip_lm_eval,
            "full_pipeline": args.full_pipeline,
        },
    }
    c = result["config"]
    log("qreason generation overhead benchmark")
    log(f"  prompts        first {args.n} rows of {data}")
    log(f"  sampling       greedy (temperature 0, top_p 1), max_tokens {args.max_tokens}, seed 0")
    log(f"  model          {model.path} (fingerprint {model.fingerprint})")
    log(
        f"  engine         vLLM build {installed_build()}, qreason backend defaults: "
        f"max_model_len {cfg.backend.max_model_len}, batch_size {cfg.backend.batch_size}"
    )
    log(
        f"  qreason run    {config_path} "
        f"({'all stages' if args.full_pipeline else 'HTML report and curation off'})"
    )
    log(f"  lm-eval        {lm_eval or 'skipped'} (batch_size {lm_batch}, device {device})")
    log(f"  versions       {json.dumps(c['versions'])}")
    if c["lm_eval_env_versions"]:
        log(f"  lm-eval env    {json.dumps(c['lm_eval_env_versions'])}")
    log(
        f"  machine        {c['machine']['cpu']} x{c['machine']['cpu_count']}, "
        f"{c['machine']['memory_gib']} GiB, gpus {c['machine']['gpus'] or 'none'}; load avg "
        f"{c['load_avg_start']}"
    )
    log(f"  output         {work}")

    # (b) first: its subprocesses each start their own engine, and on a GPU the in-process engine of (a)
    # would otherwise still hold the memory they need.
    e2e = {"qreason": run_qreason_e2e(config_path, work / "qreason-run")}
    if lm_eval is not None:
        task_dir = out / "lm_eval_tasks"
        write_lm_eval_task(task_dir, data, args.max_tokens)
        if args.lm_eval_via == "server":
            lm = lm_eval_on_server(lm_eval, task_dir, cfg, model.path, args.n, lm_batch, work)
        else:
            lm = run_lm_eval(lm_eval, task_dir, model.path, args.n, lm_batch, device, work / "lm-eval")
        lm["prompt_check"] = check_lm_eval_prompts(
            lm.pop("_samples"), requests, model.path, work / "qreason-run"
        )
        lm["task_yaml"] = str(task_dir / f"{TASK_NAME}.yaml")
        e2e["lm_eval"] = lm
        e2e["speedup"] = round(lm["wall_seconds"] / e2e["qreason"]["wall_seconds"], 3)
        e2e["cpu_speedup"] = round(lm["cpu_seconds"] / max(e2e["qreason"]["cpu_seconds"], 1e-9), 3)
        e2e["target_speedup"] = 4.0
    result["end_to_end"] = e2e

    if not args.skip_raw:
        result["overhead"] = measure_overhead(cfg, requests, args.repeats, work)

    result["load_avg_end"] = load_avg()
    result["finished_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    json_path = out / f"generation_overhead_{stamp}.json"
    result["json"] = str(json_path)
    text = json.dumps(result, indent=2, default=str) + "\n"
    json_path.write_text(text, encoding="utf-8")
    (out / "generation_overhead.json").write_text(text, encoding="utf-8")  # the latest run
    report(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
