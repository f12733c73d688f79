"""What the report says first: one headline block per quantized variant (the accuracy change with its interval
and p-value in words, the error type that grew most, the recovery verdict, the gates it tripped), the gate
results, the recovery verdicts as sentences, and the dataset card rendered. Each part is its own function so
that other sections can add to a block without touching the rest.

Colour follows significance: a fact is "bad" or "good" only when its test says the change is unlikely to be
chance (p < ALPHA); anything else is "neutral", whatever its sign."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd
import yaml
from markdown_it import MarkdownIt
from markupsafe import Markup

from qreason.config.schema import GatesConfig
from qreason.stages.judge.measured import accuracy_words
from qreason.stats import format_p
from qreason.summary import ArmResult, NoiseSummary, RunSummary, VariantRecovery

ALPHA = 0.05


@dataclass
class Fact:
    """One line of a headline: a label, the sentence, and its tone (bad / good / neutral)."""

    label: str
    text: str
    tone: str = "neutral"


@dataclass
class Headline:
    variant: str
    method: str
    facts: list[Fact] = field(default_factory=list)


def pts(x: float | None) -> str:
    """A difference of proportions in percentage points, signed."""
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:+.1f}"


def pct(x: float | None) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f} %"


def p_text(p: float | None) -> str:
    return f"p = {format_p(p)}"


def tone(change: float | None, p: float | None) -> str:
    """bad / good only for a significant change; neutral otherwise."""
    if change is None or p is None or math.isnan(p) or p >= ALPHA or change == 0:
        return "neutral"
    return "good" if change > 0 else "bad"


def in_words(p: float | None) -> str:
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "no test"
    return "significant" if p < ALPHA else "not significant"


def accuracy_fact(row: dict, base: str) -> Fact:
    """One task's accuracy change from the flips table (paired with the base on problems and seeds)."""
    diff, p = row.get("acc_diff"), row.get("mcnemar_p")
    ci = f"95 % CI [{pts(row.get('ci_low'))}, {pts(row.get('ci_high'))}]"
    text = (
        f"{pct(row.get('acc_ref'))} for {base} → {pct(row.get('acc'))}: {pts(diff)} points ({ci}, McNemar "
        f"{p_text(p)}): {in_words(p)}."
    )
    return Fact(f"accuracy · {row.get('task', '')}", text, tone(diff, p))


def noise_fact(noise: NoiseSummary | None, variant: str, task: str, row: dict) -> Fact:
    """Is the change real? The variant's flips (lost + gained) against the base's own flips when re-run
    under perturbations (one-sided Fisher test, ``stages/noise.py``), or why that was not measured."""
    flips = f"{row.get('lost', 0) + row.get('gained', 0)} flips of {row.get('pairs', 0)}"
    found = (
        next((v for v in noise.variants if (v.variant, v.task) == (variant, task)), None) if noise else None
    )
    if found is None:
        return Fact(
            f"vs noise · {task}",
            f"not measured ({flips}; no noise floor: `noise:` in the config re-runs the base to measure it).",
        )
    reruns = {p.name for p in noise.perturbations if p.task == task} if noise else set()
    where = "the base re-run" if len(reruns) == 1 else f"{len(reruns)} base re-runs"
    counts = (
        f"{found.lost + found.gained} flips of {found.cells} vs {found.noise_flips} of {found.noise_cells}"
    )
    if found.exceeds_noise:
        return Fact(f"vs noise · {task}", f"real: {counts} in {where}, p {format_p(found.p_value)}.", "bad")
    return Fact(f"vs noise · {task}", f"within the noise: {counts} in {where}, p {format_p(found.p_value)}.")


def where_fact(error_types: pd.DataFrame, variant: str, base: str, located: dict | None) -> Fact:
    """Where it broke: the error type that grew most, the median first faulty step, and how far to trust
    both: the coverage (failures with a located step) beside the deciding layer's measured accuracy. A step
    guessed by the prior layer is not located and has no error type."""
    grew = error_shift_fact(error_types, variant, base).text
    if not located or not located.get("failures"):
        return Fact("where it broke", f"{grew} No judged failure of this variant.")
    n, k = located["failures"], located["located"]
    if not k:
        step = f"no first faulty step located in {n} failures"
    else:
        step = f"median first faulty step {located['median_step']:g} (of the {k} of {n} failures located"
        step += f", coverage {100 * k / n:.0f} %)"
    guessed = located.get("guessed", 0)
    guess = f"; {guessed} only guessed by the prior, not counted" if guessed else ""
    layers = located.get("layers") or {}
    layer = max(layers, key=layers.get) if layers else None
    trust = (
        f" Decided mostly by the {layer} layer: {accuracy_words(located.get('tasks', []), list(layers))}."
        if layer
        else ""
    )
    return Fact("where it broke", f"{grew} {step[0].upper()}{step[1:]}{guess}.{trust}")


