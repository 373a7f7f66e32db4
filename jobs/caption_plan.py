"""The caption job's plan: the resolved settings (``CaptionSpec``) and the images to describe,
read on the driver while the slices are small, else in Spark by buckets of image hash, with the
same function (``udfs.caption.caption_udfs.caption_todo``; ``jobs.caption``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pyspark.sql import functions as F

from udfs.caption import caption_udfs as cu
from udfs.caption.engine import engine_identity
from udfs.caption.kinds import EngineKind, engine_kind
from udfs.representations import RepresentationError, lvlm_name

from . import tables
from .config import CaptionConf, ConfigError
from .driver_inputs import Slice, read_on_driver
from .job_run import JobRun, NothingUsable
from .spark_groups import bucket, n_groups


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


def spark_plan(spark, warehouse: str, dataset: str, spec: CaptionSpec) -> tuple[Any, dict[str, int]]:
    """``udfs.caption.caption_udfs.caption_todo`` in Spark: the dataset's items and the engine's cache
    rows cogrouped by a bounded bucket of image hash (an image's items and rows meet in one;
    an item without an image goes by its id), the same function run on each bucket
    (``caption_todo_rows``), its rows and facts added up on the driver."""
    from pyspark.sql.pandas.types import from_arrow_schema

    items = (tables.read(spark, warehouse, "items").filter(F.col("dataset") == dataset)
             .select("item_id", "image_uri", "image_sha256"))
    cache = (tables.read(spark, warehouse, "descriptions")
             .filter((F.col("engine") == spec.engine) & (F.col("model") == spec.model)
                     & (F.col("prompt_id") == spec.prompt_id))
             .select("image_sha256", "status", "error"))
    buckets = n_groups(spark, items.count() + cache.count())

    def by_bucket(frame):
        key = F.coalesce("image_sha256", "item_id") if "item_id" in frame.columns else F.col("image_sha256")
        return frame.withColumn("_bucket", bucket(key, buckets)).groupBy("_bucket")
    rows = by_bucket(items).cogroup(by_bucket(cache)).applyInArrow(
        lambda item_rows, cache_rows: cu.caption_todo_rows(item_rows.drop_columns(["_bucket"]),
                                                           cache_rows.drop_columns(["_bucket"]), spec.conf.force),
        from_arrow_schema(cu.TODO_ROWS_SCHEMA))
    return cu.caption_todo_of_rows(rows.toArrow())


def driver_plan(run: JobRun, spec: CaptionSpec) -> tuple[Any, dict[str, int]] | None:
    """The same plan read on the driver (``jobs.driver_inputs.read_on_driver``: delta-rs and
    ``udfs.caption.caption_udfs.caption_todo``), or None when the job plans with Spark for one of the
    named, counted reasons (``driver_fallback_<reason>``); any other error is the job's."""
    read = read_on_driver(run, {
        "items": Slice("items", {"dataset": run.config.dataset.name},
                       columns=["item_id", "image_uri", "image_sha256"]),
        # No image was ever described here: no table yet, an empty cache.
        "cache": Slice("descriptions", {"engine": spec.engine, "model": spec.model, "prompt_id": spec.prompt_id},
                       columns=["image_sha256", "status", "error"], optional=True)})
    if read is None:
        return None
    return cu.caption_todo(read["items"], read["cache"], force=spec.conf.force)


def plan(run: JobRun, spec: CaptionSpec) -> Any:
    """The images to describe (an Arrow table of image_sha256, item_id, image_uri), with counts:
    read on the driver while the slices are small (``driver_plan``), else one Spark job."""
    name = run.config.dataset.name
    found = driver_plan(run, spec)
    table, facts = found if found is not None else spark_plan(run.spark, run.warehouse, name, spec)
    if facts["n"] == 0:
        raise NothingUsable(f"dataset '{name}' has no items in {run.warehouse}/items: run "
                            f"`vlm4rec ingest` with this dataset first")
    run.counts.update({"items": facts["n"], "skipped_no_image": facts["n"] - facts["with_image"],
                       "images": facts["images"], "shared_image_items": facts["with_image"] - facts["images"]})
    if facts["images"] == 0:
        raise NothingUsable(f"dataset '{name}': none of its {facts['n']} items has a usable image "
                            "(see the rejects table for why)")
    cached_ok, cached_errors, retry = (facts[k] for k in ("ok", "final_errors", "retry"))
    if spec.conf.force:
        run.counts.update({"cached": 0, "forced": cached_ok + cached_errors + retry})
    else:
        run.counts.update({"cached_ok": cached_ok, "cached_errors": cached_errors,
                           "cached": cached_ok + cached_errors, "retried": retry})
    run.count("to_describe", table.num_rows)
    return table
