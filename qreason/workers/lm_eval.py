"""The lm-eval worker: runs inside lm-eval's environment (.venv-bench), never in the main one.

    python -m qreason.workers.lm_eval JOB.json        evaluate the job's tasks, one at a time
    python -m qreason.workers.lm_eval --check JOB.json   only check that every task name is known to lm-eval

lm-eval 0.4.13 would downgrade libraries of the main environment, so qreason's lm-eval stage
(``qreason.stages.lm_eval``) starts this module with the Python of ``.venv-bench``. The job names the model
(lm-eval's ``local-completions`` against a vLLM server the stage started for one variant), the tasks and
lm-eval's arguments. This module imports only the standard library, ``qreason.workers.protocol`` and lm-eval
(whose task files may import qreason's light modules: tasks, grade).

Protocol, stdout: ``RESULT_PREFIX PATH`` when a task's result file is written (the stage stores it as a record
at once, so a killed run keeps the tasks that finished); ``ERROR_PREFIX TASK: MESSAGE`` when a task fails (the
others still run); every other line is library logging, for the log file. Exit code 0 when every task
succeeded.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import sys
import time
import traceback
from pathlib import Path

from qreason.workers.protocol import ERROR_PREFIX, HUB_MARK, RESULT_PREFIX, progress


def _offline_problem(cfg: dict) -> str | None:
    """Why a task's dataset cannot be read without the Hugging Face hub (None: local files, a custom loader,
    or a copy in the datasets cache). Reads the cache only: this process runs with the hub switched off."""
    import datasets

    path = cfg.get("dataset_path")
    if not path or cfg.get("custom_dataset") or Path(str(path)).expanduser().exists():
        return None
    kwargs = {k: v for k, v in (cfg.get("dataset_kwargs") or {}).items() if k in ("data_files", "data_dir")}
    try:
        datasets.load_dataset_builder(path, cfg.get("dataset_name"), **kwargs)
    except Exception as exc:  # noqa: BLE001 - any failure to resolve offline is the answer
        name = f"{path} ({cfg['dataset_name']})" if cfg.get("dataset_name") else str(path)
        return f"{HUB_MARK}: dataset {name} is not in the local datasets cache ({type(exc).__name__})"
    return None


def check(job: dict) -> int:
    """Print one ERROR line per task name lm-eval does not know (with the job's include paths), and per task
    whose dataset is neither local nor cached (``HUB_MARK``)."""
    import os

    os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"  # before datasets is imported
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=job["include_paths"] or None)
    known = set(manager.all_tasks)
    # a tag names several tasks whose results are stored under their own names: the run would never find a
    # result stored under the tag and evaluate it again on every re-run
    tags = set(getattr(manager, "all_tags", []) or [])
    bad = 0
    for name in (t["name"] for t in job["tasks"]):
        if name not in known:
            print(f"{ERROR_PREFIX}{name}: lm-eval knows no task of this name", flush=True)
        elif name in tags:
            print(
                f"{ERROR_PREFIX}{name}: a tag of several lm-eval tasks; list the tasks themselves", flush=True
            )
        else:
            entry = getattr(manager, "task_index", {}).get(name)
            problem = _offline_problem(entry.cfg) if isinstance(getattr(entry, "cfg", None), dict) else None
            if problem:
                print(f"{ERROR_PREFIX}{name}: {problem}", flush=True)
            continue
        bad += 1
    return 1 if bad else 0


def _one_task(job: dict, task: dict, manager) -> dict:
    """Evaluate one task; returns what the stage stores (metrics by lm-eval's 'metric,filter' keys)."""
    from lm_eval import simple_evaluate

    name = task["name"]
    start = time.monotonic()
    out = simple_evaluate(
        model=job["model"],
        model_args=job["model_args"],
        tasks=[name],
        num_fewshot=job["num_fewshot"],
        limit=job["limit"],
        use_cache=job.get("cache"),
        log_samples=True,
        task_manager=manager,
        apply_chat_template=job["apply_chat_template"],
        fewshot_as_multiturn=job["fewshot_as_multiturn"],
        bootstrap_iters=job["bootstrap_iters"],
        metadata=job.get("metadata") or None,
        random_seed=0,
        numpy_random_seed=1234,
        torch_random_seed=1234,
        fewshot_random_seed=1234,
    )
    if out is None or name not in out.get("results", {}):
        raise RuntimeError("lm-eval returned no results for the task")
    samples_path = Path(job["samples_dir"]) / f"{name}.jsonl"
    samples_path.parent.mkdir(parents=True, exist_ok=True)
    n_samples = 0
    with open(samples_path, "w", encoding="utf-8") as fh:
        for sub, rows in (out.get("samples") or {}).items():
            for row in rows:
                fh.write(json.dumps({"task": sub, **row}, ensure_ascii=False, default=str) + "\n")
                n_samples += 1
    counts = out.get("n-samples", {}).get(name) or {}
    return {
        "key": task["key"],
        "task": name,
        "metrics": out["results"][name],
        "higher_is_better": out.get("higher_is_better", {}).get(name, {}),
        "n_samples": counts.get("effective", n_samples),
        "n_docs": counts.get("original"),
        "task_version": out.get("versions", {}).get(name),
        "task_config": out.get("configs", {}).get(name, {}),
        "samples_file": str(samples_path),
        "seconds": round(time.monotonic() - start, 2),
        "lm_eval_version": md.version("lm-eval"),
    }


def run(job: dict) -> int:
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=job["include_paths"] or None, metadata=job.get("metadata") or None)
    failed = 0
    for i, task in enumerate(job["tasks"], 1):
        progress(f"{task['name']} ({i}/{len(job['tasks'])})")
        try:
            result = _one_task(job, task, manager)
        except Exception as exc:  # noqa: BLE001 - one task failing must not lose the others
            traceback.print_exc()
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            print(f"{ERROR_PREFIX}{task['name']}: {type(exc).__name__}: {first}", flush=True)
            failed += 1
            continue
        path = Path(job["results_dir"]) / f"{task['key']}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, default=str, indent=1), encoding="utf-8")
        tmp.replace(path)
        print(f"{RESULT_PREFIX}{path}", flush=True)
    return 1 if failed else 0


def main(argv: list[str]) -> int:
    checking = argv[:1] == ["--check"]
    job = json.loads(Path(argv[-1]).read_text(encoding="utf-8"))
    return check(job) if checking else run(job)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
