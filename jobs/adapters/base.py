"""What a dataset adapter returns, and the readers adapters share.

An adapter turns one dataset's native files into three Spark frames with string ids:
- items: item_id, title, text, image_uri, attrs (map<string,string>)
- interactions: user_id, item_id, ts (long, unix seconds), rating (double), label (string or null;
  a split label carried by the source, e.g. MMRec's ``x_label``), _source (the file it came from)
- rejects: source, row, reason, content

It never drops a bad row silently: each one goes to rejects with a reason that names the fix.
Adapters validate their own ``dataset.options`` keys through ``options_from``.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import operator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pyspark import StorageLevel
from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from udfs.spark.schemas import REJECT_SCHEMA  # noqa: F401 - what an adapter emits as rejects

from ..config import ConfigError, DatasetConf
from ..job_run import NothingUsable

CONTENT_CHARS = 500
# The CSV reader decodes bytes that are not valid in the file's charset to U+FFFD.
REPLACEMENT_CHAR = "\ufffd"


@dataclass
class AdapterOutput:
    items: DataFrame
    interactions: DataFrame
    rejects: DataFrame
    counts: dict[str, int] = field(default_factory=dict)
    # The folder local image paths must resolve into (ingest confines them there; see
    # dataset.images.allow_outside_root); None when the adapter gives no local paths.
    images_root: str | None = None


def options_from(cls: type, dataset: DatasetConf) -> Any:
    """Build the adapter's options dataclass; an unknown key names itself and the known ones, a
    bool option that is not true or false is an error, and a string given for a list option is
    a one-element list."""
    # Every adapter module uses postponed annotations, so each field's type is its source text.
    types = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    for key, value in dataset.options.items():
        if key not in types:
            close = difflib.get_close_matches(key, types, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(sorted(types))}"
            raise ConfigError(
                f"unknown option 'dataset.options.{key}' for adapter '{dataset.adapter}' ({hint})")
        if types[key] == "bool" and not isinstance(value, bool):
            raise ConfigError(f"dataset.options.{key} must be true or false, got {value!r}")
    return cls(**{key: [value] if "list" in types[key] and isinstance(value, str) else value
                  for key, value in dataset.options.items()})


def require_path(dataset: DatasetConf, key: str, root_relative: str | None = None) -> Path:
    """A configured path that must exist; the error names the key, the path and the fix."""
    if root_relative is not None:
        # An absolute root_relative replaces the root (pathlib's join).
        path = Path(dataset.paths.get("root", ".")).expanduser() / root_relative
        label = f"dataset.paths.root + '{root_relative}'"
    else:
        if key not in dataset.paths:
            raise ConfigError(f"dataset '{dataset.name}' (adapter {dataset.adapter}) needs "
                              f"dataset.paths.{key}: set it in the dataset config or with "
                              f"--set dataset.paths.{key}=PATH")
        path = Path(dataset.paths[key]).expanduser()
        label = f"dataset.paths.{key}"
    if not path.exists():
        raise ConfigError(f"{label} = '{path}' does not exist (cwd {Path.cwd()}): "
                          "fix the path in the dataset config or pass --set dataset.paths...")
    if path.is_file() and path.stat().st_size == 0:
        # The config is right, the data has no row: "nothing usable" (exit 1), not a config error.
        raise NothingUsable(f"{label} = '{path}' is an empty file: nothing to ingest from it "
                            "(re-export or re-download it)")
    return path.resolve()


def images_folder(dataset: DatasetConf, folder: str) -> str:
    """The folder an adapter's local image paths must resolve under (``AdapterOutput.images_root``):
    ``folder`` (its images option) under ``dataset.paths.root``, resolved, or the root as given
    when ``folder`` is empty. Ingest confines image paths to it, and caption again as it reads them."""
    root = require_path(dataset, "root")
    return str((root / folder).resolve()) if folder else str(root)


def read_lines(spark: SparkSession, path: Path) -> DataFrame:
    """One row per line of a UTF-8 text file with a cheap position id (``_pos``) from which line
    numbers are derived only for the few rows that are rejected (see ``line_numbers``)."""
    return (spark.read.text(str(path)).withColumn("_pos", F.monotonically_increasing_id())
            .withColumn("_source", F.lit(str(path))))


def line_numbers(lines: DataFrame, rejected: DataFrame) -> DataFrame:
    """Add ``_line``, the 1-based line (or record) number, to ``rejected`` (a subset of ``lines``).

    ``monotonically_increasing_id`` puts the partition index in the upper 31 bits and the row's
    index within its partition in the lower 33; per-partition counts of ``lines`` turn that into
    a line number. Lazy: the counts are computed only when rejects are written, and from a cached
    ``lines`` they cost no second read of the file."""
    part = F.shiftright(F.col("_pos"), 33)
    counts = lines.groupBy(part.alias("_part")).agg(F.count(F.lit(1)).alias("_n"))
    before = Window.orderBy("_part").rowsBetween(Window.unboundedPreceding, -1)
    offsets = counts.select("_part", F.coalesce(F.sum("_n").over(before), F.lit(0)).alias("_offset"))
    return (rejected.withColumn("_part", part).join(F.broadcast(offsets), "_part", "left")
            .withColumn("_line", F.coalesce("_offset", F.lit(0)) + (F.col("_pos") - F.shiftleft("_part", 33)) + 1)
            .drop("_part", "_offset"))


def reject(df: DataFrame, row: Column | None = None, content: Column | None = None) -> DataFrame:
    """Shape rejected rows (their ``_reason``) into the rejects schema (source, row, reason,
    content); by default the row is ``line <_line>`` and the content the line's ``value``."""
    row = row if row is not None else F.concat(F.lit("line "), F.col("_line").cast("string"))
    content = content if content is not None else F.col("value")
    return df.select(
        F.col("_source").cast("string").alias("source"), row.cast("string").alias("row"),
        F.col("_reason").alias("reason"), F.substring(content.cast("string"), 1, CONTENT_CHARS).alias("content"))


