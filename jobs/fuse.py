"""``fuse``: item vectors of the parts + train/valid interactions -> trained fusions in ``item_embeddings``.

For every trained fusion of the run's plan (``attention``, ``gating``, ``crossmodal``, ``smore``
over two or more parts; ``udfs.fusion.fusion_models``), with the settings of ``experiment.fuse``:

1. read the parts' vectors from ``item_embeddings`` and the dataset's interactions with
   ``split IN ('train', 'valid')``: no test row is ever read;
2. train the model on the driver, in one process, with torch (``experiment.fuse.threads``
   threads): train rows in the loss, valid rows for early stopping only
   (``udfs.fusion.fusion_training``);
3. apply it to every item that has all the parts, in Spark (``mapInArrow`` with the model's
   bytes broadcast; ``udfs.fusion.fusion_udfs``); ``smore`` with kNN graphs is applied on the driver,
   since an item's vector then depends on its neighbours';
4. write the L2-normalised vectors into ``item_embeddings`` in one atomic replacement of the
   (dataset, these representations) slice, and describe each model in ``fusion_models``.

An item lacking a part's vector is left out and counted (``skipped_<rep>_missing_part``);
interactions with such items are not used in training (``interactions_without_item_<rep>``).
Each model is kept under ``<warehouse>/fusion_model_files/<run_id>/<sha256(representation)[:16]>/``
(through ``udfs.io.storage``: a local folder or an object store such as ``s3a://bucket/w``):
``model.pt`` (spec + weights), ``config.json`` (representation, parts, settings),
``curve.json`` (loss and valid recall per epoch), ``versions.json`` (library versions).
A rerun whose inputs (item ids, part vectors, train and valid interactions), settings, seed and
library versions hash to a stored model's ``inputs_sha256`` loads that model instead of training
(``reused_models``); anything else trains again (``trained_models``).
"""
from __future__ import annotations

if not __package__:  # run as a file (`spark-submit jobs/<job>.py`): see jobs/_as_package.py
    from _as_package import PACKAGE as __package__

import argparse
import functools
import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any

import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from udfs.fusion import fusion_udfs
from udfs.io import storage
from udfs.fusion.fusion_inputs import FUSE_SPLITS, aligned_parts, indexed_interactions, inputs_digest, library_versions
from udfs.representations import Representation, parse_representation
from udfs.spark.schemas import APPLIED_SCHEMA

from . import tables
from .config import ConfigError, FuseConf
from .job_run import Job, JobRun, NothingUsable, now, run_id_argument
from .plan import FUSE_FIELDS, plan_for_run
from .spark_groups import partitions_for, task_threads

log = logging.getLogger(__name__)

MODEL_FILE = "model.pt"
# Beside the warehouse's tables, not inside the fusion_models table's folder (a VACUUM there would
# delete files Delta does not know).
MODEL_ROOT = "fusion_model_files"


def knn_ks(settings: FuseConf, rep: Representation) -> tuple[int, ...]:
    """smore's k per part from ``experiment.fuse.smore_knn_k`` (by part name, else its kind)."""
    if rep.kind != "smore" or not settings.smore_knn_k:
        return ()
    ks = []
    for part in rep.parts:
        kind = parse_representation(part).kind
        k = settings.smore_knn_k.get(part, settings.smore_knn_k.get(kind))
        if k is None:
            raise ConfigError(f"experiment.fuse.smore_knn_k names {sorted(settings.smore_knn_k)} but not part "
                              f"'{part}' of '{rep.name}': give every part of a smore fusion a k (or none)")
        ks.append(int(k))
    return tuple(ks)


def read_json(folder: str, name: str, default):
    """``name`` in ``folder`` parsed, or ``default`` when the file is absent."""
    uri = storage.join(folder, name)
    return json.loads(storage.read_bytes(uri)) if storage.exists(uri) else default