def error_shift_fact(error_types: pd.DataFrame, variant: str, base: str) -> Fact:
    """The error type whose count grew most against the base (judged failures only; counts, no test)."""
    if error_types.empty:
        return Fact("error types", "no judged failure carries an error type.")
    counts = error_types.pivot_table(index="error_type", columns="variant", values="count", aggfunc="sum")
    counts = counts.fillna(0)
    if variant not in counts:
        return Fact("error types", "no judged failure of this variant carries an error type.")
    ref = counts[base] if base in counts else 0
    delta = (counts[variant] - ref).sort_values(ascending=False)
    top = delta.index[0]
    n, n_base = int(counts.at[top, variant]), int(counts.at[top, base]) if base in counts else 0
    if delta.iloc[0] <= 0:
        common = counts[variant].idxmax()
        return Fact(
            "error types",
            f"no error type grew against {base} (most common: {common}, {int(counts.at[common, variant])}).",
        )
    return Fact("error types", f"{top} grew most: {n} judged failures against {n_base} for {base}.")


def arm_sentence(arm: ArmResult) -> str:
    change = arm.accuracy_after - arm.accuracy_before
    word = "raised" if change > 0 else "lowered" if change < 0 else "left"
    ci = f"95 % CI [{pts(arm.diff_ci[0])}, {pts(arm.diff_ci[1])}]" if len(arm.diff_ci) == 2 else "no interval"
    return (
        f"{word} accuracy on {len(arm.eval_problem_ids)} held-out problems from "
        f"{pct(arm.accuracy_before)} to {pct(arm.accuracy_after)} ({pts(change)} points, {ci}, "
        f"McNemar {p_text(arm.mcnemar_p)}): {in_words(arm.mcnemar_p)}"
    )


def evaluated(eval_mode: str) -> str:
    if eval_mode == "merged":
        return "evaluated merged: adapter merged into a dense checkpoint"
    return "evaluated as a LoRA on the quantized checkpoint"


def recovery_fact(rec: VariantRecovery) -> Fact:
    """Recovery as docs/recovery.md defines it: gap closed and repair beyond task learning with their
    intervals, or the reason there is no verdict (with the numbers measured anyway)."""
    text = f"{rec.mode} on {rec.train_items} examples: {recovery_words(rec)}."
    budget = budget_words(rec)
    if budget:
        text += f" {budget[0].upper()}{budget[1:]}."
    if not rec.conclusive:  # too few items: nothing is claimed, nothing is coloured
        return Fact("recovery", text, "neutral")
    ci = rec.repair_beyond_fp_ci
    if rec.repair_beyond_fp is not None and ci and ci[0] is not None:
        return Fact("recovery", text, "good" if ci[0] > 0 else "neutral")
    return Fact("recovery", text, tone(rec.accuracy_after - rec.accuracy_before, rec.mcnemar_p))


def _interval(ci: list[float | None], scale: float, fmt: str, unit: str = "") -> str:
    if len(ci) != 2 or ci[0] is None or ci[1] is None:
        return ""
    return f" [{scale * ci[0]:{fmt}}{unit}, {scale * ci[1]:{fmt}}{unit}]"


def recovery_words(rec: VariantRecovery) -> str:
    """ "gap closed 80 % [32 %, 168 %]; repair beyond task learning +5.1 points [-3.0, +13.1]: VERDICT", or
    the reason there is no verdict followed by what was measured."""
    parts = []
    if rec.gap_closed is not None:
        parts.append(
            f"gap closed {100 * rec.gap_closed:.0f} %{_interval(rec.gap_closed_ci, 100, '.0f', ' %')}"
        )
    else:
        parts.append("no gap to close (the variant was not below the base on these problems)")
    if rec.repair_beyond_fp is not None:
        parts.append(
            f"repair beyond task learning {pts(rec.repair_beyond_fp)} points"
            f"{_interval(rec.repair_beyond_fp_ci, 100, '+.1f')}"
        )
    elif rec.fp_arm_skipped:
        parts.append(f"no full-precision arm ({rec.fp_arm_skipped})")
    if not rec.conclusive:  # the reason, with its numbers; nothing measured on too few items is claimed
        return f"no verdict: {rec.verdict or 'too few items to conclude'}"
    measured = "; ".join(parts)
    verdict = rec.verdict.rsplit(": ", 1)[-1] if rec.verdict and ": " in rec.verdict else ""
    return f"{measured}: {verdict}" if verdict else measured


