"""``ingest``: a dataset adapter -> the ``items``, ``interactions`` and ``rejects`` Delta tables.

Bad rows never stop the job: each goes to ``rejects`` (dataset, source, row, reason, content)
and is counted. Each table's slice for the dataset is replaced atomically, so running the job
twice leaves the same tables as running it once, and a killed run leaves the previous version.
The job exits non-zero only when no usable item or interaction remains, or a config is wrong.
"""
from __future__ import annotations

if not __package__:  # run as a file (`spark-submit jobs/<job>.py`): see jobs/_as_package.py
    from _as_package import PACKAGE as __package__

import argparse
import logging
from typing import Callable

from pyspark import StorageLevel
from pyspark.sql import DataFrame, Observation, Window
from pyspark.sql import functions as F

from udfs.spark.image_hashing import with_image_hashes
from udfs.spark.kcore import kcore
from udfs.spark.splits import assign_split, label_column
from udfs.evaluate.splits import SplitError, SplitSpec

from . import driver_inputs, tables
from .adapters import read_dataset
from .adapters.base import REJECT_SCHEMA, AdapterOutput, line_numbers, reject
from .config import ConfigError
from udfs.io.images import ReadLimits
from .job_run import Job, JobRun, NothingUsable

log = logging.getLogger(__name__)


def _row_key() -> F.Column:
    return F.format_string("user_id=%s item_id=%s ts=%d", F.col("user_id"), F.col("item_id"), F.col("ts"))


def _as_rejects(df: DataFrame, reason: F.Column | str, row: F.Column) -> DataFrame:
    reason = F.lit(reason) if isinstance(reason, str) else reason
    return df.select(F.col("_source").alias("source"), row.alias("row"), reason.alias("reason"),
                     F.to_json(F.struct(*[c for c in df.columns if not c.startswith("_")])).alias("content"))


def clean_items(run: JobRun, items: DataFrame, images_root: str | None = None) -> tuple[DataFrame, DataFrame]:
    """Unique item ids (a repeated id keeps its first row), image checked and hashed: a local
    image path must resolve under ``images_root`` (the adapter's) and is read within
    ``dataset.images``."""
    items = items.withColumn("_source", F.lit("items")).withColumn("_order", F.monotonically_increasing_id())
    ranked = items.withColumn("_rank", F.row_number().over(Window.partitionBy("item_id").orderBy("_order")))
    dupes = _as_rejects(ranked.filter(F.col("_rank") > 1).drop("_rank", "_order"),
                        "duplicate item_id: only the first row of this id is kept",
                        F.concat(F.lit("item_id="), F.col("item_id")))
    unique = ranked.filter(F.col("_rank") == 1).drop("_rank", "_order", "_source")
    images = run.config.dataset.images
    checked = with_image_hashes(unique, images_root, ReadLimits(images.max_bytes, images.read_timeout_s),
                                images.allow_outside_root).persist(StorageLevel.DISK_ONLY)
    bad_images = checked.filter(F.col("_image_error").isNotNull()).select(
        F.col("image_uri").alias("source"), F.concat(F.lit("item_id="), F.col("item_id")).alias("row"),
        F.concat(F.col("_image_error"), F.lit(" (the item is kept without an image: fix or replace the file)"))
        .alias("reason"), F.col("title").alias("content"))
    return checked.drop("_image_error"), dupes.unionByName(bad_images)


