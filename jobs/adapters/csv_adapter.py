"""Any CSV or Parquet pair (items, interactions) with a column mapping in the dataset config.

```yaml
dataset:
  adapter: csv
  paths: {root: my-data}
  options:
    items: items.csv            # relative to root
    interactions: interactions.csv
    item_id: item_id            # source column names
    user_id: user_id
    title: title
    text: description
    image: image_path           # a path relative to images_root (default: root), or a URI
    attrs: [category, colour]   # extra item columns kept in the attrs map
    rating: rating
    timestamp: timestamp
    timestamp_format: unix      # unix | unix_ms | a datetime pattern such as yyyy-MM-dd
    label: ""                   # a column holding train/valid/test labels, if any
    interactions_multiline: false  # true if quoted interaction fields span lines (reads the file in one task)
    image_only_items: false     # keep interacted items that have no metadata row but an image file
    image_pattern: ""           # their image, relative to images_root, e.g. "{item_id}.jpg"
```

Items files are read with quoted fields that may span lines (descriptions do). An interactions
file is read line by line by default, so Spark splits it across tasks: a catalog-sized file is
parsed by every core instead of one.

A malformed record (more or fewer fields than the header, a quote never closed) is rejected with
its field count, the header's and the fix.

With ``image_only_items: true``, an item id that the interactions name but the items file does
not (or whose items row was rejected) becomes an item when its image file exists: the path is
``image_pattern`` with ``{item_id}`` filled in (``{item_id[0]}`` works too), relative to
``images_root``. Such an item has title and text null, attrs empty, image_uri that file; they are
counted as ``image_only_items``. An id with neither metadata nor image is still rejected by the
ingest as an unknown item. ``image_only_items`` without ``image_pattern`` is a config error. The
existence checks run on the executors, one per id without metadata.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from udfs.io.image_files import pattern_problem, with_image_files

from ..config import ConfigError, DatasetConf
from .base import (AdapterOutput, images_folder, options_from, read_table_file, require_path, validate_columns,
                   with_image_only_items)


@dataclass
class CsvOptions:
    items: str = "items.csv"
    interactions: str = "interactions.csv"
    format: str = ""  # csv | parquet; empty: from the file extension
    sep: str = ","
    encoding: str = "utf-8"
    item_id: str = "item_id"
    user_id: str = "user_id"
    title: str = "title"
    text: str = ""
    image: str = ""
    images_root: str = ""
    attrs: list[str] = field(default_factory=list)
    rating: str = ""
    timestamp: str = "timestamp"
    timestamp_format: str = "unix"
    label: str = ""
    interactions_multiline: bool = False
    image_only_items: bool = False
    image_pattern: str = ""


def image_uri(path_col: F.Column, images_root: str) -> F.Column:
    """Absolute local paths for relative image references; URIs (scheme://) kept as they are."""
    root = images_root.rstrip("/") + "/"
    return (F.when(path_col.isNull() | (F.trim(path_col) == ""), F.lit(None))
            .when(path_col.rlike(r"^[a-zA-Z][a-zA-Z0-9+.-]*://") | path_col.startswith("/"), path_col)
            .otherwise(F.concat(F.lit(root), path_col)))


def attrs_map(df: DataFrame, columns: list[str]) -> F.Column:
    present = [c for c in columns if c in df.columns]
    if not present:
        return F.create_map().cast("map<string,string>")
    pairs = [x for c in present for x in (F.lit(c), F.col(f"`{c}`").cast("string"))]
    # map_filter drops empty attributes so that analysts never see "colour": null.
    return F.map_filter(F.create_map(*pairs), lambda k, v: v.isNotNull() & (v != ""))


def read_items_file(spark: SparkSession, path: Path, item_id: str, title: str, text: str, image: str,
                    attrs: list[str], images_root: str, fmt: str = "", sep: str = ",",
                    encoding: str = "utf-8") -> tuple[DataFrame, DataFrame]:
    """(items, rejects) of an items file whose columns the options name; ``image`` paths made
    absolute under ``images_root``."""
    raw = read_table_file(spark, path, fmt, sep, encoding)
    items, rejects = validate_columns(raw.withColumn("attrs", attrs_map(raw, attrs)), {"item_id": item_id},
                                      {"title": title, "text": text, "image": image}, path, "items",
                                      keep=("attrs",), encoding=encoding)
    return items.select("item_id", "title", "text", image_uri(F.col("image"), images_root).alias("image_uri"),
                        "attrs"), rejects


def images_root_of(dataset: DatasetConf) -> str:
    """Where ingest and caption keep this dataset's image paths (``base.images_folder``)."""
    return images_folder(dataset, options_from(CsvOptions, dataset).images_root)


def read(spark: SparkSession, dataset: DatasetConf) -> AdapterOutput:
    opts = options_from(CsvOptions, dataset)
    check_image_only_options(opts)
    root = require_path(dataset, "root")
    items_path = require_path(dataset, "items", opts.items)
    inter_path = require_path(dataset, "interactions", opts.interactions)
    images_root = images_root_of(dataset)

    items, item_rejects = read_items_file(spark, items_path, opts.item_id, opts.title, opts.text, opts.image,
                                          opts.attrs, images_root, opts.format, opts.sep, opts.encoding)

    raw_inter = read_table_file(spark, inter_path, opts.format, opts.sep, opts.encoding,
                                multiline=opts.interactions_multiline)
    # Bad interaction records stay in the frame (``_reason``): ingest reads the file once for both.
    interactions, _ = validate_columns(
        raw_inter, {"user_id": opts.user_id, "item_id": opts.item_id, "ts": opts.timestamp},
        {"rating": opts.rating, "label": opts.label}, inter_path, "interactions", opts.timestamp_format,
        encoding=opts.encoding, split=False)
    counts: dict[str, int] = {}
    if opts.image_only_items:
        items = with_image_only_items(
            items, interactions.filter(F.col("_reason").isNull()),
            lambda ids: with_image_files(ids, images_root, opts.image_pattern), counts)
    return AdapterOutput(items, interactions, item_rejects, counts, images_root=images_root)


def check_image_only_options(opts: CsvOptions) -> None:
    if not opts.image_only_items:
        return
    if not opts.image_pattern:
        raise ConfigError("dataset.options.image_only_items needs dataset.options.image_pattern, the image "
                          "file of an item without metadata relative to images_root (e.g. '{item_id}.jpg'): "
                          "set it, or set image_only_items to false")
    if problem := pattern_problem(opts.image_pattern):
        raise ConfigError(f"dataset.options.image_pattern '{opts.image_pattern}': {problem} "
                          "(e.g. '{item_id}.jpg')")
