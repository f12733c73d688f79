"""The "Silver Bullet" recovery dataset: a compact set of examples aimed at what quantization broke.

From every flip (the base model solved a problem with a seed, a quantized variant did not) whose judged first
faulty step k is known (the judge stack's combined verdict; a guess of its prior layer does not count), build:
- an SFT example: the problem and a verified-correct step-by-step solution by the full-precision model;
- a DPO pair sharing a prefix: the quantized model's own steps before k as the prefix, its step k onward as
  "rejected", and as "chosen" a continuation of that same prefix by the full-precision model that the grader
  verified correct. When no attempt yields a correct continuation, the item keeps its SFT example only.

Items are balanced across (error type, capability), one per problem, capped (default 332, the paper's size)
and split train/test deterministically by seed. Exports: JSONL and Parquet in the formats TRL's SFT trainer
(conversational ``prompt``/``completion``) and DPO trainer (conversational ``prompt``/``chosen``/``rejected``)
read, plus a dataset card.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd

from qreason.config.schema import CurateConfig, RunConfig, SamplingConfig, StabilityConfig
from qreason.engines import Backend, GenerationRequest
from qreason.flips import is_flip, latest_grades, solved_cells
from qreason.inputs.steps import step_spans
from qreason.records import Generation, Judgment, SilverBulletItem, content_key
from qreason.stages.analyze import analysis_for, verdicts
from qreason.stages.base import RunContext
from qreason.stages.generate import run_generation
from qreason.stages.grade import Grader, grade_key, run_grading
from qreason.stages.noise import store_stability
from qreason.store import RunStore, mark_owned, publish, staging
from qreason.store.ownership import check_user_dir
from qreason.summary import CurateSummary

log = logging.getLogger(__name__)


@dataclass
class FlipCandidate:
    failed: Generation  # the quantized variant's failed generation
    verdict: Judgment
    k: int  # first faulty step
    prefix: str
    rejected: str


def split_at_step(text: str, k: int) -> tuple[str, str] | None:
    """(text before step k, text from step k on), or None when k is not a step of the text."""
    spans = step_spans(text)
    if not 0 <= k < len(spans):
        return None
    start = spans[k][0]
    return text[:start], text[start:]


def find_candidates(store: RunStore, base: str) -> list[FlipCandidate]:
    solved = solved_cells(latest_grades(store.grades.all()).values(), base)
    generations = {g.key: g for g in store.generations.all()}
    out = []
    for gen_key, verdict in sorted(verdicts(store).items()):
        gen = generations.get(gen_key)
        if gen is None or not is_flip(gen, base, solved):
            continue
        if verdict.first_error_step is None or verdict.first_error_step < 0:
            continue
        if (verdict.votes or {}).get("decided_by") == "prior":
            continue  # a guess of the judge stack's prior layer, not a located step
        parts = split_at_step(gen.text, verdict.first_error_step)
        if parts is None:
            continue
        out.append(FlipCandidate(gen, verdict, verdict.first_error_step, *parts))
    return out


def continuation_request(c: FlipCandidate, base_fingerprint: str, attempt: int, sampling: SamplingConfig):
    messages = [*c.failed.messages, {"role": "assistant", "content": c.prefix}]
    key = content_key("continuation", base_fingerprint, c.failed.key, c.k, attempt, sampling.model_dump())
    return GenerationRequest(
        key=key,
        variant=f"continuation:{c.failed.variant}",
        model_fingerprint=base_fingerprint,
        task=c.failed.task,
        problem_id=c.failed.problem_id,
        messages=messages,
        seed=attempt,
    )


def find_chosen(
    store: RunStore,
    candidates: list[FlipCandidate],
    cfg: CurateConfig,
    sampling: SamplingConfig,
    base_fingerprint: str,
    backend_factory: Callable[[], Backend],
    grader: Grader,
) -> dict[str, str]:
    """Generate full-precision continuations (greedy first, then sampled), grade prefix + continuation, and
    return the first verified-correct continuation per candidate (keyed by the failed generation's key).
    ``backend_factory`` is called only if there is model work; its caller owns (and closes) the backend."""
    chosen: dict[str, str] = {}
    backend: Backend | None = None
    for attempt in range(cfg.attempts):
        todo = [c for c in candidates if c.failed.key not in chosen]
        if not todo:
            break
        params = sampling.model_copy(
            update={
                "temperature": 0.0 if attempt == 0 else cfg.temperature,
                "max_tokens": cfg.max_tokens or sampling.max_tokens,
            }
        )
        requests = {c.failed.key: continuation_request(c, base_fingerprint, attempt, params) for c in todo}
        missing = [r for r in requests.values() if r.key not in store.continuations]
        if missing:
            backend = backend or backend_factory()
            desc = f"curate: continue {attempt + 1}/{cfg.attempts}"
            run_generation(store.continuations, missing, backend, params, desc=desc, transient=True)
        full = []
        for c in todo:
            cont = store.continuations.get(requests[c.failed.key].key)
            if cont is not None:  # graded as the whole solution: the prefix followed by the continuation
                full.append(cont.model_copy(update={"text": c.prefix + cont.text}))
        run_grading(store, grader, full, out=store.continuation_grades, transient=True, desc="curate: grade")
        for c in todo:
            req = requests[c.failed.key]
            grade = store.continuation_grades.get(grade_key(req.key, grader.grader))
            if grade is not None and grade.status == "correct":
                chosen[c.failed.key] = store.continuations.get(req.key).text
    return chosen


def _order(seed: int, *parts) -> str:
    return hashlib.sha256(json.dumps([seed, *parts]).encode()).hexdigest()


def balance(items: list[SilverBulletItem], max_items: int, seed: int) -> list[SilverBulletItem]:
    """Round-robin over (error type, capability) groups, one item per problem, at most ``max_items``.
    Items with a DPO pair come first within a group; the order is otherwise a seeded hash (deterministic)."""
    groups: dict[tuple, list[SilverBulletItem]] = defaultdict(list)
    for it in items:
        groups[(it.error_type or "", it.capability or "")].append(it)
    for g in groups.values():  # stable flips first (where known), then those with a DPO pair
        g.sort(
            key=lambda it: (
                not (it.stability or {}).get("stable", False),
                it.chosen is None,
                _order(seed, it.task, it.problem_id, it.variant, it.seed),
            )
        )
    picked, used = [], set()
    queues = [groups[k] for k in sorted(groups)]
    while len(picked) < max_items and any(queues):
        for q in queues:
            while q and (q[0].task, q[0].problem_id) in used:
                q.pop(0)
            if q and len(picked) < max_items:
                it = q.pop(0)
                used.add((it.task, it.problem_id))
                picked.append(it)
    return picked


def problem_split(
    task: str, problem_id: str, seed: int, test_fraction: float, task_splits: dict[str, str] | None = None
) -> str:
    """A problem's split: its task's in ``task_splits`` (``curate.task_splits``), else a seeded hash of its id
    alone. Never from how any model did on it, so the test split is a random sample of the task (recover
    evaluates on all of it, flips included)."""
    if task_splits and task in task_splits:
        return task_splits[task]
    bucket = int(_order(seed, "split", task, problem_id)[:8], 16) / 16**8
    return "test" if bucket < test_fraction else "train"


def assign_split(item: SilverBulletItem, cfg: CurateConfig) -> str:
    return problem_split(item.task, item.problem_id, cfg.seed, cfg.test_fraction, cfg.task_splits)


def prefer_stable(items: list[SilverBulletItem], cfg: CurateConfig) -> list[SilverBulletItem]:
    """The items curation balances: where stability is known, ``only`` keeps the stable flips; ``prefer``
    keeps only them when there are at least ``min_stable_items``, else all items with the stable ones first
    (``balance`` keeps this order within a group); ``off`` keeps all."""
    known = [it for it in items if it.stability is not None and it.stability.get("stable") is not None]
    if cfg.stability == "off" or not known:
        return items
    stable = [it for it in items if it.stability and it.stability.get("stable")]
    if cfg.stability == "only" or len(stable) >= min(cfg.min_stable_items, cfg.max_items):
        return stable
    ids = {id(it) for it in stable}
    return stable + [it for it in items if id(it) not in ids]


def build_items(
    store: RunStore,
    candidates: list[FlipCandidate],
    chosen: dict[str, str],
    base: str,
    cfg: CurateConfig,
    methods: dict[str, str],
    run_id: str | None,
    stability_cfg: StabilityConfig | None = None,
) -> list[SilverBulletItem]:
    stability = store_stability(store, base, stability_cfg or StabilityConfig())
    grades = {(g.variant, g.task, g.problem_id, g.seed): g.status for g in store.grades.all()}
    base_solutions: dict[tuple, list[Generation]] = defaultdict(list)
    for g in store.generations.all():
        if g.variant == base and grades.get((base, g.task, g.problem_id, g.seed)) == "correct":
            base_solutions[(g.task, g.problem_id)].append(g)
    items = []
    for c in candidates:
        sols = sorted(
            base_solutions.get((c.failed.task, c.failed.problem_id), []),
            key=lambda g: (g.seed != c.failed.seed, g.seed),
        )
        if not sols:
            continue
        cont = chosen.get(c.failed.key)
        stab = stability.get((c.failed.variant, c.failed.task, c.failed.problem_id))
        item = SilverBulletItem(
            key=content_key("silver-bullet", c.failed.key, c.verdict.key, cont),
            task=c.failed.task,
            problem_id=c.failed.problem_id,
            variant=c.failed.variant,
            method=methods.get(c.failed.variant, c.failed.variant),
            seed=c.failed.seed,
            messages=c.failed.messages,
            sft_solution=sols[0].text,
            prefix=c.prefix if cont is not None else None,
            chosen=c.prefix + cont if cont is not None else None,
            rejected=c.prefix + c.rejected if cont is not None else None,
            first_error_step=c.k,
            error_type=c.verdict.error_type,
            sub_type=c.verdict.sub_type,
            capability=c.verdict.capability,
            judge=c.verdict.judge,
            provenance={
                "run_id": run_id,
                "failed_generation": c.failed.key,
                "sft_generation": sols[0].key,
                "judgment": c.verdict.key,
                "quantized_model": c.failed.model_fingerprint,
                "full_precision_model": sols[0].model_fingerprint,
            },
            stability=stab.as_dict() if stab is not None and stab.stable is not None else None,
        )
        items.append(item)
    picked = balance(prefer_stable(items, cfg), cfg.max_items, cfg.seed)
    return [it.model_copy(update={"split": assign_split(it, cfg)}) for it in picked]


def sft_row(messages: list[dict], solution: str, **meta) -> dict:
    """An SFT example, the one row format of the export and of qreason's training worker: TRL's
    conversational prompt-completion form (``prompt``, ``completion``: TRL's SFTTrainer then puts the loss on
    the answer only, by default) and the whole conversation as ``messages`` (for tools that read chats)."""
    answer = [{"role": "assistant", "content": solution}]
    return {"prompt": messages, "completion": answer, "messages": [*messages, *answer], **meta}


def dpo_row(messages: list[dict], chosen: str, rejected: str, **meta) -> dict:
    """A preference pair in TRL's conversational preference format."""
    return {
        "prompt": messages,
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
        **meta,
    }


def item_rows(it: SilverBulletItem) -> dict[str, dict | None]:
    """An item's rows in the exported dataset (with its provenance): SFT always, DPO when it has a pair."""
    return {
        "sft": sft_row(it.messages, it.sft_solution, **_meta(it)),
        "dpo": dpo_row(it.messages, it.chosen, it.rejected, prefix=it.prefix, **_meta(it))
        if it.chosen is not None
        else None,
    }


def _meta(it: SilverBulletItem) -> dict:
    return {
        "task": it.task,
        "problem_id": it.problem_id,
        "variant": it.variant,
        "method": it.method,
        "error_type": it.error_type,
        "sub_type": it.sub_type,
        "capability": it.capability,
        "first_error_step": it.first_error_step,
        "judge": it.judge,
        "stable": (it.stability or {}).get("stable"),
    }


def _table(counter: Counter, head: str) -> str:
    rows = "\n".join(
        f"| {k or '(none)'} | {v} |" for k, v in sorted(counter.items(), key=lambda kv: (-kv[1], str(kv[0])))
    )
    return f"| {head} | items |\n| --- | --- |\n{rows or '| (none) | 0 |'}"


def stability_note(items: list[SilverBulletItem], provenance: dict) -> str:
    """The dataset card's sentence on stability: how many items are flips stable over repetitions."""
    known = [it for it in items if it.stability is not None]
    if not known:
        return (
            "Stability: unknown (one repetition per problem: one seed and no noise floor), so some items may "
            "be flips that noise (batch composition, kernels, hardware) caused rather than quantization."
        )
    stable = sum(bool(it.stability.get("stable")) for it in known)
    return (
        f"Stability: {stable} of {len(items)} items are stable flips (the base right in at least "
        f"{100 * provenance.get('stable_base_min', 0.9):.0f} % of its repetitions, the variant in at most "
        f"{100 * provenance.get('stable_variant_max', 0.1):.0f} % of its own; column `stable`). Curation "
        f"({provenance.get('stability', 'prefer')}) found {provenance.get('stable_candidates', stable)} "
        f"stable among {provenance.get('candidates', len(items))} judged flips."
    )


def dataset_card(items: list[SilverBulletItem], provenance: dict) -> str:
    dpo = [it for it in items if it.chosen is not None]
    splits = Counter(it.split for it in items)
    front = (
        "---\nconfigs:\n"
        "- config_name: sft\n  data_files:\n  - {split: train, path: sft/train.jsonl}\n"
        "  - {split: test, path: sft/test.jsonl}\n"
        "- config_name: dpo\n  data_files:\n  - {split: train, path: dpo/train.jsonl}\n"
        "  - {split: test, path: dpo/test.jsonl}\n---\n"
    )
    return f"""{front}
# Silver Bullet recovery dataset

Built by qreason from the failures that quantization introduced: problems the full-precision model solved
and a quantized variant did not, with the first faulty step located by a judge.

- **SFT** (`sft/`, conversational `prompt` / `completion`, and the same chat as `messages`): the problem and a
  verified-correct full-precision solution. {len(items)} items (train {splits.get("train", 0)}, test
  {splits.get("test", 0)}). TRL's SFTTrainer trains on `prompt` / `completion` with the loss on the solution
  only (its default for this form), as qreason's recover stage does; `messages` alone would put loss on
  every token (system prompt and question too).
- **DPO** (`dpo/`, conversational `prompt` / `chosen` / `rejected`): both answers start with the quantized
  model's own steps before its first faulty step (`prefix`); "rejected" continues with its faulty steps,
  "chosen" with a full-precision continuation that the grader verified correct. {len(dpo)} pairs.

{stability_note(items, provenance)}

Load with `datasets.load_dataset("json", data_files=...)` and hand the rows to TRL's SFTTrainer / DPOTrainer
as they are.

## Counts

{_table(Counter(it.method for it in items), "method")}

{_table(Counter(it.error_type for it in items), "error type")}

{_table(Counter(it.capability for it in items), "capability")}

## Provenance

```json
{json.dumps(provenance, indent=2, sort_keys=True)}
```
"""


_LEGACY_LAYOUT = {"sft", "dpo", "items.jsonl", "README.md"}  # what exports wrote before the marker existed


def check_out_dir(out_dir: Path) -> None:
    """Refuse an output directory that holds anything but a dataset qreason wrote: export replaces it whole,
    and qreason never deletes what it did not create. Called before any work is done."""
    out_dir = Path(out_dir)
    legacy = out_dir.is_dir() and not out_dir.is_symlink() and {p.name for p in out_dir.iterdir()}
    if legacy and legacy <= _LEGACY_LAYOUT:
        return
    # no --force: the export replaces the directory whole, so another's files would be deleted
    check_user_dir(out_dir, "dataset", force=False, option="--out", force_ok=False)


def export(items: list[SilverBulletItem], out_dir: Path, provenance: dict) -> Path:
    """Write the dataset into ``out_dir`` atomically: it is built in a temporary directory beside it, then
    renamed into place; an earlier dataset there is first renamed aside and deleted only once the new one is
    in place."""
    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    with staging(out_dir, suffix="") as tmp:
        for kind in ("sft", "dpo"):
            (tmp / kind).mkdir()
            for split in ("train", "test"):
                rows = [r for it in items if it.split == split and (r := item_rows(it)[kind]) is not None]
                (tmp / kind / f"{split}.jsonl").write_text(
                    "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
                )
                if rows:
                    pd.DataFrame(rows).to_parquet(tmp / kind / f"{split}.parquet", index=False)
        (tmp / "items.jsonl").write_text(
            "".join(it.model_dump_json() + "\n" for it in items), encoding="utf-8"
        )
        (tmp / "README.md").write_text(dataset_card(items, provenance), encoding="utf-8")
        mark_owned(tmp, "dataset", "silver bullet")
        publish(tmp, out_dir, replace=True)
    return out_dir


@dataclass
class CurateResult:
    candidates: int
    items: int
    dpo_pairs: int
    out_dir: Path | None
    stable_items: int | None = None
    stable_candidates: int | None = None


def curate(
    store: RunStore,
    cfg: CurateConfig,
    sampling: SamplingConfig,
    base: str,
    base_fingerprint: str,
    backend_factory: Callable[[], Backend],
    grader: Grader,
    run_id: str | None = None,
    out_dir: Path | None = None,
    stability: StabilityConfig | None = None,
) -> CurateResult:
    check_out_dir(out_dir or store.dataset_dir)
    candidates = find_candidates(store, base)
    if not candidates:
        log.info("curate: no judged flips with a located first faulty step; no dataset written")
        return CurateResult(0, 0, 0, None)
    chosen = find_chosen(store, candidates, cfg, sampling, base_fingerprint, backend_factory, grader)
    methods = {v.name: v.method for v in store.variants.all()}
    items = build_items(store, candidates, chosen, base, cfg, methods, run_id, stability)
    stab = stability or StabilityConfig()
    known = store_stability(store, base, stab)
    stable_candidates = sum(
        bool(s.stable)
        for s in (known.get((c.failed.variant, c.failed.task, c.failed.problem_id)) for c in candidates)
        if s is not None
    )
    any_known = any(s.stable is not None for s in known.values())
    provenance = {
        "run_id": run_id,
        "run_dir": store.dir.name,  # its name only: the card travels, this machine's paths do not
        "base_variant": base,
        "base_model": base_fingerprint,
        "variants": sorted({it.variant for it in items}),
        "methods": sorted({it.method for it in items}),
        "judges": sorted({it.judge for it in items}),
        "seed": cfg.seed,
        "max_items": cfg.max_items,
        "candidates": len(candidates),
        "stability": cfg.stability,
        "stable_base_min": stab.base_min,
        "stable_variant_max": stab.variant_max,
        "stable_candidates": stable_candidates if any_known else None,
        "stable_items": sum(bool((it.stability or {}).get("stable")) for it in items) if any_known else None,
    }
    path = export(items, out_dir or store.dataset_dir, provenance)
    return CurateResult(
        len(candidates),
        len(items),
        sum(it.chosen is not None for it in items),
        path,
        provenance["stable_items"],
        provenance["stable_candidates"],
    )


class CurateStage:
    """The Silver Bullet dataset from the run's judged flips."""

    name = "curate"
    section = "curate"

    def __init__(self, out_dir: Path | None = None):
        self.out_dir = out_dir

    def enabled(self, cfg: RunConfig) -> bool:
        return cfg.curate.enabled

    def run(self, ctx: RunContext) -> CurateSummary | None:
        if analysis_for(ctx) is None:
            return None
        from qreason.inputs.models import ResolvedModel

        base = ctx.base_record
        model = ResolvedModel(base.name, base.path, base.fingerprint, "variant")
        result = curate(
            ctx.store,
            ctx.cfg.curate,
            ctx.cfg.sampling,
            base.name,
            base.fingerprint,
            lambda: ctx.need_engines().backend_for(model),
            ctx.grader,
            ctx.summary.run_id,
            out_dir=self.out_dir,
            stability=ctx.cfg.noise.stability if ctx.cfg.noise else None,
        )
        return CurateSummary(
            candidates=result.candidates,
            items=result.items,
            dpo_pairs=result.dpo_pairs,
            stable_items=result.stable_items,
            stable_candidates=result.stable_candidates,
            dir=str(result.out_dir) if result.out_dir else None,
        )
