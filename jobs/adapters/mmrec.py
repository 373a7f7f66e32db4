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

from ..config import DatasetConf
from .base import AdapterOutput, bare_items, images_folder, options_from, read_table_file, require_path, validate_columns
from .csv_adapter import read_items_file


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
    ids = interactions.select("item_id").distinct()
    if not opts.items_file:
        # No items file: no image paths; interacted items exist with nulls.
        return AdapterOutput(bare_items(ids), interactions, rejects, {"items_without_metadata_file": 1})
    items_path = require_path(dataset, "items", opts.items_file)
    images_root = images_root_of(dataset)
    meta, meta_rejects = read_items_file(spark, items_path, opts.item_col, opts.item_title_col, opts.item_text_col,
                                         opts.item_image_col, opts.attrs or [], images_root)
    # Interacted items without metadata still exist: kept with nulls, not dropped, and counted
    # (the docstring's promise).
    missing = ids.join(meta.select("item_id"), "item_id", "left_anti")
    return AdapterOutput(meta.unionByName(bare_items(missing)), interactions, rejects.unionByName(meta_rejects),
                         {"items_without_metadata": missing.count()}, images_root=images_root)
