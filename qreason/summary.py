"""The run summary (``RunSummary``, written as summary.json) and its main table: accuracy per variant and
task, per seed and mean ± std across seeds, with outcome counts."""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from qreason.records import Grade

SCHEMA_VERSION = 1
STATUSES = ("correct", "wrong", "no_answer", "truncated", "grader_error")


def lenient(g: Grade) -> str:
    """The lenient verdict (grades of grader revision 1 have none: their strict one stands in)."""
    return g.lenient_status or g.status


def is_format_failure(g: Grade) -> bool:
    """Right answer, unreadable format: no marker states it, but the closing sentence does."""
    return g.status == "no_answer" and lenient(g) == "correct"


def accuracy_table(grades: list[Grade]) -> list[dict]:
    """One row per (variant, task). Accuracy counts every outcome but ``correct`` as a failure; the lenient
    accuracy counts ``lenient_status``; ``format_failures`` are the no_answer grades whose lenient verdict is
    correct (they are part of ``outcomes.no_answer``)."""
    cells: dict[tuple[str, str], dict[int, list[Grade]]] = defaultdict(lambda: defaultdict(list))
    for g in grades:
        cells[(g.variant, g.task)][g.seed].append(g)
    rows = []
    for (variant, task), by_seed in sorted(cells.items()):
        per_seed = {
            seed: sum(g.status == "correct" for g in gs) / len(gs) for seed, gs in sorted(by_seed.items())
        }
        lenient_accs = [sum(lenient(g) == "correct" for g in gs) / len(gs) for gs in by_seed.values()]
        accs = list(per_seed.values())
        counts = Counter(g.status for gs in by_seed.values() for g in gs)
        rows.append(
            {
                "variant": variant,
                "task": task,
                "n_problems": len({g.problem_id for gs in by_seed.values() for g in gs}),
                "seeds": list(per_seed),
                "accuracy_per_seed": per_seed,
                "accuracy_mean": statistics.fmean(accs),
                "accuracy_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                "outcomes": {s: counts.get(s, 0) for s in STATUSES},
                "lenient_accuracy_mean": statistics.fmean(lenient_accs),
                # no_answer split: format failures (the maths was right) vs the rest; wrong answers are
                # outcomes.wrong
                "format_failures": sum(is_format_failure(g) for gs in by_seed.values() for g in gs),
                "n_grades": sum(len(gs) for gs in by_seed.values()),
            }
        )
    return rows


def format_table(rows: list) -> str:
    rows = [r.model_dump() if isinstance(r, BaseModel) else r for r in rows]
    head = ["variant", "task", "problems", "seeds", "accuracy", "lenient", *STATUSES, "format_failures"]
    body = [
        [
            r["variant"],
            r["task"],
            str(r["n_problems"]),
            str(len(r["seeds"])),
            f"{100 * r['accuracy_mean']:.1f} ± {100 * r['accuracy_std']:.1f} %",
            f"{100 * (r.get('lenient_accuracy_mean') or r['accuracy_mean']):.1f} %",
            *(str(r["outcomes"][s]) for s in STATUSES),
            str(r.get("format_failures") or 0),
        ]
        for r in rows
    ]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(
        [fmt.format(*head), fmt.format(*("-" * w for w in widths)), *(fmt.format(*b) for b in body)]
    )


# ------------------------------------------------------------------------------------------ the run summary


