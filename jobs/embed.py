"""``embed``: titles, texts, LVLM descriptions and images -> the ``item_embeddings`` Delta table.

For the run's dataset, one L2-normalised float32 vector per item and base representation of
the run's plan (``jobs.plan``: ``plan.base``, every part of a fusion included):

- ``title``, ``text``: the item's catalog title / text, through the sentence encoder
  ``experiment.text_encoder``;
- ``lvlm:<engine>:<model>:<prompt_id>``: the ``descriptions`` row of the item's image
  (joined on ``image_sha256`` + engine, model, prompt id, status ``ok``), same encoder;
- ``visual``: image features (``experiment.image_encoder``, EfficientNet-Lite0 by default)
  from the item's local image file;
- ``naive``, ``concat`` (and ``naive:a+b``...): ``udfs.fusion.fusion.fuse`` of the parts' vectors,
  for items that have every part.

Every rule (an item's input and why it has none, the reuse of a stored vector, the fusion of
an item's parts) is one pandas function of ``udfs.encode.embed_inputs``; the job reads, calls them,
counts and commits. On a local master, while the items, descriptions and stored vectors are
small (``jobs.driver_inputs``), the driver's process calls them on the whole input: the
executors of a local master are this machine's cores anyway, and two Python workers each
importing torch and loading both encoders cost seconds that the driver pays once. Otherwise
the executors call them per bucket of a bounded hash of the rows' key (``applyInPandas``; one
model per Python worker), with the same counts and commit. Nothing is
silently dropped: the counts say, per representation, how many items were written
(``written_<rep>``) and skipped (``skipped_<rep>``), and why: ``skipped_title_empty``,
``skipped_text_empty``, ``lvlm_no_image`` (no image hash: no image, or a remote image the
caption job has not fetched), ``lvlm_missing_description``, ``lvlm_failed_caption``,
``lvlm_empty_description``, ``skipped_visual_<reason>`` (``no_image``, ``missing``,
``truncated``, ``remote_uri``...), ``skipped_<fusion>_missing_part``. The encoders and
library versions are logged and recorded as ``text_encoder:...``/``image_encoder:...`` count
keys (``text_encoder:all-MiniLM-L6-v2,sentence-transformers:6.2.0,...``; value: the dimension).
For each LVLM representation, beside the titles (``udfs.caption.description_stats``, in thousandths):
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
import dataclasses
import functools
import importlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from pyspark import StorageLevel
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import StructType

from udfs.encode import embed_inputs, embedding_udfs
from udfs.io import malloc_tuning
from udfs.encode.embed_inputs import Encoding, Fusion
from udfs.representations import LVLM, VISUAL, Representation, parse_representation
from udfs.spark.schemas import ITEM_INPUT_DDL, ITEM_VECTOR_SCHEMA

from . import description_figures, driver_inputs, tables
from .config import ConfigError
from .driver_inputs import Slice
from .job_run import Job, JobRun, NothingUsable, run_id_argument
from .plan import ExperimentPlan, plan_for_run
from .spark_groups import bucket, partitions_for, task_threads

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

# Columns each path reads.
ITEM_COLUMNS = ["item_id", "title", "text", "image_uri", "image_sha256"]
DESCRIPTION_COLUMNS = ["image_sha256", "engine", "model", "prompt_id", "status", "text"]
PREVIOUS_COLUMNS = ["representation", "item_id", "source_sha256", "encoder", "vector"]

# Groups per Spark task of a bucketed step: the groups hash into the task's partitions unevenly,
# so several smaller ones a task even out the tasks' shares of the encoding.
GROUPS_PER_TASK = 8


def planned_representations(plan: ExperimentPlan) -> tuple[list[Representation], list[Representation]]:
    """(base representations to encode, fusions to build) of the run's plan. Trained fusions
    are the ``fuse`` job's: embed encodes their parts only."""
    return ([parse_representation(n) for n in plan.base],
            [parse_representation(n) for n in plan.parameter_free])


def encoder_record(key: str, name: str) -> tuple[int, str]:
    """(dimension, record) of ``experiment.<key>`` = ``name`` from the encoder's own module
    (``udfs.encode.text_encoder``, ``udfs.encode.image_encoder``: imported here, so torch only for images);
    a name the encoder does not know is a ConfigError."""
    encoder = importlib.import_module(f"udfs.encode.{key}")
    try:
        return encoder.encoder_record(name)
    except encoder.UNKNOWN_NAME as err:
        raise ConfigError(f"experiment.{key}: {err}") from None


