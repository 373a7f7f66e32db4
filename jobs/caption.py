"""``caption``: item images -> the ``descriptions`` Delta table, on Ray Data with a caption engine.

For the configured dataset and ``experiment.caption`` (engine, model, prompt):

1. The plan reads ``items`` (item_id, image_uri, image_sha256): on the driver with delta-rs
   while the dataset's ``items`` files and the whole ``descriptions`` table (it is not
   partitioned) each hold under 64 MiB of Parquet (``udfs.caption_udfs.caption_todo``), else as
   one Spark job (``spark_plan``; the same rules).
   Items without an image hash (no
   image, or one that ``ingest`` rejected) are counted ``skipped_no_image``. Items are grouped
   by hash: an image shared by several items is described once (``shared_image_items``).
2. The semantic cache: hashes that already have a row in ``descriptions`` under the same
   (engine, model, prompt_id) are ``cached`` and not described again, across items, datasets
   and reruns, when that row is ``ok`` or a permanent error (the bytes are empty, not an
   image, truncated, too large: the same hash fails the same way every time). Other errors (a
   file changed or missing since ingest, an engine exception) are retried (``retried``).
   ``--force`` (``experiment.caption.force``) describes every image again.
3. Ray Data (``udfs.caption_udfs``): an actor pool of ``caption.num_workers`` engines reads,
   verifies (the bytes must still hash to ``image_sha256``) and decodes each image, shrinks it
   to what the engine needs and describes it (``describe_isolated``: a failing image fails
   alone), one engine batch at a time, and writes each block of at most ``rows_per_file`` rows
   to one Parquet file in ``{warehouse}/_staging/descriptions/{run_id}/``, under a temporary
   name renamed into place. An actor on a GPU (``hf``) has CPU loading tasks before it, so that
   decoding overlaps the model, and I/O tasks after it that write the staged files; on CPU
   those tasks would only take cores from the actor's torch threads. The ``openai`` engine's
   actors read the files the same way (the request carries the file's own bytes when the
   server can take them) and send HTTP requests to the servers of
   ``experiment.caption.openai``; the servers are checked before Ray starts: when none answers
   the job exits 4 (``EXIT_SERVER_DOWN``), naming the URLs (docs/CAPTION_SERVERS.md). The
   ``vllm`` engine runs Ray's own vLLM integration instead of the actor pool.
4. Spark merges the staged files into ``descriptions`` (``MERGE`` on the key; an error row
   never replaces an ok row, an older row never replaces a newer one), then removes the folder.

Kill safety: a staged file is complete once it has its final name; a killed run leaves its
folder, which the next run merges before planning (so no finished caption is computed twice)
and then removes. A folder is adopted only when its owner is gone (same host and its process
is dead, or older than a day for another host); the adopter claims it by an atomic rename, so
two runs never adopt the same folder. Two runs at once both succeed: each computes its own
plan, ``MERGE`` retries on Delta conflicts, and every key ends with one row.

Counts: ``items``, ``skipped_no_image``, ``images`` (distinct hashes), ``shared_image_items``,
``cached`` (= ``cached_ok`` + ``cached_errors``), ``retried``, ``to_describe``, ``described``,
``failed`` (and ``failed_<kind>``), ``adopted_rows`` (from killed runs), ``staged_files``;
with the ``openai`` engine also ``prompt_tokens``, ``completion_tokens`` (the servers' usage),
``described_after_retry``, ``retries`` and ``retries_<kind>``; stage times ``ms_adopt``,
``ms_plan``, ``ms_prepare_engine`` (the ``openai`` servers' check), ``ms_ray_start``, ``ms_describe``, ``ms_ray_stop``, ``ms_merge``,
``ms_text_figures``. The engine's texts for the dataset's images (``udfs.description_stats``):
``descriptions_texts``, ``descriptions_distinct``, ``descriptions_vocabulary`` and, in thousandths,
``descriptions_distinct_ratio_x1000``, ``descriptions_top_text_share_x1000``,
``descriptions_words_mean_x1000`` and ``descriptions_words_p10/p50/p90_x1000``.
The job prints the representation name the ``embed`` job uses for these descriptions.

The job's settings in ``experiment.caption`` (``jobs.config.CaptionConf``): ``actor_num_cpus``
(CPUs reserved per engine actor; default: up to 1, leaving one core to a GPU actor's image
loading and to Ray's own processes),
``torch_threads`` (per actor; default: the cluster's cores divided by the actors, at most the
cores of the node the actor runs on), ``rows_per_file``
(rows per staged file at most, default 256: a killed run loses at most this many captions
per actor call in flight; an ``openai`` actor has two; an actor that reads its own files gets
smaller blocks when that gives each actor two), ``load_num_cpus`` (CPUs reserved per
image-loading task of a GPU actor, default 0: see below), ``accelerator_type`` (``vllm``). The engine gets its own section as its options:
``experiment.caption.tags``, ``.hf`` or ``.vllm`` (``tensor_parallel_size`` is there).

A GPU actor's image loading reserves no CPU by default, and at most as many loading tasks as
the cluster has CPUs run at once. Loading tasks that reserved CPUs could wait forever when
engine actors hold every CPU: two caption runs sharing a small cluster each got their actor and
neither could load an image (the concurrency test hung this way).
"""
from __future__ import annotations

