"""Figures shared by the notebooks and the HTML reports.

Each function takes a table made by ``voxlib.evaluate`` or ``voxlib.analysis`` and returns a
matplotlib Figure. Shares (accuracy, recall, gradient share) are shown as percent everywhere, in
figures and, through ``styled``, in tables, with one decimal where a number is printed; legends sit
outside the data. The figure is already closed in pyplot's registry: it still renders when a
notebook cell returns it or ``fig.savefig`` is called, but a loop over many runs leaks nothing and an
inline backend does not draw it twice. Works under the Agg backend (no display needed).
"""
from __future__ import annotations

import functools
from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, PercentFormatter

from voxlib.text import html_text, number, percent, plot_label, plot_table
from voxlib.text import markdown as markdown_text

SPLIT_ORDER = ("train", "seen_val", "unseen_val", "seen_test", "unseen_test")
ANNOTATE_MAX = 15  # confusion matrices up to this many classes print each cell's value
LEGEND_MAX = 20  # scatter plots with more label values than this skip the legend
COMPARE_MEASURES = ("accuracy_seen", "accuracy_unseen", "balanced_accuracy_unseen", "majority_unseen",
                    "through_speaker_seen", "probe_accuracy", "coarse_accuracy_unseen", "gradient_share")


# Columns that hold a share in [0, 1] (or a relative change) in the tables of evaluate, analysis, pooled,
# baselines and conditions: shown as percent with one decimal.
SHARE_COLUMNS = frozenset({
    "accuracy", "top3", "balanced_accuracy", "chance", "majority", "through_speaker", "agreement", "seen", "unseen",
    "gap", "gap_se", "seen_majority", "unseen_majority", "recall_seen", "recall_unseen", "precision", "recall", "f1",
    "rate", "share", "probe_accuracy", "probe_balanced_accuracy", "head_accuracy", "difference_se",
    "low", "high",  # low, high: a confidence interval of an accuracy
    "unseen_low", "unseen_high", "fold_std", "seen_std_over_seeds", "threshold",
    "fine_accuracy", "coarse_accuracy", "coarse_chance", "coarse_majority", "errors_within", "errors_within_expected",
    "relative_change", "mfcc", "encoder", "discriminator",
    "seen speaker", "seen birthplace", "unseen birthplace", "unseen sex"})  # a remedies study (verdict.study_display)


def shown(column: str, value) -> str:
    """One cell as every table shows it: shares as percent (one decimal), whole numbers as integers
    (counts), other numbers in fixed notation (text.number), missing values empty, text unchanged."""
    if value is None or isinstance(value, float) and value != value:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, float, np.integer, np.floating)):
        return percent(value) if column in SHARE_COLUMNS else number(float(value))
    return str(value)


def styled(table: pd.DataFrame, caption: str = "", share_rows: Sequence = ()):
    """The table as a notebook shows it: every cell through ``shown``, corpus text HTML-escaped, columns
    with no value at all left out (e.g. a spread over seeds of a single seed), a plain 0..n-1 row
    number hidden, and ``caption`` above it (say which run or pooling a table shows).

    ``share_rows``: index labels of rows that hold shares whatever their column (a table of measures
    with one run per column, as verdict.compare_runs makes).
    """
    table = table.loc[:, [c for c in table.columns if not table[c].isna().all()]] if len(table) else table
    style = table.style
    for column in table.columns:
        formatter = functools.partial(shown, column)
        # label names come from the corpus: escaped, so a label like <script> shows as text
        style = style.format(lambda v, f=formatter: html_text(f(v)), subset=[column])
    rows = [r for r in share_rows if r in table.index]
    if rows:
        style = style.format(lambda v: html_text(shown("share", v)), subset=(rows, list(table.columns)))
    style = style.format_index(escape="html", axis=0).format_index(escape="html", axis=1)
    if caption:
        style = style.set_caption(html_text(caption)).set_table_styles(
            [{"selector": "caption",
              "props": "caption-side: top; text-align: left; font-weight: bold; white-space: nowrap;"}])
    # a plain 0..n-1 row number says nothing a reader needs
    return style.hide(axis="index") if isinstance(table.index, pd.RangeIndex) else style


class Sentence(str):
    """What a figure function returns instead of a figure that would show nothing (every class the same
    size, a single epoch): one sentence, shown by a notebook as Markdown (corpus text escaped)."""

    def _repr_markdown_(self) -> str:
        return markdown_text(self)


