"""H&M Personalized Fashion Recommendations (the Kaggle layout) under ``dataset.paths.root``:

- ``articles.csv``: article_id, prod_name, product_type_name, product_group_name,
  graphical_appearance_name, colour_group_name, perceived_colour_value_name, department_name,
  index_name, section_name, garment_group_name, detail_desc, ...
- ``transactions_train.csv``: t_dat (yyyy-MM-dd), customer_id, article_id, price, sales_channel_id
- ``images/0xx/0xxxxxxxxx.jpg``: the folder is the first three digits of the 10-digit id.

```yaml
dataset:
  adapter: hm
  paths: {root: data/h-and-m-personalized-fashion-recommendations}
  options: {same_day_repeats: collapse}
```

Article ids are 10-digit strings with a leading zero (``0108775015``); they are read as strings
and an id written without its zeros (a file that went through a spreadsheet or pandas' int
parsing) is left-padded back to 10 digits (``article_ids_padded`` counts them in articles.csv).
An id that is not 1-10 digits is rejected. title = prod_name, text = detail_desc, attrs = the
product type, group, colour, appearance, department, index, section and garment group names
(``options.attrs``). image_uri = the article's JPEG when the file exists; a few articles have
none (``items_without_image_file``), and a missing ``images`` folder is a warning, not an error.

Interactions are implicit: rating is null, ts is t_dat at midnight UTC (unix seconds), price
and sales channel are dropped. Buying the same article more than once on one day is common and
legitimate, but those purchases share (user, item, ts), the ingest's interaction key. With
``same_day_repeats: collapse`` (the default) they become one interaction and are counted
(``same_day_repeat_purchases``), not rejected: for implicit feedback a repeat on the same day
adds no signal, and millions of legitimate rows in ``rejects`` would bury the real problems.
With ``reject`` they are left to the ingest, which keeps one and writes each repeat to
``rejects`` as a duplicate interaction.

``image_only_items: true`` keeps the purchases of articles that are missing from articles.csv
(or whose row there was rejected) but have their image, ``images/0xx/<id>.jpg``: each becomes
an item with title and text null, attrs empty and image_uri that file, counted as
``image_only_items``; for those the image is the only content. Without the option (the
default), or for an article with no image either, the ingest rejects the purchases as naming an
unknown item. The image folder is listed once either way, so the option costs one distinct over
the purchased article ids.

A malformed record (more or fewer fields than the header, a quote never closed) is rejected with
its field count, the header's and the fix.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from ..config import ConfigError, DatasetConf
from .base import (AdapterOutput, images_folder, options_from, read_table_file, require_path, validate_columns,
                   with_image_only_items)
from .csv_adapter import attrs_map

log = logging.getLogger(__name__)

ID_DIGITS = 10
DEFAULT_ATTRS = ["product_type_name", "product_group_name", "graphical_appearance_name",
                 "colour_group_name", "perceived_colour_value_name", "perceived_colour_master_name",
                 "department_name", "index_name", "index_group_name", "section_name", "garment_group_name"]
REPEAT_POLICIES = ("collapse", "reject")


@dataclass
class HMOptions:
    articles: str = "articles.csv"
    transactions: str = "transactions_train.csv"
    images_dir: str = "images"
    attrs: list[str] = field(default_factory=lambda: list(DEFAULT_ATTRS))
    same_day_repeats: str = "collapse"  # collapse | reject
    image_only_items: bool = False


def padded_article_id(raw: Column) -> Column:
    """A 1-9 digit id gets its leading zeros back; anything else is returned trimmed, unchanged."""
    value = F.trim(raw)
    return F.when(value.rlike(r"^[0-9]{1,%d}$" % (ID_DIGITS - 1)), F.lpad(value, ID_DIGITS, "0")).otherwise(value)


def _bad_ids(good: DataFrame, path: Path, row: Column) -> tuple[DataFrame, DataFrame]:
    """Split off rows whose article_id is still not 10 digits after padding."""
    ok = F.col("item_id").rlike(r"^[0-9]{%d}$" % ID_DIGITS)
    bad = good.filter(~ok).select(
        F.lit(str(path)).alias("source"), row.alias("row"),
        F.format_string(f"article_id '%s' is not a number of at most {ID_DIGITS} digits "
                        "(H&M ids look like 0108775015): fix or drop the row", F.col("item_id")).alias("reason"),
        F.to_json(F.struct(*[F.col(c) for c in good.columns if not c.startswith("_")])).alias("content"))
    return good.filter(ok), bad


def image_ids(images_dir: Path) -> list[str]:
    """The article ids that have ``images_dir/0xx/0xxxxxxxxx.jpg``, from one directory listing."""
    return [path.name[:-4] for path in images_dir.glob("*/*")
            if path.name.lower().endswith(".jpg") and path.name[:3] == path.parent.name]


def images_root_of(dataset: DatasetConf) -> str:
    """Where ingest and caption keep this dataset's images (``base.images_folder``)."""
    return images_folder(dataset, options_from(HMOptions, dataset).images_dir)