if not __package__:  # run as a file (`spark-submit jobs/<job>.py`): see jobs/_as_package.py
    from _as_package import PACKAGE as __package__

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyspark.sql import Observation, Window
from pyspark.sql import functions as F

from udfs import caption_udfs as cu
from udfs import storage
from udfs.caption.engine import engine_identity
from udfs.caption.kinds import EngineKind, engine_kind
from udfs.caption.openai_engine import ServerUnavailable
from udfs.images import ReadLimits
from udfs.representations import RepresentationError, lvlm_name, parse_representation

from . import description_figures, tables
from .config import CaptionConf, ConfigError, load_config
from .job_run import EXIT_INSTALL, Job, JobParser, JobRun, NothingUsable, base_parser, run_id_argument
from .plan import check_caption_agrees, run_plan
from .ray_session import ray_session

log = logging.getLogger(__name__)

STAGING = ("_staging", "descriptions")
OWNER_FILE = "_OWNER.json"
ADOPTED_MARK = ".adopted-by-"
# A staging folder of another host whose owner is silent this long belongs to a dead run.
FOREIGN_STALE_SECONDS = 24 * 3600
# Said once per run, just before Ray's own error-level line, which reads as a failure and is
# not one. Its cause is inside Ray Data, not in our arguments (they are a few small settings):
# every actor of a ``map_batches`` pool gets Ray Data's own DataContext and the batch function
# as object references (``ray.put`` whatever their size; ray-project/ray#57733), and the pool
# keeps restarts on. Turning the restarts off is the only way to silence it, and we keep them.
RAY_ACTOR_ARGS_NOTE = (
    "Ray logs an error-level line 'Actor with class name: MapWorker(MapBatches(CaptionActor)) ... has "
    "constructor arguments in the object store and max_restarts > 0' for each engine actor: it is not a "
    "failure. Ray Data passes every pool actor its own context and batch function through the object "
    "store, and Ray warns that a restart needs them there; they stay there while this job runs "
    "(ray-project/ray#57733)")
# The ``openai`` engine's server does not answer (the job's other exit codes: jobs.job_run).
EXIT_SERVER_DOWN = 4


class EngineUnavailable(ImportError):
    """The configured engine's packages are not installed."""


@dataclass(frozen=True)
class CaptionSpec:
    """The resolved caption settings: the engine's identity (the cache key), its options, and
    the job's settings (``conf``)."""

    engine: str
    model: str
    prompt: str
    prompt_id: str
    engine_options: dict[str, Any]
    conf: CaptionConf

    @property
    def batch_size(self) -> int:
        return self.conf.batch_size

    @property
    def max_new_tokens(self) -> int:
        return self.conf.max_new_tokens

    @property
    def num_workers(self) -> int:
        return self.conf.num_workers

    @property
    def force(self) -> bool:
        return self.conf.force

    @property
    def representation(self) -> str:
        return lvlm_name(self.engine, self.model, self.prompt_id)

    @property
    def kind(self) -> EngineKind:
        return engine_kind(self.engine)