class Section(BaseModel):
    """A part of the summary; unknown keys are kept (a newer qreason may have written them)."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)


class ResultRow(Section):
    """Accuracy of one variant on one task (``accuracy_table``)."""

    variant: str
    task: str
    n_problems: int
    seeds: list[int]
    accuracy_per_seed: dict[int, float]
    accuracy_mean: float
    accuracy_std: float
    outcomes: dict[str, int]
    lenient_accuracy_mean: float | None = None  # None in summaries of grader revision 1
    format_failures: int = 0  # strict no_answer, lenient correct (part of outcomes.no_answer)
    n_grades: int | None = None


class QuantizedVariant(Section):
    name: str = ""
    method: str = ""
    reused: bool = False
    seconds: float | None = None
    path: str = ""
    versions: dict[str, str] = Field(default_factory=dict)


class QuantizationSummary(Section):
    variants: list[QuantizedVariant] = Field(default_factory=list)
    quantized: int = 0
    reused: int = 0


class GenerationSummary(Section):
    planned: int = 0
    cached: int = 0
    cached_by_variant: dict[str, int] = Field(default_factory=dict)  # generations reused, per variant
    produced: int = 0
    failed: int = 0
    seconds: float = 0.0


class CurateSummary(Section):
    candidates: int = 0
    items: int = 0
    dpo_pairs: int = 0
    stable_items: int | None = None  # items whose flip is stable over repetitions (None: not known)
    stable_candidates: int | None = None
    dir: str | None = None


class GatesSummary(Section):
    tripped: list[str] = Field(default_factory=list)
    passed: bool = True
    held: list[str] = Field(default_factory=list)  # over a bare threshold, held back by the noise band


class JudgeSummary(Section):
    """The judge stage (``qreason.stages.judge``): what was judged and by whom."""

    candidates: int = 0  # failures selected for judging
    flips: int = 0  # of which flips
    rules_written: int = 0  # records of the model-free layers (rule checks, reference locator) written
    llm_items: int = 0  # failures sent to the LLM judges (outcomes and empty solutions are not)
    judges: dict[str, dict[str, int]] = Field(
        default_factory=dict
    )  # name -> ok, judge_error, cached, done, pending
    panel_written: int = 0
    stack_written: int = 0  # combined verdicts (judge "stack") written
    requests: int = 0  # HTTP requests sent (retries included)
    usage: dict[str, int] = Field(default_factory=dict)
    batch_files: list[str] = Field(default_factory=list)
    errors: list[str] = Field(default_factory=list)  # judges stopped for the run (the endpoint refused them)
    first_errors: dict[str, str] = Field(default_factory=dict)  # judge name -> its first error this run
    seconds: float = 0.0


class ArmResult(Section):
    """One adapter of one quantized variant, evaluated on the held-out problems: targeted (the Silver Bullet
    items), control (untargeted examples, same budget) or fp (the full-precision model trained on the targeted
    arm's data: "before" and "after" are then the base's own accuracy without and with that adapter)."""

    variant: str  # the quantized variant
    eval_variant: str  # the name its re-evaluation generations carry (VARIANT+sb / +ctl / +fp)
    arm: Literal["targeted", "control", "fp"]
    mode: str
    train_items: int
    train_chars: int | None = None  # characters of answer text trained on (the budget beside train_items)
    train_problem_ids: list[str]
    eval_problem_ids: list[str]
    seeds: list[int]
    base_accuracy: float
    accuracy_before: float
    accuracy_after: float
    recovery_before: float | None  # accuracy / base accuracy (None when the base solved nothing)
    recovery_after: float | None
    recovery_after_ci: list[float | None] = Field(default_factory=list)  # paired bootstrap over problems
    repaired: int  # wrong before, right after (same problem and seed)
    broken: int  # right before, wrong after
    mcnemar_p: float
    diff_ci: list[float | None]  # accuracy_after - accuracy_before, paired bootstrap 95 %
    adapter: str  # PEFT adapter directory (adapter_config.json)
    adapter_key: str
    adapter_reused: bool
    eval_mode: Literal["lora", "merged"]
    train_seconds: float | None
    eval_seconds: float
    generations_produced: int
    loss: dict[str, list[list[float]]] = Field(default_factory=dict)  # phase -> [[step, loss], ...]
    failures_after: dict[str, int] = Field(default_factory=dict)  # rule-check verdicts of what still fails
    versions: dict[str, str] = Field(default_factory=dict)
    teacher: dict[str, int] = Field(default_factory=dict)  # kd: teacher outputs computed / read from cache


class HeadToHead(Section):
    """Targeted against control training on the same held-out items."""

    diff: float  # accuracy targeted - control
    ci: list[float | None]  # paired bootstrap 95 % interval of ``diff``
    targeted_only: int  # right after targeted training only
    control_only: int  # right after control training only
    mcnemar_p: float
    verdict: str


class VariantRecovery(ArmResult):
    control: ArmResult | None = None
    fp_arm: ArmResult | None = None  # the full-precision model trained on the same data (recover.fp_arm)
    fp_arm_skipped: str | None = None  # why there is no full-precision arm
    # (after - before) / (base - before): the share of the quantization gap the adapter closed (None when the
    # variant matched the base before training), with a paired bootstrap 95 % interval over problems
    gap_closed: float | None = None
    gap_closed_ci: list[float | None] = Field(default_factory=list)
    # the variant's gain minus the base's gain from the same data (accuracy points as a fraction): repair of
    # quantization damage beyond what the data teaches any model; paired bootstrap 95 % interval
    repair_beyond_fp: float | None = None
    repair_beyond_fp_ci: list[float | None] = Field(default_factory=list)
    min_train_items: int = 0  # below this many train items nothing is concluded
    conclusive: bool = True
    verdict: str = ""  # one line: what the comparison shows (or "too few items to conclude")
    # the targeted adapter merged into a dense checkpoint, for lm-eval (``lm_eval.adapters``): vLLM 0.32
    # cannot compute prompt logprobs with a LoRA, so loglikelihood tasks need the merged model
    merged_checkpoint: str | None = None
    targeted_vs_control: HeadToHead | None = None


class RecoverySummary(Section):
    """The recover stage (``qreason.stages.recover``), also written to ``RUN_DIR/recovery/summary.json``."""

    variants: list[VariantRecovery] = Field(default_factory=list)
    skipped: dict[str, str] = Field(default_factory=dict)  # variant -> why nothing was trained
    produced: int = 0
    seconds: float = 0.0
    summary_path: str | None = None


class LmEvalSummary(Section):
    """The lm-eval stage (qreason/lm_eval.py): every variant's metrics per lm-eval task."""

    tasks: list[str] = Field(default_factory=list)
    variants: dict[str, dict[str, dict[str, float]]] = Field(
        default_factory=dict
    )  # variant -> task -> metric
    stderr: dict[str, dict[str, dict[str, float | None]]] = Field(default_factory=dict)
    recovery: dict[str, dict[str, float | None]] = Field(default_factory=dict)  # variant -> task -> % of base
    primary_metric: dict[str, str] = Field(default_factory=dict)  # task -> metric
    higher_is_better: dict[str, bool] = Field(default_factory=dict)  # task -> of its primary metric
    n_samples: dict[str, int] = Field(default_factory=dict)  # task -> documents evaluated
    lm_eval_version: str = ""
    evaluated: int = 0  # (model, task) results lm-eval produced in this invocation
    cached: int = 0  # found in the store
    failed: list[dict[str, str]] = Field(default_factory=list)
    seconds: float = 0.0
    dir: str = ""


