"""Degradation analysis over a run directory (pandas): how much each quantization method hurts, and how.

All functions take plain DataFrames built by ``frames(store)`` and return DataFrames, so every table is usable
from Python and is saved with the run (``analysis/*.csv``) by ``analyze``.

Conventions:
- accuracy counts every outcome but ``correct`` as a failure; mean ± std is across seeds (std with ddof=1);
- recovery % = quantized accuracy / full-precision accuracy × 100 (as in Red Hat's quantized-model cards);
- flips pair the same (task, problem, seed) in the base and a variant: "lost" = base right, variant wrong;
  "gained" = the reverse. McNemar's exact test is the two-sided binomial test on lost vs gained; the
  confidence interval of the accuracy difference is a paired percentile bootstrap over problems (seeded,
  reproducible).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from qreason.config.schema import RunConfig
from qreason.records import Judgment
from qreason.stages.base import RunContext
from qreason.stats import bootstrap_diff_ci, mcnemar_exact
from qreason.store import RunStore, write_atomic

log = logging.getLogger(__name__)
BASE = "base"
DIFFICULTY_COLUMNS = ("level", "subject", "n_reference_steps", "difficulty")


def frames(
    store: RunStore, generation_keys: set[str] | None = None, base: str = BASE
) -> dict[str, pd.DataFrame]:
    """The run's records as DataFrames: one row per grade (joined with its generation, problem and variant),
    and one row per judgment. ``generation_keys`` limits them to those generations (a config's own work, when
    the run directory also holds records of an earlier version of the config)."""

    def keep(key: str) -> bool:
        return generation_keys is None or key in generation_keys

    problems = pd.DataFrame(
        [
            {"task": p.task, "problem_id": p.problem_id, **{k: p.meta.get(k) for k in DIFFICULTY_COLUMNS}}
            for p in store.problems.all()
        ]
    )
    gens = pd.DataFrame(
        [
            {
                "generation_key": g.key,
                "completion_tokens": g.completion_tokens,
                "finish_reason": g.finish_reason,
                "n_steps": len(g.steps),
            }
            for g in store.generations.all()
            if keep(g.key)
        ]
    )
    grades = pd.DataFrame([g.model_dump() for g in store.grades.all() if keep(g.generation_key)])
    variants = pd.DataFrame(
        [{"variant": v.name, "method": v.method, "bits": v.bits} for v in store.variants.all()]
    )
    if grades.empty:
        return {"grades": grades, "judgments": pd.DataFrame()}
    df = grades.merge(gens, on="generation_key", how="left")
    if not problems.empty:
        df = df.merge(problems, on=["task", "problem_id"], how="left")
    if not variants.empty:
        df = df.merge(variants.drop_duplicates("variant"), on="variant", how="left")
    else:
        df["method"], df["bits"] = None, None
    df["method"] = df["method"].fillna(df["variant"].where(df["variant"] != base, "none"))
    df["correct"] = (df["status"] == "correct").astype(int)
    if "lenient_status" not in df:
        df["lenient_status"] = None
    df["lenient_status"] = df["lenient_status"].fillna(
        df["status"]
    )  # grader revision 1 had no lenient verdict
    records = [j for j in store.judgments.all() if keep(j.generation_key)]
    judgments = pd.DataFrame([j.model_dump() for j in records])
    if not judgments.empty:
        chosen = {j.key for j in verdicts(store).values()}
        judgments["verdict"] = judgments["key"].isin(chosen)
        votes = [j.votes or {} for j in records]
        judgments["decided_by"] = [v.get("decided_by") or j.judge for v, j in zip(votes, records)]
        judgments["answer_wrong"] = [v.get("answer_wrong") for v in votes]
        ab = [v.get("abandoned_answer") or {} for v in votes]
        judgments["abandoned_step"] = [a.get("step") for a in ab]
        judgments["tokens_to_correct"] = [a.get("tokens_to_correct") for a in ab]
        judgments["tokens_total"] = [a.get("tokens") for a in ab]
        judgments = judgments.merge(gens[["generation_key", "n_steps"]], on="generation_key", how="left")
    return {"grades": df, "judgments": judgments}


def accuracy(df: pd.DataFrame) -> pd.DataFrame:
    per_seed = df.groupby(["variant", "method", "task", "seed"])["correct"].mean().reset_index()
    out = (
        per_seed.groupby(["variant", "method", "task"])["correct"]
        .agg(accuracy="mean", accuracy_std=lambda s: s.std(ddof=1) if len(s) > 1 else 0.0, seeds="count")
        .reset_index()
    )
    n = df.groupby(["variant", "task"])["problem_id"].nunique().rename("n_problems").reset_index()
    return out.merge(n, on=["variant", "task"])


def degradation(acc: pd.DataFrame, base: str = BASE) -> pd.DataFrame:
    """Accuracy with absolute and relative drop and recovery % against the base variant of the same task."""
    ref = acc[acc["variant"] == base][["task", "accuracy"]].rename(columns={"accuracy": "base_accuracy"})
    out = acc.merge(ref, on="task", how="left")
    out["abs_drop"] = out["base_accuracy"] - out["accuracy"]
    out["rel_drop_pct"] = np.where(
        out["base_accuracy"] > 0, 100 * out["abs_drop"] / out["base_accuracy"], np.nan
    )
    out["recovery_pct"] = np.where(
        out["base_accuracy"] > 0, 100 * out["accuracy"] / out["base_accuracy"], np.nan
    )
    return out


FLIP_COLUMNS = [
    "variant",
    "task",
    "pairs",
    "lost",
    "gained",
    "net",
    "acc_ref",
    "acc",
    "acc_diff",
    "ci_low",
    "ci_high",
    "mcnemar_p",
]


def paired(ref: pd.DataFrame, other: pd.DataFrame, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Compare ``other`` with ``ref`` item by item. Both have columns variant, task, problem_id, seed,
    correct; rows pair on (task, problem_id, seed) and on the variant given by ``ref``'s ``pair_variant``
    column (or the same variant when it has none). "lost" = right in ref, wrong in other; "gained" = the
    reverse."""
    keys = ["task", "problem_id", "seed"]
    rows = []
    ref = ref.rename(columns={"correct": "ref_correct"})
    for (variant, task), group in other.groupby(["variant", "task"]):
        ref_variant = (
            ref[ref["pair_variant"] == variant] if "pair_variant" in ref else ref[ref["variant"] == variant]
        )
        pairs = group[keys + ["correct"]].merge(ref_variant[keys + ["ref_correct"]], on=keys)
        if pairs.empty:
            continue
        lost = int(((pairs["ref_correct"] == 1) & (pairs["correct"] == 0)).sum())
        gained = int(((pairs["ref_correct"] == 0) & (pairs["correct"] == 1)).sum())
        lo, hi = bootstrap_diff_ci(pairs["ref_correct"].to_numpy(), pairs["correct"].to_numpy(), n_boot, seed)
        rows.append(
            {
                "variant": variant,
                "task": task,
                "pairs": len(pairs),
                "lost": lost,
                "gained": gained,
                "net": gained - lost,
                "acc_ref": pairs["ref_correct"].mean(),
                "acc": pairs["correct"].mean(),
                "acc_diff": pairs["correct"].mean() - pairs["ref_correct"].mean(),
                "ci_low": lo,
                "ci_high": hi,
                "mcnemar_p": mcnemar_exact(lost, gained),
            }
        )
    return pd.DataFrame(rows, columns=FLIP_COLUMNS)