@dataclass(frozen=True)
class EmbedWork:
    """What ``embed`` hands its path: the slice of ``item_embeddings`` to replace and how each of
    its representations is made (an encoder's share, or a fusion of encoded parts)."""

    dataset: str
    base: tuple[Representation, ...]
    encodings: tuple[Encoding, ...]
    fusions: tuple[Fusion, ...]
    reuse: bool
    rows_per_task: int

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.base] + [f.representation.name for f in self.fusions]

    @property
    def lvlm(self) -> list[str]:
        return [r.name for r in self.base if r.kind == LVLM]

    def threaded(self, threads: int) -> EmbedWork:
        """The same work with ``threads`` torch threads per encoder (the cores a task or the driver has)."""
        return dataclasses.replace(self, encodings=tuple(dataclasses.replace(e, threads=threads)
                                                         for e in self.encodings))

    def slices(self) -> dict[str, Slice]:
        """What the job reads: the dataset's items, the LVLM engines' descriptions (if any) and
        the stored vectors of the slice it replaces (if any: a first run has none)."""
        slices = {"items": Slice("items", {"dataset": self.dataset}, columns=ITEM_COLUMNS)}
        engines = sorted({r.engine for r in self.base if r.kind == LVLM})
        if engines:
            slices["descriptions"] = Slice("descriptions", within={"engine": engines}, columns=DESCRIPTION_COLUMNS,
                                           optional=True)
        stored = PREVIOUS_COLUMNS if self.reuse else PREVIOUS_COLUMNS[:-1]
        slices["stored"] = Slice("item_embeddings", {"dataset": self.dataset}, {"representation": self.names},
                                 columns=stored, optional=True)
        return slices

    def vector_bytes(self, n_items: int) -> int:
        """Bytes of the vectors to write for ``n_items`` items (a fusion's: its parts')."""
        dims = {r.name: e.dim for e in self.encodings for r in e.representations}
        floats = sum(dims.values()) + sum(dims.get(p, 0) for f in self.fusions for p in f.representation.parts)
        return n_items * floats * 4


def planned_work(run: JobRun, plan: ExperimentPlan) -> EmbedWork | None:
    """The plan's representations as work for a path, the encoders' records counted (their
    dimension: ``text_encoder:<name>,<library>:<version>...``); None when it asks for no vector."""
    base, fusions = planned_representations(plan)
    if not base:
        return None
    experiment = run.config.experiment
    settings = experiment.embed
    shares = [("text_encoder", settings.text_batch_size, [r for r in base if r.is_text]),
              ("image_encoder", settings.image_batch_size, [r for r in base if r.kind == VISUAL])]
    encodings = []
    for key, batch_size, reps in shares:
        if reps:
            encoder = getattr(experiment, key)
            dim, record = encoder_record(key, encoder)
            run.count(record, dim)
            encodings.append(Encoding(encoder, tuple(reps), batch_size, dim=dim))
    encoders = {r.name: e.encoder for e in encodings for r in e.representations}
    made = tuple(Fusion(rep, plan.fusion_weights(rep.parts) if rep.kind == "concat" else None,
                        f"{rep.kind}[" + ",".join(f"{p}={encoders[p]}" for p in rep.parts) + "]") for rep in fusions)
    return EmbedWork(plan.dataset, tuple(base), tuple(encodings), made, settings.reuse_vectors,
                     settings.rows_per_task)


def skip_key(rep: Representation, status: str) -> str:
    """The count of items skipped for ``status``: ``skipped_<name>_<status>`` (``skipped_title_empty``,
    ``skipped_visual_truncated``, ``skipped_naive_zero_fusion``), ``lvlm_<reason>`` for descriptions."""
    if rep.kind == LVLM:
        return _LVLM_REASONS.get(status, f"lvlm_{status}")
    return f"skipped_{rep.name}_{status}"


