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
from qreason.summary import ArmResult, RunSummary, VariantRecovery

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
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "p –"
    return "p < 0.001" if p < 0.001 else f"p = {p:.2f}" if p >= 0.01 else f"p = {p:.3f}"


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
        f"{p_text(p)}): {in_words(p)}. {row.get('lost', 0)} lost, {row.get('gained', 0)} gained of "
        f"{row.get('pairs', 0)} paired answers (same problem and seed)."
    )
    return Fact(f"accuracy · {row.get('task', '')}", text, tone(diff, p))


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
    how = f"{rec.mode}, {rec.train_items} examples; {evaluated(rec.eval_mode)}"
    text = f"the adapter ({how}) {arm_sentence(rec)}."
    if rec.control is not None:
        text += f" Control adapter: {pct(rec.control.accuracy_after)}."
    if rec.targeted_vs_control is not None:
        text += f" Targeted vs control: {rec.targeted_vs_control.verdict}."
    if rec.verdict:
        text += f" Verdict: {rec.verdict}."
    if not rec.conclusive:  # too few items: nothing is claimed, nothing is coloured
        return Fact("recovery", text, "neutral")
    return Fact("recovery", text, tone(rec.accuracy_after - rec.accuracy_before, rec.mcnemar_p))


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
) -> list[Headline]:
    """One block per quantized variant, in the order of the flips table."""
    tripped = summary.gates.tripped if summary.gates else []
    recovered = {v.variant: v for v in (summary.recover.variants if summary.recover else [])}
    rows = flips.to_dict("records") if not flips.empty else []
    out: list[Headline] = []
    for variant in dict.fromkeys(r["variant"] for r in rows):
        h = Headline(variant, methods.get(variant, ""))
        h.facts += [accuracy_fact(r, base) for r in rows if r["variant"] == variant]
        h.facts.append(error_shift_fact(error_types, variant, base))
        if variant in recovered:
            h.facts.append(recovery_fact(recovered[variant]))
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
            if isinstance(meta, dict):
                front = [(str(k), _flat(v)) for k, v in meta.items()]
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
            lines.append(
                Fact(
                    "control",
                    f"The control adapter (the same budget on examples the analysis did not choose) "
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