class PerturbationNoise(Section):
    """The base re-run under one perturbation against the base itself, per task (cells: problem x seed)."""

    name: str  # the perturbation
    variant: str  # BASE~NAME
    task: str
    settings: dict[str, Any] = Field(default_factory=dict)  # what the perturbation changed
    cells: int = 0  # paired (problem, seed) cells
    lost: int = 0  # base right, perturbed base wrong
    gained: int = 0  # the reverse
    text_changed: int = 0  # cells whose generated text differs at all
    accuracy: float = 0.0  # of the perturbed base
    base_accuracy: float = 0.0

    @property
    def flips(self) -> int:
        return self.lost + self.gained


class VariantVsNoise(Section):
    """A quantized variant's flips beside the noise's, per task: is its discordance with the base larger than
    the base's with itself under perturbations? One-sided Fisher exact test on discordant / concordant cells
    (variant cells against all perturbations' cells pooled; per perturbation in ``p_by_perturbation``)."""

    variant: str
    task: str
    cells: int = 0
    lost: int = 0
    gained: int = 0
    noise_cells: int = 0
    noise_flips: int = 0  # discordant cells of all perturbations together
    discordance: float = 0.0  # (lost + gained) / cells
    noise_discordance: float = 0.0
    p_value: float = 1.0
    p_by_perturbation: dict[str, float] = Field(default_factory=dict)
    exceeds_noise: bool = False  # p_value < alpha
    stable_flips: int | None = None  # flips (problems) stable over repetitions; None: not known


class NoiseSummary(Section):
    """The noise floor (``qreason.stages.noise``): base-vs-base flips per perturbation and each quantized
    variant's flips tested against them. The perturbed base variants live in ``RUN_DIR/noise/`` only: they
    never appear in ``results``, judging or curation."""

    base: str = ""
    alpha: float = 0.05
    perturbations: list[PerturbationNoise] = Field(default_factory=list)
    variants: list[VariantVsNoise] = Field(default_factory=list)
    floor: dict[str, float] = Field(default_factory=dict)  # task -> largest |accuracy change| of the base
    repetitions: dict[str, int] = Field(default_factory=dict)  # variant -> repetitions per problem
    stability: dict[str, float] = Field(default_factory=dict)  # the thresholds of a stable flip
    skipped: dict[str, str] = Field(default_factory=dict)  # perturbation -> why it did not run here
    planned: int = 0
    produced: int = 0
    cached: int = 0
    failed: int = 0
    seconds: float = 0.0


