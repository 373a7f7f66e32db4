"""The Delta table contract between jobs: keys, partitions, and the two idempotent writes.

The tables' schemas are in ``udfs.spark.schemas`` (every Spark output schema is there);
``SCHEMAS`` and ``VECTOR`` are re-exported here under their old names.

- ``merge`` upserts on the table's key (``MERGE``): the incremental ``descriptions`` cache,
  which many runs and datasets add to.
- ``replace_slice`` atomically replaces one slice of a table (``replaceWhere``), e.g. one
  dataset's ``items``: a snapshot writer that runs twice leaves the same table as once, and a
  killed run leaves the previous version, never a half-written one.
- ``append`` adds rows with new keys (a fresh run's ``runs`` row).

``replace_slice`` and ``append`` take a Spark frame or an Arrow table (rows a job computed on
the driver). On a local master with a local warehouse, Arrow rows are committed by delta-rs
(``udfs.io.warehouse_writer``): the same commit, in tens of ms instead of seconds of Spark job and
log replay. Anywhere else (a cluster, an object store), a table whose columns are not the
contract's, or a slice value that is not plain text, Spark commits them as before.

Tables live at ``{warehouse}/{name}``; analysts query them with
``SELECT ... FROM delta.`{warehouse}/items``` or through ``register_views``.
"""
from __future__ import annotations

import functools
import logging
import operator
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
from delta.tables import DeltaTable
from deltalake.exceptions import CommitFailedError
from py4j.protocol import Py4JJavaError
from pyspark.errors import PySparkException
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.pandas.types import to_arrow_schema

from udfs.io import storage, warehouse_writer
from udfs.io.warehouse_reader import FALLBACK_REASONS, fallback_reason
from udfs.spark.schemas import SCHEMAS, VECTOR  # noqa: F401 - VECTOR: re-exported for callers of tables

log = logging.getLogger(__name__)

KEYS: dict[str, list[str]] = {
    "items": ["dataset", "item_id"],
    "interactions": ["dataset", "user_id", "item_id", "ts"],
    "rejects": ["dataset", "source", "row"],
    "descriptions": ["image_sha256", "engine", "model", "prompt_id"],
    "item_embeddings": ["dataset", "item_id", "representation"],
    "user_profiles": ["run_id", "user_id", "representation"],
    "recommendations": ["run_id", "user_id", "representation", "rank"],
    "user_metrics": ["run_id", "user_id", "representation", "metric", "k"],
    "metrics": ["run_id", "representation", "metric", "k"],
    "comparisons": ["run_id", "representation_a", "representation_b", "metric", "k"],
    "plans": ["run_id"],
    "candidates": ["run_id", "representation", "item_id"],
    "fusion_models": ["run_id", "representation"],
    "runs": ["run_id"],
}

# Tables partitioned on disk: a dataset's slice is replaced without touching the others.
PARTITIONS: dict[str, list[str]] = {
    "items": ["dataset"],
    "interactions": ["dataset"],
    "rejects": ["dataset"],
}

# What a Delta operation through Spark raises: a JVM exception PySpark converts (an
# ``AnalysisException``...) or one it passes on as it is (Delta's concurrency exceptions).
SPARK_ERRORS = (PySparkException, Py4JJavaError)

# Delta raises these when another writer committed a conflicting change first.
_CONFLICTS = ("ConcurrentAppendException", "ConcurrentDeleteReadException",
              "ConcurrentDeleteDeleteException", "ConcurrentTransactionException",
              "MetadataChangedException", "ProtocolChangedException", "DELTA_CONCURRENT",
              # delta-rs: the next log version was taken by another writer.
              "CommitFailedError")


def table_path(warehouse: str | Path, name: str) -> str:
    """``{warehouse}/{name}``; a URI warehouse (``s3a://bucket/w``) stays a URI."""
    if storage.is_uri(str(warehouse)):
        return storage.join(str(warehouse), name)
    return str(Path(warehouse) / name)


def exists(spark: SparkSession, warehouse: str | Path, name: str) -> bool:
    return DeltaTable.isDeltaTable(spark, table_path(warehouse, name))


def small_read(spark: SparkSession, warehouse: str | Path, name: str, without_spark, with_spark,
               count: Callable[[str], None] | None = None) -> list:
    """What ``without_spark()`` reads from table ``name`` with delta-rs (tens of ms; through Spark a
    job and a log replay, 0.3-0.5 s at every job's start), else what ``with_spark()`` reads, for
    the named reasons only (``udfs.io.warehouse_reader.FALLBACK_REASONS``): delta-rs cannot open the
    store (credentials given only to Hadoop's s3a, say), the rows are more than the driver holds,
    or it sees no table (a table wrongly read as missing could be written over, so Spark is
    asked too). ``[]`` when Spark sees none either. Any other error is the caller's. ``count``
    (a run's ``count``) is told ``driver_fallback_<reason>`` of a fallback, as every path choice is."""
    try:
        return without_spark()
    except tuple(FALLBACK_REASONS) as exc:
        log.info("%s read with Spark: %s", name, exc)
        if count is not None:
            count(f"driver_fallback_{fallback_reason(exc)}")
    return with_spark() if exists(spark, warehouse, name) else []


