"""``report``: one run's tables -> a self-contained HTML report and its figures as PNG files.

Written under ``<warehouse>/reports/<run_id>/`` (``report.html``, ``metrics.png``,
``forest.png``, ``by_history.png``, ``beyond_accuracy.png``), a local folder or an object-store
prefix (``s3a://bucket/w/reports/<run_id>/``) through ``udfs.io.storage``.

Contents: each metric@K per representation with its bootstrap CI, in the paper's row order;
a forest plot of the paired differences ``representation - reference`` (the printed results
table's sign) against the reference representation (``--reference``, default ``lvlm``: the
run's LVLM representation, else its first representation) with Holm p-values (grey: not
significant after Holm; the bootstrap CIs are not adjusted), at K = 10 (or the largest K
evaluated when 10 is not); per-user NDCG@K by train
history length; catalog coverage, mean popularity percentile and Gini of exposure of each
representation's lists (``udfs.evaluate.exposure``, over the run's stored candidates); a gallery of item
images beside the descriptions the caption engine wrote, with the descriptions' figures
(``udfs.caption.description_stats``: how distinct, how long, how alike for items one user consumed) and,
when they carry no signal, the warning ``evaluate`` prints, also next to the ``lvlm`` row of the
metrics; a few users' history next to their top-5 per representation; the data counts (items without image, rejects by reason,
users without train history), the run's plan and config and its stage wall times.

Tables are read with delta-rs (``udfs.io.warehouse_reader``), not Spark: a run's slices are small
and a Spark read costs a job per table. ``pipeline`` runs this stage last, with its run id.
The counts record ``report_figures``, ``report_thumbnails`` and ``report_bytes``; the summary
line ends with the HTML file's path.
"""
from __future__ import annotations

if not __package__:  # run as a file (`spark-submit jobs/<job>.py`): see jobs/_as_package.py
    from _as_package import PACKAGE as __package__

import argparse
import datetime as dt
import hashlib
import json
import logging

import numpy as np
import pandas as pd

from udfs.caption import description_stats
from udfs.rank import explanations
from udfs.evaluate import exposure
from udfs.report import report_figures, report_html
from udfs.io import storage
from udfs.evaluate.metrics import METRICS
from udfs.evaluate.protocol import BASELINES, RELEVANT_SPLIT, TRAIN_SPLIT
from udfs.recommender import RecommendError, resolve_representation
from udfs.report.results_table import metric_cells, paper_order
from udfs.io.warehouse_reader import TableMissing, read_frame

from . import description_figures
from .config import ConfigError
from .job_run import Job, JobRun, NothingUsable, run_id_argument
from .plan import ExperimentPlan

log = logging.getLogger(__name__)

FOREST_METRICS = ("recall", "ndcg")
PREFERRED_K = 10
GALLERY_ITEMS = 8
GALLERY_USERS = 3
TOP_N = 5
HISTORY_SHOWN = 8
DESCRIPTION_CHARS = 300


def write_report(warehouse: str, run_id: str, page: str, figures: dict[str, bytes]) -> str:
    """Write the figures, then the page, under ``<warehouse>/reports/<run_id>`` (a local path, or
    a URI for an object-store warehouse); returns the page's path or URI.
    Each file is complete once it has its name (``storage.write_bytes``: renamed into place on
    a local disk; an object-store upload is visible only once complete), and the page comes
    last, so a reader that finds it finds its figures too."""
    folder = storage.join(warehouse.removeprefix("file://"), "reports", run_id)
    for name, data in figures.items():
        storage.write_bytes(storage.join(folder, name), data)
    html = storage.join(folder, "report.html")
    storage.write_bytes(html, page.encode("utf-8"))
    return html


def _sample(ids, n: int, salt: str) -> list:
    """``n`` of ``ids``, the same ones on every run (ordered by a keyed hash, not by Python's)."""
    key = lambda i: hashlib.blake2b(f"{salt}:{i}".encode(), digest_size=8).digest()  # noqa: E731
    return sorted(dict.fromkeys(ids), key=key)[:n]