def caption_spec(conf: CaptionConf) -> CaptionSpec:
    """The engine's identity for ``experiment.caption`` (whose ranges the config checked); raises
    ``ConfigError`` naming the section when the engine refuses its options or model."""
    engine_options = conf.engine_options()
    model = conf.model or engine_kind(conf.engine).default_model
    try:
        # The same pure identity the plan uses (no model loaded): the two cannot disagree.
        prompt, pid = engine_identity(conf.engine, model, conf.prompt, engine_options)
    except ValueError as exc:
        raise ConfigError(f"experiment.caption.{conf.engine}: {exc}") from exc
    spec = CaptionSpec(conf.engine, model, prompt, pid, engine_options, conf)
    try:
        spec.representation
    except RepresentationError as exc:
        raise ConfigError(f"experiment.caption.model '{model}': {exc}") from exc
    return spec


def check_engine_installed(engine: str) -> None:
    """Raise ``EngineUnavailable`` with the install command when the engine cannot run here."""
    missing = engine_kind(engine).missing_install()
    if missing:
        raise EngineUnavailable(missing)


# --- staging folders ------------------------------------------------------------------------

def staging_root(warehouse: str | Path) -> str:
    """``{warehouse}/_staging/descriptions``: a local path or a URI, like the warehouse."""
    return storage.join(str(warehouse), *STAGING)