def read(spark: SparkSession, warehouse: str | Path, name: str) -> DataFrame:
    """The table, or an empty frame with its schema when it was never written. A contract
    column that a table written by an older version lacks reads as null (``ensure`` adds it
    to the table at the next write)."""
    if not exists(spark, warehouse, name):
        return spark.createDataFrame([], SCHEMAS[name])
    frame = spark.read.format("delta").load(table_path(warehouse, name))
    for field in SCHEMAS[name].fields:
        if field.name not in frame.columns:
            frame = frame.withColumn(field.name, F.lit(None).cast(field.dataType))
    return frame


# Tables this process has found up to date with their contract: checked once, not per write.
_CURRENT: set[str] = set()


def ensure(spark: SparkSession, warehouse: str | Path, name: str) -> None:
    """Create the empty table with its contract schema if it does not exist yet; a table written
    by an older version that lacks a contract column gets it (null in the old rows)."""
    path = table_path(warehouse, name)
    if DeltaTable.isDeltaTable(spark, path):
        if path not in _CURRENT:
            have = set(spark.read.format("delta").load(path).columns)
            missing = [f for f in SCHEMAS[name].fields if f.name not in have]
            if missing:
                columns = ", ".join(f"{_identifier(f.name)} {f.dataType.simpleString()}" for f in missing)
                log.info("table %s lacks %s: adding them", name, [f.name for f in missing])
                retry_on_conflict(lambda: spark.sql(f"ALTER TABLE delta.{_identifier(path)} ADD COLUMNS ({columns})"),
                                  name)
            _CURRENT.add(path)
        return
    builder = DeltaTable.createIfNotExists(spark).location(path).addColumns(SCHEMAS[name])
    if name in PARTITIONS:
        builder = builder.partitionedBy(*PARTITIONS[name])

    def create():
        try:
            builder.execute()
        except SPARK_ERRORS as exc:
            # Two jobs starting on a fresh warehouse race to create the same table; the loser
            # sees DELTA_CREATE_TABLE_WITH_NON_EMPTY_LOCATION or, mid-way through the winner's
            # first commit, DELTA_TABLE_NOT_FOUND.
            if not any(code in str(exc) for code in ("NON_EMPTY_LOCATION", "DELTA_TABLE_NOT_FOUND")):
                raise
            for _ in range(40):
                # A read refreshes Delta's cached log of the path; isDeltaTable would keep
                # answering from the empty log this failed create just cached.
                try:
                    spark.read.format("delta").load(path).columns
                except SPARK_ERRORS:  # not a table yet: the winner has not committed
                    time.sleep(0.25)
                    continue
                log.info("table %s was created by a concurrent job", name)
                return
            raise

    retry_on_conflict(create, name)


def conform(df: DataFrame, name: str) -> DataFrame:
    """Select and cast ``df`` to the table's contract schema; a missing column is an error."""
    schema = SCHEMAS[name]
    missing = [f.name for f in schema.fields if f.name not in df.columns]
    if missing:
        raise ValueError(f"frame written to '{name}' lacks columns {missing}; it has {df.columns}")
    return df.select([F.col(f.name).cast(f.dataType).alias(f.name) for f in schema.fields])


def retry_on_conflict(action, name: str, attempts: int = 5):
    """Run ``action`` (a Delta write to table ``name``), retrying when another writer won."""
    for attempt in range(1, attempts + 1):
        try:
            return action()
        except (*SPARK_ERRORS, CommitFailedError) as exc:
            text = f"{type(exc).__name__}: {exc}"
            if attempt == attempts or not any(c in text for c in _CONFLICTS):
                raise
            log.warning("concurrent write to %s conflicted (attempt %d/%d); retrying",
                        name, attempt, attempts)
            time.sleep(0.5 * attempt)


def merge(spark: SparkSession, warehouse: str | Path, name: str, df: DataFrame | pa.Table) -> None:
    """Upsert ``df`` (a Spark frame, or Arrow rows held by the driver, one a key) into the table
    on its key; rows with an existing key are replaced."""
    if isinstance(df, pa.Table):
        found = _driver_rows(spark, warehouse, name, df, keys_matched=True)
        if found is not None:
            retry_on_conflict(lambda: warehouse_writer.merge(*found, KEYS[name]), name)
            return
    source = _spark_rows(spark, warehouse, name, df).dropDuplicates(KEYS[name])
    condition = " AND ".join(f"t.`{k}` <=> s.`{k}`" for k in KEYS[name])

    def run():
        (DeltaTable.forPath(spark, table_path(warehouse, name)).alias("t").merge(source.alias("s"), condition)
         .whenMatchedUpdateAll().whenNotMatchedInsertAll().execute())

    retry_on_conflict(run, name)