def count_vectors(run: JobRun, work: EmbedWork, statuses: pd.DataFrame, n_items: int) -> int:
    """Count ``statuses`` (``embed_inputs.status_counts`` of every vector row): reused, skipped by
    reason, a fusion's missing parts, written per representation and in all; the total written."""
    reps = {r.name: r for r in work.base} | {f.representation.name: f.representation for f in work.fusions}
    written = dict.fromkeys(work.names, 0)
    for name, status, reused, n in statuses.itertuples(index=False):
        if reused:
            run.count(f"reused_{name}", n)
        if status == embedding_udfs.OK:
            written[name] += int(n)
            continue
        run.count(skip_key(reps[name], status), n)
        if not reps[name].is_fusion:
            run.count(f"skipped_{name}", n)
    for name in (f.representation.name for f in work.fusions):
        made = statuses.loc[statuses["representation"] == name, "count"].sum()
        run.count(f"skipped_{name}_missing_part", n_items - made)
        run.count(f"skipped_{name}", n_items - written[name])
    for name, n in written.items():
        run.count(f"written_{name}", n)
        if n == 0:
            log.warning("representation %s: no item got a vector (see the skipped_* counts)", name)
    total = sum(written.values())
    run.count("rows_written", total)
    run.count("rows_skipped", n_items * len(written) - total)
    if total == 0:
        raise NothingUsable(f"dataset '{work.dataset}': no item got a vector in any of {list(written)}; "
                            "see the skipped_* counts for the reasons")
    return total


def count_items(run: JobRun, work: EmbedWork, n_items: int, descriptions_missing: bool) -> int:
    run.count("items_read", n_items)
    if n_items == 0:
        raise NothingUsable(f"dataset '{work.dataset}' has no items in {run.warehouse}/items: "
                            "run `vlm4rec ingest` first")
    if work.lvlm and descriptions_missing:
        log.warning("no descriptions table in %s: every item counts as lvlm_missing_description "
                    "for %s; run `vlm4rec caption` first", run.warehouse, work.lvlm)
    return n_items


def embed_on_driver(run: JobRun, work: EmbedWork, inputs: dict[str, pa.Table | None]) -> None:
    """The work in this process, on the slices ``jobs.driver_inputs`` read: the same functions
    the Spark tasks run (``udfs.encode.embed_inputs``), the same counts and commit."""
    frames = {key: None if table is None else table.to_pandas() for key, table in inputs.items()}
    items, stored = frames["items"], frames["stored"]
    n_items = count_items(run, work, len(items), "descriptions" in frames and frames["descriptions"] is None)
    # This process encodes in place of the Python workers: it gets their malloc tunables
    # (spark.worker_env), without which torch's buffers page-fault in and out every batch.
    tuned = malloc_tuning.apply(run.config.spark.worker_env)
    if tuned:
        log.info("malloc tunables of the workers set in the driver: %s", tuned)
    work = work.threaded(max(1, run.spark.sparkContext.defaultParallelism))
    previous = stored if work.reuse else None
    with run.stage("encode"):
        encoded = pd.concat([embed_inputs.encoded_or_reused(
            embed_inputs.input_rows(items, frames.get("descriptions"), encoding), previous, encoding)
            for encoding in work.encodings], ignore_index=True)
    with run.stage("fuse"):
        vectors = pd.concat([encoded, embed_inputs.fused(encoded, work.fusions)], ignore_index=True)
    total = count_vectors(run, work, embed_inputs.status_counts(vectors), n_items)
    vectors = vectors[vectors["status"] == embedding_udfs.OK].reset_index(drop=True)
    column = pa.array([np.asarray(v, dtype=np.float32) for v in vectors["vector"]], pa.list_(pa.float32()))
    table = pa.table({
        "dataset": pa.array([work.dataset] * len(vectors), pa.string()),
        **{c: pa.array(vectors[c].tolist(), pa.string()) for c in ("item_id", "representation", "encoder")},
        "dim": pc.list_value_length(column).cast(pa.int32()),
        "vector": column,
        "source_sha256": pa.array([None if pd.isna(h) else h for h in vectors["source_sha256"]], pa.string()),
    })
    with run.stage("write"):
        stale = 0
        if stored is not None:
            keys = stored[stored["representation"].isin(work.names)][["representation", "item_id"]]
            kept = keys.merge(vectors[["representation", "item_id"]].drop_duplicates(), how="left", indicator=True)
            stale = int((kept["_merge"] == "left_only").sum())
        run.count("stale_rows_removed", stale)
        tables.replace_slice(run.spark, run.warehouse, "item_embeddings", table,
                             {"dataset": work.dataset, "representation": work.names})
    log.info("embed %s: wrote %d vectors over %s (on the driver)", work.dataset, total, work.names)


