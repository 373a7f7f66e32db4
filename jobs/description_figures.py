"""The inputs of ``udfs.caption.description_stats`` read from the tables (delta-rs, on the driver): an
engine's texts for a dataset's images, the dataset's item vectors of a few representations,
its train interactions. ``caption``, ``embed``, ``evaluate`` and ``report`` call these, so that
each job computes the figures from the same rows by the same rule.

The reads are bounded whatever the catalog (``MAX_BYTES`` of Parquet and ``driver_inputs.MAX_ROWS``
rows a table): the figures are a diagnostic, so a table too large for that, or a store delta-rs
cannot open, skips them with a count (``description_figures_skipped_<reason>``) and the job goes on."""
from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from udfs.caption import description_stats
from udfs.evaluate.protocol import TRAIN_SPLIT
from udfs.representations import LVLM, TITLE, Representation, parse_representation
from udfs.io.warehouse_reader import FALLBACK_REASONS, TableMissing, read_frame

from .driver_inputs import MAX_ROWS, fallback_reason

log = logging.getLogger(__name__)

# Parquet bytes of one table the figures read at most: ml100k's item_embeddings is 42 MB.
MAX_BYTES = 1 << 30
BOUNDS = {"max_bytes": MAX_BYTES, "max_rows": MAX_ROWS}


def lvlm_representations(names: Sequence[str]) -> list[Representation]:
    return [r for r in (parse_representation(n) for n in names if n.startswith(f"{LVLM}:")) if r.kind == LVLM]


def description_texts(warehouse: str, dataset: str, engine: str, model: str, prompt_id: str) -> list[str]:
    """The ``ok`` description of each distinct image of the dataset's items, for one engine."""
    items = read_frame(warehouse, "items", equal={"dataset": dataset}, columns=["image_sha256"], **BOUNDS)
    try:
        rows = read_frame(warehouse, "descriptions", equal={"engine": engine, "model": model, "prompt_id": prompt_id},
                          columns=["image_sha256", "text", "status"], **BOUNDS)
    except TableMissing:
        return []
    rows = rows[(rows["status"] == "ok") & rows["image_sha256"].isin(set(items["image_sha256"].dropna()))]
    return rows.drop_duplicates("image_sha256")["text"].tolist()


def item_vectors(warehouse: str, dataset: str, names: dict[str, str]) -> dict[str, tuple[list[str], np.ndarray]]:
    """``figure name -> (item ids, vectors)`` for ``figure name -> representation``; a
    representation without vectors is left out."""
    try:
        rows = read_frame(warehouse, "item_embeddings", equal={"dataset": dataset},
                          within={"representation": sorted(set(names.values()))},
                          columns=["item_id", "representation", "vector"], **BOUNDS)
    except TableMissing:
        return {}
    out = {}
    for figure, rep in names.items():
        mine = rows[rows["representation"] == rep]
        if len(mine):
            out[figure] = (mine["item_id"].tolist(), np.stack([np.asarray(v, dtype=np.float32) for v in mine["vector"]]))
    return out


def figures_for(warehouse: str, dataset: str, rep: Representation, texts: bool = True,
                vectors: bool = True) -> dict[str, float]:
    """``text_figures`` of ``rep``'s descriptions and ``vector_figures`` of its vectors (``lvlm_*``)
    and the titles' (``title_*``) over the train split."""
    out: dict[str, float] = {}
    if texts:
        out.update(description_stats.text_figures(
            description_texts(warehouse, dataset, rep.engine, rep.model, rep.prompt_id)))
    if vectors:
        found = item_vectors(warehouse, dataset, {"lvlm": rep.name, TITLE: TITLE})
        if "lvlm" in found:
            train = read_frame(warehouse, "interactions", equal={"dataset": dataset, "split": TRAIN_SPLIT},
                               columns=["user_id", "item_id"], **BOUNDS)
            out.update(description_stats.vector_figures(found, train))
    return out


def count_figures(run, dataset: str, representations: Sequence[str], texts: bool = True,
                  vectors: bool = True) -> dict[str, dict[str, float]]:
    """``figures_for`` each LVLM representation of ``representations``, counted in the run
    (``descriptions_...``; ``descriptions[<name>]_...`` when there are several); a table too
    large or a store unreadable skips it with a count. The figures (representation -> figures).
    ``caption`` counts the texts' figures (``vectors=False``), ``embed`` the vectors' (``texts=False``)."""
    reps = lvlm_representations(representations)
    measured = {}
    for rep in reps:
        try:
            figures = figures_for(run.warehouse, dataset, rep, texts, vectors)
        except tuple(FALLBACK_REASONS) as exc:
            run.count(f"description_figures_skipped_{fallback_reason(exc)}")
            log.info("%s: the descriptions' figures are skipped: %s", run.job, exc)
            continue
        # ``descriptions_`` for a run's only LVLM representation, else one prefix per representation.
        prefix = description_stats.COUNT_PREFIX if len(reps) <= 1 else f"descriptions[{rep.name}]_"
        for key, value in description_stats.as_counts(figures, prefix).items():
            run.count(key, value)
        measured[rep.name] = figures
    return measured


def check_descriptions(run, dataset: str, representations: Sequence[str]) -> dict[str, str]:
    """``evaluate``'s counts (``count_figures``), and the ``description_warning`` of each LVLM
    representation whose descriptions carry no signal, logged and returned (representation ->
    warning)."""
    warnings = {}
    for name, figures in count_figures(run, dataset, representations).items():
        warning = description_stats.description_warning(figures, name)
        if warning:
            run.count("descriptions_without_signal")
            log.warning("%s", warning)
            warnings[name] = warning
    return warnings