@functools.lru_cache(maxsize=None)
def arrow_schema(name: str) -> pa.Schema:
    """The table's contract schema in Arrow (a vector's elements and key columns NOT NULL)."""
    return to_arrow_schema(SCHEMAS[name])


def _driver_rows(spark: SparkSession, warehouse: str | Path, name: str, data: pa.Table,
                 keys_matched: bool = False) -> tuple[str, pa.Table] | None:
    """(the local table's path, ``data`` in its contract) when this process may commit with
    delta-rs (see the module's notes), else None: Spark must write it."""
    path = warehouse_writer.local_table(warehouse, name)
    if not spark.sparkContext.master.startswith("local") or path is None:
        return None
    schema = arrow_schema(name)
    if keys_matched and any(schema.field(k).nullable for k in KEYS[name]):
        return None  # delta-rs' ``=`` would not match null keys as Spark's ``<=>`` does
    have = _driver_table(path, name, schema)
    if sorted(have) != sorted(schema.names):
        # A table of an older contract: Spark's path adds the missing columns first (``ensure``).
        return None
    return path, warehouse_writer.conform(data, schema, name).select(have)


def _commit_on_driver(spark: SparkSession, warehouse: str | Path, name: str, data: pa.Table,
                      where: dict[str, object] | None) -> bool:
    """Commit ``data`` with delta-rs when this process may; False when Spark must write it."""
    condition = None if where is None else warehouse_writer.predicate(where)
    if where is not None and condition is None:
        return False
    found = _driver_rows(spark, warehouse, name, data)
    if found is None:
        return False
    retry_on_conflict(lambda: warehouse_writer.write(*found, slice_predicate=condition), name)
    return True


def _driver_table(path: str, name: str, schema: pa.Schema) -> list[str]:
    """The columns of the table at ``path``, created empty first when there is none. A first
    write that created the table itself could race another first write and land as a second
    version 0-like commit beside it (delta-rs then commits a new table over the other's rows
    without removing them); a created table makes the writes conflict and retry as usual."""
    have = warehouse_writer.table_columns(path)
    if have is None:
        retry_on_conflict(lambda: warehouse_writer.create(path, schema, PARTITIONS.get(name)), name)
        have = warehouse_writer.table_columns(path)
    return have


def _spark_frame(spark: SparkSession, name: str, data: DataFrame | pa.Table) -> DataFrame:
    if isinstance(data, DataFrame):
        return data
    # The contract's StructType, not a DDL string: DDL cannot say that a vector holds no null
    # element, and the write's cast to the contract refuses the widening.
    return spark.createDataFrame(warehouse_writer.conform(data, arrow_schema(name), name), schema=SCHEMAS[name])


def _spark_rows(spark: SparkSession, warehouse: str | Path, name: str, data: DataFrame | pa.Table) -> DataFrame:
    """``data`` as the frame Spark commits: in the table's contract, the table created first."""
    frame = _spark_frame(spark, name, data)
    ensure(spark, warehouse, name)
    return conform(frame, name)


def append(spark: SparkSession, warehouse: str | Path, name: str, df: DataFrame | pa.Table) -> None:
    """Append rows whose keys are new to the table (the caller guarantees it, e.g. a fresh run id)."""
    if isinstance(df, pa.Table) and _commit_on_driver(spark, warehouse, name, df, None):
        return
    data = _spark_rows(spark, warehouse, name, df)
    retry_on_conflict(lambda: data.write.format("delta").mode("append").save(table_path(warehouse, name)), name)


def sql_literal(value: object) -> str:
    """``value`` as a Spark SQL string literal that cannot end early, whatever it holds.

    Doubling quotes is not enough in Spark SQL: a backslash escapes the quote after it
    (``'x\\'' OR true --'`` ends the literal after ``x'``), and adjacent literals concatenate
    (``'it''s'`` is ``its``). A plain value is quoted as it is, so that Delta's history stays
    readable; any other is ``decode(unhex('<hex of its UTF-8 bytes>'), 'UTF-8')``, whose only
    characters are hex digits."""
    text = str(value)
    # warehouse_writer.PLAIN_TEXT: no quote, no backslash, no control character, so it reads
    # the same in Spark SQL whatever the parser settings.
    if warehouse_writer.PLAIN_TEXT.fullmatch(text):
        return f"'{text}'"
    return f"decode(unhex('{text.encode('utf-8').hex().upper()}'), 'UTF-8')"