# a control whose answer text is within this fraction of the targeted arm's (and as many examples) is matched
BUDGET_TOLERANCE = 0.1


def budget_matched(rec: VariantRecovery) -> bool:
    """The control trained on as many examples as the targeted arm and about as much text (where recorded)."""
    c = rec.control
    if c is None or c.train_items != rec.train_items:
        return False
    chars, mine = getattr(c, "train_chars", None), getattr(rec, "train_chars", None)
    return chars is None or mine is None or abs(chars - mine) <= BUDGET_TOLERANCE * max(chars, mine, 1)


def budget_words(rec: VariantRecovery) -> str:
    """The control arm's budget against the targeted arm's, in numbers: "the same budget" only when the
    examples (and their characters, where recorded) are equal."""
    c = rec.control
    if c is None:
        return ""
    chars, mine = getattr(c, "train_chars", None), getattr(rec, "train_chars", None)
    same = c.train_items == rec.train_items and (chars is None or mine is None or chars == mine)
    if same:
        return f"control: the same budget ({c.train_items} examples), {pct(c.accuracy_after)} after"
    if budget_matched(rec):
        return (
            f"control: as many examples ({c.train_items}), about as long ({chars} against {mine} "
            f"characters), {pct(c.accuracy_after)} after"
        )
    chars = f", {chars} against {mine} characters" if chars is not None and mine is not None else ""
    return (
        f"control: {c.train_items} examples against the targeted arm's {rec.train_items}{chars} (budgets "
        f"differ), {pct(c.accuracy_after)} after"
    )


def gate_lines_for(variant: str, tripped: list[str]) -> list[str]:
    """The tripped-gate lines that name this variant (``VARIANT/task: ...`` or ``VARIANT+sb: ...``)."""
    return [t for t in tripped if t.startswith((f"{variant}/", f"{variant}+"))]


def headlines(
    flips: pd.DataFrame,
    error_types: pd.DataFrame,
    summary: RunSummary,
    base: str,
    methods: dict[str, str],
    gates_configured: bool = True,
    located: dict[str, dict] | None = None,
) -> list[Headline]:
    """One block per quantized variant, in the order of the flips table, answering in turn: how much did
    accuracy change; is it more than the noise; where did it break (and how far to trust the locating);
    did training repair it. ``located``: per variant, the located first faulty steps (``build_report``)."""
    tripped = summary.gates.tripped if summary.gates else []
    recovered = {v.variant: v for v in (summary.recover.variants if summary.recover else [])}
    rows = flips.to_dict("records") if not flips.empty else []
    out: list[Headline] = []
    for variant in dict.fromkeys(r["variant"] for r in rows):
        h = Headline(variant, methods.get(variant, ""))
        mine = [r for r in rows if r["variant"] == variant]
        h.facts += [accuracy_fact(r, base) for r in mine]
        h.facts += [noise_fact(summary.noise, variant, r.get("task", ""), r) for r in mine]
        h.facts.append(where_fact(error_types, variant, base, (located or {}).get(variant)))
        if variant in recovered:
            h.facts.append(recovery_fact(recovered[variant]))
        elif summary.recover and variant in summary.recover.skipped:
            h.facts.append(Fact("recovery", f"not trained ({summary.recover.skipped[variant]})."))
        lines = gate_lines_for(variant, tripped)
        if lines:
            h.facts.append(Fact("gates", "; ".join(lines), "bad"))
        else:
            h.facts.append(Fact("gates", "none tripped." if gates_configured else "none configured."))
        out.append(h)
    return out


# ------------------------------------------------------------------------------------------------ gates

GATE_TEXT = {
    "max_drop": ("accuracy drop vs the base", "points"),
    "max_drop_vs_previous": ("accuracy drop vs the previous run", "points"),
    "max_judge_error_rate": ("judge error rate", "share"),
    "min_accuracy": ("accuracy floor", "share"),
    "max_format_failure_rate": ("format failure rate", "share"),
    "max_lm_eval_drop": ("lm-eval primary metric drop", "metric"),
    "min_recovery_after": ("recovery after training", "share"),
    "recover_no_worse": ("an adapter must not lower accuracy", "flag"),
}
GATE_WORDS = {
    "max_drop": "points below",
    "max_drop_vs_previous": "below the previous run",
    "max_judge_error_rate": "judge error rate",
    "min_accuracy": "below the floor",
    "max_format_failure_rate": "format failures",
    "max_lm_eval_drop": "lm-eval",
    "min_recovery_after": "recovery after training",
    "recover_no_worse": "lowered accuracy",
}


