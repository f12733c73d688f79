"""The HTML report: one self-contained file (figures embedded, no network) for a run directory.

It answers first: a headline block per quantized variant (qreason/report/headline.py), then the gates, then
the detail. Model text is untrusted: the template autoescapes everything, and the page's
Content-Security-Policy allows one script only, the failure filter below, by its SHA-256 hash, so text such
as ``<script>`` shows as text and nothing else runs.
"""

from __future__ import annotations

import base64
import hashlib
import json
import statistics
from collections import defaultdict
from datetime import datetime
from pathlib import Path

import jinja2
import pandas as pd

from qreason.config.schema import GatesConfig, RunConfig
from qreason.flips import is_flip, latest_grades, solved_cells
from qreason.report import figures
from qreason.report.headline import gate_rows, headlines, in_words, recovery_verdicts, render_card, tone
from qreason.report.recovery import recovery_section
from qreason.stages.analyze import Analysis, analysis_for, analyze, verdicts
from qreason.stages.base import RunContext
from qreason.stages.judge.stack import PRIOR
from qreason.stages.judge.stage import is_located
from qreason.stats import format_p
from qreason.store import RunIndex, RunStore, shown_path, write_atomic
from qreason.summary import LmEvalSummary, RunSummary, changes

TEMPLATE_DIR = Path(__file__).parent

# The failure filter: shows the failures whose data-* attributes match every chosen value. Its hash is the
# only script source the page's CSP allows.
FILTER_SCRIPT = """
const form = document.getElementById("failure-filter");
function apply() {
  const want = Object.fromEntries(new FormData(form));
  let shown = 0;
  for (const item of document.querySelectorAll("details.failure")) {
    const ok = Object.entries(want).every(([k, v]) => v === "" || item.dataset[k] === v);
    item.hidden = !ok;
    shown += ok;
  }
  document.getElementById("failure-count").textContent = shown;
}
form.addEventListener("change", apply);
apply();
"""


def script_hash(script: str) -> str:
    """The CSP source that allows exactly this inline script."""
    return "'sha256-" + base64.b64encode(hashlib.sha256(script.encode()).digest()).decode() + "'"


def _records(df: pd.DataFrame) -> list[dict]:
    return json.loads(df.to_json(orient="records")) if not df.empty else []


def drilldown(store: RunStore, base: str, limit: int, generation_keys: set[str] | None = None) -> list[dict]:
    """Failures of non-base variants that have a verdict: flips first, each beside the base's solution."""
    generations = {
        g.key: g for g in store.generations.all() if generation_keys is None or g.key in generation_keys
    }
    by_cell = {(g.variant, g.task, g.problem_id, g.seed): g for g in generations.values()}
    grades = latest_grades(store.grades.all())
    solved = solved_cells(grades.values(), base)
    problems = {(p.task, p.problem_id): p for p in store.problems.all()}
    all_judgments = defaultdict(list)
    for j in store.judgments.all():
        all_judgments[j.generation_key].append(j)
    items = []
    for key, verdict in verdicts(store).items():
        gen = generations.get(key)
        if gen is None or gen.variant == base:
            continue
        ref = by_cell.get((base, gen.task, gen.problem_id, gen.seed))
        ref_grade = grades.get(ref.key) if ref else None
        flip = is_flip(gen, base, solved)
        problem = problems.get((gen.task, gen.problem_id))
        items.append(
            {
                "id": f"f-{key}",
                "variant": gen.variant,
                "task": gen.task,
                "problem_id": gen.problem_id,
                "seed": gen.seed,
                "flip": flip,
                "question": problem.question if problem else "",
                "reference": problem.answer if problem else "",
                "status": grades[key].status if key in grades else "?",
                "extracted": grades[key].extracted if key in grades else None,
                "steps": gen.steps,
                "first_error_step": verdict.first_error_step,
                "located": is_located(verdict),
                "guessed": (verdict.votes or {}).get("decided_by") == PRIOR,
                "error_type": verdict.error_type or "none",
                "verdict": verdict,
                "judgments": sorted(
                    all_judgments[key], key=lambda j: (j.judge != "stack", j.judge != "panel", j.judge)
                ),
                "decided_by": (verdict.votes or {}).get("decided_by") or verdict.judge,
                "abandoned": (verdict.votes or {}).get("abandoned_answer"),
                "base_steps": ref.steps if ref else [],
                "base_status": ref_grade.status if ref_grade else None,
            }
        )
    items.sort(key=lambda it: (not it["flip"], it["variant"], it["task"], it["problem_id"], it["seed"]))
    return items[:limit]


