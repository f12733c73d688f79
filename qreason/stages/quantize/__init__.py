"""The quantize stage: a base model plus a ``QuantizeSpec`` in, a ``ModelVariant`` (a checkpoint on disk) out.

    from qreason.stages.quantize import QuantizeSpec, quantize, list_methods
    spec = QuantizeSpec(method="gptq-w4a16", overrides={"group_size": 64})
    variant = quantize(resolve_model("default"), spec)

Methods are recipes in ``recipes.yaml`` (``recipes.py`` resolves them), calibration samples come from
``calibration.py``, the work itself runs in the separate llm-compressor environment
(``qreason.workers.launch``
starts ``qreason.workers.quantize`` there), and ``cache.py`` keys, places and describes the result.
``method="import"`` takes an existing quantized checkpoint instead (``imports.py``).

Everything that can be wrong with the input (method, overrides, group size, calibration data, the quantization
environment) is checked before any directory is created or process started, and reported as a one-line
``UserError``. vLLM is loaded only for calibration traces.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from qreason import __version__, console
from qreason.config.schema import CalibrationSpec, QuantizeSpec, RunConfig
from qreason.errors import UserError
from qreason.inputs.models import ResolvedModel, fingerprint_dir, resolve_model
from qreason.records import ModelVariant, content_key
from qreason.stages.base import RunContext
from qreason.stages.quantize.cache import (
    CALIBRATION_FILE,
    PROVENANCE,
    cache_root,
    checkpoint_size,
    publish,
    quant_key,
    read_provenance,
    worker_log_path,
)
from qreason.stages.quantize.calibration import CalibrationPlan, plan_calibration, write_samples
from qreason.stages.quantize.imports import describe_quantization
from qreason.stages.quantize.recipes import ResolvedRecipe, resolve
from qreason.stages.quantize.recipes import list_methods as _list
from qreason.stages.quantize.shapes import check_group_size, default_group_size, read_config
from qreason.store import now_iso, staging
from qreason.summary import QuantizationSummary, QuantizedVariant
from qreason.workers.launch import QUANT, WorkerFailed, run_worker
from qreason.workers.protocol import QuantizeJob

__all__ = [
    "CalibrationSpec",
    "QuantizeSpec",
    "Prepared",
    "prepare",
    "quantize",
    "list_methods",
    "WorkerFailed",
]

log = logging.getLogger(__name__)


def list_methods() -> list[dict]:
    """Every registered method: name, description, whether it calibrates, parameters (defaults, help)."""

    return _list()


def _stderr_echo(label: str) -> Callable[[str], None]:
    def echo(message: str) -> None:
        console.say(f"quantize {label}: {message}")

    return echo


def _variant(provenance: dict, name: str, path: Path, reused: bool) -> ModelVariant:

    return ModelVariant(
        key=content_key("variant", name, provenance["key"]),
        name=name,
        base_model=provenance["base"]["spec"],
        base_fingerprint=provenance["base"]["fingerprint"],
        method=provenance["method"],
        recipe=provenance["recipe"],
        recipe_hash=provenance["recipe_hash"],
        path=str(path),
        fingerprint=fingerprint_dir(path),
        bits=provenance["bits"],
        size_bytes=provenance["size_bytes"],
        quantize_seconds=provenance["wall_seconds"],
        peak_memory_mb=provenance["peak_memory_mb"],
        reused=reused,
        versions=provenance["versions"],
        created_at=provenance["created_at"],
    )


def _import(base: ResolvedModel, spec: QuantizeSpec, name: str | None, base_dir: Path | None) -> ModelVariant:

    model = resolve_model(spec.path, spec.revision, base_dir)
    config = read_config(model.path)
    fmt = describe_quantization(config.get("quantization_config"), f"{model.path}/config.json")
    recipe = fmt.as_recipe(config["quantization_config"])
    name = name or Path(spec.path.rstrip("/")).name
    return ModelVariant(
        key=content_key("variant", name, "import", model.fingerprint),
        name=name,
        base_model=base.spec,
        base_fingerprint=base.fingerprint,
        method="import",
        recipe=recipe,
        recipe_hash=content_key("import", recipe),
        path=model.path,
        fingerprint=model.fingerprint,
        bits=fmt.bits,
        size_bytes=checkpoint_size(Path(model.path)),
        versions={"format": fmt.format},
        created_at=now_iso(),
    )


@dataclass
class Prepared:
    """A checked quantization request: the resolved recipe, calibration plan, cache key and destination."""

    recipe: ResolvedRecipe
    plan: CalibrationPlan | None
    key: str
    name: str
    dest: Path


def prepare(
    base: ResolvedModel,
    spec: QuantizeSpec,
    name: str | None = None,
    out_dir: Path | None = None,
    base_dir: Path | None = None,
) -> Prepared:
    """Check a request and compute its cache key; creates nothing and starts nothing."""

    if spec.method == "import":
        raise UserError("method import", "an import is not quantized; call quantize() for it")
    recipe = resolve(spec.method, spec.overrides)
    if "group_size" in recipe.params and "group_size" not in spec.overrides:
        fit = default_group_size(base.path, recipe.params["group_size"])
        if fit != recipe.params["group_size"]:  # the default does not fit this model: the largest that does
            log.debug(
                "%s: group_size %d (the default %d does not fit %s)",
                recipe.name,
                fit,
                recipe.params["group_size"],
                base.spec,
            )
            recipe = resolve(spec.method, {**spec.overrides, "group_size": fit})
    if "group_size" in recipe.params:
        check_group_size(base.path, recipe.params["group_size"], recipe.name)
    plan = plan_calibration(spec.calibration, base_dir) if recipe.calibration else None
    key = quant_key(base.fingerprint, recipe.identity(), plan.identity if plan else None)
    name = name or recipe.name
    dest = Path(out_dir).expanduser().resolve() if out_dir is not None else cache_root() / key
    return Prepared(recipe, plan, key, name, dest)


def quantize(
    base: ResolvedModel,
    spec: QuantizeSpec,
    name: str | None = None,
    out_dir: Path | None = None,
    base_dir: Path | None = None,
    echo: Callable[[str], None] | None = None,
) -> ModelVariant:
    """Quantize ``base`` as ``spec`` says, or reuse the cached checkpoint made from the same inputs.

    ``name``: the variant's label in every later record (default: the method's name).
    ``out_dir``: where the checkpoint goes (default: ``cache_dir()/quantized/KEY``). ``base_dir``: where
    relative paths in the spec are resolved (a config file's directory). ``echo``: receives progress lines
    (default: printed to stderr).
    """
    if spec.method == "import":
        return _import(base, spec, name, base_dir)

    # 1. Check everything; nothing is created or started before this block has passed.
    prep = prepare(base, spec, name, out_dir, base_dir)
    recipe, plan, key, name, dest = prep.recipe, prep.plan, prep.key, prep.name, prep.dest
    notes = console.notes(f"quantize {name}: ") if echo is None else echo  # the worker's step-by-step lines
    echo = echo or _stderr_echo(name)

    # 2. A finished checkpoint from the same inputs is reused.
    found = read_provenance(dest)
    if found is not None and found["key"] == key:
        echo(f"reusing {dest}")
        return _variant(found, name, dest, reused=True)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise UserError(
            str(dest),
            "exists and is not a checkpoint made from these inputs; "
            "choose another output directory or remove it",
        )
    python = QUANT.python()

    # 3. Build in a temporary directory beside dest; rename into place only when complete.
    started = time.monotonic()
    with staging(dest, kind="checkpoint") as tmp:  # marked: prune may delete it, or its leftover
        job: QuantizeJob = {
            "model": base.path,
            "output_dir": str(tmp),
            "modifiers": recipe.modifiers,
            "calibration": None,
            "seed": spec.calibration.seed,
        }
        calibration_record = None
        detail = "no calibration"
        if plan is not None:
            samples = plan.build(base, echo)
            write_samples(samples, tmp / CALIBRATION_FILE)
            job["calibration"] = {
                "file": str(tmp / CALIBRATION_FILE),
                "max_seq_len": spec.calibration.max_seq_len,
            }
            calibration_record = {
                **plan.identity,
                "path": str(plan.path) if plan.path else None,
                "task": spec.calibration.task,
                "n_used": len(samples),
                "file": CALIBRATION_FILE,
            }
            detail = f"{len(samples)} {spec.calibration.source} calibration samples"
        echo(f"quantizing {base.spec} with {recipe.name} in {python.parent.parent.name} ({detail})")
        run = run_worker(
            job,
            tmp,
            worker_log_path(dest),
            name,
            notes,
            python=python,
            module="qreason.workers.quantize",
            stage="quantize",
        )
        if calibration_record is not None:
            calibration_record["tokens"] = run.result.get("tokens")
        provenance = {
            "key": key,
            "method": recipe.name,
            "bits": recipe.bits,
            "recipe": recipe.identity(),
            "overrides": recipe.overrides,
            "recipe_hash": recipe.hash,
            "base": {
                "spec": base.spec,
                "path": base.path,
                "fingerprint": base.fingerprint,
                "source": base.source,
            },
            "calibration": calibration_record,
            "wall_seconds": round(time.monotonic() - started, 2),
            "worker_seconds": round(run.seconds, 2),
            "worker_cpu_seconds": round(run.cpu_seconds, 2),
            "oneshot_seconds": run.result.get("oneshot_seconds"),
            "peak_memory_mb": round(run.peak_memory_mb, 1),
            "size_bytes": checkpoint_size(tmp),
            "versions": run.result.get("versions", {}),
            "device": run.result.get("device"),
            "qreason_version": __version__,
            "created_at": now_iso(),
        }
        (tmp / PROVENANCE).write_text(
            json.dumps(provenance, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        if not publish(tmp, dest):
            echo(f"another process finished {dest} first; using it")
            return _variant(read_provenance(dest), name, dest, reused=True)
    echo(
        f"done in {provenance['wall_seconds']:.1f} s (peak memory {provenance['peak_memory_mb']:.0f} MB, "
        f"{provenance['size_bytes'] / 2**20:.1f} MiB on disk): {dest}"
    )
    return _variant(provenance, name, dest, reused=False)


def variant_name(spec) -> str:
    """A variant's label: its ``name``, else the method (an import: the checkpoint's directory name)."""
    if spec.name:
        return spec.name
    return Path(spec.path.rstrip("/")).name if spec.method == "import" else spec.method


class QuantizeStage:
    """The base variant plus each quantized one (made, or reused from the checkpoint cache)."""

    name = "quantize"
    section = "quantization"

    def enabled(self, cfg: RunConfig) -> bool:
        return True

    def run(self, ctx: RunContext) -> QuantizationSummary:
        b = ctx.base
        base = ModelVariant(
            key=content_key("variant", ctx.cfg.model.name, b.fingerprint),
            name=ctx.cfg.model.name,
            base_model=b.spec,
            base_fingerprint=b.fingerprint,
            method="none",
            path=b.path,
            fingerprint=b.fingerprint,
            reused=True,
            created_at=now_iso(),
        )
        ctx.variants = [base] + ctx.need_engines().quantize(
            [(b, spec, variant_name(spec), None, ctx.base_dir) for spec in ctx.cfg.quantize]
        )
        ctx.store.variants.append(ctx.variants)
        made = ctx.variants[1:]
        return QuantizationSummary(
            variants=[
                QuantizedVariant(
                    name=v.name,
                    method=v.method,
                    reused=v.reused,
                    seconds=v.quantize_seconds,
                    path=v.path,
                    versions=v.versions,
                )
                for v in made
            ],
            quantized=sum(not v.reused for v in made),
            reused=sum(v.reused for v in made),
        )