def parse_delimited(spark: SparkSession, path: Path, sep: str, names: list[str],
                    casts: dict[str, str], fix: str = "") -> tuple[DataFrame, DataFrame]:
    """Split each line on ``sep`` into ``names`` and cast; returns (good rows, rejects).

    A line with the wrong number of fields, or a value that does not cast, is rejected with its
    line number and content. Blank lines are skipped silently (they carry nothing)."""
    lines = read_lines(spark, path)
    skip = F.trim("value") == ""
    # The separator as a regular expression: '|' escaped, a space a run of spaces.
    parts = F.split(F.regexp_replace("value", r"\r$", ""), {"|": r"\|", " ": " +"}.get(sep, sep))
    # try_element_at: under ANSI mode (Spark 4's default) getItem past the end raises, and a line
    # with too few fields (a wrong separator) must become a reject, not kill the job.
    cols = [F.trim(F.try_element_at(parts, F.lit(i + 1))).alias(n) for i, n in enumerate(names)]
    parsed = lines.select("value", "_pos", "_source", F.size(parts).alias("_n"), *cols)
    problems = [F.when(undecodable(F.col("value")),
                       F.lit("line is not valid utf-8: the file has bytes in another encoding "
                             "(latin-1?); re-save it as UTF-8 or fix the line")),
                F.when(F.col("_n") > len(names),
                       F.format_string(f"expected {len(names)} '{printable(sep)}'-separated fields "
                                       f"({', '.join(names)}), found %d: a field holds an extra "
                                       f"'{printable(sep)}'; remove it or fix the line", F.col("_n"))),
                F.when(F.col("_n") < len(names),
                       F.format_string(f"expected {len(names)} '{printable(sep)}'-separated fields "
                                       f"({', '.join(names)}), found %d: a field or a '{printable(sep)}' "
                                       "is missing, or the line uses another separator; fix the line",
                                       F.col("_n")))]
    typed = []
    for name in names:
        kind = casts.get(name, "string")
        value = F.col(name) if kind == "string" else F.col(name).try_cast(kind)
        typed.append(value.alias(name))
        if kind == "string":
            problems.append(F.when((F.col(name).isNull() | (F.col(name) == "")) & (F.col("_n") == len(names)),
                                   F.lit(f"{name} is empty")))
        else:
            problems.append(F.when(value.isNull() & (F.col("_n") == len(names)),
                                   F.format_string(f"{name} '%s' is not a valid {kind}", F.col(name))))
    reason = F.coalesce(*problems)
    if fix:
        reason = F.concat(reason, F.lit(f" ({fix})"))
    return split_checked(parsed.select("value", "_pos", "_source", *typed, skip.alias("_skip"),
                                       reason.alias("_reason")), drop=("value", "_skip"))