def stored_model(spark, wh: str, key: str) -> tuple[bytes, dict] | None:
    """(model bytes, its fusion_models row) of a stored model trained on inputs hashing to ``key``
    whose file is intact, else None."""
    rows = (tables.read(spark, wh, "fusion_models").filter(F.col("inputs_sha256") == key)
            .orderBy(F.col("created_at").desc()).collect())
    for row in rows:
        uri = storage.join(row["path"], MODEL_FILE)
        if storage.exists(uri):
            blob = storage.read_bytes(uri)
            if hashlib.sha256(blob).hexdigest() == row["sha256"]:
                return blob, row.asDict()
    return None


def save_model(folder: str, blob: bytes, config: dict, curve: list[dict]) -> str:
    """The model and its descriptions written into ``folder`` (through ``udfs.io.storage``: a local
    folder or an object store); returns the model's sha256. The model file is written last, so a
    folder with a model file is complete."""
    for name, data in (("config.json", config), ("curve.json", curve), ("versions.json", library_versions())):
        storage.write_bytes(storage.join(folder, name), json.dumps(data, indent=1, sort_keys=True).encode())
    storage.write_bytes(storage.join(folder, MODEL_FILE), blob)  # a reader never sees half a model
    return hashlib.sha256(blob).hexdigest()


def joined_parts(spark, wh: str, dataset: str, rep: Representation, n_items: int, rows_per_task: int) -> DataFrame:
    """(item_id, part_0, ..., part_{k-1}) of the items with every part, in tasks of at most
    ``rows_per_task`` items (and at least as many tasks as Spark has cores, while each task still
    gets 2,000 items).

    Each part is hash-partitioned on the item id into that many partitions, once, and the parts
    are joined within those partitions: the join needs no exchange of its own and no second
    repartition of the joined rows follows, so every vector crosses the shuffle once. A sort-merge
    join: it spills where a hash join would have to hold a whole task's side in memory, and its
    output is in item id order within each partition whatever order the shuffle blocks arrived
    in, so the Arrow batches (and with them the vectors' last bits) are the same every run."""
    vectors = tables.read(spark, wh, "item_embeddings").filter(F.col("dataset") == dataset)
    partitions = partitions_for(spark, n_items, rows_per_task, 2000)
    frames = [vectors.filter(F.col("representation") == part).select("item_id", F.col("vector").alias(f"part_{j}"))
              .repartition(partitions, "item_id") for j, part in enumerate(rep.parts)]
    return functools.reduce(lambda joined, frame: joined.join(frame, "item_id"), frames)


def apply_in_spark(spark, wh: str, dataset: str, rep: Representation, blob: bytes, threads: int,
                   n_items: int, rows_per_task: int) -> DataFrame:
    """(item_id, vector, status) of the items with every part (``joined_parts``), the model in
    ``blob`` applied in ``mapInArrow`` with ``threads`` torch threads per task."""
    shipped = spark.sparkContext.broadcast(blob)

    def run(batches):
        return fusion_udfs.apply_batches(shipped.value, threads)(batches)

    return joined_parts(spark, wh, dataset, rep, n_items, rows_per_task).mapInArrow(run, APPLIED_SCHEMA)