def difficulty_context(table: pd.DataFrame) -> dict:
    """The difficulty rows of the dimensions that split the problems into two buckets or more (one bucket
    is no breakdown), and the dimensions left out with their one bucket."""
    if table.empty:
        return {"difficulty": [], "difficulty_single": []}
    counts = table.groupby(["task", "dimension"])["bucket"].nunique()
    split = {k for k, n in counts.items() if n > 1}
    keep = table[[(t, d) in split for t, d in zip(table["task"], table["dimension"])]]
    single = sorted(
        f"{t}: {d} {table[(table['task'] == t) & (table['dimension'] == d)]['bucket'].iloc[0]}"
        for (t, d), n in counts.items()
        if n <= 1
    )
    return {"difficulty": _records(keep), "difficulty_single": single}


def meta_parts(summary: RunSummary) -> list[str]:
    """The line under the title: what the summary knows of the run (nothing shown as "?")."""
    model = summary.model or {}
    parts = [f"run {summary.run_id}"] if summary.run_id else []
    if summary.finished_at:
        parts.append(f"finished {summary.finished_at}")
    if model.get("spec"):
        fp = f" (fingerprint {model['fingerprint']})" if model.get("fingerprint") else ""
        parts.append(f"model {model['spec']}{fp}")
    if model.get("note"):
        parts.append(f"base: {model['note']}")
    return parts


def located_steps(chosen) -> dict[str, dict]:
    """Per variant, from the combined verdicts: failures judged, those with a located first faulty step
    (coverage), those only guessed by the prior layer (not located), the median located step (1-based), the
    layers that decided the located ones and the tasks (for the layer's measured accuracy)."""
    out: dict[str, dict] = {}
    for j in chosen:
        v = out.setdefault(j.variant, {"failures": 0, "located": 0, "guessed": 0, "steps": [], "layers": {}})
        v["failures"] += 1
        v.setdefault("tasks", set()).add(j.task)
        if is_located(j):
            v["located"] += 1
            v["steps"].append(j.first_error_step + 1)
            layer = (j.votes or {}).get("decided_by") or j.judge
            v["layers"][layer] = v["layers"].get(layer, 0) + 1
        elif (j.votes or {}).get("decided_by") == PRIOR:
            v["guessed"] += 1
    for v in out.values():
        v["median_step"] = statistics.median(v["steps"]) if v["steps"] else None
    return out


def trend_points(index: RunIndex | None, name: str, current: RunSummary | None = None) -> pd.DataFrame:
    """Accuracy per variant/task of every finished run of this config, plus the current one."""
    rows = []
    runs = [
        (r["run_id"], r["finished_at"] or r["started_at"] or "", RunSummary.read(r["summary"]))
        for r in (index.list(name) if index is not None else [])
        if r["status"] == "ok" and r["summary"]
    ]
    if current and current.results and all(run_id != current.run_id for run_id, _, _ in runs):
        runs.append((current.run_id, current.finished_at or "", current))
    runs.sort(key=lambda r: r[1])
    previous = None
    for run_id, when, summary in runs:
        if not when:
            continue  # a run that recorded no time has no place on a time axis
        changed = "; ".join(changes(previous, summary)) if previous is not None else ""
        for r in summary.results:
            rows.append(
                {
                    "when": datetime.fromisoformat(when),
                    "run_id": run_id,
                    "series": f"{r.variant} / {r.task}",
                    "accuracy": r.accuracy_mean,
                    "changes": changed,
                }
            )
        previous = summary
    return pd.DataFrame(rows, columns=["when", "run_id", "series", "accuracy", "changes"])