def split_checked(checked: DataFrame, drop: tuple[str, ...], storage: StorageLevel = StorageLevel.MEMORY_AND_DISK,
                  row: Column | None = None, content: Column | None = None) -> tuple[DataFrame, DataFrame]:
    """(good rows without ``_reason`` and the ``drop`` columns, rejects with their line numbers)
    of ``checked``, whose ``_reason`` is null on a good row; a row flagged ``_skip`` (a blank
    line) is neither."""
    # One read of the file serves the good rows, the rejects and their line numbers.
    checked = checked.persist(storage)
    counted = ~F.col("_skip") if "_skip" in checked.columns else F.lit(True)
    good = checked.filter(F.col("_reason").isNull() & counted).drop("_reason", *drop)
    bad = checked.filter(F.col("_reason").isNotNull() & counted)
    return good, reject(line_numbers(checked, bad), row, content)


def undecodable(text: Column, encoding: str = "utf-8") -> Column:
    """True where ``text`` came from bytes that are not valid in ``encoding``: raw invalid UTF-8
    (the text source keeps bytes as they are) or U+FFFD (what the CSV source decodes them to).
    Only meaningful for UTF-8 input; a single-byte charset such as latin-1 decodes any byte."""
    if encoding.lower().replace("-", "").replace("_", "") not in ("utf8", "ascii"):
        return F.lit(False)
    return F.coalesce(~F.is_valid_utf8(text) | text.contains(REPLACEMENT_CHAR), F.lit(False))


def printable(sep: str) -> str:
    return {"\t": "\\t", " ": "space"}.get(sep, sep)


def read_table_file(spark: SparkSession, path: Path, fmt: str = "", sep: str = ",",
                    encoding: str = "utf-8", multiline: bool = True) -> DataFrame:
    """A CSV (header row, quoted fields) or Parquet file, every CSV column as a string, with
    ``_pos``/``_source`` for rejects. A malformed CSV record lands in ``_corrupt_record``: Spark
    (4.0.1) puts there a record with more fields than the header and also one with fewer."""
    fmt = fmt or ("parquet" if path.suffix.lower() in (".parquet", ".pq") or path.is_dir() else "csv")
    if fmt == "parquet":
        df = spark.read.parquet(str(path)).withColumn("_corrupt_record", F.lit(None).cast("string"))
    elif fmt == "csv":
        header = spark.read.option("header", "true").option("sep", sep).option("encoding", encoding) \
            .csv(str(path)).columns
        schema = T.StructType([T.StructField(c, T.StringType()) for c in header]
                              + [T.StructField("_corrupt_record", T.StringType())])
        df = (spark.read.option("header", "true").option("sep", sep).option("encoding", encoding)
              .option("multiLine", str(multiline).lower()).option("escape", '"')
              .option("mode", "PERMISSIVE").option("columnNameOfCorruptRecord", "_corrupt_record")
              .schema(schema).csv(str(path)))
        # validate_columns explains a malformed record by its field count: the separator and the
        # header travel with the column, so no caller has to pass them along.
        df = df.withColumn("_corrupt_record", F.col("_corrupt_record").alias(
            "_corrupt_record", metadata={"sep": sep, "header": header}))
    else:
        raise ConfigError(f"format '{fmt}' for {path} is not supported: use csv or parquet")
    return df.withColumn("_pos", F.monotonically_increasing_id()).withColumn("_source", F.lit(str(path)))