def by_bucket(tasks: int, function: Callable[..., pd.DataFrame], schema: StructType | str,
              *keyed: tuple[DataFrame, Column]) -> DataFrame:
    """``function(rows[, other rows])`` (pandas) on each bucket (``jobs.spark_groups.bucket``) of one
    frame, or of two frames cogrouped (each with its own key column), in ``tasks`` tasks. The
    buckets are a bounded number, so a group's rows follow the rows per task, never one key's;
    an explicit repartition, because adaptive execution would merge small text rows into one task."""
    n = tasks * GROUPS_PER_TASK
    groups = [frame.withColumn("_bucket", bucket(key, n)).repartition(tasks, "_bucket")
              .groupBy("_bucket") for frame, key in keyed]
    if len(groups) == 1:
        return groups[0].applyInPandas(lambda rows: function(rows.drop(columns="_bucket")), schema)
    return groups[0].cogroup(groups[1]).applyInPandas(
        lambda rows, other: function(rows.drop(columns="_bucket"), other.drop(columns="_bucket")), schema)


def read_slice(run: JobRun, part: Slice) -> DataFrame:
    return (tables.read(run.spark, run.warehouse, part.table)
            .filter(tables.slice_filter({**part.equal, **part.within})).select(*part.columns))


def cut_lineage(spark: SparkSession, frame: DataFrame) -> DataFrame:
    """``frame`` materialised apart from the table it was read from. A plan cached on top of a
    Delta table is rebuilt when that table is written, and this job writes the table the
    previous vectors come from: cached, they made the final write 2.5x slower on ml100k.
    With ``spark.checkpoint.dir`` set (a cluster: a lost executor must not lose the data) the
    checkpoint is reliable; else it stays on the executors (local mode)."""
    reliable = bool(spark.sparkContext.getCheckpointDir())
    return frame.checkpoint(eager=True) if reliable else frame.localCheckpoint(eager=True)