def trend_table(points: pd.DataFrame) -> tuple[list[str], list[dict]]:
    """The trend as one row per run (newest first): its accuracy per variant/task and what changed in versions
    or hardware since the run before."""
    series = sorted(points["series"].unique()) if not points.empty else []
    rows = []
    for run_id, group in points.groupby("run_id", sort=False):
        rows.append(
            {
                "run_id": run_id,
                "when": str(group["when"].iloc[0]),
                "changes": group["changes"].iloc[0],
                "accuracy": dict(zip(group["series"], group["accuracy"])),
            }
        )
    return series, rows[::-1]


def lm_eval_rows(section: LmEvalSummary | None, base: str = "base") -> list[dict]:
    """The report's lm-eval table: one row per variant, task and metric; recovery % on the primary metric;
    ``tone`` bad / good only where the difference from the base exceeds 1.96 combined standard errors."""
    if not section:
        return []
    rows = []
    for variant, tasks in section.variants.items():
        for task, metrics in tasks.items():
            for metric, value in metrics.items():
                is_primary = section.primary_metric.get(task) == metric
                rows.append(
                    {
                        "variant": variant,
                        "task": task,
                        "metric": metric,
                        "value": value,
                        "stderr": section.stderr.get(variant, {}).get(task, {}).get(metric),
                        "primary": is_primary,
                        "n": section.n_samples.get(task),
                        "recovery": section.recovery.get(variant, {}).get(task) if is_primary else None,
                    }
                )
    rows.sort(key=lambda r: (r["task"], not r["primary"], r["metric"], r["variant"]))
    base_of = {(r["task"], r["metric"]): r for r in rows if r["variant"] == base}
    for r in rows:
        ref = base_of.get((r["task"], r["metric"]))
        r["tone"] = "neutral"
        if ref is not None and r is not ref and r["stderr"] and ref["stderr"]:
            # |difference| beyond 1.96 combined standard errors (about p < 0.05), the two treated as
            # independent: on the same documents that is the cautious side
            z = (r["value"] - ref["value"]) / ((r["stderr"] ** 2 + ref["stderr"] ** 2) ** 0.5)
            higher = (section.higher_is_better or {}).get(r["task"], True)
            if abs(z) > 1.96:
                r["tone"] = "good" if (z > 0) == higher else "bad"
    return rows


def lm_eval_figure(rows: list[dict]) -> str | None:
    primary = pd.DataFrame([r for r in rows if r["primary"]])
    if primary.empty:
        return None
    primary["label"] = primary["task"] + " (" + primary["metric"] + ")"
    primary["stderr"] = primary["stderr"].fillna(0.0)
    return figures.grouped_bars(
        primary, "label", "variant", "value", "lm-eval: primary metric by task", "value", err="stderr"
    )


def noise_context(store: RunStore, summary: RunSummary, base: str, limit: int = 200) -> dict:
    """The noise-floor section (``noise.html.j2``): the summary's noise section and the flipped problems with
    their stability, stable flips first."""
    from qreason.config.schema import StabilityConfig
    from qreason.stages.noise import store_stability

    if summary.noise is None:
        return {"noise": None, "noise_flips": [], "noise_stability": {}}
    stab_cfg = StabilityConfig(**summary.noise.stability)
    stability = store_stability(store, base, stab_cfg)
    grades = latest_grades(store.grades.all()).values()
    solved = solved_cells(grades, base)
    flipped = {
        (g.variant, g.task, g.problem_id)
        for g in grades
        if g.variant != base and g.status != "correct" and (g.task, g.problem_id, g.seed) in solved
    }
    rows = [
        {"variant": v, "task": t, "problem_id": pid, **stability[(v, t, pid)].as_dict()}
        for v, t, pid in sorted(flipped)
        if (v, t, pid) in stability
    ]
    rows.sort(key=lambda r: (not r["stable"], r["variant"], r["task"], r["problem_id"]))
    return {
        "noise": summary.noise.model_dump(mode="json"),
        "noise_flips": rows[:limit],
        "noise_stability": stab_cfg.model_dump(),
    }