def malformed_reason(df: DataFrame, columns: list[str]) -> Column:
    """Why Spark's CSV parser put a record into ``_corrupt_record``, with the fix.

    The raw record is split again here, respecting quotes: quoted fields (``""`` inside them is
    an escaped quote, as read_table_file reads it) are cut out, the separators left are counted.
    A quote that opens a field and never closes is named first: in a multi-line read it runs on
    over the following lines and swallows those records. Wrapped in the caller's ``when`` on
    ``_corrupt_record``, so the regular expressions run on the malformed records only."""
    meta = df.schema["_corrupt_record"].metadata if "_corrupt_record" in df.columns else {}
    sep, header = meta.get("sep", ","), list(meta.get("header", columns))
    record = F.col("_corrupt_record")
    sep_re = "\\Q" + sep + "\\E"
    unquoted = F.regexp_replace(record, f'(^|{sep_re})"(?:[^"]|"")*+"', "$1")
    found = F.size(F.split(unquoted, sep_re))
    shown = ", ".join(header[:12]) + (f", ... ({len(header) - 12} more)" if len(header) > 12 else "")
    # format_string patterns below: a '%' in a column name or the separator is literal text.
    counts = f"the header has {len(header)} (columns {shown})".replace("%", "%%")
    shown_sep = printable(sep).replace("%", "%%")
    extra_lines = F.size(F.split(record, "\n")) - 1
    return (F.when(unquoted.rlike(f'(^|{sep_re})"'), F.concat(
                F.lit("malformed record: a '\"' opens a quoted field that is never closed"),
                F.when(extra_lines > 0, F.format_string(
                    ", so the record runs on over the next %d line(s) and swallows the records there",
                    extra_lines)).otherwise(F.lit("")),
                F.lit("; close the quote, or double a quote inside a quoted field (\"\")")))
            .when(found > len(header), F.format_string(
                f"malformed record: it has %d fields, {counts}: a field holds an unquoted "
                f"'{shown_sep}'; quote fields that contain the separator or fix the row", found))
            .when(found < len(header), F.format_string(
                f"malformed record: it has %d fields, {counts}: a field or a '{shown_sep}' is "
                "missing (or the row uses another separator); fix the row", found))
            .otherwise(F.lit(f"malformed record: the CSV parser could not split it into the {len(header)} "
                             f"'{printable(sep)}'-separated fields of the header; check the row's quoting")))


def with_image_only_items(items: DataFrame, interactions: DataFrame,
                          find_images: Callable[[DataFrame], DataFrame], counts: dict[str, int]) -> DataFrame:
    """``items`` plus a row for each id that the (good) ``interactions`` name, that has no row in
    ``items``, and whose image file exists: title and text null, attrs empty, image_uri the file.

    ``find_images`` maps a frame of such ids to (item_id, image_uri) for those whose file exists,
    by the adapter's own naming rule. An id without a file is left out, so ingest still rejects
    its interactions as naming an unknown item. The count is ``image_only_items``."""
    missing = interactions.select("item_id").distinct().join(items.select("item_id"), "item_id", "left_anti")
    # Small (one row per image-only item) and read twice: by the count here and by ingest.
    found = find_images(missing).persist(StorageLevel.MEMORY_AND_DISK)
    counts["image_only_items"] = found.count()
    return items.unionByName(bare_items(found, F.col("image_uri")))


def bare_items(ids: DataFrame, image_uri: Column | None = None) -> DataFrame:
    """Items rows for the ``item_id`` of ``ids`` with no metadata: title and text null, attrs
    empty, image_uri the given column (or null)."""
    return ids.select("item_id", F.lit(None).cast("string").alias("title"), F.lit(None).cast("string").alias("text"),
                      (F.lit(None).cast("string") if image_uri is None else image_uri).alias("image_uri"),
                      F.create_map().cast("map<string,string>").alias("attrs"))


def timestamp_seconds(raw: Column, ts_format: str) -> Column:
    """unix seconds from ``unix`` seconds, ``unix_ms`` milliseconds or a datetime pattern."""
    # try_cast all the way: under ANSI mode a plain cast of NaN or 1e30 to long raises.
    if ts_format == "unix":
        return F.coalesce(raw.try_cast("long"), raw.try_cast("double").try_cast("long"))
    if ts_format == "unix_ms":
        return (raw.try_cast("double") / 1000).try_cast("long")
    return F.unix_timestamp(F.try_to_timestamp(raw, F.lit(ts_format)))