def classify_interactions(out: AdapterOutput, item_ids: DataFrame) -> DataFrame:
    """Adds ``_reason`` (null for a good row): the adapter's own (a record that did not parse),
    an unknown item, or a repeat of (user, item, ts).

    One shuffle by user and one sort serve the duplicate check here and the split later: within
    a user, rows are ordered by (ts, item_id), so repeats sit next to each other (good rows
    first, the highest rating first) and the split's order is a prefix of this one."""
    df = out.interactions
    for name, kind in (("_reason", "string"), ("_content", "string"), ("_pos", "long")):
        if name not in df.columns:
            df = df.withColumn(name, F.lit(None).cast(kind))
    df = (df.join(F.broadcast(item_ids.select("item_id", F.lit(True).alias("_known"))), "item_id", "left")
          .repartition("user_id"))
    # Good rows first among repeats.
    order = Window.partitionBy("user_id").orderBy(
        "ts", "item_id", F.col("_reason").isNotNull().asc(), F.col("rating").desc_nulls_last(), "_source", "_pos")
    same_as_previous = ((F.lag("item_id").over(order) == F.col("item_id"))
                        & (F.lag("ts").over(order) == F.col("ts")))
    reason = F.coalesce(
        F.col("_reason"),
        F.when(F.col("_known").isNull(),
               F.format_string("item_id '%s' is not among the ingested items (missing from the items "
                               "file, or rejected there: see its reject row): add the item or drop the row",
                               F.col("item_id"))),
        F.when(F.coalesce(same_as_previous, F.lit(False)),
               F.lit("duplicate interaction (same user_id, item_id, ts): the row with the highest "
                     "rating is kept")))
    return df.withColumn("_reason", reason).drop("_known")


def interaction_rejects(classified: DataFrame, n_bad: int) -> DataFrame:
    """Rejected interactions in the rejects schema; rows named by record number when the adapter
    kept the file position, else by their key. ``n_bad`` (counted while the good rows were
    written) spares the usual case, no bad row, a second pass over the file."""
    if n_bad == 0:
        return classified.sparkSession.createDataFrame([], REJECT_SCHEMA)
    bad = classified.filter(F.col("_reason").isNotNull())
    numbered = line_numbers(classified.filter(F.col("_pos").isNotNull()), bad)
    row = F.when(F.col("_pos").isNotNull(), F.concat(F.lit("record "), F.col("_line").cast("string"))) \
        .otherwise(_row_key())
    content = F.coalesce(F.col("_content"),
                         F.to_json(F.struct("user_id", "item_id", "ts", "rating", "label")))
    return reject(numbered, row, content)


def ingest(run: JobRun, args: argparse.Namespace | None = None) -> None:
    config, spark = run.config, run.spark
    dataset = config.dataset
    if not dataset.name or not dataset.adapter:
        raise ConfigError("no dataset configured: pass --conf datasets/NAME.yaml "
                          "(or --set dataset.name=... --set dataset.adapter=...)")
    s = dataset.split
    try:
        spec = SplitSpec(s.protocol, tuple(s.ratios), s.seed, s.valid_cut, s.test_cut,
                         s.min_user_interactions).validate()
    except SplitError as exc:
        raise ConfigError(f"dataset.split: {exc}") from exc
    with run.stage("read_items"):
        out = read_dataset(spark, dataset)
        # Small exports: every output row is collected and committed from the driver.
        hold = driver_inputs.fits_on_driver(run, out.items, out.interactions, out.rejects)
        for key, value in out.counts.items():
            run.count(key, value)
        items, item_rejects = clean_items(run, out.items, out.images_root)
        summary = items.agg(F.count(F.lit(1)).alias("n"),
                            F.count(F.when(F.col("image_sha256").isNull(), 1)).alias("no_image")).first()
        run.count("items", summary["n"])
        run.count("items_without_image", summary["no_image"])
    rejects = out.rejects.unionByName(item_rejects)
    if summary["n"] == 0:
        _write_rejects(run, rejects, hold)
        raise NothingUsable(f"dataset '{dataset.name}': no item row survived; see the rejects table")
    classified = classify_interactions(out, items.select("item_id"))
    filtered = dataset.min_rating is not None or dataset.kcore > 1
    if filtered:
        # These filters count (k-core in rounds) before the write: cache the classified rows,
        # on disk so that the footprint does not grow with the catalog.
        classified = classified.persist(StorageLevel.DISK_ONLY)
    # The usual path reads the file once: the bad rows are counted while the good ones are
    # written, and only when there are some are they read again for the rejects table.
    classify_counts = Observation("classified")
    observed = classified.observe(classify_counts, F.count(F.when(F.col("_reason").isNotNull(), 1)).alias("bad"))
    good = _filtered(run, observed.filter(F.col("_reason").isNull()).drop("_reason", "_source", "_content", "_pos"))
    if not _has_usable_interaction(out, items, spec, good if filtered else None):
        # Checked before any slice is replaced: the last good snapshot of this dataset stays.
        _write_rejects(run, rejects.unionByName(interaction_rejects(
            classified, classified.filter(F.col("_reason").isNotNull()).count())), hold)
        raise NothingUsable(f"dataset '{dataset.name}': no interaction row survived; see the rejects "
                            "table for the reasons (a wrong separator or column mapping rejects every "
                            "row). The tables keep this dataset's previous snapshot.")
    _write_slices(run, spec, good, items, rejects, hold,
                  lambda: interaction_rejects(classified, int(classify_counts.get["bad"])))
    # Every frame this job cached (parsed files, classified rows) is done with.
    spark.catalog.clearCache()
    _count_written(run)