def lm_eval_section(lm_eval: LmEvalSummary | None, run_dir: Path) -> dict:
    """The lm-eval summary as the page shows it: its directory without this machine's."""
    if lm_eval is None:
        return {}
    out = lm_eval.model_dump()
    if out.get("dir"):
        out["dir"] = shown_path(out["dir"], run_dir)
    return out


def build_report(
    store: RunStore,
    out_path: Path | None = None,
    index: RunIndex | None = None,
    base: str = "base",
    max_failures: int = 200,
    analysis: Analysis | None = None,
    generation_keys: set[str] | None = None,
    summary: RunSummary | None = None,
    gates: GatesConfig | None = None,
) -> Path:
    """The report of a run from its typed summary (default: the run's ``summary.json``) and its store; written
    to ``out_path`` (default ``RUN_DIR/report.html``)."""
    analysis = analysis or analyze(store, base, generation_keys=generation_keys)
    summary = summary or RunSummary.read(store.read_json("summary.json") or {})
    env = store.read_json("environment.json") or {}
    card_path = store.dataset_dir / "README.md"
    deg = analysis.degradation
    first_error_steps = defaultdict(list)  # 1-based, as a reader counts steps
    chosen = {k: j for k, j in verdicts(store).items() if generation_keys is None or k in generation_keys}
    for j in chosen.values():
        if is_located(j):
            first_error_steps[j.variant].append(j.first_error_step + 1)
    located = located_steps(chosen.values())
    trend = trend_points(index, summary.name or store.dir.name, summary)
    trend_series, trend_rows = trend_table(trend)
    palette = figures.palette_for(sorted(deg["variant"].unique()) if not deg.empty else [])
    figs = {
        "accuracy": figures.grouped_bars(
            deg,
            "task",
            "variant",
            "accuracy",
            "Accuracy by task",
            "accuracy (%)",
            percent=True,
            err="accuracy_std",
            palette=palette,
        ),
        "error_types": figures.grouped_bars(
            analysis.error_types,
            "error_type",
            "variant",
            "count",
            "Error types of judged failures",
            "failures",
            palette=palette,
        ),
        "capabilities": figures.grouped_bars(
            analysis.capabilities,
            "capability",
            "variant",
            "count",
            "Capabilities hurt",
            "failures",
            palette=palette,
        ),
        "first_errors": figures.step_histogram(dict(first_error_steps), "First faulty step", palette),
        "lengths": figures.grouped_bars(
            analysis.lengths,
            "task",
            "variant",
            "mean_tokens",
            "Mean output length",
            "tokens",
            palette=palette,
        ),
        "trend": figures.trend(trend),
    }
    lm_rows = lm_eval_rows(summary.lm_eval, base)
    figs["lm_eval"] = lm_eval_figure(lm_rows)
    recovery = summary.recover
    if recovery:
        arms = [a for v in recovery.variants for a in [v, v.control, v.fp_arm] if a is not None]
        figs["loss"] = figures.loss_curves(
            {f"{a.eval_variant} {phase}": points for a in arms for phase, points in a.loss.items()}
        )
    env_versions = env.get("versions", {})
    # checkpoint paths as the page may show them: no directory of the machine that wrote it
    variant_records = [
        {**v.model_dump(), "path": shown_path(v.path, store.dir)} for v in store.variants.all()
    ]
    flip_rows = _records(analysis.flips)
    significance = {(f["variant"], f["task"]): f for f in flip_rows}
    degradation = _records(deg)
    for r in degradation:  # red / green only for a change McNemar's test finds significant
        f = significance.get((r["variant"], r["task"]))
        r["tone"] = tone(f["acc_diff"], f["mcnemar_p"]) if f else "neutral"
    for f in flip_rows:
        f["tone"], f["words"] = tone(f["acc_diff"], f["mcnemar_p"]), in_words(f["mcnemar_p"])
    failures = drilldown(store, base, max_failures, generation_keys)
    gates_table = gate_rows(gates, summary)
    context = {
        "title": f"qreason report: {summary.name or store.dir.name}",
        "summary": summary.dump(),
        "environment": env,
        "versions": env_versions,
        "headlines": headlines(
            analysis.flips,
            analysis.error_types,
            summary,
            base,
            {v["name"]: v["method"] for v in variant_records},
            gates_configured=bool(gates_table),
            located=located,
        ),
        "gate_rows": gates_table,
        "gates_tripped": summary.gates.tripped if summary.gates else [],
        "degradation": degradation,
        "flips": flip_rows,
        "error_types": _records(analysis.error_types),
        "sub_types": _records(analysis.sub_types),
        "capabilities": _records(analysis.capabilities),
        "first_errors": _records(analysis.first_errors),
        "lengths": _records(analysis.lengths),
        **difficulty_context(analysis.difficulty),
        "formats": _records(analysis.formats),
        "judge_layers": _records(analysis.judge_layers),
        "abandoned": _records(analysis.abandoned),
        "variants": variant_records,
        "figures": figs,
        "failures": failures,
        "failure_filters": {
            "variant": sorted({f["variant"] for f in failures}),
            "errortype": sorted({f["error_type"] for f in failures}),
        },
        "filter_script": FILTER_SCRIPT,
        "script_hash": script_hash(FILTER_SCRIPT),
        "n_verdicts": len(chosen),
        "dataset_card": render_card(card_path.read_text(encoding="utf-8")) if card_path.exists() else None,
        "trend_series": trend_series,
        "trend": trend_rows,
        "lm_eval": lm_rows,
        "lm_eval_section": lm_eval_section(summary.lm_eval, store.dir),
        "recovery": recovery_section(recovery),
        **noise_context(store, summary, base),
        "recovery_verdicts": recovery_verdicts(recovery),
        "meta_parts": meta_parts(summary),
        "generated_at": datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    env_j = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATE_DIR), autoescape=True, undefined=jinja2.StrictUndefined
    )
    env_j.filters["pct"] = lambda v, d=1: "–" if v is None else f"{100 * v:.{d}f}%"
    env_j.filters["pts"] = lambda v: "–" if v is None else f"{100 * v:+.1f}"
    env_j.filters["num"] = lambda v, d=2: (
        "–" if v is None else (f"{v:.{d}f}" if isinstance(v, float) else str(v))
    )
    env_j.filters["pval"] = format_p
    html = env_j.get_template("report.html.j2").render(**context)
    out = out_path or store.report_path
    write_atomic(Path(out), html)
    return Path(out)


class ReportStage:
    """The run's HTML report, from the summary the earlier stages filled."""

    name = "report"
    section = "report"

    def __init__(self, out_path: Path | None = None):
        self.out_path = out_path

    def enabled(self, cfg: RunConfig) -> bool:
        return cfg.report.enabled

    def run(self, ctx: RunContext) -> str | None:
        analysis = analysis_for(ctx)
        if analysis is None:
            return None
        return str(
            build_report(
                ctx.store,
                self.out_path,
                ctx.index,
                ctx.base_name,
                ctx.cfg.report.max_failures,
                analysis,
                ctx.wanted,
                summary=ctx.summary,
                gates=ctx.cfg.gates,
            )
        )
