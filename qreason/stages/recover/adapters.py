"""LoRA adapters: their content keys, where they and the dense/merged checkpoints live, checks of adapters
the user gives, and one training-worker run per variant for everything it needs."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from qreason import untrusted
from qreason.config.schema import RecoverConfig
from qreason.errors import UserError
from qreason.records import ModelVariant, content_key
from qreason.stages.recover.data import TrainSet
from qreason.store import cache_dir, child_path, is_sealed, now_iso, publish, seal
from qreason.workers.launch import TRAIN
from qreason.workers.protocol import TrainJob, TrainRun

KEY_VERSION = 1  # bump when the worker changes what it trains for the same inputs


ADAPTER_META = "qreason-adapter.json"


def read_meta(adapter_dir: Path) -> dict | None:
    try:
        meta = json.loads((adapter_dir / ADAPTER_META).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if (adapter_dir / "adapter_config.json").is_file() and isinstance(meta, dict) else None


def hyperparameters(cfg: RecoverConfig) -> dict:
    return {
        "rank": cfg.rank,
        "alpha": cfg.alpha,
        "dropout": cfg.dropout,
        "learning_rate": cfg.learning_rate,
        "epochs": cfg.epochs,
        "batch_size": cfg.batch_size,
        "max_length": cfg.max_length,
        "beta": cfg.beta,
        "target_modules": list(cfg.target_modules),
        **({"kd_top_k": cfg.kd_top_k, "kd_chunk": cfg.kd_chunk} if cfg.mode == "kd" else {}),
    }


def adapter_key(
    variant: ModelVariant, data: TrainSet, cfg: RecoverConfig, arm: str, teacher: str | None = None
) -> str:
    """``variant``: the model the adapter trains on; ``teacher``: kd's teacher fingerprint."""
    rows = {"sft": data.sft if cfg.mode != "dpo" else [], "dpo": data.dpo if cfg.mode != "sft" else []}
    parts = [teacher] if cfg.mode == "kd" else []
    return content_key(
        "adapter",
        KEY_VERSION,
        variant.fingerprint,
        content_key("data", rows),
        cfg.mode,
        hyperparameters(cfg),
        cfg.seed,
        arm,
        *parts,
    )


def dense_dir(variant: ModelVariant) -> Path:
    return cache_dir() / "recover" / "dense" / variant.fingerprint


def merged_dir(variant: ModelVariant, key: str) -> Path:
    """The dense checkpoint of ``variant`` with adapter ``key`` merged in: one per (checkpoint, adapter), as
    the same external adapter may be given for several variants."""
    return cache_dir() / "recover" / "merged" / content_key("merged", variant.fingerprint, key)


def teacher_cache_dir() -> Path:
    """kd: the teacher's top-k per example, one file per content key (shared by runs and arms)."""
    return cache_dir() / "recover" / "teacher"