def _filtered(run: JobRun, good: DataFrame) -> DataFrame:
    """The good rows after ``dataset.min_rating`` and ``dataset.kcore``, each filter counted."""
    dataset = run.config.dataset
    if dataset.min_rating is not None:
        before = good
        good = good.filter(F.col("rating") >= F.lit(dataset.min_rating))
        run.count("below_min_rating", before.count() - good.count())
    if dataset.kcore > 1:
        before_n = good.count()
        good, rounds = kcore(good, dataset.kcore)
        run.count("kcore_removed", before_n - good.count())
        run.count("kcore_rounds", rounds)
    return good


def _write_slices(run: JobRun, spec: SplitSpec, good: DataFrame, items: DataFrame, rejects: DataFrame,
                  hold: bool, bad_interactions: Callable[[], DataFrame]) -> None:
    """Split and write the interactions, then the rejects (``bad_interactions`` among them, asked
    only once the interactions' write has counted them) and the items: each the dataset's slice,
    replaced atomically."""
    spark, wh, name = run.spark, run.warehouse, run.config.dataset.name
    split = assign_split(good, spec)
    label_counts = None
    if spec.protocol == "label":
        label_counts = Observation("labels")
        split = split.observe(label_counts, F.count(F.when(F.col("split").isNull(), 1)).alias("unlabeled"))
        unlabeled = split.filter(F.col("split").isNull())
        split = split.filter(F.col("split").isNotNull())
    interactions = split.withColumn("dataset", F.lit(name)).withColumn("ingest_id", F.lit(run.run_id))
    with run.stage("classify_split_and_write_interactions"):
        tables.replace_slice(spark, wh, "interactions", _rows(interactions, hold), {"dataset": name})
    with run.stage("write_rejects"):
        rejects = rejects.unionByName(bad_interactions())
        bad_labels = int(label_counts.get["unlabeled"]) if label_counts else 0
        if bad_labels:
            rejects = rejects.unionByName(_as_rejects(
                unlabeled.withColumn("_source", F.lit("interactions")).drop("split"),
                F.format_string("label '%s' is not train/valid/test or 0/1/2", F.col("label")), _row_key()))
            run.count("rejected_bad_label", bad_labels)
        _write_rejects(run, rejects, hold)
    with run.stage("write_items"):
        items_out = items.withColumn("dataset", F.lit(name)).withColumn("ingest_id", F.lit(run.run_id))
        tables.replace_slice(spark, wh, "items", _rows(items_out, hold), {"dataset": name})


