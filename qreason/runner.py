"""``qreason run``: plan from the config, then the stages in order, each reading the store and appending to it.

Everything that can be wrong with the input (config, task data, model) is checked before the run directory is
touched, so bad input leaves no artifacts behind.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import yaml

from .config import LoadedConfig, load_config
from .envinfo import environment
from .generate import Backend, GenerationRequest, make_backend, make_request, run_generation
from .grade import Grader, grade_key, run_grading
from .models import ResolvedModel, resolve_model
from .records import Problem, content_key
from .store import RunIndex, RunStore, now_iso
from .summary import accuracy_table
from .tasks import build_messages, load_problems

log = logging.getLogger(__name__)


def runs_root() -> Path:
    return Path(os.environ.get("QREASON_RUNS", "runs")).resolve()


def default_index() -> RunIndex:
    return RunIndex(Path(os.environ.get("QREASON_INDEX", runs_root() / "index.sqlite")))


@dataclass
class Plan:
    loaded: LoadedConfig
    run_dir: Path
    model: ResolvedModel
    problems: list[Problem]
    requests: list[GenerationRequest]


def make_plan(config_path: str | Path, output_dir: str | Path | None = None) -> Plan:
    """Validate the config, load every task's problems and resolve the model. Writes nothing to the run dir."""
    loaded = load_config(config_path)
    cfg = loaded.config
    specs_and_problems = [load_problems(t, loaded) for t in cfg.tasks]
    model = resolve_model(cfg.model.path, cfg.model.revision, loaded.base_dir) if cfg.backend.kind == "vllm" \
        else ResolvedModel(cfg.model.path, cfg.backend.model or cfg.model.path,
                           content_key("endpoint", cfg.backend.base_url, cfg.backend.model or cfg.model.path),
                           "endpoint")
    problems, requests = [], []
    for task_cfg, (spec, task_problems) in zip(cfg.tasks, specs_and_problems):
        problems.extend(task_problems)
        for p in task_problems:
            messages = build_messages(spec, p, task_cfg.format_example)
            for seed in cfg.sampling.seeds:
                requests.append(make_request(cfg.model.name, model, p, messages, cfg.sampling, seed))
    if output_dir is not None:
        run_dir = Path(output_dir).resolve()
    elif cfg.output_dir:
        run_dir = loaded.resolve(cfg.output_dir)
    else:
        run_dir = runs_root() / cfg.name
    return Plan(loaded, run_dir, model, problems, requests)


def _attach_log_file(run_dir: Path) -> logging.Handler:
    handler = logging.FileHandler(run_dir / "run.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    return handler


def run(config_path: str | Path, output_dir: str | Path | None = None, index: RunIndex | None = None,
        backend: Backend | None = None) -> dict:
    """Run every stage for a config; returns the summary (also written to summary.json).

    ``backend``: an already started generation backend to use instead of starting one from the config
    (the caller keeps ownership and closes it)."""
    t0 = time.monotonic()
    plan = make_plan(config_path, output_dir)
    cfg = plan.loaded.config
    store = RunStore(plan.run_dir)
    store.dir.mkdir(parents=True, exist_ok=True)
    handler = _attach_log_file(store.dir)
    index = index or default_index()
    run_id = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"
    config_hash = content_key("config", cfg.model_dump())
    env = environment()
    store.write_json("environment.json", env)
    (store.dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(), sort_keys=False), encoding="utf-8")
    index.start(run_id, store.dir, cfg.name, config_hash, env)
    status, summary = "failed", None
    try:
        store.problems.append(plan.problems)
        todo = [r for r in plan.requests if r.key not in store.generations]
        log.info("run %s: %d generations planned, %d cached, %d to do", run_id, len(plan.requests),
                 len(plan.requests) - len(todo), len(todo))
        gen_stats = None
        if todo:
            engine = backend or make_backend(cfg.backend, plan.model)
            try:
                gen_stats = run_generation(store.generations, todo, engine, cfg.sampling)
            finally:
                if backend is None:
                    engine.close()
        wanted = {r.key for r in plan.requests}
        generations = [g for g in store.generations.all() if g.key in wanted]
        grades_written = run_grading(store, Grader(cfg.grading.timeout_s, cfg.grading.workers), generations)
        grade_keys = {grade_key(g.key) for g in generations}
        rows = accuracy_table([g for g in store.grades.all() if g.key in grade_keys])
        summary = {
            "run_id": run_id, "name": cfg.name, "run_dir": str(store.dir), "config_hash": config_hash,
            "finished_at": now_iso(), "wall_seconds": round(time.monotonic() - t0, 2),
            "model": {"spec": plan.model.spec, "fingerprint": plan.model.fingerprint, "source": plan.model.source},
            "generations": {"planned": len(plan.requests), "cached": len(plan.requests) - len(todo),
                            "produced": gen_stats.produced if gen_stats else 0,
                            "failed": gen_stats.failed if gen_stats else 0,
                            "seconds": round(gen_stats.seconds, 2) if gen_stats else 0.0},
            "grades_written": grades_written,
            "versions": env["versions"],
            "results": rows,
        }
        store.write_json("summary.json", summary)
        status = "incomplete" if len(generations) < len(plan.requests) else "ok"
        return summary
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    finally:
        index.finish(run_id, status, summary)
        logging.getLogger().removeHandler(handler)
        handler.close()