def fuse(run: JobRun, args: argparse.Namespace | None = None) -> None:
    spark, wh = run.spark, run.warehouse
    run_id = getattr(args, "run_id", None) or run.run_id
    # Resolving the plan refuses a config without a dataset.
    plan = plan_for_run(run, run_id, FUSE_FIELDS)
    dataset = plan.dataset
    trained = [parse_representation(n) for n in plan.trained]
    run.count("trained_fusions_planned", len(trained))
    if not trained:
        log.info("fuse %s: the plan has no trained fusion; nothing to do", dataset)
        return
    settings = plan.fuse
    n_items = tables.read(spark, wh, "items").filter(F.col("dataset") == dataset).count()
    run.count("items", n_items)
    # part -> (item_id, vector) frame sorted by item id, collected to the driver
    parts = sorted({p for r in trained for p in r.parts})
    rows = (tables.read(spark, wh, "item_embeddings")
            .filter((F.col("dataset") == dataset) & F.col("representation").isin(parts))
            .select("representation", "item_id", "vector").toPandas())
    frames = {p: rows[rows["representation"] == p].sort_values("item_id").reset_index(drop=True) for p in parts}
    # (user_id, item_id, split) of the train and valid rows: the filter cannot let a test row through
    interactions = (tables.read(spark, wh, "interactions")
                    .filter((F.col("dataset") == dataset) & F.col("split").isin(*FUSE_SPLITS))
                    .select("user_id", "item_id", "split").toPandas())
    run.count("interactions_read", len(interactions))
    if not len(interactions):
        raise NothingUsable(f"dataset '{dataset}' has no train or valid interactions: run `vlm4rec ingest` first")
    fused = [fuse_one(run, run_id, settings, rep, frames, interactions, n_items) for rep in trained]
    written = {f.representation: f.written for f in fused}
    for name, n in written.items():
        run.count(f"written_{name}", n)
    run.count("rows_written", sum(written.values()))
    out = functools.reduce(DataFrame.unionByName, [f.vectors for f in fused])
    with run.stage("write"):
        # one commit replaces every trained fusion's slice: a reader sees all old or all new
        tables.replace_slice(spark, wh, "item_embeddings", out.coalesce(max(1, spark.sparkContext.defaultParallelism)),
                             {"dataset": dataset, "representation": list(written)})
        models = spark.createDataFrame([f.model_row for f in fused], tables.SCHEMAS["fusion_models"])
        tables.replace_slice(spark, wh, "fusion_models", models, {"run_id": run_id, "representation": list(written)})
    for f in fused:
        f.applied.unpersist()
    log.info("fuse %s: %s", dataset, written)


@dataclass(frozen=True)
class Fused:
    """One trained fusion, ready to write: its ``fusion_models`` row, its applied rows
    (persisted until the write), its ok vectors in ``item_embeddings``' columns and their count."""

    representation: str
    model_row: tuple
    applied: DataFrame
    vectors: DataFrame
    written: int


def fuse_one(run: JobRun, run_id: str, settings: FuseConf, rep: Representation, frames: dict[str, pd.DataFrame],
             interactions: pd.DataFrame, n_items: int) -> Fused:
    """Train (or reuse) ``rep``'s model on the items that have every part and apply it."""
    from udfs.fusion.fusion_models import FusionSpec, item_graphs
    from udfs.fusion.fusion_training import TrainData, TrainSettings, apply_fusion

    spark, wh, dataset = run.spark, run.warehouse, run.config.dataset.name
    try:
        item_ids, matrices = aligned_parts(frames, rep)
    except ValueError as exc:
        raise NothingUsable(f"'{rep.name}': {exc}") from exc
    run.count(f"skipped_{rep.name}_missing_part", n_items - len(item_ids))
    if len(item_ids) < 2:
        raise NothingUsable(f"'{rep.name}': {len(item_ids)} items have a vector in every part {list(rep.parts)}; "
                            "run `vlm4rec embed` with these representations first")
    indexed, unknown = indexed_interactions(interactions, item_ids)
    run.count(f"interactions_without_item_{rep.name}", unknown)
    spec = FusionSpec(rep.kind, tuple(m.shape[1] for m in matrices), hidden=settings.hidden,
                      out_dim=settings.out_dim, heads=settings.heads, tokens=settings.tokens,
                      product_term=settings.smore_product_term)
    train_settings = TrainSettings.from_fields(settings, knn_ks(settings, rep))
    params = {"spec": spec.to_dict(), "training": train_settings.to_dict()}
    key = inputs_digest(rep, params, item_ids, matrices, interactions)
    # Where the model of this run is kept: a folder under the warehouse, local or a URI.
    folder = storage.join(wh, MODEL_ROOT, run_id, hashlib.sha256(rep.name.encode()).hexdigest()[:16])
    found = stored_model(spark, wh, key) if settings.reuse_models else None
    if found is not None:
        model, blob, sha, info = reused_model(run, folder, *found)
    else:
        model, blob, sha, info = trained_model(run, folder, rep, spec, train_settings,
                                               TrainData(matrices, *indexed), params, key)
    model_row = (run_id, rep.name, list(rep.parts), settings.objective, json.dumps(params, sort_keys=True),
                 int(info["epochs"]), int(info["best_epoch"]),
                 None if info["valid_recall"] is None else float(info["valid_recall"]),
                 float(info["train_seconds"]), str(folder), sha, key, found is not None, now())
    with run.stage(f"apply_{rep.kind}"):
        if train_settings.knn_k:
            # each vector depends on its neighbours': the whole catalog at once, on the driver
            vectors = apply_fusion(model, matrices, settings.threads, item_graphs(matrices, train_settings.knn_k))
            applied = spark.createDataFrame(pd.DataFrame({
                "item_id": item_ids.tolist(), "vector": [v.tolist() for v in vectors],
                "status": fusion_udfs.OK}), APPLIED_SCHEMA)
        else:
            applied = apply_in_spark(spark, wh, dataset, rep, blob, task_threads(spark), len(item_ids),
                                     settings.rows_per_task)
        applied = applied.persist()
        by_status = dict(applied.groupBy("status").count().collect())
    for status, n in by_status.items():
        if status != fusion_udfs.OK:
            run.count(f"skipped_{rep.name}_{status}", n)
    encoder = f"{rep.kind}[{','.join(rep.parts)}]@{sha[:12]}"
    vectors = applied.filter(F.col("status") == fusion_udfs.OK).select(
        F.lit(dataset).alias("dataset"), "item_id", F.lit(rep.name).alias("representation"),
        F.lit(encoder).alias("encoder"), F.size("vector").alias("dim"), "vector",
        F.lit(None).cast("string").alias("source_sha256"))
    return Fused(rep.name, model_row, applied, vectors, by_status.get(fusion_udfs.OK, 0))


