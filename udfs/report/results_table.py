"""The printed results table: the paper's rows in the paper's order, with CIs and the paired
differences against the text-grounded representation (``lvlm``).

Row order (``paper_order``), rows that the run has only:

1. ``lvlm:...`` (text-only from the descriptions; several caption engines in the run's order),
2. ``title`` (title only), then ``text`` (the item's own text: a text-only baseline like the
   title, so beside it), 3. ``visual`` (vision only),
4. title + vision with each fusion method in ``FUSION_METHODS`` order, then lvlm + vision the
   same way (for each lvlm representation),
5. ``als``, ``popularity``, ``random`` (the references),
6. every other representation (fusions of other parts...), sorted by name.

The formatting takes plain rows (dicts or Spark ``Row``s) of the ``metrics`` and ``comparisons``
tables, so ``evaluate`` and anyone reading the tables print the same thing.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

from udfs.evaluate.metrics import METRICS
from udfs.evaluate.protocol import BASELINES
from udfs.representations import ALS, LVLM, TEXT, TITLE, VISUAL, RepresentationError, parse_representation

# The paper's fusion columns, in its table's order.
FUSION_METHODS = ("naive", "concat", "attention", "gating", "crossmodal", "smore")
REFERENCES = (ALS, *BASELINES)


def _parsed(name: str):
    try:
        return parse_representation(name)
    except RepresentationError:  # a baseline name, or one this version does not know
        return None


def paper_order(names: Iterable[str]) -> list[str]:
    """``names`` (each once) in the paper's row order (see the module doc)."""
    names = list(dict.fromkeys(names))
    parsed = {n: _parsed(n) for n in names}
    lvlms = [n for n in names if parsed[n] is not None and parsed[n].kind == LVLM]
    order = lvlms + [n for n in (TITLE, TEXT, VISUAL) if n in parsed]
    for text in [TITLE, *lvlms]:
        for method in FUSION_METHODS:
            order += [n for n in names if parsed[n] is not None and parsed[n].kind == method
                      and set(parsed[n].parts) == {text, VISUAL}]
    order += [n for n in REFERENCES if n in parsed]
    placed = set(order)
    return order + sorted(n for n in names if n not in placed)


def metric_cells(rows: Iterable[Mapping], order: Sequence[str], ks: Sequence[int], cell: Callable[[Mapping], str],
                 missing: str) -> list[tuple[str, int, list[str]]]:
    """Per representation of ``order``: (it, its users, a cell per K and metric of ``METRICS``):
    ``cell(row)`` of its ``metrics`` row, ``missing`` where it has none. What the printed table
    and the report's table show."""
    by_key = {(r["representation"], r["metric"], int(r["k"])): r for r in rows}
    out = []
    for rep in order:
        cells, n_users = [], 0
        for k in ks:
            for metric in METRICS:
                row = by_key.get((rep, metric, k))
                if row is not None:
                    n_users = int(row["n_users"])
                cells.append(missing if row is None else cell(row))
        out.append((rep, n_users, cells))
    return out


def metrics_block(rows: Iterable[Mapping], order: Sequence[str], ks: Sequence[int]) -> list[str]:
    """One block per K: a row per representation, each metric as ``mean [ci_low,ci_high]``."""
    rows = list(rows)
    width = max([len(r) for r in order] + [len("representation")])
    lines = []
    for k in ks:
        header = f"{'representation':<{width}}  {'n_users':>7}  " + "  ".join(f"{f'{m}@{k}':^22}" for m in METRICS)
        lines += [header, "-" * len(header)]
        for rep, n_users, cells in metric_cells(rows, order, [k], _mean_and_ci, f"{'-':^22}"):
            lines.append(f"{rep:<{width}}  {n_users:>7}  " + "  ".join(cells))
        lines.append("")
    return lines


def _mean_and_ci(row: Mapping) -> str:
    return f"{row['value']:.4f} [{row['ci_low']:.4f},{row['ci_high']:.4f}]"