def _fmt(value, digits: int = 4) -> str:
    return "-" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.{digits}f}"


def read_run(warehouse: str, run_id: str) -> dict:
    """The run's plan and its slices of every table the report shows, as pandas frames."""
    plans = read_frame(warehouse, "plans", equal={"run_id": run_id}, columns=["plan", "plan_hash"])
    if plans.empty:
        raise ConfigError(f"run '{run_id}' has no plan in {warehouse}/plans: pass the run id `vlm4rec pipeline` "
                          "printed")
    try:
        plan = ExperimentPlan.from_json(plans["plan"].iloc[0])
    except ConfigError as exc:
        raise ConfigError(f"run '{run_id}': its plan was stored by another version of vlm4rec, which this "
                          f"report cannot read ({exc}): report it with that version, or run the pipeline again "
                          "with this one") from None
    by_run, of_dataset = {"run_id": run_id}, {"dataset": plan.dataset}
    metrics = read_frame(warehouse, "metrics", equal=by_run)
    if metrics.empty:
        raise NothingUsable(f"run '{run_id}' has no metrics: run `vlm4rec evaluate --run-id {run_id}` first")
    # The first LVLM representation's descriptions: the gallery's texts.
    lvlm = description_figures.lvlm_representations(plan.representations)
    columns = ["image_sha256", "text", "status"]
    descriptions = pd.DataFrame(columns=columns) if not lvlm else _optional(
        warehouse, "descriptions", {"engine": lvlm[0].engine, "model": lvlm[0].model, "prompt_id": lvlm[0].prompt_id},
        columns)
    return {
        "plan": plan, "plan_hash": plans["plan_hash"].iloc[0], "metrics": metrics, "descriptions": descriptions,
        "comparisons": read_frame(warehouse, "comparisons", equal=by_run),
        "user_metrics": read_frame(warehouse, "user_metrics", equal=by_run,
                                   columns=["representation", "user_id", "metric", "k", "value"]),
        "recommendations": read_frame(warehouse, "recommendations", equal=by_run,
                                      columns=["representation", "user_id", "rank", "item_id", "score"]),
        "candidates": read_frame(warehouse, "candidates", equal=by_run, columns=["representation", "item_id"]),
        "interactions": read_frame(warehouse, "interactions", equal=of_dataset,
                                   columns=["user_id", "item_id", "ts", "split"]),
        "items": read_frame(warehouse, "items", equal=of_dataset,
                            columns=["item_id", "title", "image_uri", "image_sha256"]),
        "rejects": _optional(warehouse, "rejects", of_dataset, ["source", "reason"]),
        "runs": _optional(warehouse, "runs", by_run, ["job", "config", "code_version", "counts"]),
    }


def _optional(warehouse: str, name: str, equal: dict, columns: list[str]) -> pd.DataFrame:
    try:
        return read_frame(warehouse, name, equal=equal, columns=columns)
    except TableMissing:
        return pd.DataFrame(columns=columns)


def data_counts(data: dict) -> tuple[list[tuple[str, str]], list[tuple[str, int]]]:
    """(name, value) rows of the data section, and rejects per reason (its text up to a colon)."""
    items, inter = data["items"], data["interactions"]
    has_image = items["image_uri"].fillna("") != ""
    train_users = set(inter.loc[inter["split"] == TRAIN_SPLIT, "user_id"])
    users = set(inter["user_id"])
    reasons = data["rejects"]["reason"].fillna("").str.split(":").str[0].str.strip()
    rows = [("items", len(items)), ("items without image", int((~has_image).sum()))]
    if len(data["descriptions"]):
        described = explanations.item_descriptions(items[has_image], data["descriptions"])
        rows.append(("items with an image but no description", int(has_image.sum()) - len(described)))
    rows += [
        ("interactions", len(inter)),
        *((f"interactions ({split})", int(n)) for split, n in inter["split"].value_counts().sort_index().items()),
        ("users", len(users)), ("users without train history", len(users - train_users)),
        *((f"candidates ({report_figures.short_label(rep, data['plan'].representations)})", int(n))
          for rep, n in data["candidates"].groupby("representation").size().items()),
        ("rejected rows", len(reasons)),
    ]
    return ([(name, f"{value:,}") for name, value in rows],
            [(r or "(no reason)", int(n)) for r, n in reasons.value_counts().items()])