def _identifier(column: str) -> str:
    return "`" + column.replace("`", "``") + "`"


def slice_condition(where: dict[str, object]) -> str:
    """SQL for a slice (the ``replaceWhere`` option, which takes only SQL text): column -> value
    (``=``) or list of values (``IN``), ANDed, every value through ``sql_literal``."""
    terms = []
    for column, value in where.items():
        if isinstance(value, (list, tuple)):
            terms.append(f"{_identifier(column)} IN ({', '.join(sql_literal(v) for v in value)})"
                         if value else "FALSE")
        else:
            terms.append(f"{_identifier(column)} = {sql_literal(value)}")
    return " AND ".join(terms)


def slice_filter(where: dict[str, object]):
    """The same slice as a Column, for DataFrame filters (no SQL text at all)."""
    terms = [F.col(column).isin(list(value)) if isinstance(value, (list, tuple)) else F.col(column) == F.lit(value)
             for column, value in where.items()]
    return functools.reduce(operator.and_, terms) if terms else F.lit(True)


def replace_slice(spark: SparkSession, warehouse: str | Path, name: str, df: DataFrame | pa.Table,
                  where: dict[str, object]) -> None:
    """Atomically replace the rows matching ``where`` (column -> value or list of values) with
    ``df`` (a Spark frame, or Arrow rows held by the driver): one Delta commit, so a reader sees
    the old slice or the new one, never a mix, and a run killed before the commit leaves the
    old slice in place."""
    if isinstance(df, pa.Table) and _commit_on_driver(spark, warehouse, name, df, where):
        return
    condition = slice_condition(where)
    # Delta checks at write time that every row falls inside the slice; a violation aborts
    # the commit, so the table keeps its previous version.
    data = _spark_rows(spark, warehouse, name, df)

    def run():
        (data.write.format("delta").mode("overwrite").option("replaceWhere", condition)
         .save(table_path(warehouse, name)))

    retry_on_conflict(run, name)


class MixedIngest(RuntimeError):
    """A dataset's ``items`` and ``interactions`` slices come from different ingest runs."""


def ingest_id_summary(spark: SparkSession, warehouse: str | Path, dataset: str) -> DataFrame:
    """One row per table (``items``, ``interactions``: ``name``) with the dataset's smallest and
    largest ingest id (``low``, ``high``), its rows (``n``) and its rows with an id (``tagged``):
    the facts ``same_ingest`` decides from. A frame, so that a caller can fold it into a larger
    Spark job."""
    frames = [read(spark, warehouse, name).filter(F.col("dataset") == F.lit(dataset))
              .agg(F.min("ingest_id").alias("low"), F.max("ingest_id").alias("high"),
                   F.count(F.lit(1)).alias("n"), F.count("ingest_id").alias("tagged"))
              .select(F.lit(name).alias("name"), "low", "high", "n", "tagged")
              for name in ("items", "interactions")]
    return frames[0].unionByName(frames[1])


def same_ingest(rows, dataset: str) -> str | None:
    """The ingest run id that wrote both the ``items`` and the ``interactions`` of ``dataset``,
    from ``ingest_id_summary``'s rows.

    Delta commits one table at a time, so an ingest killed between its two commits leaves new
    interactions beside the previous items (or the reverse). Every row carries its ingest's run
    id; a reader that joins the two checks this first and gets ``MixedIngest`` naming both ids
    and the fix instead of a silent mix. Rows written before the column existed (null) are not
    checked: ``None`` is returned."""
    by_name = {row["name"]: row for row in rows}
    seen = {}
    for name in ("items", "interactions"):
        row = by_name[name]
        if row["n"] == 0 or row["tagged"] < row["n"]:
            return None
        if row["low"] != row["high"]:
            raise MixedIngest(f"dataset '{dataset}': table {name} holds rows of two ingest runs "
                              f"({row['low']} and {row['high']}); rerun `vlm4rec ingest` for it")
        seen[name] = row["low"]
    if seen["items"] != seen["interactions"]:
        raise MixedIngest(
            f"dataset '{dataset}': items were written by ingest {seen['items']} but interactions by "
            f"ingest {seen['interactions']} (an ingest stopped between its two commits): rerun "
            "`vlm4rec ingest` for this dataset, then the later jobs")
    return seen["items"]


def register_views(spark: SparkSession, warehouse: str | Path) -> list[str]:
    """Temporary views named after the tables, for ``SELECT * FROM items`` in notebooks."""
    names = [name for name in SCHEMAS if exists(spark, warehouse, name)]
    for name in names:
        spark.read.format("delta").load(table_path(warehouse, name)).createOrReplaceTempView(name)
    return names