def check_adapter(adapter: Path, variant: ModelVariant) -> None:
    """An adapter given by the user must belong to this variant: qreason's own metadata names the checkpoint
    it was trained on; any adapter's LoRA shapes must fit the variant's layers."""
    if not (adapter / "adapter_config.json").is_file():
        raise UserError(str(adapter), "not a PEFT adapter directory (no adapter_config.json)")
    meta = read_meta(adapter)
    if meta is not None and meta.get("variant_fingerprint") != variant.fingerprint:
        raise UserError(
            str(adapter),
            f"this adapter was trained on {meta.get('variant')!r} "
            f"({meta.get('variant_fingerprint')}), not on {variant.name!r} "
            f"({variant.fingerprint})",
        )
    problems = (meta or {}).get("train_problems", [])
    if not (
        isinstance(problems, list)
        and all(isinstance(p, list) and len(p) == 2 and all(isinstance(x, str) for x in p) for p in problems)
    ):
        raise UserError(
            str(adapter / ADAPTER_META),
            "train_problems must be a list of [task, problem_id] pairs of strings",
        )
    config = json.loads((Path(variant.path) / "config.json").read_text(encoding="utf-8"))
    hidden = config.get("hidden_size")
    for name, shape in _safetensors_shapes(adapter / "adapter_model.safetensors").items():
        if (
            ".lora_A." in name
            and any(p in name for p in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"))
            and hidden
            and shape[-1] != hidden
        ):
            raise UserError(
                str(adapter),
                f"{name} expects inputs of width {shape[-1]} but {variant.name} has "
                f"hidden size {hidden}: an adapter of another base model",
            )


def _safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor shapes from a safetensors header (no tensor is loaded, nothing is executed)."""
    if not path.is_file():
        raise UserError(str(path.parent), "no adapter_model.safetensors in the adapter directory")
    with open(path, "rb") as fh:
        size = int.from_bytes(fh.read(8), "little")
        if not 0 < size < 100 * 2**20:
            raise UserError(str(path), "not a safetensors file")
        try:
            header = untrusted.loads(fh.read(size))
        except ValueError:
            raise UserError(str(path), "not a safetensors file (bad header)") from None
    if not isinstance(header, dict):
        raise UserError(str(path), "not a safetensors file (bad header)")
    shapes = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        shape = info.get("shape") if isinstance(info, dict) else None
        if not (isinstance(shape, list) and shape and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise UserError(str(path), f"not a safetensors file (tensor {name[:80]!r} has no valid shape)")
        shapes[name] = shape
    if not shapes:
        raise UserError(str(path), "holds no tensors")
    return shapes


@dataclass
class ArmPlan:
    arm: str
    data: TrainSet
    key: str
    adapter_dir: Path
    meta: dict | None  # provenance when the adapter is finished (reused)
    external: bool = False  # an adapter the user gave (--adapter)
    mode: str | None = None  # its objective when not the config's (the full-precision arm under kd)
    model: ModelVariant | None = None  # the model it trains on when not the variant (the full-precision arm)


def train_adapters(
    plans: list[ArmPlan],
    variant: ModelVariant,
    cfg: RecoverConfig,
    merge_arms: set[str],
    work_root: Path,
    echo: Callable[[str], None],
    teacher: ModelVariant | None = None,
) -> None:
    """One worker run for everything this variant needs: the dense copy, each missing adapter (trained), and
    the merged checkpoints of the arms in ``merge_arms``. Fills in ``plan.meta`` of trained adapters.
    ``teacher``: the full-precision model kd distills from."""
    from qreason.workers.launch import run_worker

    runs, staged = [], []
    root = None
    for p in plans:
        need_train = p.meta is None
        need_merge = p.arm in merge_arms and not is_sealed(merged_dir(p.model or variant, p.key))
        if not (need_train or need_merge):
            continue
        if root is None:
            root = child_path(work_root, f".{variant.name}.partial")
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir(parents=True)
        run: TrainRun = {
            "name": f"{variant.name} {p.arm}",
            "mode": p.mode or cfg.mode,
            "sft": p.data.sft,
            "dpo": p.data.dpo,
            "hyper": hyperparameters(cfg),
            "merged_dir": None,
        }
        if p.model is not None:
            run["model_dir"] = p.model.path
            run["base_name"] = f"{p.model.name}@{p.model.fingerprint}"
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
    dense = dense_dir(variant)
    if dense.exists() and not is_sealed(dense):  # a copy cut short or damaged since: made again
        shutil.rmtree(dense)
    job: TrainJob = {
        "checkpoint": variant.path,
        "dense_dir": str(dense_dir(variant)),
        "base_name": f"{variant.name}@{variant.fingerprint}",
        "device": cfg.device,
        "seed": cfg.seed,
        "threads": cfg.threads,
        "runs": runs,
    }
    if teacher is not None and any(r["mode"] == "kd" for r in runs):
        job.update(
            teacher=teacher.path, teacher_key=teacher.fingerprint, teacher_cache=str(teacher_cache_dir())
        )
    try:
        result = run_worker(
            job,
            root,
            child_path(root.parent, f"{variant.name}.train.log"),
            variant.name,
            echo,
            python=TRAIN.python(),
            module="qreason.workers.train",
            stage="recover",
        )
        if not is_sealed(dense):
            seal(dense)
        for p, run in staged:
            done = result.result["runs"][run["name"]]
            if "adapter_dir" in run:
                meta = {
                    "key": p.key,
                    "variant": variant.name,
                    "variant_fingerprint": variant.fingerprint,
                    # as in adapter_config.json: a name, never a path of this machine
                    "base_model": f"{(p.model or variant).name}@{(p.model or variant).fingerprint}",
                    "arm": p.arm,
                    "mode": p.mode or cfg.mode,
                    "hyperparameters": hyperparameters(cfg),
                    "seed": cfg.seed,
                    "train_items": p.data.rows_for(p.mode or cfg.mode),
                    "train_problems": [list(k) for k in p.data.problems],
                    "train_seconds": done["train_seconds"],
                    "loss": done["loss"],
                    "steps": done["steps"],
                    "device": result.result["device"],
                    "threads": result.result["threads"],
                    "versions": result.result["versions"],
                    "teacher": {k: done[k] for k in ("teacher_computed", "teacher_cached") if k in done},
                    "created_at": now_iso(),
                }
                tmp = Path(run["adapter_dir"])
                (tmp / ADAPTER_META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
                publish(tmp, p.adapter_dir, replace=True)
                p.meta = meta
            if run.get("merged_dir"):
                dest = merged_dir(p.model or variant, p.key)
                dest.parent.mkdir(parents=True, exist_ok=True)
                if not is_sealed(dest):
                    seal(Path(run["merged_dir"]))
                    publish(Path(run["merged_dir"]), dest, replace=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