def stage_times(runs: pd.DataFrame) -> list[tuple[str, str]]:
    if runs.empty or runs["counts"].iloc[0] is None:
        return []
    # The stages' wall times the pipeline's runs row counted (ms_<stage>).
    return [(key[3:], f"{value / 1000:.1f} s") for key, value in dict(runs["counts"].iloc[0]).items()
            if key.startswith("ms_")]


def choose_reference(asked: str, order: list[str], run_id: str) -> str:
    """``asked`` as the run names it; for the default ``lvlm`` of a run without one, its first
    vector representation (else its first baseline)."""
    try:
        return resolve_representation(asked, order, run_id)
    except RecommendError:
        if asked != "lvlm":
            raise ConfigError(f"--reference '{asked}' is not a representation of run '{run_id}': choose one of "
                              f"{order}") from None
    return ([r for r in order if r not in BASELINES] or order)[0]


def metric_rows(metrics: pd.DataFrame, order: list[str], ks: list[int],
                warnings: dict[str, str]) -> tuple[list[str], list[dict]]:
    """The metrics table: its column names, and per representation its cells (mean [CI]), its
    users and the descriptions' warning of its label (``warnings``), if any."""
    columns = [report_figures.metric_label(m, k) for k in ks for m in METRICS]
    rows = []
    for rep, n_users, cells in metric_cells(metrics.to_dict("records"), order, ks, _mean_and_ci, "-"):
        label = report_figures.short_label(rep, order)
        rows.append({"label": label, "n_users": n_users, "cells": cells, "warning": warnings.get(label)})
    return columns, rows


def _mean_and_ci(row: dict) -> str:
    return f"{_fmt(row['value'])} [{_fmt(row['ci_low'])}, {_fmt(row['ci_high'])}]"


def forest_rows(comparisons: pd.DataFrame, reference: str, k: int, order: list[str]) -> list[dict]:
    """The forest plot's rows as a table, in its sign (``representation - reference``) and with
    its rule: a verdict of better or worse only where Holm's p is below ``report_figures.SIGNIFICANCE``."""
    rows = []
    for metric in FOREST_METRICS:
        diffs = report_figures.reference_differences(comparisons, reference, metric, k)
        for _, r in diffs.set_index("other").reindex([o for o in order if o != reference]).dropna(
                subset=["mean_diff"]).iterrows():
            if r["p_holm"] >= report_figures.SIGNIFICANCE:
                verdict = "no clear difference: not significant after Holm's correction" + (
                    "" if r["ci_low"] <= 0 <= r["ci_high"] else " (the unadjusted CI misses zero)")
            else:
                verdict = (f"{'better' if r['mean_diff'] > 0 else 'worse'} than the reference "
                           f"(Holm p < {report_figures.SIGNIFICANCE})")
            rows.append({"metric": report_figures.metric_label(metric, k),
                         "other": report_figures.short_label(r.name, order), "diff": f"{r['mean_diff']:+.4f}",
                         "ci": f"[{r['ci_low']:+.4f}, {r['ci_high']:+.4f}]",
                         "effect": "-" if pd.isna(r["effect_size"]) else f"{r['effect_size']:+.2f}",
                         # Rows written before the test was stored were Wilcoxon's.
                         "test": r["test"] if isinstance(r["test"], str) else "wilcoxon",
                         "p": f"{r['p_value']:.3g}", "p_holm": f"{r['p_holm']:.3g}", "verdict": verdict})
    return rows