def flips(df: pd.DataFrame, base: str = BASE, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Each variant against the base on the same problems and seeds."""
    others = df[df["variant"] != base]
    ref = (
        pd.concat([df[df["variant"] == base].assign(pair_variant=v) for v in others["variant"].unique()])
        if not others.empty
        else df.iloc[:0].assign(pair_variant=None)
    )
    return paired(ref, others, n_boot, seed)


def compare_runs(a: RunStore, b: RunStore) -> pd.DataFrame:
    """Run B against run A, per variant and task, paired on the same problems and seeds (``qreason
    compare``)."""
    df_a, df_b = frames(a)["grades"], frames(b)["grades"]
    if df_a.empty or df_b.empty:
        raise ValueError("both runs need graded generations")
    return paired(df_a, df_b)


def verdicts(store: RunStore) -> dict[str, Judgment]:
    """The verdict that counts per judged generation (the judge stage's rule: panel, else an LLM judge, else
    the rule checks), judge errors left out."""
    from qreason.stages.judge import final_judgments

    return {k: j for k, j in final_judgments(store).items() if j.status == "ok"}


def final_verdicts(judgments: pd.DataFrame) -> pd.DataFrame:
    """The judgment rows that ``verdicts`` chose (marked by ``frames``)."""
    return judgments if judgments.empty else judgments[judgments["verdict"]]


def error_distribution(verdicts: pd.DataFrame, column: str) -> pd.DataFrame:
    """Counts and shares of ``column`` (error_type, sub_type or capability) per variant."""
    cols = ["variant", column, "count", "share"]
    if verdicts.empty:
        return pd.DataFrame(columns=cols)
    v = verdicts[verdicts[column].notna()]
    counts = v.groupby(["variant", column]).size().rename("count").reset_index()
    counts["share"] = counts["count"] / counts.groupby("variant")["count"].transform("sum")
    return counts[cols]


def first_error_positions(verdicts: pd.DataFrame) -> pd.DataFrame:
    """First faulty step per variant: absolute (1-based, as a reader counts steps; the records are 0-based)
    and relative to the solution's number of steps."""
    cols = [
        "variant",
        "judged",
        "located",
        "mean_step",
        "median_step",
        "mean_relative",
        "share_in_first_third",
    ]
    if verdicts.empty:
        return pd.DataFrame(columns=cols)
    v = verdicts.copy()
    # a step guessed by the prior layer is not located (qreason.stages.judge.stack)
    guessed = v["decided_by"] == "prior" if "decided_by" in v else False
    v["located"] = (v["first_error_step"].fillna(-1) >= 0) & ~guessed
    loc = v[v["located"]].copy()
    loc["relative"] = (loc["first_error_step"] + 1) / loc["n_steps"].clip(lower=1)
    rows = []
    for variant, group in v.groupby("variant"):
        g = loc[loc["variant"] == variant]
        rows.append(
            {
                "variant": variant,
                "judged": len(group),
                "located": len(g),
                "mean_step": (g["first_error_step"] + 1).mean(),
                "median_step": (g["first_error_step"] + 1).median(),
                "mean_relative": g["relative"].mean(),
                "share_in_first_third": (g["relative"] <= 1 / 3).mean() if len(g) else np.nan,
            }
        )
    return pd.DataFrame(rows, columns=cols)


JUDGE_LAYER_COLUMNS = ["variant", "decided_by", "failures", "located", "share"]


def judge_layers(verdicts: pd.DataFrame) -> pd.DataFrame:
    """Judge coverage per variant: for each deciding layer of the combined verdict (rules, reference, prm,
    llm, prior), the failures it decided, how many of them have a located step (the prior's guesses never
    count), and its share of the variant's failures."""
    if verdicts.empty:
        return pd.DataFrame(columns=JUDGE_LAYER_COLUMNS)
    v = verdicts.copy()
    if "decided_by" not in v:
        v["decided_by"] = v["judge"]
    v["decided_by"] = v["decided_by"].fillna("none")
    v["located"] = (v["first_error_step"].fillna(-1) >= 0) & (v["decided_by"] != "prior")
    rows = []
    for (variant, layer), g in v.groupby(["variant", "decided_by"]):
        rows.append(
            {
                "variant": variant,
                "decided_by": layer,
                "failures": len(g),
                "located": int(g["located"].sum()),
                "share": len(g) / (v["variant"] == variant).sum(),
            }
        )
    return pd.DataFrame(rows, columns=JUDGE_LAYER_COLUMNS)


ABANDONED_COLUMNS = [
    "variant",
    "wrong_answers",
    "abandoned",
    "rate",
    "mean_tokens_to_correct",
    "mean_tokens",
    "share_after_correct",
]


def abandoned_answers(verdicts: pd.DataFrame) -> pd.DataFrame:
    """Per variant: failures with a wrong final answer, how many stated the correct value as a result in an
    earlier step (an abandoned answer, judge stack), the rate, and for those the mean tokens up to the end of
    the step with the first correct value against the mean tokens of the whole solution (a
    proportional-to-characters estimate) and the share of tokens spent after it."""
    if verdicts.empty or "answer_wrong" not in verdicts:
        return pd.DataFrame(columns=ABANDONED_COLUMNS)
    v = verdicts[verdicts["answer_wrong"].fillna(False).astype(bool)]
    rows = []
    for variant, g in v.groupby("variant"):
        ab = g[g["abandoned_step"].notna()]
        to, total = ab["tokens_to_correct"].dropna(), ab["tokens_total"].dropna()
        rows.append(
            {
                "variant": variant,
                "wrong_answers": len(g),
                "abandoned": len(ab),
                "rate": len(ab) / len(g) if len(g) else np.nan,
                "mean_tokens_to_correct": to.mean() if len(to) else np.nan,
                "mean_tokens": total.mean() if len(total) else np.nan,
                "share_after_correct": 1 - to.sum() / total.sum() if len(total) and total.sum() else np.nan,
            }
        )
    return pd.DataFrame(rows, columns=ABANDONED_COLUMNS)


def lengths(df: pd.DataFrame) -> pd.DataFrame:
    return (
        df.groupby(["variant", "task"])
        .agg(
            mean_tokens=("completion_tokens", "mean"),
            median_tokens=("completion_tokens", "median"),
            mean_steps=("n_steps", "mean"),
            truncation_rate=("status", lambda s: (s == "truncated").mean()),
            no_answer_rate=("status", lambda s: (s == "no_answer").mean()),
        )
        .reset_index()
    )


FORMAT_COLUMNS = [
    "variant",
    "task",
    "n",
    "accuracy",
    "lenient_accuracy",
    "wrong",
    "format_failures",
    "no_answer_other",
    "truncated",
    "grader_error",
    "wrong_rate",
    "format_failure_rate",
]


def format_failures(df: pd.DataFrame) -> pd.DataFrame:
    """Per variant and task, failures split by kind: wrong answers (the maths) against format failures (a
    right answer that no marker states: strict no_answer, lenient correct) and the other no_answer grades."""
    rows = []
    for (variant, task), g in df.groupby(["variant", "task"]):
        fmt = int(((g["status"] == "no_answer") & (g["lenient_status"] == "correct")).sum())
        n = len(g)
        rows.append(
            {
                "variant": variant,
                "task": task,
                "n": n,
                "accuracy": g["correct"].mean(),
                "lenient_accuracy": (g["lenient_status"] == "correct").mean(),
                "wrong": int((g["status"] == "wrong").sum()),
                "format_failures": fmt,
                "no_answer_other": int((g["status"] == "no_answer").sum()) - fmt,
                "truncated": int((g["status"] == "truncated").sum()),
                "grader_error": int((g["status"] == "grader_error").sum()),
                "wrong_rate": (g["status"] == "wrong").mean(),
                "format_failure_rate": fmt / n,
            }
        )
    return pd.DataFrame(rows, columns=FORMAT_COLUMNS)


def by_difficulty(df: pd.DataFrame, base: str = BASE) -> pd.DataFrame:
    """Accuracy and drop vs base per difficulty bucket: MATH level and subject, GSM8K reference steps,
    synthetic steps (whichever the task has)."""
    rows = []
    for column in DIFFICULTY_COLUMNS:
        if column not in df or df[column].isna().all():
            continue
        sub = df[df[column].notna()]
        acc = (
            sub.groupby(["variant", "task", column])["correct"].agg(accuracy="mean", n="count").reset_index()
        )
        ref = acc[acc["variant"] == base][["task", column, "accuracy"]].rename(
            columns={"accuracy": "base_accuracy"}
        )
        acc = acc.merge(ref, on=["task", column], how="left")
        acc["abs_drop"] = acc["base_accuracy"] - acc["accuracy"]
        acc = acc.rename(columns={column: "bucket"})
        acc.insert(2, "dimension", column)
        acc["bucket"] = acc["bucket"].astype(str)
        rows.append(acc)
    if not rows:
        return pd.DataFrame(
            columns=["variant", "task", "dimension", "bucket", "accuracy", "n", "base_accuracy", "abs_drop"]
        )
    return pd.concat(rows, ignore_index=True)


@dataclass
class Analysis:
    degradation: pd.DataFrame
    flips: pd.DataFrame
    error_types: pd.DataFrame
    sub_types: pd.DataFrame
    capabilities: pd.DataFrame
    first_errors: pd.DataFrame
    lengths: pd.DataFrame
    difficulty: pd.DataFrame
    formats: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=FORMAT_COLUMNS))
    judge_layers: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=JUDGE_LAYER_COLUMNS))
    abandoned: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=ABANDONED_COLUMNS))
    tables: list[str] = field(
        default_factory=lambda: [
            "degradation",
            "flips",
            "error_types",
            "sub_types",
            "capabilities",
            "first_errors",
            "lengths",
            "difficulty",
            "formats",
            "judge_layers",
            "abandoned",
        ]
    )

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        for name in self.tables:
            write_atomic(directory / f"{name}.csv", getattr(self, name).to_csv(index=False))
        payload = {name: json.loads(getattr(self, name).to_json(orient="records")) for name in self.tables}
        write_atomic(directory / "analysis.json", json.dumps(payload, indent=1))


