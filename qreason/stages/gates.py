"""Regression gates for nightly runs: thresholds from the config, checked against this run's summary, the
previous finished run of the same config, and the judge's error rate. A tripped gate makes ``qreason run``
exit with code 3 after writing everything, so cron or CI can alert on it."""

from __future__ import annotations

from qreason.config.schema import GatesConfig, RunConfig
from qreason.records import Judgment
from qreason.stages.base import RunContext
from qreason.store import RunIndex
from qreason.summary import GatesSummary, LmEvalSummary, RunSummary

GATE_EXIT_CODE = 3


def previous_summary(index: RunIndex, name: str, run_id: str | None) -> RunSummary | None:
    """The summary of the last finished run of this config before ``run_id``."""
    earlier = [
        r
        for r in index.list(name)
        if r["run_id"] != run_id
        and r["status"] in ("ok", "gated")
        and r["summary"]
        and r["summary"].get("results")
    ]
    return RunSummary.read(earlier[-1]["summary"]) if earlier else None


def history(index: RunIndex, name: str, run_id: str | None, n: int) -> list[RunSummary]:
    """The summaries of the last ``n`` finished runs of this config before ``run_id``, oldest first."""
    earlier = [
        r
        for r in index.list(name)
        if r["run_id"] != run_id
        and r["status"] in ("ok", "gated")
        and r["summary"]
        and r["summary"].get("results")
    ]
    return [RunSummary.read(r["summary"]) for r in earlier[-n:]]


def base_band(runs: list[RunSummary], base: str) -> dict[str, tuple[float, int]]:
    """Task -> (the base's spread: max - min accuracy over ``runs``, how many runs had it); tasks seen in
    fewer than two runs have no band."""
    accs: dict[str, list[float]] = {}
    for s in runs:
        for r in s.results:
            if r.variant == base:
                accs.setdefault(r.task, []).append(r.accuracy_mean)
    return {t: (max(a) - min(a), len(a)) for t, a in accs.items() if len(a) >= 2}


def _noise_holds(summary: RunSummary, variant: str, task: str, drop: float) -> str | None:
    """Why a drop over ``max_drop`` is within the noise (None: it is not)."""
    noise = summary.noise
    if noise is None:
        return None
    floor = noise.floor.get(task)
    if floor is not None and drop <= floor + 1e-12:
        return f"within the noise floor ({100 * floor:.1f} points: the base's largest change when perturbed)"
    vs = next((v for v in noise.variants if v.variant == variant and v.task == task), None)
    if vs is not None and not vs.exceeds_noise:
        return (
            f"its discordance with {noise.base} ({vs.lost + vs.gained} of {vs.cells}) does not exceed the "
            f"noise's ({vs.noise_flips} of {vs.noise_cells}; p = {vs.p_value:.3g}, alpha {noise.alpha:g})"
        )
    return None


def judge_error_rate(judgments: list[Judgment]) -> tuple[float, int]:
    """Share of LLM-judge records that are judge errors (rules and panel records excluded), and their
    count."""
    llm = [j for j in judgments if j.judge not in ("rules", "panel")]
    return (sum(j.status == "judge_error" for j in llm) / len(llm) if llm else 0.0), len(llm)


def format_failure_gate(limit: float, summary: RunSummary) -> list[str]:
    """Cells whose share of format failures (right answer, no readable final-answer marker) exceeds ``limit``:
    a quantized model that drifts in format loses accuracy without losing maths."""
    tripped = []
    for r in summary.results:
        n = r.n_grades or sum(r.outcomes.values())
        rate = r.format_failures / n if n else 0.0
        if rate > limit + 1e-12:
            tripped.append(
                f"{r.variant}/{r.task}: {r.format_failures} of {n} answers ({100 * rate:.1f}%) are "
                f"format failures; the limit is {100 * limit:.1f}%"
            )
    return tripped


