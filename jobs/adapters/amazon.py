"""Amazon Reviews 2018 and 2023 (McAuley lab): a reviews file and an item metadata file.

Both are JSON lines, ``.json`` or ``.jsonl``, optionally gzipped, read from the local disk:

| | 2018 | 2023 |
| --- | --- | --- |
| reviews | ``reviewerID, asin, overall, unixReviewTime`` (s) | ``user_id, parent_asin, asin, rating, timestamp`` (ms) |
| metadata | ``asin, title, description [..], imageURLHighRes [..], imageURL [..], category [..], brand, main_cat, price`` | ``parent_asin, title, description [..], images [{thumb, large, hi_res, variant}], main_category, categories [..], features [..], store, details`` |

```yaml
dataset:
  adapter: amazon
  paths: {root: data/amazon}
  options:
    category: Clothing_Shoes_and_Jewelry   # finds {category}.jsonl[.gz] and meta_{category}.jsonl[.gz]
    # or name the files: reviews: Clothing.json.gz, meta: meta_Clothing.json.gz
    version: auto                          # auto | 2018 | 2023
    image: large                           # 2023 image size kept: large | hi_res | thumb
```

Each file's version comes from the field names of its first lines unless ``options.version``
forces it (a forced version that does not match the fields is a config error).

Mapping: item_id = ``asin`` (2018) or ``parent_asin`` (2023: the metadata's key; a review
without it falls back to ``asin``); title = ``title``; text = the ``description`` paragraphs;
image_uri = the first high-resolution image URL (2018 ``imageURLHighRes``, else ``imageURL``;
2023 the ``MAIN`` image, else the first, at ``options.image`` size, else another size); attrs =
brand/store, main category, the category path (``" > "``), price, features (``"; "``) and details
(JSON). Image URLs stay URLs: nothing is downloaded here (the ingest's image check leaves remote
URIs to the caption job). Ratings are the stars; ts is unix seconds.

Rejected with their line number: a malformed JSON line (Spark's ``_corrupt_record``), a line
that is not valid UTF-8, a missing id, a rating or time that is not a number. Both datasets
carry known duplicates (2018 metadata repeats some asins, reviews repeat some rows): the ingest
keeps the first and rejects the rest. Gzipped files are read by one task each (gzip does not
split); decompress a large file first to parse it in parallel.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from ..config import ConfigError, DatasetConf
from .base import (AdapterOutput, options_from, read_lines, require_path, split_checked, timestamp_seconds,
                   undecodable)

log = logging.getLogger(__name__)

VERSIONS = ("2018", "2023")
IMAGE_SIZES = ("large", "hi_res", "thumb")
SUFFIXES = (".jsonl.gz", ".jsonl", ".json.gz", ".json")
SAMPLE_LINES = 50

# Canonical column -> source field, per file kind and version.
REVIEW_FIELDS = {
    "2018": {"user_id": "reviewerID", "item_id": "asin", "rating": "overall", "ts": "unixReviewTime"},
    "2023": {"user_id": "user_id", "item_id": "parent_asin", "rating": "rating", "ts": "timestamp"},
}
META_FIELDS = {
    "2018": ["asin", "title", "description", "imageURLHighRes", "imageURL", "category", "brand",
             "main_cat", "price"],
    "2023": ["parent_asin", "asin", "title", "description", "images", "main_category", "categories",
             "features", "store", "price", "details"],
}
# Fields that only one version has: how a file's version is told from its first lines.
MARKERS = {
    "reviews": {"2018": {"reviewerID", "unixReviewTime", "overall"},
                "2023": {"user_id", "parent_asin", "timestamp"}},
    "meta": {"2018": {"asin", "imageURL", "imageURLHighRes", "main_cat", "category"},
             "2023": {"parent_asin", "main_category", "images", "categories"}},
}
IMAGES_2023 = "array<struct<thumb:string,large:string,hi_res:string,variant:string>>"
# Some 2023 exports (Hugging Face's columnar view) store images as lists per size instead.
IMAGES_2023_COLUMNAR = "struct<thumb:array<string>,large:array<string>,hi_res:array<string>,variant:array<string>>"


@dataclass
class AmazonOptions:
    reviews: str = ""  # relative to paths.root; empty: {category} with a JSON-lines suffix
    meta: str = ""  # relative to paths.root; empty: meta_{category} with a JSON-lines suffix
    category: str = ""  # the file stem both files share, e.g. Clothing_Shoes_and_Jewelry
    version: str = "auto"  # auto | 2018 | 2023
    image: str = "large"  # 2023 image size: large | hi_res | thumb


def read(spark: SparkSession, dataset: DatasetConf) -> AdapterOutput:
    opts = options_from(AmazonOptions, dataset)
    version = str(opts.version)
    if version not in ("auto", *VERSIONS):
        raise ConfigError(f"dataset.options.version must be auto, 2018 or 2023, got {opts.version!r}")
    if opts.image not in IMAGE_SIZES:
        raise ConfigError(f"dataset.options.image must be one of {', '.join(IMAGE_SIZES)}, got {opts.image!r}")
    require_path(dataset, "root")
    reviews_path = _locate(dataset, "reviews", opts.reviews, opts.category, "")
    meta_path = _locate(dataset, "meta", opts.meta, opts.category, "meta_")

    review_lines = read_lines(spark, reviews_path)
    review_version = _version(review_lines, reviews_path, "reviews", version)
    interactions, review_rejects = _reviews(review_lines, review_version)

    meta_lines = read_lines(spark, meta_path)
    meta_version = _version(meta_lines, meta_path, "meta", version)
    items, meta_rejects = _meta(meta_lines, meta_version, opts.image)
    log.info("amazon: reviews %s (%s format), metadata %s (%s format)", reviews_path, review_version,
             meta_path, meta_version)
    return AdapterOutput(items, interactions, review_rejects.unionByName(meta_rejects), {})


def _locate(dataset: DatasetConf, key: str, name: str, category: str, prefix: str) -> Path:
    if name:
        return require_path(dataset, key, name)
    if not category:
        raise ConfigError(f"dataset '{dataset.name}' (adapter amazon) needs dataset.options.{key} "
                          f"(the {key} file under dataset.paths.root) or dataset.options.category "
                          "(the file stem, e.g. Clothing_Shoes_and_Jewelry)")
    root = Path(dataset.paths.get("root", ".")).expanduser()
    tried = [f"{prefix}{category}{suffix}" for suffix in SUFFIXES]
    for candidate in tried:
        if (root / candidate).exists():
            return require_path(dataset, key, candidate)
    raise ConfigError(f"no {key} file for category '{category}' under dataset.paths.root = '{root}' "
                      f"(tried {', '.join(tried)}): fix dataset.options.category or set "
                      f"dataset.options.{key}")


def _version(lines: DataFrame, path: Path, kind: str, forced: str) -> str:
    """The file's version from the fields of its first JSON objects (or the forced one, checked)."""
    # json_object_keys is null for a line that is not one JSON object.
    sample = (lines.filter(F.trim("value") != "").limit(SAMPLE_LINES)
              .select(F.json_object_keys("value").alias("keys")).collect())
    if not sample:
        return VERSIONS[-1] if forced == "auto" else forced  # no row: nothing to parse either way
    keys = {key for row in sample for key in row["keys"] or ()}
    matches = {v: len(marks & keys) for v, marks in MARKERS[kind].items()}
    best = max(matches, key=matches.get)
    unique = matches[best] > 0 and list(matches.values()).count(matches[best]) == 1
    fields = ", ".join(sorted(keys)[:20]) or "none (no line parses as a JSON object)"
    if forced == "auto":
        if not unique:
            raise ConfigError(f"{path}: cannot tell whether this Amazon {kind} file is 2018 or 2023 from "
                              f"the fields of its first lines ({fields}): set dataset.options.version")
        return best
    if matches[forced] == 0 and unique:
        raise ConfigError(f"{path}: dataset.options.version is {forced} but the file has {best} fields "
                          f"({fields}): set dataset.options.version to {best} or auto")
    return forced


