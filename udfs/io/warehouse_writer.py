"""Committing rows the driver holds to a local warehouse without Spark: delta-rs.

A job on a local master that computed its output on the driver (``jobs.driver_inputs``) holds
a few MB of Arrow. Written through Spark, each commit costs a Spark job, a Python-to-JVM copy
and a log replay: 2.5-4 s on the reference machine, against 0.07 s here, for the same Delta
commit (``docs/BENCHMARKS.md``, "Eighth session"). The commit is the same one: an overwrite
whose predicate is the slice (delta-rs, like Spark's ``replaceWhere``, refuses a row outside
it and a null in a NOT NULL column, so the table keeps its previous version), or an append.
The tables stay what Spark writes (reader 1, writer 2, no table feature) and Spark reads them
as before; both writers commit with an atomic put-if-absent of the next log file, so one that
loses a race gets a conflict and ``jobs.tables.retry_on_conflict`` retries it.

``jobs.tables`` decides when this writer is used and gives the contract's Arrow schema; this
module knows no table by name (``udfs`` may not import ``jobs``).
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import pyarrow as pa
from deltalake import DeltaTable, write_deltalake

from udfs.io import storage

# Values a predicate may hold as they are: inside single quotes none of these can end the
# literal, in DataFusion's SQL (delta-rs) as in Spark's. Anything else is not written here:
# the caller takes Spark's path, whose literals are hex-encoded (``jobs.tables.sql_literal``).
PLAIN_TEXT = re.compile(r"[A-Za-z0-9 _.:@+=,/#()-]*")
_COLUMN = re.compile(r"[a-z_][a-z0-9_]*")


def local_table(warehouse: str | Path, name: str) -> str | None:
    """The table's folder when the warehouse is on the local file system, else None."""
    local = storage.local_path_of(str(warehouse))
    return None if local is None else str(Path(local).expanduser().resolve() / name)


def predicate(where: Mapping[str, object]) -> str | None:
    """The slice as delta-rs predicate text (column -> value or list of values, ANDed), or None
    when a column or value cannot be written as plain text (then Spark's path writes it)."""
    terms = []
    for column, value in where.items():
        if not _COLUMN.fullmatch(column):
            return None
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        if not values or not all(isinstance(v, str) and PLAIN_TEXT.fullmatch(v) for v in values):
            return None
        terms.append(f"{column} IN (" + ", ".join(f"'{v}'" for v in values) + ")"
                     if isinstance(value, (list, tuple)) else f"{column} = '{value}'")
    return " AND ".join(terms) if terms else None


def with_constants(table: pa.Table, values: Mapping[str, str]) -> pa.Table:
    """``table`` with a string column per ``values`` item, the same value in every row."""
    for column, value in values.items():
        table = table.append_column(column, pa.array([value] * table.num_rows, pa.string()))
    return table


def conform(table: pa.Table, schema: pa.Schema, name: str) -> pa.Table:
    """``table`` with ``schema``'s columns, in its order and types; a missing column is an error."""
    missing = [f.name for f in schema if f.name not in table.column_names]
    if missing:
        raise ValueError(f"frame written to '{name}' lacks columns {missing}; it has {table.column_names}")
    table = table.select(schema.names).cast(schema)
    # Map columns rebuilt from their values: delta-rs 1.6 panics ("range start index ... out of
    # range for slice of length 0") overwriting a partition with the map arrays Spark's
    # ``toArrow()`` gives for ``create_map()`` (zero-length child buffers); pyarrow's rebuild of
    # the same values writes. Maps are small here (an item's attributes, a run's counts).
    for i, field in enumerate(schema):
        if pa.types.is_map(field.type):
            table = table.set_column(i, field, pa.array(table.column(i).to_pylist(), field.type))
    return table


def table_columns(path: str) -> list[str] | None:
    """The columns of the Delta table at ``path``, or None when there is none."""
    if not DeltaTable.is_deltatable(path):
        return None
    return [field.name for field in DeltaTable(path).schema().fields]


def write(path: str, table: pa.Table, *, slice_predicate: str | None = None) -> None:
    """One commit to the table at ``path`` (``create`` it first): ``table`` replaces the rows
    matching ``slice_predicate`` (None: it is appended)."""
    if slice_predicate is None:
        write_deltalake(path, table, mode="append")
    else:
        write_deltalake(path, table, mode="overwrite", predicate=slice_predicate)


def create(path: str, schema: pa.Schema, partition_by: Sequence[str] | None = None) -> None:
    """An empty table of ``schema`` at ``path``, unless one is there already."""
    write_deltalake(path, schema.empty_table(), mode="ignore", partition_by=list(partition_by or []) or None)


def merge(path: str, table: pa.Table, keys: Sequence[str]) -> None:
    """One ``MERGE`` commit: ``table``'s rows replace the rows with their key and add the others
    (``table`` holds one row a key; keys are NOT NULL columns, so ``=`` is the key's equality)."""
    condition = " AND ".join(f"t.{k} = s.{k}" for k in keys)
    (DeltaTable(path).merge(source=table, predicate=condition, source_alias="s", target_alias="t")
     .when_matched_update_all().when_not_matched_insert_all().execute())