def encode_in_spark(run: JobRun, work: EmbedWork, items: DataFrame, n_items: int) -> DataFrame:
    """Every encoding's ``VECTOR_COLUMNS`` rows, on the executors: inputs made per bucket of image
    hash (with the descriptions of those images), encoded or reused per bucket of item."""
    spark, slices = run.spark, work.slices()
    descriptions = read_slice(run, slices["descriptions"]) if work.lvlm else None
    previous = None
    if work.reuse:
        # Vectors whose input and encoder are unchanged are reused: a rerun encodes only what changed.
        previous = cut_lineage(spark, read_slice(run, slices["stored"]).filter(F.col("source_sha256").isNotNull()))
        previous = None if previous.isEmpty() else previous  # a first run: nothing to compare with
    frames = []
    for encoding in work.threaded(task_threads(spark)).encodings:
        per_task, least = ((max(1, work.rows_per_task // 20), 100) if encoding.is_image
                           else (work.rows_per_task, 500))
        n_rows = n_items * len(encoding.representations)
        keyed = [(items, F.coalesce("image_sha256", "item_id"))]
        if descriptions is not None and not encoding.is_image:
            keyed.append((descriptions, F.col("image_sha256")))
        inputs = by_bucket(partitions_for(spark, n_items, work.rows_per_task, 500),
                           lambda rows, found=None, e=encoding: embed_inputs.input_rows(rows, found, e),
                           ITEM_INPUT_DDL, *keyed)
        keyed = [(inputs, F.col("item_id"))] + ([(previous, F.col("item_id"))] if previous is not None else [])
        frames.append(by_bucket(partitions_for(spark, n_rows, per_task, least),
                                lambda rows, stored=None, e=encoding: embed_inputs.encoded_or_reused(rows, stored, e),
                                ITEM_VECTOR_SCHEMA, *keyed))
    return functools.reduce(DataFrame.unionByName, frames)


def embed_with_spark(run: JobRun, work: EmbedWork) -> None:
    """The work on the executors: ``udfs.encode.embed_inputs`` per bucket, one commit from Spark."""
    spark, keep = run.spark, StorageLevel.MEMORY_AND_DISK
    items = read_slice(run, work.slices()["items"]).persist(keep)
    cached = [items]
    try:
        missing = bool(work.lvlm) and not tables.exists(spark, run.warehouse, "descriptions")
        n_items = count_items(run, work, items.count(), missing)
        vectors = encode_in_spark(run, work, items, n_items).persist(keep)
        cached.append(vectors)
        statuses = []
        with run.stage("encode"):  # the first action on the vectors: what is not reused is encoded here
            statuses.append(vectors.groupBy("representation", "status", "_reused").count().toPandas())
        with run.stage("fuse"):
            if work.fusions:
                fusions = work.fusions  # what the tasks get: udfs' types only, not this module's
                parts = [p for f in fusions for p in f.representation.parts]
                ok = vectors.filter((F.col("status") == embedding_udfs.OK) & F.col("representation").isin(parts))
                fused = by_bucket(partitions_for(spark, n_items, max(1, work.rows_per_task // 20), 100),
                                  lambda rows: embed_inputs.fused(rows, fusions), ITEM_VECTOR_SCHEMA,
                                  (ok, F.col("item_id"))).persist(keep)
                cached.append(fused)
                statuses.append(fused.groupBy("representation", "status", "_reused").count().toPandas())
                vectors = vectors.unionByName(fused)
        total = count_vectors(run, work, pd.concat(statuses, ignore_index=True), n_items)
        # Every cached piece (each encoder's tasks, each fusion) would otherwise be its own
        # file: ml100k's 11.5k vectors landed in 40 files, and readers pay per file.
        files = max(spark.sparkContext.defaultParallelism, math.ceil(total / ROWS_PER_FILE))
        out = (vectors.filter(F.col("status") == embedding_udfs.OK)
               .select(F.lit(work.dataset).alias("dataset"), "item_id", "representation", "encoder",
                       F.size("vector").alias("dim"), "vector", "source_sha256").coalesce(files))
        where = {"dataset": work.dataset, "representation": work.names}
        with run.stage("write"):
            run.count("stale_rows_removed", stale_rows(run, out, where))
            # One commit replaces the slice: a MERGE on the key (twice as long on ml100k's 11.5k
            # vectors) and then a delete of the stale rows let a reader see the mix between them.
            tables.replace_slice(spark, run.warehouse, "item_embeddings", out, where)
    finally:
        # Last first: unpersisting a frame that a cached one was built from makes Spark rebuild
        # the dependent cache on its next use.
        for frame in reversed(cached):
            frame.unpersist()
    log.info("embed %s: wrote %d vectors over %s", work.dataset, total, work.names)


def stale_rows(run: JobRun, written: DataFrame, where: dict[str, object]) -> int:
    """How many rows of ``item_embeddings`` inside the slice ``where`` have a key that is not in
    ``written``: the rows that replacing the slice removes (an item dropped from the catalog, a
    caption that now fails). A read-only anti-join."""
    keys = tables.KEYS["item_embeddings"]
    return (tables.read(run.spark, run.warehouse, "item_embeddings").filter(tables.slice_filter(where))
            .select(*keys).join(written.select(*keys).dropDuplicates(keys), keys, "left_anti").count())


def embed(run: JobRun, args: argparse.Namespace | None = None) -> None:
    # The run's plan (stored by the pipeline, or by the first job of the run id): which
    # representations to encode and fuse, and the concat weights.
    plan = plan_for_run(run, getattr(args, "run_id", None) or run.run_id, EMBED_FIELDS)
    work = planned_work(run, plan)
    if work is None:  # only baselines or als: no item vector to build, and nothing to replace
        log.warning("the plan's representations %s need no item vectors: embed has nothing to do",
                    list(plan.representations))
        return
    inputs = None
    # The driver path (jobs.driver_inputs) only on a local master, whose executors are this
    # machine's cores anyway: on a cluster the executors (their GPUs, their cores) encode.
    if not run.spark.sparkContext.master.startswith("local"):
        driver_inputs.fallback(run, "cluster", "a cluster's executors encode")
    else:
        def declines(read: dict) -> str | None:
            vector_bytes = work.vector_bytes(read["items"].num_rows)
            too_large = vector_bytes > driver_inputs.limit_bytes(run)
            return f"the vectors to write would hold {vector_bytes} bytes" if too_large else None

        inputs = driver_inputs.read_on_driver(run, work.slices(), declines)
    if inputs is not None:
        embed_on_driver(run, work, inputs)
    else:
        embed_with_spark(run, work)
    # The descriptions' vectors against the titles' (udfs.caption.description_stats), from the table
    # just written: what evaluate's warning judges, recorded where the vectors are made.
    with run.stage("vector_figures"):
        description_figures.count_figures(run, plan.dataset, plan.base, texts=False)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-id", default=None, type=run_id_argument,
                        help="read the plan stored under this run id (the pipeline's); default: this job's run id")


JOB = Job("embed", __doc__.splitlines()[0], embed, add_arguments)


def main(argv: list[str] | None = None) -> int:
    return JOB.main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