def validate_columns(df: DataFrame, required: dict[str, str], optional: dict[str, str],
                     path: Path, what: str, ts_format: str = "unix",
                     keep: tuple[str, ...] = (), encoding: str = "utf-8",
                     split: bool = True) -> tuple[DataFrame, DataFrame | None]:
    """Rename configured source columns to canonical names, cast, and split off bad records.

    With ``split=False`` the bad records stay in the one frame returned, marked by ``_reason``
    (with ``_content`` and ``_pos``), and the rejects are ``None``: the ingest job classifies every
    row in one pass and reads the file again only when some were bad.

    ``required``/``optional`` map canonical name -> source column. A missing source column is a
    config error naming the file and the columns it does have; a record whose required value is
    empty or does not cast is rejected with the reason, and so is a record holding bytes that are
    not valid in ``encoding`` (a latin-1 row in a UTF-8 file)."""
    have = [c for c in df.columns if c not in ("_pos", "_source", "_corrupt_record", *keep)]
    for canonical, source in required.items():
        if source and source not in have:
            seps = [s for s in (",", ";", "\t", "|") if len(have) == 1 and s in have[0]]
            fix = (f"the header looks '{printable(seps[0])}'-separated: set dataset.options.sep"
                   if seps else f"fix dataset.options.{canonical}")
            raise ConfigError(f"{path}: column '{source}' (for {what} {canonical}) not found; the file "
                              f"has columns {have}: {fix}")
    casts = {"ts": "long", "rating": "double"}
    text_cols = [F.col(f"`{c}`").cast("string") for c in have]
    cols, problems = [], [
        F.when(F.col("_corrupt_record").isNotNull(), malformed_reason(df, have)),
        # Column by column: joining the columns into one string to check it cost a third of the
        # whole parse of a large file.
        F.when(functools.reduce(operator.or_, (undecodable(c, encoding) for c in text_cols), F.lit(False)),
               F.lit(f"record is not valid {encoding}: the file has bytes in another encoding (latin-1?); "
                     "set dataset.options.encoding or re-save the file as UTF-8")),
    ]
    for canonical, source in {**required, **optional}.items():
        if not source or source not in have:
            cols.append(F.lit(None).cast(casts.get(canonical, "string")).alias(canonical))
            continue
        raw = F.trim(F.col(f"`{source}`").cast("string"))
        value = raw if canonical not in casts else (
            timestamp_seconds(raw, ts_format) if canonical == "ts" else raw.try_cast(casts[canonical]))
        cols.append(value.alias(canonical))
        if canonical in required:
            problems.append(F.when(raw.isNull() | (raw == ""), F.lit(f"{source} is empty")))
        if canonical in casts:
            problems.append(F.when(value.isNull() & raw.isNotNull() & (raw != ""),
                                   F.format_string(f"{source} '%s' is not a valid "
                                                   + ("timestamp (" + ts_format + ")" if canonical == "ts"
                                                      else casts[canonical]), raw)))
    # One read of the file serves the good rows, the rejects and their record numbers.
    # The reject's content is the record as the file has it: a value that did not cast is
    # null in the canonical columns, and to_json would leave it out.
    raw_record = F.to_json(F.struct(*[F.col(f"`{c}`").cast("string").alias(c) for c in have])) if have \
        else F.lit(None).cast("string")
    out = df.select("_pos", "_source", F.col("_corrupt_record"), *cols, *keep,
                    F.coalesce(*problems).alias("_reason"),
                    F.when(F.coalesce(*problems).isNotNull(), raw_record).alias("_content"))
    if not split:
        return (out.withColumn("_content", F.coalesce(F.col("_corrupt_record"), F.col("_content")))
                .drop("_corrupt_record"), None)
    return split_checked(out, ("_corrupt_record", "_pos", "_content"), StorageLevel.DISK_ONLY,
                         row=F.concat(F.lit("record "), F.col("_line").cast("string")),
                         content=F.coalesce(F.col("_corrupt_record"), F.col("_content")))