def literal_labels(figure_function):
    """Every table, name and title a figure function gets is drawn as written (text.plot_table /
    plot_label): corpus labels reach tick labels, legends and titles through it."""
    def literal(value):
        if isinstance(value, pd.DataFrame):
            return plot_table(value)
        if isinstance(value, str):
            return plot_label(value)
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return type(value)(plot_label(v) for v in value)
        return value

    @functools.wraps(figure_function)
    def drawn(*args, **kwargs):
        return figure_function(*map(literal, args), **{k: literal(v) for k, v in kwargs.items()})

    return drawn


def _percent_axis(axis) -> None:
    axis.set_major_formatter(PercentFormatter(1.0, decimals=0))


def _epoch_axis(ax) -> None:
    """Whole epochs only on the x axis (no 1.5)."""
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _legend_outside(ax, **kw) -> None:
    """The legend right of the panel, where it covers no data point."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0, fontsize=8, **kw)


def _figure(width: float, height: float, ncols: int = 1, nrows: int = 1, **kw) -> tuple[Figure, np.ndarray]:
    fig = plt.figure(figsize=(width, height), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False, **kw).ravel())
    return fig, axes


def _done(fig: Figure) -> Figure:
    plt.close(fig)
    return fig


@literal_labels
def learning_curves(curves: pd.DataFrame, ylabel: str = "cross-entropy",
                    baselines: pd.DataFrame | None = None, title: str = "") -> Figure:
    """One panel per head: the metric against epoch, one line per split (train / seen / unseen val).

    ``curves`` is ``evaluate.learning_curves(run, metric)``. With ``metric="loss"`` this is the seed's
    softmax cross-entropy figure; with ``metric="acc"`` its accuracy figure (``ylabel`` "accuracy").
    ``baselines`` (``evaluate.accuracy_table(run)``) adds what a head must beat: on accuracy, chance
    and the majority baseline of the seen-speaker validation set; on loss, the cross-entropy of a
    uniform guess, ln K. ``title`` goes above all panels (say which run the curves are of).
    """
    heads = list(dict.fromkeys(curves["head"]))
    splits = [s for s in SPLIT_ORDER if s in set(curves["split"])]
    accuracy = ylabel.startswith("acc")
    fig, axes = _figure(3.6 * len(heads) + 1.4, 3.2, ncols=len(heads), sharey=accuracy)
    for ax, head in zip(axes, heads):
        sns.lineplot(data=curves[curves["head"] == head], x="epoch", y="value", hue="split", hue_order=splits,
                     marker="o", markersize=3, ax=ax, legend=ax is axes[-1])
        rows = baselines[baselines["head"] == head] if baselines is not None else pd.DataFrame()
        if len(rows):
            row = rows[rows["split"] == "seen_val"].iloc[0] if (rows["split"] == "seen_val").any() else rows.iloc[0]
            if accuracy and np.isclose(row["majority"], row["chance"]):  # balanced classes: one line, both names
                ax.axhline(row["chance"], color="0.35", linestyle="--", linewidth=1,
                           label=f"chance = majority ({row['split']})")
            elif accuracy:
                ax.axhline(row["majority"], color="0.35", linestyle="--", linewidth=1,
                           label=f"majority ({row['split']})")
                ax.axhline(row["chance"], color="0.35", linestyle=":", linewidth=1, label="chance")
            else:
                ax.axhline(np.log(1 / row["chance"]), color="0.35", linestyle=":", linewidth=1,
                           label="uniform guess (ln K)")
        ax.set(title=head, ylabel=ylabel, xlabel="epoch")
        _epoch_axis(ax)
        if accuracy:
            _percent_axis(ax.yaxis)
        if ax is not axes[-1] and ax.get_legend() is not None:
            ax.get_legend().remove()
    _legend_outside(axes[-1])
    if title:
        fig.suptitle(title)
    return _done(fig)


@literal_labels
def confusion_heatmap(matrix: pd.DataFrame, title: str = "") -> Figure:
    """Row-normalised confusion matrix that stays readable from 2 to 100+ classes.

    The figure grows with the number of classes, tick labels shrink, and cell values are printed
    only up to ANNOTATE_MAX classes (beyond that the numbers would overprint each other).
    """
    n = max(len(matrix), 1)
    # printed cells need room for "100.0" at the font below; unprinted ones can be small
    side = min(max(4.0, (0.55 if n <= ANNOTATE_MAX else 0.25) * n + 2.5), 30.0)
    font = float(np.clip(11 - n / 8, 4, 10))
    fig, axes = _figure(side + 1.2, side)
    ax = axes[0]
    sns.heatmap(matrix * 100, vmin=0, vmax=100, cmap="Blues", square=True, annot=n <= ANNOTATE_MAX, fmt=".1f",
                annot_kws={"fontsize": font}, xticklabels=True, yticklabels=True,
                cbar_kws={"label": "% of the true class", "shrink": 0.6, "format": "%.0f%%"}, ax=ax)
    ax.tick_params(labelsize=font)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    return _done(fig)


@literal_labels
def recall_vs_size(table: pd.DataFrame, size: str = "train_speakers",
                   recall: Sequence[str] | str = ("recall_seen", "recall_unseen")) -> Figure | Sentence:
    """Per-class recall against training size (log x): do small classes fail?

    When every class has the same size there is nothing to set recall against: a ``Sentence`` says so.

    ``table`` is ``analysis.class_size_table`` (recall_seen / recall_unseen) or
    ``evaluate.per_class_metrics`` (pass ``recall="recall"``).
    """
    recall = [recall] if isinstance(recall, str) else [r for r in recall if r in table.columns]
    sizes = table[size].dropna().unique()
    if len(sizes) < 2:  # one x value: a vertical column of dots that says nothing about size
        what = size.replace("train_", "training ").replace("_", " ")
        every = f"{number(float(sizes[0]))} {what}" if len(sizes) else f"no {what}"
        return Sentence(f"Every class has {every}, so recall cannot be set against class size here: "
                        "the per-class table above shows each class's recall.")
    long = table.melt(id_vars=["class", size], value_vars=recall, var_name="set", value_name="recall").dropna()
    fig, axes = _figure(5.0, 3.8)
    ax = axes[0]
    sns.scatterplot(data=long, x=size, y="recall", hue="set", style="set", s=40, alpha=0.8, ax=ax)
    ax.set_xscale("log")
    ax.set(xlabel=size.replace("_", " ") + " (log)", ylabel="recall", ylim=(-0.05, 1.05))
    _percent_axis(ax.yaxis)
    _legend_outside(ax)
    return _done(fig)


@literal_labels
def embedding_scatter(projection: pd.DataFrame, hues: Sequence[str] = ("birthplace", "sex")) -> Figure:
    """The 2-D projection of trunk features, one panel per label used as colour, marker per split."""
    hues = [h for h in hues if h in projection.columns]
    if not hues:
        raise ValueError(f"none of the label columns {list(hues)} is in the projection")
    method = {"pca": "PCA", "tsne": "t-SNE"}.get(projection["method"].iloc[0], "projection") \
        if "method" in projection else "projection"
    fig, axes = _figure(6.2 * len(hues), 4.5, ncols=len(hues))
    for ax, hue in zip(axes, hues):
        n = projection[hue].nunique()
        palette = "tab10" if n <= 10 else "tab20" if n <= 20 else "husl"
        sns.scatterplot(data=projection, x="x", y="y", hue=hue, style="split" if "split" in projection else None,
                        palette=palette, s=18, alpha=0.8, legend="brief" if n <= LEGEND_MAX else False, ax=ax)
        ax.set(title=f"{method} of trunk features, by {hue}" + ("" if n <= LEGEND_MAX else f" ({n} classes)"),
               xlabel="", ylabel="", xticks=[], yticks=[])
        if n <= LEGEND_MAX:
            _legend_outside(ax, markerscale=0.8)
    return _done(fig)


@literal_labels
def seen_unseen_bars(table: pd.DataFrame) -> Figure:
    """Accuracy on seen vs unseen speakers per head, each beside its majority baseline.

    ``table`` is ``analysis.seen_unseen(run)``.
    """
    parts = {"seen": "seen", "seen_majority": "seen, majority", "unseen": "unseen",
             "unseen_majority": "unseen, majority"}
    long = table.melt(id_vars="head", value_vars=list(parts), var_name="set", value_name="accuracy")
    long["set"] = long["set"].map(parts)
    fig, axes = _figure(3.2 + 1.6 * len(table), 3.6)
    ax = axes[0]
    paired = sns.color_palette("Paired", 4)  # light/dark blue, light/dark green: baselines are light
    palette = dict(zip(parts.values(), [paired[1], paired[0], paired[3], paired[2]]))
    sns.barplot(data=long, x="head", y="accuracy", hue="set", hue_order=list(parts.values()), palette=palette, ax=ax)
    ax.set(ylim=(0, 1), xlabel="", ylabel="accuracy")
    _percent_axis(ax.yaxis)
    _legend_outside(ax)
    return _done(fig)


@literal_labels
def compare_runs(comparison: pd.DataFrame, measures: Sequence[str] = COMPARE_MEASURES) -> Figure:
    """Two (or more) runs side by side on the fraction-valued measures of ``verdict.compare_runs``."""
    runs = [c for c in comparison.columns if c != "difference"]
    keep = [m for m in measures if m in comparison.index]
    long = comparison.loc[keep, runs].reset_index().melt(id_vars="measure", var_name="run", value_name="value")
    long["value"] = pd.to_numeric(long["value"], errors="coerce")
    long = long.dropna()
    fig, axes = _figure(6.0, 0.5 * max(len(keep), 2) + 1.2)
    ax = axes[0]
    sns.barplot(data=long, y="measure", x="value", hue="run", orient="h", ax=ax)
    ax.set(xlim=(0, 1), xlabel="share", ylabel="")
    _percent_axis(ax.xaxis)
    _legend_outside(ax)
    return _done(fig)


@literal_labels
def gradient_share(shares: pd.DataFrame) -> Figure | Sentence:
    """Share of the trunk gradient per head over epochs (stacked to 1); ``analysis.gradient_share``.
    A single epoch has no course to draw: a ``Sentence`` gives its shares."""
    wide = shares.pivot(index="epoch", columns="head", values="share").fillna(0)
    if len(wide) < 2:  # one epoch: a stack of zero width
        return Sentence("One epoch only, so there is no course over epochs to draw: " + ", ".join(
            f"{head} {percent(share)}" for head, share in wide.iloc[0].items()) + " of the gradient norm."
            if len(wide) else "No gradient norms were logged.")
    fig, axes = _figure(5.5, 3.4)
    ax = axes[0]
    colours = sns.color_palette("Set2", len(wide.columns))
    ax.stackplot(wide.index, wide.T.to_numpy(), labels=list(wide.columns), colors=colours, alpha=0.9)
    ax.set(xlabel="epoch", ylabel="share of gradient norm", ylim=(0, 1),
           xlim=(wide.index.min(), max(wide.index.max(), wide.index.min() + 1)))
    _epoch_axis(ax)
    _percent_axis(ax.yaxis)
    _legend_outside(ax)
    return _done(fig)



@literal_labels
def variant_intervals(table: pd.DataFrame, column: str = "unseen_birthplace",
                      xlabel: str = "birthplace accuracy on unseen speakers") -> Figure:
    """Each variant's pooled accuracy with its 95 % interval, the reference baselines and chance as lines.

    ``table`` is ``remedies.study_table``: variant rows carry ``unseen_low``/``unseen_high``; rows whose
    ``variant`` starts with ``baseline:`` are drawn as vertical lines.
    """
    baseline = table["variant"].str.startswith("baseline:")
    rows = table[~baseline & table[column].notna()].reset_index(drop=True)
    fig, axes = _figure(6.4, 0.45 * max(len(rows), 2) + 1.3)
    ax = axes[0]
    y = np.arange(len(rows))[::-1]
    low = (rows[column] - rows["unseen_low"]).fillna(0).clip(lower=0)
    high = (rows["unseen_high"] - rows[column]).fillna(0).clip(lower=0)
    ax.errorbar(rows[column], y, xerr=[low, high], fmt="o", color=sns.color_palette()[0], capsize=3,
                label="discriminator (95 % interval over speakers)")
    for (_, line), colour in zip(table[baseline & table[column].notna()].iterrows(), sns.color_palette("Set2")):
        ax.axvline(line[column], color=colour, linestyle="--", label=line["label"])
    if "chance" in table.columns and table["chance"].notna().any():
        ax.axvline(float(table["chance"].dropna().iloc[0]), color="grey", linestyle=":", label="chance")
    ax.set_yticks(y, rows["label"])
    ax.set(xlim=(0, 1), xlabel=xlabel, ylabel="")
    _percent_axis(ax.xaxis)
    _legend_outside(ax)
    return _done(fig)