def against_reference(row: Mapping, reference: str) -> dict | None:
    """A ``comparisons`` row as ``representation - reference``, the one sign of every printed
    and plotted difference (right of zero: the representation scores higher): ``other``,
    ``mean_diff``, ``ci_low``, ``ci_high``, ``effect_size``, ``test``, ``p_value``, ``p_holm``.
    A row stored as ``reference - other`` is turned round (the difference and the effect size
    change sign, the CI's ends swap and change sign); None for a pair without the reference.
    ``effect_size`` and ``test`` are None in rows written before they were stored."""
    a, b = row["representation_a"], row["representation_b"]
    if reference not in (a, b) or a == b:
        return None
    effect, test = _optional(row, "effect_size"), _optional(row, "test")
    effect = None if effect is None or effect != effect else float(effect)
    out = {"other": a, "mean_diff": row["mean_diff"], "ci_low": row["ci_low"],
           "ci_high": row["ci_high"], "effect_size": effect, "test": test if isinstance(test, str) else None,
           "p_value": row["p_value"], "p_holm": row["p_holm"]}
    if a == reference:
        out.update(other=b, mean_diff=-out["mean_diff"], ci_low=-out["ci_high"], ci_high=-out["ci_low"],
                   effect_size=None if effect is None else -effect)
    return out


def _optional(row, key):
    try:
        return row[key]
    except (KeyError, ValueError, IndexError):  # a dict, a Spark Row or a pandas row without it
        return None


def differences_against(rows: Iterable[Mapping], reference: str) -> dict[tuple[str, str, int], tuple]:
    """(representation, metric, k) -> (mean_diff, ci_low, ci_high, p_holm) of representation
    minus ``reference`` (``against_reference``), from ``comparisons`` rows of either orientation."""
    out = {}
    for row in rows:
        found = against_reference(row, reference)
        if found is not None:
            out[(found["other"], row["metric"], int(row["k"]))] = tuple(
                found[c] for c in ("mean_diff", "ci_low", "ci_high", "p_holm"))
    return out


def _p(value) -> str:
    """A p-value, or 'n/a' where the test had nothing to rank (every paired difference zero)."""
    return "n/a" if value is None or value != value else f"{value:.3g}"


def comparisons_block(rows: Iterable[Mapping], order: Sequence[str], ks: Sequence[int],
                      reference: str) -> list[str]:
    """Per K, each representation minus ``reference``, paired over the users both were
    evaluated on: ``mean [ci_low,ci_high] p`` per metric (p: the run's test, Holm-corrected
    over all the pairs of the metric@K)."""
    rows = list(rows)
    diffs = differences_against(rows, reference)
    tests = sorted({t for t in (_optional(r, "test") for r in rows) if isinstance(t, str)})
    test = "/".join(tests) or "wilcoxon"  # rows written before the test was stored were Wilcoxon's
    others = [r for r in order if r != reference]
    width = max([len(r) for r in others] + [len("representation")])
    lines = [f"paired differences against {reference} (representation - {reference}; mean [95% CI] "
             f"Holm-corrected {test} p):"]
    for k in ks:
        header = f"{'representation':<{width}}  " + "  ".join(f"{f'{m}@{k}':^33}" for m in METRICS)
        lines += [header, "-" * len(header)]
        for rep in others:
            cells = []
            for metric in METRICS:
                found = diffs.get((rep, metric, k))
                cells.append(f"{'-':^33}" if found is None else
                             f"{found[0]:+.4f} [{found[1]:+.4f},{found[2]:+.4f}] {_p(found[3])}".ljust(33))
            lines.append(f"{rep:<{width}}  " + "  ".join(cells))
        lines.append("")
    return lines


def results_table(metric_rows: Iterable[Mapping], comparison_rows: Iterable[Mapping], names: Iterable[str],
                  ks: Sequence[int], notes: Mapping[str, str] | None = None) -> str:
    """The metrics of ``names`` in the paper's order, then their paired differences against the
    first ``lvlm`` representation (when the run has one). ``notes``: representation -> a warning
    printed under the metrics, its rows marked (``udfs.caption.description_stats``)."""
    order = paper_order(names)
    lines = metrics_block(list(metric_rows), order, ks)
    if notes:
        width = max([len(r) for r in order] + [len("representation")])
        marked = {f"{rep:<{width}}  " for rep in notes}
        lines = [f"{line}  (!) see the warning below" if line[:width + 2] in marked else line for line in lines]
        lines += [f"WARNING {rep}: {note}" for rep, note in notes.items()] + [""]
    reference = next((n for n in order if n.startswith(f"{LVLM}:")), None)
    if reference is None:
        lines.append("no lvlm representation in this run: no paired differences against it")
    elif len(order) > 1:
        lines += comparisons_block(list(comparison_rows), order, ks, reference)
    return "\n".join(lines)