def gate_rows(gates: GatesConfig | None, summary: RunSummary) -> list[dict]:
    """Each configured gate with its limit and what tripped it (empty: no gates configured)."""
    tripped = summary.gates.tripped if summary.gates else []
    rows = []
    for name, (what, unit) in GATE_TEXT.items():
        limit = getattr(gates, name, None) if gates is not None else None
        if limit is None or limit is False:
            continue
        shown = (
            "on"
            if unit == "flag"
            else f"{100 * limit:.1f} points"
            if unit == "points"
            else f"{100 * limit:.1f} %"
            if unit == "share"
            else f"{limit:g}"
        )
        key = GATE_WORDS[name]
        if name == "max_drop":  # "points below NAME (" without "the previous run"
            hits = [t for t in tripped if key in t and "previous run" not in t]
        else:
            hits = [t for t in tripped if key in t]
        rows.append({"gate": name, "what": what, "limit": shown, "tripped": hits})
    return rows


# --------------------------------------------------------------------------------------------- the card

LOADER_KEYS = {
    "configs",
    "dataset_info",
}  # Hugging Face dataset card front matter for ``datasets``, not readers
_MD = MarkdownIt("commonmark", {"html": False}).enable("table")


def render_card(text: str | None) -> dict | None:
    """A dataset card as HTML: YAML front matter as key/value rows, the Markdown body rendered with raw HTML
    escaped (markdown-it's ``html: False``; its link check drops ``javascript:`` and the like)."""
    if not text:
        return None
    front: list[tuple[str, str]] = []
    body = text
    if text.startswith("---\n"):
        end = text.find("\n---", 4)
        if end > 0:
            try:
                meta = yaml.safe_load(text[4:end])
            except yaml.YAMLError:
                meta = None
            if isinstance(meta, dict):  # the loader's own settings (configs, dataset_info) are no reading
                front = [(str(k), _flat(v)) for k, v in meta.items() if k not in LOADER_KEYS]
                body = text[end + 4 :].lstrip("-\n")
    return {"front_matter": front, "html": Markup(_MD.render(body))}


def _flat(value) -> str:
    if isinstance(value, (list, dict)):
        return yaml.safe_dump(value, default_flow_style=True, sort_keys=False).strip()
    return str(value)


def recovery_verdicts(recovery) -> list[dict]:
    """Per recovered variant, the sentences the recovery section opens with: what the targeted adapter did,
    what the control did, and which won."""
    out = []
    for v in recovery.variants if recovery else []:
        lines = [
            Fact(
                "targeted",
                f"Training on its {v.train_items} Silver Bullet items ({v.mode}; {evaluated(v.eval_mode)}) "
                f"{arm_sentence(v)}.",
                tone(v.accuracy_after - v.accuracy_before, v.mcnemar_p),
            )
        ]
        if v.control is not None:
            c = v.control
            same = budget_matched(v)
            budget = (
                f"the same budget, {c.train_items} examples"
                if budget_words(v).startswith("control: the same budget")
                else f"as many examples ({c.train_items}), about as long"
                if same
                else f"{c.train_items} examples against the targeted arm's {v.train_items}: budgets differ"
            )
            lines.append(
                Fact(
                    "control",
                    f"The control adapter ({budget}; examples the analysis did not choose) "
                    f"{arm_sentence(c)}.",
                    tone(c.accuracy_after - c.accuracy_before, c.mcnemar_p),
                )
            )
        h2h = v.targeted_vs_control
        if h2h is not None:
            ci = f"95 % CI [{pts(h2h.ci[0])}, {pts(h2h.ci[1])}]" if len(h2h.ci) == 2 else "no interval"
            lines.append(
                Fact(
                    "which helped",
                    f"Targeted minus control: {pts(h2h.diff)} points ({ci}, "
                    f"McNemar {p_text(h2h.mcnemar_p)}): {h2h.verdict}.",
                    tone(h2h.diff, h2h.mcnemar_p),
                )
            )
        out.append({"variant": v.variant, "facts": lines})
    return out