def read(spark: SparkSession, dataset: DatasetConf) -> AdapterOutput:
    opts = options_from(HMOptions, dataset)
    if opts.same_day_repeats not in REPEAT_POLICIES:
        raise ConfigError(f"dataset.options.same_day_repeats must be collapse or reject, "
                          f"got {opts.same_day_repeats!r}")
    root = require_path(dataset, "root")
    articles_path = require_path(dataset, "articles", opts.articles)
    transactions_path = require_path(dataset, "transactions", opts.transactions)
    counts: dict[str, int] = {}

    raw = read_table_file(spark, articles_path)
    counts["article_ids_padded"] = raw.filter(
        F.trim("article_id").rlike(r"^[0-9]{1,%d}$" % (ID_DIGITS - 1))).count() if "article_id" in raw.columns else 0
    raw = raw.withColumn("attrs", attrs_map(raw, opts.attrs))
    if "article_id" in raw.columns:
        raw = raw.withColumn("article_id", padded_article_id(F.col("article_id")))
    items, item_rejects = validate_columns(raw, {"item_id": "article_id"},
                                           {"title": "prod_name", "text": "detail_desc"},
                                           articles_path, "articles", keep=("attrs",))
    items, bad_items = _bad_ids(items, articles_path, F.concat(F.lit("article_id="), F.col("item_id")))
    images_dir = root / opts.images_dir
    folder = images_root_of(dataset)
    present = _image_id_frame(spark, images_dir)
    items = _with_images(items, present, folder, counts)

    # transactions_train.csv has no quoted newlines: a line-splittable read parses it in parallel.
    raw_tx = read_table_file(spark, transactions_path, multiline=False)
    if "article_id" in raw_tx.columns:
        raw_tx = raw_tx.withColumn("article_id", padded_article_id(F.col("article_id")))
    tx, tx_rejects = validate_columns(raw_tx, {"user_id": "customer_id", "item_id": "article_id", "ts": "t_dat"},
                                      {"rating": "", "label": ""}, transactions_path, "transactions",
                                      ts_format="yyyy-MM-dd")
    tx, bad_tx = _bad_ids(tx, transactions_path,
                          F.format_string("customer_id=%s article_id=%s ts=%d", "user_id", "item_id", "ts"))
    if opts.image_only_items:
        items = with_image_only_items(
            items, tx, lambda ids: ids.join(F.broadcast(present), "item_id").select(
                "item_id", article_image_uri(F.col("item_id"), folder).alias("image_uri")), counts)
    interactions = tx.select("user_id", "item_id", "ts", "rating", "label", "_source")
    if opts.same_day_repeats == "collapse":
        grouped = interactions.groupBy("user_id", "item_id", "ts", "_source").agg(F.count(F.lit(1)).alias("_n"))
        counts["same_day_repeat_purchases"] = int(grouped.agg(F.sum(F.col("_n") - 1)).first()[0] or 0)
        interactions = grouped.select("user_id", "item_id", "ts", F.lit(None).cast("double").alias("rating"),
                                      F.lit(None).cast("string").alias("label"), "_source")
    rejects = item_rejects.unionByName(bad_items).unionByName(tx_rejects).unionByName(bad_tx)
    return AdapterOutput(items, interactions, rejects, counts, images_root=folder)


def _image_id_frame(spark: SparkSession, images_dir: Path) -> DataFrame:
    """The ids that have an image file, as a one-column frame (item_id); empty without the folder."""
    if not images_dir.is_dir():
        log.warning("H&M images folder %s does not exist: every article is ingested without an image "
                    "(set dataset.options.images_dir to the folder holding 0xx/0xxxxxxxxx.jpg)", images_dir)
    ids = image_ids(images_dir) if images_dir.is_dir() else []
    return spark.createDataFrame(pd.DataFrame({"item_id": pd.Series(ids, dtype=str)}), "item_id string")


def article_image_uri(item_id: Column, folder: str) -> Column:
    """``folder/0xx/<id>.jpg``, the Kaggle layout's path of an article's image."""
    return F.concat(F.lit(folder + "/"), F.substring(item_id, 1, 3), F.lit("/"), item_id, F.lit(".jpg"))


def _with_images(items: DataFrame, present: DataFrame, folder: str, counts: dict[str, int]) -> DataFrame:
    joined = items.join(F.broadcast(present.withColumn("_has_image", F.lit(True))), "item_id", "left")
    counts["items_without_image_file"] = joined.filter(F.col("_has_image").isNull()).count()
    uri = F.when(F.col("_has_image"), article_image_uri(F.col("item_id"), folder))
    return joined.select("item_id", "title", "text", uri.alias("image_uri"), "attrs")
