"""The report's figures, drawn with matplotlib's object API (``Figure``: no pyplot, no display,
the Agg canvas) from plain pandas frames, each returned as PNG bytes.

Representations appear in the paper's row order (``udfs.report.results_table.paper_order``, the
same order as the printed results table). Long LVLM names (``lvlm:<engine>:<model>:<prompt_id>``)
are shown as ``lvlm`` (``short_label``) when a run has one.
"""
from __future__ import annotations

import io
import re
from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from udfs.evaluate.exposure import BEYOND_ACCURACY
from udfs.evaluate.metrics import METRICS
from udfs.report.results_table import against_reference

METRIC_LABELS = {"recall": "Recall", "ndcg": "NDCG", "precision": "Precision", "map": "MAP",
                 "hit_rate": "HitRate", "hitrate": "HitRate", "mrr": "MRR"}
BEYOND_LABELS = {"coverage": "catalog coverage", "popularity_percentile": "mean popularity percentile",
                 "exposure_gini": "Gini of exposure"}
HISTORY_BUCKETS = (1, 5, 10, 20, 50)  # lower bounds of the history-length buckets
HISTORY_LABELS = tuple(f"{lo}-{hi - 1}" for lo, hi in zip(HISTORY_BUCKETS, HISTORY_BUCKETS[1:])) + (
    f"{HISTORY_BUCKETS[-1]}+",)  # 1-4, 5-9, ..., 50+
DPI = 100


def short_label(name: str, names: Sequence[str] = ()) -> str:
    """``lvlm`` for the run's only LVLM representation (also inside a fusion's parts)."""
    if len([n for n in names if n.startswith("lvlm:")]) > 1:
        return name
    # An LVLM name runs to the next fusion '+' or the end: its parts hold no '+' (lvlm_name).
    return re.sub(r"\blvlm:[^+]+", "lvlm", name)


def png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    return buffer.getvalue()


def metric_label(metric: str, k: int | None = None) -> str:
    """``Recall``, or ``Recall@10`` at a K: a metric as the figures and the report's tables name it."""
    label = METRIC_LABELS.get(metric, metric)
    return f"{label}@{k}" if k is not None else label