def check_gates(
    gates: GatesConfig,
    summary: RunSummary,
    base: str,
    previous: RunSummary | None,
    judgments: list[Judgment],
    held: list[str] | None = None,
    band_runs: list[RunSummary] | None = None,
) -> list[str]:
    """One readable line per tripped gate (empty: all passed). A drop over a bare threshold that the noise
    floor (``drop_over_noise``) or the base's spread over earlier runs (``trend_band_runs``: ``band_runs``,
    this run's summary added) explains is not tripped: it goes to ``held`` with the reason."""
    tripped = []
    held = held if held is not None else []
    band = base_band([*(band_runs or []), summary], base) if gates.trend_band_runs else {}
    rows = {(r.variant, r.task): r.accuracy_mean for r in summary.results}
    for (variant, task), acc in sorted(rows.items()):
        cell = f"{variant}/{task}"
        if gates.min_accuracy is not None and acc < gates.min_accuracy:
            tripped.append(
                f"{cell}: accuracy {100 * acc:.1f}% is below the floor {100 * gates.min_accuracy:.1f}%"
            )
        base_acc = rows.get((base, task))
        if (
            gates.max_drop is not None
            and variant != base
            and base_acc is not None
            and base_acc - acc > gates.max_drop + 1e-12
        ):
            line = (
                f"{cell}: accuracy {100 * acc:.1f}% is {100 * (base_acc - acc):.1f} points below "
                f"{base} ({100 * base_acc:.1f}%); the limit is {100 * gates.max_drop:.1f}"
            )
            why = _noise_holds(summary, variant, task, base_acc - acc) if gates.drop_over_noise else None
            if why is None:
                tripped.append(line)
            else:
                held.append(f"{line}, but {why}: not tripped (gates.drop_over_noise)")
    if gates.max_drop_vs_previous is not None and previous is not None:
        before = {(r.variant, r.task): r.accuracy_mean for r in previous.results}
        for cell, acc in sorted(rows.items()):
            if cell in before and before[cell] - acc > gates.max_drop_vs_previous + 1e-12:
                line = (
                    f"{cell[0]}/{cell[1]}: accuracy {100 * acc:.1f}% is {100 * (before[cell] - acc):.1f} "
                    f"points below the previous run {previous.run_id} ({100 * before[cell]:.1f}%); "
                    f"the limit is {100 * gates.max_drop_vs_previous:.1f}"
                )
                spread, n = band.get(cell[1], (0.0, 0))
                if before[cell] - acc > spread + 1e-12:
                    tripped.append(line + (f" and the base's band {100 * spread:.1f}" if n else ""))
                else:
                    held.append(
                        f"{line}, but within the band of the base's spread over the last {n} runs "
                        f"({100 * spread:.1f} points): not tripped (gates.trend_band_runs)"
                    )
    if gates.max_format_failure_rate is not None:
        tripped += format_failure_gate(gates.max_format_failure_rate, summary)
    if gates.max_lm_eval_drop is not None:
        tripped += lm_eval_gate(gates.max_lm_eval_drop, summary.lm_eval, base)
    for v in summary.recover.variants if summary.recover else []:
        after, before = v.recovery_after, v.accuracy_before
        if (
            gates.min_recovery_after is not None
            and after is not None
            and after < gates.min_recovery_after - 1e-12
        ):
            tripped.append(
                f"{v.eval_variant}: recovery after training {100 * after:.1f}% is below "
                f"{100 * gates.min_recovery_after:.1f}%"
            )
        if gates.recover_no_worse and v.accuracy_after < before - 1e-12:
            tripped.append(
                f"{v.eval_variant}: the adapter lowered accuracy on held-out problems "
                f"({100 * before:.1f}% -> {100 * v.accuracy_after:.1f}%)"
            )
        if (
            gates.min_gap_closed is not None
            and v.gap_closed is not None
            and v.gap_closed < gates.min_gap_closed - 1e-12
        ):
            tripped.append(
                f"{v.eval_variant}: the adapter closed {100 * v.gap_closed:.1f}% of the gap to the base, "
                f"below {100 * gates.min_gap_closed:.1f}%"
            )
    if gates.max_judge_error_rate is not None:
        rate, n = judge_error_rate(judgments)
        if rate > gates.max_judge_error_rate:
            tripped.append(
                f"judge error rate {100 * rate:.1f}% of {n} LLM judgments exceeds "
                f"{100 * gates.max_judge_error_rate:.1f}%"
            )
    return tripped


def lm_eval_gate(limit: float, section: LmEvalSummary | None, base: str) -> list[str]:
    """Variants whose primary lm-eval metric of a task is worse than the base's by more than ``limit`` (in the
    metric's units; "worse" is lower, or higher for a lower-is-better metric such as perplexity)."""
    if section is None:
        return []
    tripped = []
    for task, metric in sorted(section.primary_metric.items()):
        base_value = section.variants.get(base, {}).get(task, {}).get(metric)
        if base_value is None:
            continue
        sign = 1.0 if section.higher_is_better.get(task, True) else -1.0
        for variant in sorted(v for v in section.variants if v != base):
            value = section.variants[variant].get(task, {}).get(metric)
            if value is not None and sign * (base_value - value) > limit + 1e-12:
                tripped.append(
                    f"{variant}/lm-eval {task}: {metric} {value:.4g} is {abs(base_value - value):.4g} "
                    f"worse than {base} ({base_value:.4g}); the limit is {limit:g}"
                )
    return tripped


class GatesStage:
    """Regression gates on this run's summary (and the previous run of the same config in the index)."""

    name = "gates"
    section = "gates"

    def enabled(self, cfg: RunConfig) -> bool:
        return True

    def run(self, ctx: RunContext) -> GatesSummary:
        gates = ctx.cfg.gates
        previous = previous_summary(ctx.index, ctx.cfg.name, ctx.summary.run_id) if ctx.index else None
        runs = (
            history(ctx.index, ctx.cfg.name, ctx.summary.run_id, gates.trend_band_runs - 1)
            if ctx.index and gates.trend_band_runs
            else []
        )
        judgments = [j for j in ctx.store.judgments.all() if j.generation_key in ctx.wanted]
        held: list[str] = []
        tripped = check_gates(gates, ctx.summary, ctx.base_name, previous, judgments, held, runs)
        return GatesSummary(tripped=tripped, passed=not tripped, held=held)