def _parse(lines: DataFrame, fields: list[str]) -> DataFrame:
    """Every field as a string (arrays and objects as their JSON text): one oddly typed value
    never turns a whole line into a corrupt record. Blank lines stay, flagged ``_skip``, so that
    line numbers can be counted from this frame."""
    schema = T.StructType([T.StructField(f, T.StringType()) for f in fields]
                          + [T.StructField("_corrupt_record", T.StringType())])
    parsed = lines.withColumn(
        "_j", F.from_json("value", schema, {"mode": "PERMISSIVE", "columnNameOfCorruptRecord": "_corrupt_record"}))
    return parsed.select("value", "_pos", "_source", (F.trim("value") == "").alias("_skip"),
                         *[F.col(f"_j.{f}").alias(f) for f in fields],
                         F.col("_j._corrupt_record").alias("_corrupt_record"))


def _blank(col: Column) -> Column:
    return col.isNull() | (F.trim(col) == "")


def _split(checked: DataFrame, problems: list[Column]) -> tuple[DataFrame, DataFrame]:
    """(good rows, rejects with line numbers) from ``checked`` and its list of problems."""
    first = [F.when(undecodable(F.col("value")),
                    F.lit("line is not valid UTF-8 (latin-1 bytes?): re-save the file as UTF-8 or drop the line")),
             F.when(F.col("_corrupt_record").isNotNull(),
                    F.lit("malformed JSON line (not one JSON object per line): fix or drop the line"))]
    return split_checked(checked.withColumn("_reason", F.coalesce(*first, *problems)),
                         drop=("_skip", "value", "_pos", "_corrupt_record"))