def metrics_figure(metrics: pd.DataFrame, order: Sequence[str]) -> bytes:
    """One panel per metric: a bar per representation and K, with the bootstrap CI as error bars.
    ``metrics``: representation, metric, k, value, ci_low, ci_high."""
    present = list(metrics["metric"].drop_duplicates())
    names = [m for m in METRICS if m in present] + [m for m in present if m not in METRICS]
    ks = sorted(metrics["k"].unique())
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    figure = Figure(figsize=(4.6 * cols, 3.4 * rows + 0.6), layout="constrained")
    labels = [short_label(r, order) for r in order]
    width = 0.8 / max(1, len(ks))
    x = np.arange(len(order))
    for n, metric in enumerate(names):
        ax = figure.add_subplot(rows, cols, n + 1)
        for j, k in enumerate(ks):
            part = (metrics[(metrics["metric"] == metric) & (metrics["k"] == k)]
                    .set_index("representation").reindex(order))
            value = part["value"].to_numpy(np.float64)
            # Whiskers below and above the bar, never negative.
            spread = np.clip(np.vstack([value - part["ci_low"].to_numpy(np.float64),
                                        part["ci_high"].to_numpy(np.float64) - value]), 0, None)
            ax.bar(x + (j - (len(ks) - 1) / 2) * width, np.nan_to_num(value), width, label=f"@{k}",
                   yerr=np.nan_to_num(spread), capsize=2, ecolor="#333333")
        ax.set_title(metric_label(metric))
        ax.set_xticks(x, labels, rotation=35, ha="right", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        if n == 0:
            ax.legend(fontsize=7, title="K", title_fontsize=7)
    figure.suptitle("Metrics per representation (bars: mean over users; whiskers: 95% bootstrap CI)")
    return png(figure)


SIGNIFICANCE = 0.05


def forest_plot(comparisons: pd.DataFrame, reference: str, metrics: Sequence[str], k: int,
                order: Sequence[str]) -> Figure:
    """Paired differences ``representation - reference`` (the printed results table's sign:
    right of zero, the representation scores higher), one panel per metric at K: each pair's
    mean difference with its (unadjusted) 95% bootstrap CI, and its Holm-adjusted p-value as a
    right-hand tick label, so labels and p-values get separate margins and never overlap. Grey
    and hollow: not significant after Holm (p_holm >= ``SIGNIFICANCE``), the same rule as the
    report's verdicts; a CI that misses zero can still be grey, because the CI is not adjusted.
    The mean of each pair is a point with ``gid`` ``mean:<representation>``, its CI a line with
    ``gid`` ``ci:<representation>`` (what the tests read back). ``comparisons``:
    representation_a, representation_b, metric, k, mean_diff, ci_low, ci_high, p_holm."""
    others = [r for r in order if r != reference]
    ref_label = short_label(reference, order)
    figure = Figure(figsize=(6.4 * len(metrics), 0.45 * len(others) + 1.8), layout="constrained")
    for n, metric in enumerate(metrics):
        ax = figure.add_subplot(1, len(metrics), n + 1)
        rows = reference_differences(comparisons, reference, metric, k).set_index("other").reindex(others)
        y = np.arange(len(others))[::-1]
        for yi, (other, row) in zip(y, rows.iterrows()):
            if pd.isna(row["mean_diff"]):
                ax.text(0, yi, "no common users", ha="center", va="center", fontsize=7, color="#888888")
                continue
            significant = row["p_holm"] < SIGNIFICANCE
            color = ("#1b7837" if row["mean_diff"] > 0 else "#b2182b") if significant else "#9e9e9e"
            ax.plot([row["ci_low"], row["ci_high"]], [yi, yi], color=color, lw=2, gid=f"ci:{other}")
            ax.plot([row["mean_diff"]], [yi], "o", color=color, mfc=color if significant else "white", ms=7,
                    gid=f"mean:{other}")
        # A pair without common users has no row (its mean and p are NaN after the reindex): no label.
        p_labels = ["" if pd.isna(diff) else f"p_holm={p:.2g}" for diff, p in zip(rows["mean_diff"], rows["p_holm"])]
        ax.axvline(0, color="black", lw=0.8)
        ax.set_yticks(y, [short_label(o, order) for o in others], fontsize=8)
        ax.set(ylim=(-0.7, len(others) - 0.3), xmargin=0.08)
        right = ax.secondary_yaxis("right")
        right.set_yticks(y, p_labels, fontsize=7)
        right.tick_params(length=0)
        ax.set_title(f"representation - {ref_label}, {metric_label(metric, k)}", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    figure.suptitle(f"Paired differences: each representation minus {ref_label} (right of 0: better than "
                    f"{ref_label}; 95% bootstrap CI, unadjusted; grey: not significant after Holm, p_holm >= "
                    f"{SIGNIFICANCE})", fontsize=9)
    return figure


def forest_figure(comparisons: pd.DataFrame, reference: str, metrics: Sequence[str], k: int,
                  order: Sequence[str]) -> bytes:
    """``forest_plot`` as PNG bytes."""
    return png(forest_plot(comparisons, reference, metrics, k, order))


def reference_differences(comparisons: pd.DataFrame, reference: str, metric: str, k: int) -> pd.DataFrame:
    """(other, mean_diff, ci_low, ci_high, effect_size, test, p_value, p_holm) of ``other -
    reference`` (``udfs.report.results_table.against_reference``: the printed table's sign) at metric@k."""
    part = comparisons[(comparisons["metric"] == metric) & (comparisons["k"] == k)]
    found = [against_reference(row, reference) for _, row in part.iterrows()]
    return pd.DataFrame([f for f in found if f is not None],
                        columns=["other", "mean_diff", "ci_low", "ci_high", "effect_size", "test", "p_value", "p_holm"])


def history_bucket(n_history: np.ndarray) -> np.ndarray:
    """The label of each history length's bucket (``HISTORY_LABELS``; "0" below the first)."""
    index = np.searchsorted(HISTORY_BUCKETS, np.asarray(n_history), side="right") - 1
    return np.array([HISTORY_LABELS[i] if i >= 0 else "0" for i in index], dtype=object)


def by_history_figure(user_values: pd.DataFrame, n_history: pd.Series, metric: str, k: int,
                      order: Sequence[str]) -> bytes:
    """Mean per-user ``metric@k`` per history-length bucket, a line per representation, with the
    number of users of each bucket under its label. ``user_values``: representation, user_id, value;
    ``n_history``: user_id -> train interactions."""
    frame = user_values.assign(bucket=history_bucket(user_values["user_id"].map(n_history).fillna(0).to_numpy()))
    present = [b for b in HISTORY_LABELS if (frame["bucket"] == b).any()]
    users = frame.drop_duplicates("user_id")["bucket"].value_counts()
    figure = Figure(figsize=(7.5, 3.8))
    ax = figure.add_subplot(1, 1, 1)
    x = np.arange(len(present))
    for rep in order:
        means = frame[frame["representation"] == rep].groupby("bucket")["value"].mean().reindex(present)
        ax.plot(x, means.to_numpy(np.float64), marker="o", label=short_label(rep, order))
    ax.set_xticks(x, [f"{b}\n({users.get(b, 0)} users)" for b in present], fontsize=8)
    ax.set(xlabel="train history length", ylabel=f"mean {metric_label(metric, k)}",
           title=f"Per-user {metric_label(metric, k)} by history length")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return png(figure)


def beyond_accuracy_figure(figures: pd.DataFrame, order: Sequence[str]) -> bytes:
    """A horizontal bar panel per figure of ``udfs.evaluate.exposure``: coverage, mean popularity
    percentile, Gini of exposure. ``figures``: representation + those columns."""
    frame = figures.set_index("representation").reindex([r for r in order if r in set(figures["representation"])])
    figure = Figure(figsize=(12, 0.35 * len(frame) + 1.6))
    y = np.arange(len(frame))[::-1]
    for n, column in enumerate(BEYOND_ACCURACY):
        ax = figure.add_subplot(1, len(BEYOND_ACCURACY), n + 1)
        values = frame[column].to_numpy(np.float64)
        ax.barh(y, np.nan_to_num(values), color="#4c72b0")
        for yi, v in zip(y, values):
            ax.text(v, yi, f" {v:.3f}", va="center", fontsize=7)
        ax.set_yticks(y, [short_label(r, order) for r in frame.index] if n == 0 else [""] * len(y), fontsize=8)
        ax.set_xlim(0, 1.15)
        ax.set_title(BEYOND_LABELS[column], fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    figure.suptitle("Beyond accuracy: each representation's lists over the run's candidates", fontsize=10)
    return png(figure)