def gallery(data: dict, descriptions: dict[str, str], order: list[str], run) -> tuple[list[dict], list[dict]]:
    """Sample item cards and users' strips (history, then top-``TOP_N`` per representation)."""
    items = data["items"].set_index("item_id")
    thumbs: dict[str, str | None] = {}

    def card(item_id: str, hit: bool = False) -> dict:
        if item_id not in thumbs:
            uri = items["image_uri"].get(item_id) if item_id in items.index else None
            thumbs[item_id] = report_html.thumbnail(uri if isinstance(uri, str) else None)
            run.count("report_thumbnails")
        title = items["title"].get(item_id) if item_id in items.index else None
        text = descriptions.get(item_id)  # shown by the gallery's cards
        return {"item_id": item_id, "title": title if isinstance(title, str) else None,
                "image": thumbs[item_id], "hit": hit,
                "description": text[:DESCRIPTION_CHARS] + "..." if text and len(text) > DESCRIPTION_CHARS else text}

    with_image = items.index[items["image_uri"].fillna("") != ""]
    cards = [card(i) for i in _sample(with_image if len(with_image) else items.index, GALLERY_ITEMS, "gallery")]

    recs, inter = data["recommendations"], data["interactions"]
    test = inter[inter["split"] == RELEVANT_SPLIT].groupby("user_id")["item_id"].apply(set)
    train = inter[inter["split"] == TRAIN_SPLIT].sort_values("ts").groupby("user_id")["item_id"].apply(list)
    listed = set(recs["user_id"]) & set(test.index) & set(train.index)
    users = []
    for user in _sample(sorted(listed), GALLERY_USERS, "users"):
        mine = recs[(recs["user_id"] == user) & (recs["rank"] <= TOP_N)].sort_values("rank")
        ranked = {rep: list(group["item_id"]) for rep, group in mine.groupby("representation")}
        lists = [{"label": report_figures.short_label(rep, order),
                  "cards": [card(i, i in test[user]) for i in ranked[rep]]} for rep in order if rep in ranked]
        history = train[user]
        users.append({"user_id": user, "n_history": len(history),
                      "history": [card(i) for i in history[-HISTORY_SHOWN:]], "lists": lists})
    return cards, users