def _count_written(run: JobRun) -> None:
    """Count what the commit holds, read back: with delta-rs, two columns (a Spark job and a log
    replay cost more than the counting on small data), else (too many rows to hold, or delta-rs
    cannot read the warehouse: counted ``driver_fallback_<reason>``) with Spark."""
    spark, wh, name = run.spark, run.warehouse, run.config.dataset.name

    def with_delta_rs() -> list[dict]:
        from udfs.io.warehouse_reader import read_frame

        rows = read_frame(wh, "interactions", equal={"dataset": name}, columns=["split", "user_id"],
                          max_rows=driver_inputs.MAX_ROWS)
        per_split = rows.groupby("split")["user_id"].agg(["size", "nunique"])
        return [{"split": split, "n": int(r["size"]), "users": int(r["nunique"])} for split, r in per_split.iterrows()]

    def with_spark() -> list:
        return (tables.read(spark, wh, "interactions").filter(F.col("dataset") == name)
                .groupBy("split").agg(F.count(F.lit(1)).alias("n"), F.countDistinct("user_id").alias("users"))
                .collect())

    written = tables.small_read(spark, wh, "interactions", with_delta_rs, with_spark, run.count)
    for row in written:
        run.count(f"interactions_{row['split']}", row["n"])
        run.count(f"users_with_{row['split']}", row["users"])
    run.count("interactions", sum(row["n"] for row in written))


def _has_usable_interaction(out: AdapterOutput, items: DataFrame, spec: SplitSpec,
                            filtered: DataFrame | None) -> bool:
    """Whether the write would keep at least one interaction row: asked before any slice is
    replaced, so that an export with nothing usable (header only, every row rejected, a wrong
    column mapping) leaves the previous snapshot as it was.

    A row survives when the adapter parsed it, its item was ingested and (``label`` protocol) its
    label is known: duplicates always keep one row of their group, so they cannot empty the
    table. Without shuffle, and ``limit(1)`` stops at the first partition that has such a row, so
    the usual case costs a fraction of one scan. After the rating or k-core filters, which have
    counted their output already, their frame is asked instead."""
    if filtered is not None:
        return bool(filtered.select("user_id").limit(1).collect())
    rows = out.interactions
    if "_reason" in rows.columns:
        rows = rows.filter(F.col("_reason").isNull())
    rows = rows.join(F.broadcast(items.select("item_id")), "item_id", "left_semi")
    if spec.protocol == "label":
        rows = rows.filter(label_column(F.col("label")).isNotNull())
    return bool(rows.select("user_id").limit(1).collect())


def _rows(frame: DataFrame, hold: bool):
    """What a commit gets: ``frame``'s rows as Arrow when the export is small (``hold``:
    ``driver_inputs.fits_on_driver``), else the frame, which Spark writes."""
    return frame.toArrow() if hold else frame


def _write_rejects(run: JobRun, rejects: DataFrame, hold: bool) -> None:
    name = run.config.dataset.name
    written = Observation("rejects")
    frame = (rejects.withColumn("dataset", F.lit(name)).withColumn("row", F.coalesce("row", F.lit("?")))
             .observe(written, F.count(F.lit(1)).alias("n")))
    tables.replace_slice(run.spark, run.warehouse, "rejects", _rows(frame, hold), {"dataset": name})
    if int(written.get["n"]) == 0:  # the usual case: no read-back of the slice to count by reason
        run.counts["rejected"] = 0
        return
    by_reason = (tables.read(run.spark, run.warehouse, "rejects").filter(F.col("dataset") == name)
                 .groupBy(F.regexp_extract("reason", r"^([a-z_ ]+)", 1).alias("kind")).count().collect())
    for row in by_reason:
        run.counts[f"rejected_{row['kind'].strip().replace(' ', '_') or 'other'}"] = row["count"]
    # The slice just written holds rows (written.n > 0), so the total is positive.
    run.counts["rejected"] = sum(row["count"] for row in by_reason)
    log.warning("%d rows rejected for dataset %s: SELECT * FROM delta.`%s/rejects` WHERE dataset = '%s'",
                run.counts["rejected"], name, run.warehouse, name)


JOB = Job("ingest", __doc__.splitlines()[0], ingest)


def main(argv: list[str] | None = None) -> int:
    return JOB.main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