def write_owner(folder: str, run_id: str) -> None:
    owner = {"run_id": run_id, "host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
    storage.write_bytes(storage.join(folder, OWNER_FILE), json.dumps(owner).encode())


def owner_alive(folder: str, now: float | None = None) -> bool:
    """Whether the run that owns a staging folder may still be writing to it."""
    now = now or time.time()
    try:
        owner = json.loads(storage.read_bytes(storage.join(folder, OWNER_FILE)))
    except (OSError, ValueError):
        # No owner record: a folder whose owner died before writing one, unless it is brand new
        # (an object store has no folder times: its newest file's).
        local = storage.local_path_of(folder)
        newest = (os.stat(local).st_mtime if local is not None
                  else max((m for _, _, m in storage.list_entries(folder)), default=0.0))
        return now - newest < 60
    if owner.get("host") == socket.gethostname():
        try:
            os.kill(int(owner["pid"]), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return now - float(owner.get("since", 0)) < FOREIGN_STALE_SECONDS


def staged_files(folder: str) -> list[str]:
    """The complete staged files of a folder (temporary files of a killed writer are ignored)."""
    return sorted(storage.join(folder, name) for name, is_dir, _ in storage.list_entries(folder)
                  if not is_dir and name.startswith(cu.STAGED_FILE_PREFIX) and name.endswith(".parquet"))


def claim_dead_folders(root: str, run_id: str) -> list[str]:
    """Rename every staging folder whose owner is dead to ``<name>.adopted-by-<run_id>``. On a
    local or HDFS file system the rename is atomic, so of two runs adopting at once each folder
    goes to exactly one; on an object store it is a copy and a delete, so two adopters may both
    merge a folder, which the ``MERGE`` on the key makes harmless."""
    claimed = []
    for name in sorted(name for name, is_dir, _ in storage.list_entries(root) if is_dir):
        folder = storage.join(root, name)
        if name == run_id or owner_alive(folder):
            continue
        target = storage.join(root, f"{name.split(ADOPTED_MARK)[0]}{ADOPTED_MARK}{run_id}")
        try:
            storage.move(folder, target)
        except OSError:
            continue  # another run claimed it first
        write_owner(target, run_id)
        claimed.append(target)
    return claimed


# --- Spark: plan and merge -------------------------------------------------------------------

# While the dataset's items files and the descriptions table (unpartitioned: every engine's rows
# count) each stay under this many Parquet bytes, the plan is read on the driver with delta-rs: a
# Spark job costs more than the reading there (0.9 s against tens of ms for 1,500 images), and a
# cached rerun is nearly all plan.
DRIVER_PLAN_MAX_BYTES = 64 << 20


def spark_plan(spark, warehouse: str, dataset: str, spec: CaptionSpec) -> tuple[Any, dict[str, int]]:
    """``udfs.caption_udfs.caption_todo`` as one Spark action: the counts are observed on the
    way to the to-do list, so a rerun on a cached catalog costs one pass over the items and the
    cache's keys."""
    item_stats, image_stats = Observation("caption_items"), Observation("caption_images")
    items = (tables.read(spark, warehouse, "items").filter(F.col("dataset") == dataset)
             .select("item_id", "image_uri", "image_sha256")
             .observe(item_stats, F.count(F.lit(1)).alias("n"), F.count("image_sha256").alias("with_image")))
    # One item per image: the smallest item id, so that reruns pick the same one.
    first = F.min(F.struct("item_id", "image_uri")).alias("first")
    images = (items.filter(F.col("image_sha256").isNotNull()).groupBy("image_sha256").agg(first)
              .select("image_sha256", "first.item_id", "first.image_uri"))
    kind = F.split(F.col("error"), ":").getItem(0)
    final = F.coalesce((F.col("status") == cu.OK) | ((F.col("status") == cu.ERROR)
                                                    & kind.isin(*sorted(cu.PERMANENT_ERROR_KINDS))), F.lit(False))
    cached = F.col("status").isNotNull()
    cache = (tables.read(spark, warehouse, "descriptions")
             .filter((F.col("engine") == spec.engine) & (F.col("model") == spec.model)
                     & (F.col("prompt_id") == spec.prompt_id))
             .select("image_sha256", "status", "error"))
    marked = (images.join(cache, "image_sha256", "left").withColumn("_final", final)
              .observe(image_stats, F.count(F.lit(1)).alias("images"),
                       F.count(F.when(F.col("status") == cu.OK, 1)).alias("ok"),
                       F.count(F.when(F.col("_final") & cached & (F.col("status") != cu.OK), 1)).alias("final_errors"),
                       F.count(F.when(cached & ~F.col("_final"), 1)).alias("retry")))
    todo = marked if spec.force else marked.filter(~F.col("_final"))
    # Sorted on the driver: a Spark orderBy samples its input in an extra job, which would run
    # the observed plan twice and double its counts.
    table = todo.select("image_sha256", "item_id", "image_uri").toArrow().sort_by("image_sha256")
    facts = {**item_stats.get, **image_stats.get}
    return table, {k: int(v or 0) for k, v in facts.items()}


def driver_plan(warehouse: str, dataset: str, spec: CaptionSpec,
                max_bytes: int = DRIVER_PLAN_MAX_BYTES) -> tuple[Any, dict[str, int]] | None:
    """The same plan read on the driver (delta-rs + pandas), or None when either table's files
    to read exceed ``max_bytes`` or delta-rs cannot open the store (the caller then plans with
    Spark); any other error is the job's."""
    from udfs.warehouse_reader import StoreUnreadable, TableMissing, TooLarge, read_table

    try:
        items = read_table(warehouse, "items", equal={"dataset": dataset},
                           columns=["item_id", "image_uri", "image_sha256"], max_bytes=max_bytes)
        try:
            cache = read_table(warehouse, "descriptions", columns=["image_sha256", "status", "error"],
                               equal={"engine": spec.engine, "model": spec.model, "prompt_id": spec.prompt_id},
                               max_bytes=max_bytes)
        except TableMissing:  # no image was ever described here
            cache = None
    except (TooLarge, StoreUnreadable) as exc:
        log.info("caption plan with Spark: %s", exc)
        return None
    if cache is None:
        import pyarrow as pa

        cache = pa.table({c: pa.array([], pa.string()) for c in ("image_sha256", "status", "error")})
    return cu.caption_todo(items, cache, force=spec.force)


def plan(run: JobRun, spec: CaptionSpec) -> Any:
    """The images to describe (an Arrow table of image_sha256, item_id, image_uri), with counts:
    read on the driver when the tables are small (``driver_plan``), else one Spark job."""
    name = run.config.dataset.name
    found = driver_plan(run.warehouse, name, spec)
    table, facts = found if found is not None else spark_plan(run.spark, run.warehouse, name, spec)
    if facts["n"] == 0:
        raise NothingUsable(f"dataset '{name}' has no items in {run.warehouse}/items: run "
                            f"`vlm4rec ingest` with this dataset first")
    run.count("items", facts["n"])
    run.count("skipped_no_image", facts["n"] - facts["with_image"])
    run.count("images", facts["images"])
    run.count("shared_image_items", facts["with_image"] - facts["images"])
    if facts["images"] == 0:
        raise NothingUsable(f"dataset '{name}': none of its {facts['n']} items has a usable image "
                            "(see the rejects table for why)")
    cached_ok, cached_errors, retry = (facts[k] for k in ("ok", "final_errors", "retry"))
    if spec.force:
        run.count("cached", 0)
        run.count("forced", cached_ok + cached_errors + retry)
    else:
        run.count("cached_ok", cached_ok)
        run.count("cached_errors", cached_errors)
        run.count("cached", cached_ok + cached_errors)
        run.count("retried", retry)
    run.count("to_describe", table.num_rows)
    return table


def merge_staged(run: JobRun, files: list[str]) -> int:
    """Merge staged ``descriptions`` files into the table; returns the rows that won.

    Within the files and against the table, for each key an ok row beats an error row and a
    newer row beats an older one of the same status; rows that lose are not written, so a
    stale folder adopted late never overwrites a later run's work.
    """
    if not files:
        return 0
    n = merge_on_driver(run, files)
    if n is not None:
        return n
    spark = run.spark
    schema = tables.SCHEMAS["descriptions"]
    keys = tables.KEYS["descriptions"]
    staged = spark.read.schema(schema).parquet(*files)
    best = Window.partitionBy(*keys).orderBy((F.col("status") == cu.OK).desc(), F.col("created_at").desc())
    staged = staged.withColumn("_rank", F.row_number().over(best)).filter("_rank = 1").drop("_rank")
    current = (tables.read(spark, run.warehouse, "descriptions")
               .select(*keys, F.col("status").alias("_t_status"), F.col("created_at").alias("_t_created")))
    newer = F.col("_t_created").isNull() | (F.col("created_at") > F.col("_t_created"))
    wins = (F.col("_t_status").isNull()
            | ((F.col("status") == cu.OK) & ((F.col("_t_status") != cu.OK) | newer))
            | ((F.col("status") == cu.ERROR) & (F.col("_t_status") == cu.ERROR) & newer))
    winners = staged.join(current, keys, "left").filter(wins).drop("_t_status", "_t_created")
    winners = winners.persist()
    try:
        n = winners.count()
        if n:
            tables.merge(spark, run.warehouse, "descriptions", winners)
    finally:
        winners.unpersist()
    return n


def merge_on_driver(run: JobRun, files: list[str]) -> int | None:
    """``merge_staged`` on the driver (the same winners, ``cu.staged_winners``; the same MERGE,
    committed by delta-rs on a local master, ``jobs.tables``) while the staged files and the
    table's rows of their images are small (``spark.driver_compute_mb``, ``MAX_ROWS``); None:
    the Spark path merges them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from udfs.warehouse_reader import StoreUnreadable, TableMissing, TooLarge, check_size, read_table

    from .driver_inputs import MAX_ROWS, limit_bytes

    limit = limit_bytes(run)
    local = [storage.local_path_of(f) for f in files]
    if limit <= 0 or not run.spark.sparkContext.master.startswith("local") or None in local \
            or sum(os.path.getsize(f) for f in local) > limit:
        return None
    keys, schema = tables.KEYS["descriptions"], tables.arrow_schema("descriptions")
    try:
        staged = pa.concat_tables([pq.read_table(f, schema=schema) for f in local])
        hashes = sorted(set(staged.column("image_sha256").to_pylist()))
        try:
            check_size(run.warehouse, "descriptions", within={"image_sha256": hashes}, max_bytes=limit,
                       max_rows=MAX_ROWS)
            current = read_table(run.warehouse, "descriptions", within={"image_sha256": hashes},
                                 columns=[*keys, "status", "created_at"])
        except TableMissing:
            current = None
    except (TooLarge, StoreUnreadable) as exc:
        log.info("caption merge with Spark: %s", exc)
        return None
    winners = cu.staged_winners(staged, current, keys)
    if winners.num_rows:
        tables.merge(run.spark, run.warehouse, "descriptions", winners)
    return winners.num_rows


def adopt_dead_runs(run: JobRun) -> None:
    """Merge what killed runs staged, then remove their folders."""
    for folder in claim_dead_folders(staging_root(run.warehouse), run.run_id):
        files = staged_files(folder)
        n = merge_staged(run, files)
        log.warning("adopted %d staged description rows (%d files) of a killed caption run from %s",
                    n, len(files), folder)
        run.count("adopted_rows", n)
        run.count("adopted_files", len(files))
        storage.delete_dir(folder)


# --- Ray: describe ---------------------------------------------------------------------------

def describe_with_ray(ray: Any, todo: Any, spec: CaptionSpec, folder: str,
                      limits: ReadLimits | None = None) -> list[dict[str, Any]]:
    """Run the Ray Data pipeline over ``todo``; returns one summary row per staged file.
    ``limits``: how image files are read (``dataset.images``)."""
    import ray.data

    per_file = spec.conf.rows_per_file
    per_block = per_file
    kind, conf = spec.kind, spec.conf
    cluster = ray.cluster_resources()
    cpus, gpus = float(cluster.get("CPU", 1)), float(cluster.get("GPU", 0))
    # Only a GPU actor gets loading tasks of its own, so that decoding overlaps its model.
    # A CPU actor reads its own files (a millisecond an image against tens for the model)
    # and writes its own staged files: the loading and writing tasks would take those very
    # cores from its torch threads (docs/BENCHMARKS.md, "Eleventh session": the slowest
    # twentieth of its batches went from 69 to 35 ms an image).
    own_io = kind.reads_own_files(spec.engine_options, gpus)
    if own_io:
        # Such an actor takes a whole block per call: blocks small enough that every actor
        # gets two, so none idles while another works through the rest.
        per_block = max(1, min(per_file, -(-todo.num_rows // (2 * spec.num_workers))))
    blocks = [todo.slice(start, per_block) for start in range(0, todo.num_rows, per_block)]
    ds = ray.data.from_arrow(blocks)
    write_kwargs = dict(staging_dir=str(folder), engine=spec.engine, model=spec.model,
                        prompt_id=spec.prompt_id, prompt=spec.prompt)
    write = dict(fn_kwargs=write_kwargs, batch_size=per_file, batch_format="pandas", num_cpus=0.25)
    if kind.runs_own_pipeline:
        ds = describe_with_vllm(ds, spec, limits).map_batches(cu.write_staging, **write)
    else:
        actor = kind.actor_resources(spec.engine_options, spec.num_workers, conf.actor_num_cpus, conf.torch_threads,
                                     cpus, gpus)
        actor_cpus, actor_gpus, threads = actor.num_cpus, actor.num_gpus, actor.torch_threads
        log.info("caption engine %s: %d actor(s), %.2f CPU + %.0f GPU each, %d torch thread(s)",
                 spec.engine, spec.num_workers, actor_cpus, actor_gpus, threads)
        log.info(RAY_ACTOR_ARGS_NOTE)
        cluster_cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        load = {"max_side": kind.max_side, "limits": limits}
        if not own_io:
            ds = ds.map_batches(cu.load_images, fn_kwargs=load, batch_size=spec.batch_size, batch_format="pandas",
                                num_cpus=spec.conf.load_num_cpus,
                                compute=ray.data.TaskPoolStrategy(size=cluster_cpus))
        ds = ds.map_batches(
            cu.CaptionActor,
            fn_constructor_kwargs=dict(engine=spec.engine, model=spec.model, prompt=spec.prompt,
                                       batch_size=spec.batch_size, max_new_tokens=spec.max_new_tokens,
                                       options=spec.engine_options,
                                       torch_threads=spec.conf.torch_threads if threads else 0,
                                       max_torch_threads=threads, expected_prompt_id=spec.prompt_id,
                                       load=load if own_io else None,
                                       staging=write_kwargs if own_io else None),
            compute=kind.actor_pool(ray, spec.num_workers),
            # A whole block per call for an actor doing its own I/O: openai streams it
            # (CaptionActor._send_as_read), the others describe it an engine batch at a time
            # (CaptionActor._read_and_describe).
            batch_size=None if own_io else spec.batch_size,
            batch_format="pandas", num_cpus=actor_cpus, num_gpus=actor_gpus)
        if not own_io:
            ds = ds.map_batches(cu.write_staging, **write)
    return ds.take_all()


def describe_with_vllm(ds: Any, spec: CaptionSpec, limits: ReadLimits | None = None) -> Any:
    """The ``vllm`` branch: Ray's vLLM processor replaces the actor pool (needs GPUs and vLLM;
    not exercised on CPU-only machines). Images that fail to load bypass the engine."""
    from udfs.caption.vllm_engine import build_vllm_processor

    options = spec.engine_options
    engine_kwargs = dict(options["engine_kwargs"] or {})
    # The processor takes no argument of its own for it: an engine argument of vLLM's.
    if options["gpu_memory_utilization"] is not None:
        engine_kwargs.setdefault("gpu_memory_utilization", options["gpu_memory_utilization"])
    caption = build_vllm_processor(
        model=spec.model, prompt=spec.prompt, batch_size=spec.batch_size,
        max_new_tokens=spec.max_new_tokens, tensor_parallel_size=options["tensor_parallel_size"],
        concurrency=spec.num_workers, image_column="image_bytes",
        keep_columns=("image_sha256", "item_id", "image_uri"),
        accelerator_type=spec.conf.accelerator_type,
        max_model_len=options["max_model_len"], min_new_tokens=options["min_new_tokens"],
        engine_kwargs=engine_kwargs)
    loaded = ds.map_batches(cu.load_image_bytes, fn_kwargs={"limits": limits}, batch_format="pandas",
                            batch_size=spec.batch_size).materialize()
    failed = loaded.filter(expr="error IS NOT NULL").map_batches(cu.failed_rows, batch_format="pandas")
    described = caption(loaded.filter(expr="error IS NULL")).map_batches(cu.vllm_rows, batch_format="pandas")
    return described.union(failed)


# --- the job ---------------------------------------------------------------------------------

def caption(run: JobRun, args: argparse.Namespace | None = None) -> None:
    """The job body (also called by ``pipeline``)."""
    config = run.config
    if not config.dataset.name:
        raise ConfigError("no dataset configured: pass --conf datasets/NAME.yaml (or --set dataset.name=...)")
    spec = caption_spec(config.experiment.caption)
    if getattr(args, "run_id", None):
        # Only for a run (the pipeline's): a bare caption job, a cache fill, reads no plan
        # and never stores one.
        planned = run_plan(run, args.run_id)
        if planned is not None:
            check_caption_agrees(planned, config.dataset.name, spec.representation, args.run_id)
    check_engine_installed(spec.engine)
    log.info("caption %s with %s (prompt %s) for dataset %s%s", spec.engine, spec.model, spec.prompt_id,
             config.dataset.name, " (forced)" if spec.force else "")
    # Stage times (ms_<stage> in the counts) say where a run's fixed seconds go; a fully cached
    # rerun stops after the plan and never starts Ray.
    with run.stage("adopt"):
        adopt_dead_runs(run)
    with run.stage("plan"):
        todo = plan(run, spec)
    if todo.num_rows:
        with run.stage("prepare_engine"):
            spec = prepared(spec)
    if todo.num_rows:
        folder = storage.join(staging_root(run.warehouse), run.run_id)
        write_owner(folder, run.run_id)
        started = time.perf_counter()
        described = False
        try:
            with contextlib.ExitStack() as stack:
                with run.stage("ray_start"):
                    ray = stack.enter_context(ray_session(config.ray))
                with run.stage("describe"):
                    summaries = describe_with_ray(ray, todo, spec, folder, ReadLimits(
                        config.dataset.images.max_bytes, config.dataset.images.read_timeout_s))
                session = stack.pop_all()
            with run.stage("ray_stop"):
                session.close()
            described = True
        finally:
            if not described:  # whatever stopped Ray (an interrupt too): keep what it finished
                _salvage(run, folder)
        seconds = time.perf_counter() - started
        with run.stage("merge"):
            files = staged_files(folder)
            merge_staged(run, files)
            storage.delete_dir(folder)
        run.count("staged_files", len(files))
        run.count("described", sum(s["ok"] for s in summaries))
        run.count("failed", sum(s["error"] for s in summaries))
        run.count("describe_ms", int(seconds * 1000))
        for summary in summaries:
            for kind, n in json.loads(summary["error_kinds"]).items():
                run.count(f"failed_{kind}", n)
        if spec.kind.reports_usage:
            count_requests(run, summaries)
        log.info("described %d images in %.1f s (%.2f images/s)", todo.num_rows, seconds,
                 todo.num_rows / max(seconds, 1e-9))
    else:
        run.count("described", 0)
        run.count("failed", 0)
    with run.stage("text_figures"):
        # Over every description of the dataset's images, cached ones included: how distinct
        # and how rich the texts are (udfs.description_stats; evaluate judges their signal).
        description_figures.count_text_figures(run, config.dataset.name, parse_representation(spec.representation))
    usable = run.counts["cached_ok"] + run.counts["described"]
    print(f"caption: representation for the embed job: {spec.representation} "
          f"({usable} images with a description)")
    if usable == 0:
        raise NothingUsable(f"dataset '{config.dataset.name}': no image could be described; the errors "
                            f"are in the descriptions table (status = 'error')")


def prepared(spec: CaptionSpec) -> CaptionSpec:
    """The spec with the options the engine describes with once there are images to describe
    (``EngineKind.prepared_options``: the ``openai`` servers that answer now, or
    ``ServerUnavailable``, exit 4, when none does, before any image is sent)."""
    try:
        options = spec.kind.prepared_options(spec.engine_options, spec.model)
    except ValueError as exc:
        raise ConfigError(f"experiment.caption.{spec.engine}: {exc}") from exc
    return dataclasses.replace(spec, engine_options=options)


def count_requests(run: JobRun, summaries: list[dict[str, Any]]) -> None:
    """The cost and fault counts of an engine whose servers report them (``openai``): tokens as the server reported them, images
    described after a retry, and retries per fault kind (``retries_rate_limited``, ...)."""
    for key in ("prompt_tokens", "completion_tokens", "described_after_retry"):
        run.count(key, sum(int(s.get(key) or 0) for s in summaries))
    retries: dict[str, int] = {}
    for summary in summaries:
        for kind, n in json.loads(summary.get("retries") or "{}").items():
            retries[kind] = retries.get(kind, 0) + n
    run.count("retries", sum(retries.values()))
    for kind, n in sorted(retries.items()):
        run.count(f"retries_{kind}", n)


def _salvage(run: JobRun, folder: str) -> None:
    """After a failed Ray stage, keep what was described: merge the staged files. When the store
    or Delta refuses that too, the folder stays for the next run to adopt, and the Ray stage's
    error is the one the job reports (any other error of the merge is raised, with it as context)."""
    try:
        n = merge_staged(run, staged_files(folder))
    except (*tables.SPARK_ERRORS, OSError) as exc:
        log.error("could not merge the staged descriptions in %s (%s); the next run adopts them", folder, exc)
        return
    log.warning("the caption run failed; %d descriptions it had finished were merged", n)
    storage.delete_dir(folder)


def add_arguments(parser: JobParser) -> None:
    parser.add_setting("--force", "experiment.caption.force", type=bool,
                       help="describe every image again, ignoring cached descriptions")
    parser.add_argument("--run-id", default=None, type=run_id_argument,
                        help="check the caption settings against the plan stored under this run id (the "
                             "pipeline's); default: read no plan")


def unavailable_engine(argv: list[str] | None) -> str | None:
    """The install hint when the configured engine cannot run here, checked before any table is
    touched; ``None`` when it can (or the config is wrong, which ``run_job`` reports)."""
    parser = base_parser("caption", "")
    add_arguments(parser)
    try:
        args, _ = parser.parse_known_args(argv)
        engine = load_config(args.conf, args.overrides).experiment.caption.engine
        check_engine_installed(engine)
    except EngineUnavailable as exc:
        return str(exc)
    except (ConfigError, SystemExit):
        return None
    return None


JOB = Job("caption", __doc__.splitlines()[0], caption, add_arguments,
          exit_codes=((EngineUnavailable, EXIT_INSTALL), (ServerUnavailable, EXIT_SERVER_DOWN)))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    missing = unavailable_engine(argv)
    if missing:
        print(f"vlm4rec caption: {missing}", file=sys.stderr)
        return EXIT_INSTALL
    return JOB.main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