def reused_model(run: JobRun, folder: str, blob: bytes, row: dict) -> tuple[Any, bytes, str, dict]:
    """(model, bytes, sha256, training figures) of a stored model, copied into this run's folder
    when it was another run's."""
    from udfs.fusion.fusion_training import load_model

    model, _ = load_model(blob)
    run.count("reused_models")
    if row["path"] != folder:
        sha = save_model(folder, blob, read_json(row["path"], "config.json", {}),
                         read_json(row["path"], "curve.json", []))
    else:
        sha = row["sha256"]
    return model, blob, sha, {k: row[k] for k in ("epochs", "best_epoch", "valid_recall", "train_seconds")}


def trained_model(run: JobRun, folder: str, rep: Representation, spec: Any, train_settings: Any,
                  data: Any, params: dict, key: str) -> tuple[Any, bytes, str, dict]:
    """(model, bytes, sha256, training figures) of a model trained now on ``data`` (a
    ``udfs.fusion.fusion_training.TrainData``) and saved in ``folder``."""
    from udfs.fusion.fusion_training import model_bytes, train_fusion

    with run.stage(f"train_{rep.kind}"):
        result = train_fusion(spec, data, train_settings)
    blob = model_bytes(result.model, spec)
    config = {"representation": rep.name, "parts": list(rep.parts), "dataset": run.config.dataset.name, **params,
              "inputs_sha256": key, "n_items": data.n_items, "n_examples": result.n_examples,
              "n_valid_users": result.n_valid_users}
    sha = save_model(folder, blob, config, result.curve)
    run.count("trained_models")
    return result.model, blob, sha, {"epochs": result.epochs_run, "best_epoch": result.best_epoch,
                                     "valid_recall": result.valid_recall, "train_seconds": result.seconds}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-id", default=None, type=run_id_argument,
                        help="key the fusion_models rows by this run id (the pipeline's); default: this job's")


JOB = Job("fuse", __doc__.splitlines()[0], fuse, add_arguments)


def main(argv: list[str] | None = None) -> int:
    return JOB.main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