def build(warehouse: str, run_id: str, reference: str, run) -> tuple[str, dict[str, bytes]]:
    """The page and the figures (file name -> PNG bytes) of one run."""
    with run.stage("read"):
        data = read_run(warehouse, run_id)
    plan, metrics = data["plan"], data["metrics"]
    order = paper_order([r for r in plan.ranked if r in set(metrics["representation"])])
    ks = sorted(int(k) for k in metrics["k"].unique())
    k = PREFERRED_K if PREFERRED_K in ks else max(ks)
    reference = choose_reference(reference, order, run_id)
    with run.stage("figures"):
        figures = {"metrics.png": report_figures.metrics_figure(metrics, order)}
        comparisons = data["comparisons"]
        has_pairs = not report_figures.reference_differences(comparisons, reference, FOREST_METRICS[0], k).empty
        if has_pairs:
            figures["forest.png"] = report_figures.forest_figure(comparisons, reference, FOREST_METRICS, k, order)
        train = data["interactions"].query("split == @TRAIN_SPLIT")
        values = data["user_metrics"].query("metric == 'ndcg' and k == @k")
        if len(values):
            figures["by_history.png"] = report_figures.by_history_figure(
                values, train.groupby("user_id").size(), "ndcg", k, order)
        # Popularity, for the percentile: an item's train interactions.
        beyond = exposure.beyond_accuracy_frame(data["recommendations"], data["candidates"],
                                                train.groupby("item_id").size().to_dict())
        figures["beyond_accuracy.png"] = report_figures.beyond_accuracy_figure(beyond, order)
    with run.stage("gallery"):
        cards, users = gallery(data, explanations.item_descriptions(data["items"], data["descriptions"]), order, run)
    with run.stage("descriptions"):
        described = description_blocks(warehouse, plan.dataset, order)
    counts, rejects = data_counts(data)
    warned = {block["label"]: block["warning"] for block in described if block["warning"]}
    metric_columns, rows = metric_rows(metrics, order, ks, warned)
    runs = data["runs"]
    beyond_rows = [{"label": report_figures.short_label(r.representation, order), "coverage": _fmt(r.coverage, 3),
                    "popularity_percentile": _fmt(r.popularity_percentile, 3),
                    "exposure_gini": _fmt(r.exposure_gini, 3)}
                   for r in beyond.set_index("representation").reindex(order).reset_index().itertuples()
                   if r.representation in set(beyond["representation"])]
    return report_html.render({
        "run_id": run_id, "dataset": plan.dataset, "candidates_policy": plan.candidates,
        "exclude": "+".join(plan.exclude) or "nothing",
        "written_at": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "code_version": runs["code_version"].iloc[0] if len(runs) and runs["code_version"].iloc[0] else "unknown",
        "data_counts": counts, "rejects": rejects,
        "figures": {"metrics": report_html.b64(figures["metrics.png"]),
                    "forest": report_html.b64(figures["forest.png"]) if "forest.png" in figures else "",
                    "history": report_html.b64(figures["by_history.png"]) if "by_history.png" in figures else "",
                    "beyond": report_html.b64(figures["beyond_accuracy.png"])},
        "metric_columns": metric_columns, "metric_rows": rows,
        "reference_label": report_figures.short_label(reference, order),
        "forest_rows": forest_rows(comparisons, reference, k, order) if has_pairs else [],
        "description_figures": described, "description_warnings": list(warned.items()),
        "beyond_rows": beyond_rows, "gallery": cards, "users": users, "top_n": TOP_N,
        "stage_times": stage_times(runs), "plan_hash": data["plan_hash"],
        "plan_json": json.dumps(plan.to_dict(), indent=2, sort_keys=True),
        "config_json": (json.dumps(json.loads(runs["config"].iloc[0]), indent=2, sort_keys=True)
                        if len(runs) and runs["config"].iloc[0] else "(no runs row for this run id)"),
    }), figures


def description_blocks(warehouse: str, dataset: str, order: list[str]) -> list[dict]:
    """Per LVLM representation: its description figures and warning (``udfs.caption.description_stats``),
    measured here from the tables as ``evaluate`` measures them."""
    blocks = []
    for rep in description_figures.lvlm_representations(order):
        figures = description_figures.figures_for(warehouse, dataset, rep)
        blocks.append({"label": report_figures.short_label(rep.name, order),
                       "rows": report_html.description_rows(figures),
                       "warning": description_stats.description_warning(figures, rep.name)})
    return blocks


def report(run: JobRun, args: argparse.Namespace) -> None:
    if not args.run_id:
        raise ConfigError("--run-id is required: pass the run id `vlm4rec pipeline` printed")
    warehouse = run.warehouse.removeprefix("file://")
    page, figures = build(warehouse, args.run_id, args.reference, run)
    with run.stage("write"):
        html = write_report(warehouse, args.run_id, page, figures)
    run.count("report_figures", len(figures))
    run.count("report_bytes", len(page.encode("utf-8")))
    print(f"report of run {args.run_id}: {html} (figures: {', '.join(sorted(figures))})")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-id", default=None, type=run_id_argument, help="the run to report on")
    parser.add_argument("--reference", default="lvlm",
                        help="the representation the others are compared against (default lvlm)")


JOB = Job("report", __doc__.splitlines()[0], report, add_arguments)


def main(argv: list[str] | None = None, spark=None) -> int:
    return JOB.main(argv, spark=spark)


if __name__ == "__main__":
    raise SystemExit(main())
