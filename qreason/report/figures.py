"""Matplotlib figures for the report, returned as base64 PNG data URIs (the report needs no network)."""

from __future__ import annotations

import base64
import functools
import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

COLORS = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C"]


def _literal_text(draw):
    """Draw with mathtext off: variant and task names are user text, and a ``$`` in one (``w4$\\cmd{$``) would
    otherwise be parsed as TeX and fail the report. Scoped to our figures, not set for the whole process."""

    @functools.wraps(draw)
    def wrapper(*args, **kwargs):
        with matplotlib.rc_context({"text.parse_math": False}):
            return draw(*args, **kwargs)

    return wrapper


def palette_for(names: list[str]) -> dict[str, str]:
    """One colour per name (a run's variants, in a fixed order), the same in every chart of a report."""
    return {name: COLORS[i % len(COLORS)] for i, name in enumerate(dict.fromkeys(names))}


def colors_for(names: list, palette: dict[str, str] | None) -> list[str]:
    """The colours of ``names``: the palette's, else the default cycle in order."""
    if palette is None:
        return [COLORS[i % len(COLORS)] for i in range(len(names))]
    extra = iter(c for c in COLORS * 4 if c not in palette.values())
    return [palette.get(str(n)) or next(extra, COLORS[0]) for n in names]


def _uri(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@_literal_text
def grouped_bars(
    df: pd.DataFrame,
    index: str,
    columns: str,
    values: str,
    title: str,
    ylabel: str,
    percent: bool = False,
    err: str | None = None,
    palette: dict[str, str] | None = None,
) -> str | None:
    """Bars of ``values`` grouped by ``index`` with one colour per ``columns`` value (``palette``: a fixed
    colour per value, so a variant keeps its colour from chart to chart); error bars from ``err`` only where
    it is non-zero somewhere (a standard deviation over one seed is no spread). None for one bar."""
    if df.empty or df[values].isna().all():
        return None
    table = df.pivot_table(index=index, columns=columns, values=values, aggfunc="sum").fillna(0)
    if table.size < 2:
        return None  # one bar: the table beside it says the same
    errs = df.pivot_table(index=index, columns=columns, values=err, aggfunc="sum").fillna(0) if err else None
    if errs is not None and not (errs.to_numpy() > 0).any():
        errs = None  # no spread (one seed): no error bars
    scale = 100 if percent else 1
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(table) * max(1, len(table.columns)) / 2 + 3), 3.4))
    (table * scale).plot.bar(
        ax=ax,
        color=colors_for(list(table.columns), palette),
        width=0.8,
        yerr=None if errs is None else errs * scale,
        capsize=3,
    )
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.set_xlabel("")
    ax.tick_params(axis="x", rotation=0)
    ax.legend(fontsize=8, frameon=False)
    ax.grid(axis="y", alpha=0.3)
    return _uri(fig)


@_literal_text
def step_histogram(
    steps_by_group: dict[str, list[int]], title: str, palette: dict[str, str] | None = None
) -> str | None:
    """Counts of 1-based step numbers per group, side by side on an integer axis. None when every value is
    the same step (one bucket says nothing a table does not)."""
    groups = {k: [int(s) for s in steps_by_group[k]] for k in sorted(steps_by_group) if steps_by_group[k]}
    values = sorted({s for vals in groups.values() for s in vals})
    if len(values) < 2:
        return None
    steps = list(range(values[0], values[-1] + 1))
    width = 0.8 / len(groups)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.45 * len(steps) + 3), 3.2))
    for i, ((name, vals), color) in enumerate(zip(groups.items(), colors_for(list(groups), palette))):
        counts = [vals.count(s) for s in steps]
        ax.bar([s - 0.4 + width * (i + 0.5) for s in steps], counts, width=width, label=name, color=color)
    ax.set_xticks(steps)
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.set_title(title)
    ax.set_xlabel("step (1 = the first step)")
    ax.set_ylabel("failures")
    ax.legend(fontsize=8, frameon=False)
    ax.grid(axis="y", alpha=0.3)
    return _uri(fig)


@_literal_text
def trend(points: pd.DataFrame) -> str | None:
    """Accuracy over time: one line per variant/task (columns: when, series, accuracy)."""
    if points.empty or points["when"].nunique() < 2:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    for (series, group), color in zip(points.groupby("series"), COLORS * 4):
        group = group.sort_values("when")
        ax.plot(group["when"], 100 * group["accuracy"], marker="o", label=series, color=color)
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Accuracy across runs of this config")
    ax.legend(fontsize=8, frameon=False)
    ax.grid(alpha=0.3)
    fig.autofmt_xdate()
    return _uri(fig)


@_literal_text
def loss_curves(curves: dict[str, list[list[float]]]) -> str | None:
    """Training loss per step: one line per adapter and phase (``{"rtn+sb sft": [[step, loss], ...]}``)."""
    curves = {k: v for k, v in curves.items() if v}
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    for (name, points), color in zip(sorted(curves.items()), COLORS * 4):
        ax.plot(
            [p[0] for p in points],
            [p[1] for p in points],
            marker=".",
            label=name,
            color=color,
            linestyle="--" if "ctl" in name else "-",
        )
    ax.set_title("Training loss of the recovery adapters")
    ax.xaxis.get_major_locator().set_params(integer=True)  # optimizer steps are whole numbers
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.legend(fontsize=8, frameon=False)
    ax.grid(alpha=0.3)
    return _uri(fig)
