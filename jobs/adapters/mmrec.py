"""The MMRec format: ``{name}.inter`` (tab-separated ``userID itemID rating timestamp x_label``
with a header row) plus an optional item metadata file with titles and image paths.

```yaml
dataset:
  adapter: mmrec
  paths: {root: data/baby}
  options:
    inter_file: baby.inter        # default: {dataset.name}.inter
    items_file: baby_items.csv    # optional CSV: itemID,title,description,image_path
  split: {protocol: label}        # x_label 0/1/2 -> train/valid/test
```
Item ids come from the ``itemID`` column, never from row order; items with interactions but no
metadata row are kept with an empty title (counted as ``items_without_metadata``).
"""
from __future__ import annotations

from dataclasses import dataclass

from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from ..config import DatasetConf
from .base import AdapterOutput, images_folder, options_from, read_table_file, require_path, validate_columns
from .csv_adapter import attrs_map, image_uri


@dataclass
class MMRecOptions:
    inter_file: str = ""
    items_file: str = ""
    sep: str = "\t"
    user_col: str = "userID"
    item_col: str = "itemID"
    rating_col: str = "rating"
    timestamp_col: str = "timestamp"
    label_col: str = "x_label"
    item_title_col: str = "title"
    item_text_col: str = "description"
    item_image_col: str = "image_path"
    images_root: str = ""
    attrs: list = None  # type: ignore[assignment]


def images_root_of(dataset: DatasetConf) -> str:
    """Where ingest and caption keep this dataset's image paths (``base.images_folder``)."""
    return images_folder(dataset, options_from(MMRecOptions, dataset).images_root)


def read(spark: SparkSession, dataset: DatasetConf) -> AdapterOutput:
    opts = options_from(MMRecOptions, dataset)
    root = require_path(dataset, "root")
    inter_path = require_path(dataset, "inter", opts.inter_file or f"{dataset.name}.inter")
    raw = read_table_file(spark, inter_path, "csv", opts.sep, multiline=False)
    interactions, rejects = validate_columns(
        raw, {"user_id": opts.user_col, "item_id": opts.item_col, "ts": opts.timestamp_col},
        {"rating": opts.rating_col, "label": opts.label_col}, inter_path, "interactions")
    counts: dict[str, int] = {}
    images_root = None  # no items file: no image paths
    ids = interactions.select("item_id").distinct()
    if opts.items_file:
        items_path = require_path(dataset, "items", opts.items_file)
        meta = read_table_file(spark, items_path)
        meta = meta.withColumn("attrs", attrs_map(meta, opts.attrs or []))
        meta, meta_rejects = validate_columns(
            meta, {"item_id": opts.item_col},
            {"title": opts.item_title_col, "text": opts.item_text_col, "image": opts.item_image_col},
            items_path, "items", keep=("attrs",))
        rejects = rejects.unionByName(meta_rejects)
        images_root = images_root_of(dataset)
        meta = meta.select("item_id", "title", "text", image_uri(F.col("image"), images_root).alias("image_uri"),
                           "attrs")
        # Interacted items without metadata still exist: kept with nulls, not dropped.
        items = meta.unionByName(
            ids.join(meta.select("item_id"), "item_id", "left_anti").select(
                "item_id", F.lit(None).cast("string").alias("title"), F.lit(None).cast("string").alias("text"),
                F.lit(None).cast("string").alias("image_uri"),
                F.create_map().cast("map<string,string>").alias("attrs")))
        # The docstring's promise: interacted items missing from the metadata file are counted.
        counts["items_without_metadata"] = ids.join(meta.select("item_id"), "item_id", "left_anti").count()
    else:
        items = ids.select("item_id", F.lit(None).cast("string").alias("title"),
                           F.lit(None).cast("string").alias("text"), F.lit(None).cast("string").alias("image_uri"),
                           F.create_map().cast("map<string,string>").alias("attrs"))
        counts["items_without_metadata_file"] = 1
    return AdapterOutput(items, interactions, rejects, counts, images_root=images_root)
