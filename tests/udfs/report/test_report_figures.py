"""The forest plot: its plotted values (read back from the figure's artists) are the
``comparisons`` rows in the printed table's sign, grey follows Holm, labels never cover p-values."""
from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from udfs.report import report_figures
from udfs.report.results_table import differences_against

REFERENCE = "lvlm:tags:efficientnet-lite0:paper"
ORDER = [REFERENCE, "title", "text", "visual", "naive:title+visual", "naive:lvlm:tags:efficientnet-lite0:paper+visual",
         "als", "popularity", "random"]


def comparisons(seed: int = 0) -> pd.DataFrame:
    """Rows of every pair, stored a - b with a before b in ORDER (the reference is always a, so
    every plotted difference must be turned round), p_holm on both sides of 0.05."""
    rng = np.random.default_rng(seed)
    rows = []
    for metric, (a, b) in itertools.product(("recall", "ndcg"), itertools.combinations(ORDER, 2)):
        diff = rng.normal(0, 0.05)
        half = abs(rng.normal(0.02, 0.01))
        p = float(rng.choice([1e-6, 0.01, 0.2, 0.8]))
        rows.append({"representation_a": a, "representation_b": b, "metric": metric, "k": 10, "mean_diff": diff,
                     "ci_low": diff - half, "ci_high": diff + 1.5 * half, "effect_size": diff / 0.1, "test": "t",
                     "p_value": p / 3, "p_holm": p})
    return pd.DataFrame(rows)


def plotted(figure) -> dict[tuple[str, str], dict]:
    """(panel title, representation) -> the plotted mean, CI ends and colour, from the artists."""
    out = {}
    for ax in figure.axes:
        for line in ax.get_lines():
            gid = line.get_gid() or ""
            kind, _, rep = gid.partition(":")
            if kind in ("mean", "ci"):
                entry = out.setdefault((ax.get_title(), rep), {})
                entry[kind] = list(line.get_xdata())
                entry["color"] = line.get_color()
    return out


def test_plotted_values_are_the_rows_as_representation_minus_reference():
    rows = comparisons()
    figure = report_figures.forest_plot(rows, REFERENCE, ["recall", "ndcg"], 10, ORDER)
    drawn = plotted(figure)
    assert len(drawn) == 2 * (len(ORDER) - 1)
    for (title, rep), entry in drawn.items():
        metric = "recall" if "Recall" in title else "ndcg"
        assert title.startswith("representation - lvlm")
        stored = rows[(rows.metric == metric) & (rows.representation_a == REFERENCE)
                      & (rows.representation_b == rep)].iloc[0]
        # Stored as reference - rep: plotted as rep - reference.
        assert entry["mean"] == [pytest.approx(-stored.mean_diff, abs=1e-15)]
        assert entry["ci"] == [pytest.approx(-stored.ci_high, abs=1e-15), pytest.approx(-stored.ci_low, abs=1e-15)]
        grey = entry["color"] == "#9e9e9e"
        assert grey == (stored.p_holm >= 0.05)
    # The printed table's differences are the plotted ones.
    printed = differences_against(rows.to_dict("records"), REFERENCE)
    for (title, rep), entry in drawn.items():
        metric = "recall" if "Recall" in title else "ndcg"
        assert printed[(rep, metric, 10)][0] == pytest.approx(entry["mean"][0], abs=1e-15)
    assert "minus lvlm" in figure._suptitle.get_text() and "Holm" in figure._suptitle.get_text()


def test_a_pair_stored_the_other_way_round_is_plotted_unchanged():
    rows = comparisons(1)
    title_row = (rows.metric == "recall") & (rows.representation_b == "title") & (rows.representation_a == REFERENCE)
    turned = rows.copy()
    turned.loc[title_row, ["representation_a", "representation_b"]] = ["title", REFERENCE]
    turned.loc[title_row, "mean_diff"] = -rows.loc[title_row, "mean_diff"]
    turned.loc[title_row, "ci_low"] = -rows.loc[title_row, "ci_high"]
    turned.loc[title_row, "ci_high"] = -rows.loc[title_row, "ci_low"]
    one = plotted(report_figures.forest_plot(rows, REFERENCE, ["recall"], 10, ORDER))
    other = plotted(report_figures.forest_plot(turned, REFERENCE, ["recall"], 10, ORDER))
    assert one == other


def test_labels_never_cover_the_p_values():
    figure = report_figures.forest_plot(comparisons(2), REFERENCE, ["recall", "ndcg"], 10, ORDER)
    canvas = FigureCanvasAgg(figure)  # what savefig draws on: lays out the constrained layout
    canvas.draw()
    renderer = canvas.get_renderer()
    boxes = []
    for ax in figure.axes:
        texts = [t for t in ax.get_yticklabels() if t.get_text()]
        texts += [t for child in ax.child_axes for t in child.get_yticklabels() if t.get_text()]
        texts += [ax.title]
        boxes += [(t.get_text(), t.get_window_extent(renderer)) for t in texts]
    assert sum(text.startswith("p_holm=") for text, _ in boxes) == 2 * (len(ORDER) - 1)
    for (text_a, a), (text_b, b) in itertools.combinations(boxes, 2):
        assert not a.overlaps(b), (text_a, text_b)


def test_old_rows_without_test_or_effect_size_still_plot():
    rows = comparisons(3).drop(columns=["test", "effect_size"])
    found = report_figures.reference_differences(rows, REFERENCE, "recall", 10)
    assert len(found) == len(ORDER) - 1 and found["test"].isna().all() and found["effect_size"].isna().all()
    assert plotted(report_figures.forest_plot(rows, REFERENCE, ["recall"], 10, ORDER))