class RunSummary(Section):
    """``summary.json``: what one run did and found. Each stage fills its own section; readers (the CLI,
    gates, the report's trend, ``compare``) use these fields, never string keys. Summaries of older runs (no
    ``schema_version``) validate too: every section is optional."""

    schema_version: int = SCHEMA_VERSION
    run_id: str | None = None
    name: str = ""
    run_dir: str = ""
    config_hash: str | None = None
    model: dict[str, Any] = Field(default_factory=dict)
    executor: str | None = None
    quantization: QuantizationSummary | None = None
    generations: GenerationSummary | None = None
    grades_written: int = 0
    results: list[ResultRow] = Field(default_factory=list)
    noise: NoiseSummary | None = None
    judge: JudgeSummary | None = None
    curate: CurateSummary | None = None
    lm_eval: LmEvalSummary | None = None
    recover: RecoverySummary | None = None
    finished_at: str | None = None
    wall_seconds: float | None = None
    versions: dict[str, Any] = Field(default_factory=dict)
    hardware: dict[str, Any] = Field(default_factory=dict)
    report: str | None = None
    gates: GatesSummary | None = None
    # stages that could not run (stage name -> one line why); the others ran and the report was written
    stage_failures: dict[str, str] = Field(default_factory=dict)

    @classmethod
    def read(cls, data: dict | None) -> "RunSummary | None":
        """A summary from JSON (a file or the run index); None for None."""
        return None if data is None else cls.model_validate(data)

    def dump(self) -> dict:
        return self.model_dump(mode="json", exclude_none=True)


def format_noise(noise: NoiseSummary) -> str:
    """The noise floor as text: base-vs-base flips per perturbation, then each variant's flips beside them."""
    from qreason.stats import format_p

    lines = [f"noise floor ({noise.base} re-run under perturbations; flips = lost + gained of paired cells):"]
    for p in noise.perturbations:
        what = ", ".join(f"{k} {v}" for k, v in p.settings.items()) or "identical settings"
        lines.append(
            f"  {p.variant:<22} {p.task:<12} {p.flips:>3} flips of {p.cells} ({p.lost} lost, {p.gained} "
            f"gained; {p.text_changed} texts changed) [{what}]"
        )
    for name, why in noise.skipped.items():
        lines.append(f"  {noise.base}~{name}: skipped ({why})")
    for v in noise.variants:
        verdict = "exceeds the noise" if v.exceeds_noise else "not above the noise"
        stable = f"; {v.stable_flips} stable flips" if v.stable_flips is not None else ""
        lines.append(
            f"  {v.variant:<22} {v.task:<12} {v.lost + v.gained:>3} flips of {v.cells} "
            f"({100 * v.discordance:.1f} % vs noise {100 * v.noise_discordance:.1f} %): "
            f"p = {format_p(v.p_value)}, {verdict}{stable}"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------- what differs between runs


def provenance(summary: RunSummary) -> dict[str, str]:
    """What a run's numbers may depend on besides the config: library versions (main and quantization
    environments) and hardware, flattened to name -> value."""
    out = {k: str(v) for k, v in summary.versions.items()}
    hw = summary.hardware
    if hw:
        out["cpu"] = f"{hw.get('cpu')} x{hw.get('cpu_count')}"
        out["gpus"] = ", ".join(hw.get("gpus") or []) or "none"
    for v in summary.quantization.variants if summary.quantization else []:
        for dist, version in v.versions.items():
            out[f"{dist} (quantization)"] = str(version)
    return out


def changes(before: RunSummary, after: RunSummary) -> list[str]:
    """Versions and hardware that differ between two runs' summaries, as 'name: old -> new' (only names both
    record: a run without quantized variants says nothing about llm-compressor)."""
    a, b = provenance(before), provenance(after)
    return [f"{k}: {a[k]} -> {b[k]}" for k in sorted(a.keys() & b.keys()) if a[k] != b[k]]