def _reviews(lines: DataFrame, version: str) -> tuple[DataFrame, DataFrame]:
    fields = REVIEW_FIELDS[version]
    parsed = _parse(lines, [*fields.values(), "asin"] if version == "2023" else list(fields.values()))
    item = F.col(fields["item_id"])
    if version == "2023":
        item = F.when(_blank(item), F.col("asin")).otherwise(item)
    rating = F.trim(F.col(fields["rating"])).try_cast("double")
    ts = timestamp_seconds(F.trim(F.col(fields["ts"])), "unix" if version == "2018" else "unix_ms")
    checked = parsed.select("value", "_pos", "_source", "_skip", "_corrupt_record",
                            F.trim(F.col(fields["user_id"])).alias("user_id"), F.trim(item).alias("item_id"),
                            rating.alias("rating"), ts.alias("ts"),
                            *[F.col(f).alias(f"_raw_{c}") for c, f in fields.items() if c in ("rating", "ts")])
    item_name = fields["item_id"] + (" (and asin)" if version == "2023" else "")
    unit = "unix seconds" if version == "2018" else "unix milliseconds"
    problems = [
        F.when(_blank(F.col("user_id")), F.lit(f"{fields['user_id']} is missing")),
        F.when(_blank(F.col("item_id")), F.lit(f"{item_name} is missing")),
        F.when(_blank(F.col("_raw_rating")), F.lit(f"{fields['rating']} is missing")),
        F.when(F.col("rating").isNull(),
               F.format_string(f"{fields['rating']} '%s' is not a number", F.col("_raw_rating"))),
        F.when(_blank(F.col("_raw_ts")), F.lit(f"{fields['ts']} is missing")),
        F.when(F.col("ts").isNull(),
               F.format_string(f"{fields['ts']} '%s' is not a time in {unit}", F.col("_raw_ts"))),
    ]
    good, rejects = _split(checked, problems)
    return (good.select("user_id", "item_id", "ts", "rating", F.lit(None).cast("string").alias("label"),
                        "_source"), rejects)


def _as_list(raw: Column) -> Column:
    """A JSON array of strings as an array; a plain string as a one-element array."""
    listed = F.from_json(raw, "array<string>")
    single = F.when(~_blank(raw) & ~F.trim(raw).startswith("["), F.array(F.trim(raw)))
    return F.filter(F.coalesce(listed, single, F.array().cast("array<string>")), lambda x: ~_blank(x))


def _joined(raw: Column, sep: str) -> Column:
    text = F.array_join(_as_list(raw), sep)
    return F.when(text != "", text)


def _first(raw: Column) -> Column:
    return F.try_element_at(_as_list(raw), F.lit(1))


def _image_2023(raw: Column, size: str) -> Column:
    order = [size, *[s for s in IMAGE_SIZES if s != size]]
    images = F.from_json(raw, IMAGES_2023)
    main = F.coalesce(F.try_element_at(F.filter(images, lambda i: i["variant"] == "MAIN"), F.lit(1)),
                      F.try_element_at(images, F.lit(1)))
    columnar = F.from_json(raw, IMAGES_2023_COLUMNAR)
    return F.coalesce(*[F.when(~_blank(main[s]), main[s]) for s in order],
                      *[F.try_element_at(F.filter(columnar[s], lambda x: ~_blank(x)), F.lit(1)) for s in order])


def _attrs(pairs: list[tuple[str, Column]]) -> Column:
    flat = [x for name, value in pairs for x in (F.lit(name), value)]
    return F.map_filter(F.create_map(*flat), lambda k, v: v.isNotNull() & (v != ""))


def _meta(lines: DataFrame, version: str, image_size: str) -> tuple[DataFrame, DataFrame]:
    parsed = _parse(lines, META_FIELDS[version])
    if version == "2018":
        key = "asin"
        item_id = F.trim(F.col("asin"))
        image = F.coalesce(_first(F.col("imageURLHighRes")), _first(F.col("imageURL")))
        attrs = _attrs([("brand", F.trim(F.col("brand"))), ("main_category", F.trim(F.col("main_cat"))),
                        ("category", _joined(F.col("category"), " > ")), ("price", F.trim(F.col("price")))])
    else:
        key = "parent_asin"
        item_id = F.trim(F.coalesce(F.when(~_blank(F.col("parent_asin")), F.col("parent_asin")), F.col("asin")))
        image = _image_2023(F.col("images"), image_size)
        attrs = _attrs([("store", F.trim(F.col("store"))), ("main_category", F.trim(F.col("main_category"))),
                        ("category", _joined(F.col("categories"), " > ")), ("price", F.trim(F.col("price"))),
                        ("features", _joined(F.col("features"), "; ")),
                        ("details", F.when(F.trim(F.col("details")) != "{}", F.trim(F.col("details"))))])
    checked = parsed.select("value", "_pos", "_source", "_skip", "_corrupt_record", item_id.alias("item_id"),
                            F.trim(F.col("title")).alias("title"),
                            _joined(F.col("description"), "\n").alias("text"),
                            image.alias("image_uri"), attrs.alias("attrs"))
    good, rejects = _split(checked, [F.when(_blank(F.col("item_id")), F.lit(f"{key} is missing"))])
    title = F.when(F.col("title") != "", F.col("title"))
    return good.select("item_id", title.alias("title"), "text", "image_uri", "attrs"), rejects