def analyze(
    store: RunStore, base: str = BASE, save: bool = True, generation_keys: set[str] | None = None
) -> Analysis:
    data = frames(store, generation_keys, base)
    df, judgments = data["grades"], data["judgments"]
    if df.empty:
        raise ValueError(f"{store.dir}: no graded generations to analyse")
    chosen = final_verdicts(judgments)
    result = Analysis(
        degradation=degradation(accuracy(df), base),
        flips=flips(df, base),
        error_types=error_distribution(chosen, "error_type"),
        sub_types=error_distribution(chosen, "sub_type"),
        capabilities=error_distribution(chosen, "capability"),
        first_errors=first_error_positions(chosen),
        lengths=lengths(df),
        difficulty=by_difficulty(df, base),
        formats=format_failures(df),
        judge_layers=judge_layers(chosen),
        abandoned=abandoned_answers(chosen),
    )
    if save:
        result.save(store.analysis_dir)
    return result


def analysis_for(ctx: RunContext) -> Analysis | None:
    """The run's analysis of its wanted generations: the analyze stage's, or computed now (a per-stage
    command); None when nothing is graded."""
    if ctx.analysis is None and ctx.summary.results:
        ctx.analysis = analyze(ctx.store, ctx.base_name, generation_keys=ctx.wanted)
    return ctx.analysis


class AnalyzeStage:
    """The degradation tables (``analysis/*.csv``); curation, recovery and the report use them."""

    name = "analyze"
    section = None

    def enabled(self, cfg: RunConfig) -> bool:
        return True

    def run(self, ctx: RunContext) -> None:
        if analysis_for(ctx) is None:
            log.warning("no graded generations: nothing to analyse, curate, recover or report")
        return None
