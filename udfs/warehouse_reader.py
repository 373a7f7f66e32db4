"""Reading the warehouse's Delta tables without Spark: delta-rs (the ``deltalake`` package) and
pyarrow, for the online half (``recommend``) and the report, which must not pay a JVM start.

delta-rs reads the tables delta-spark 4.0 writes here (reader protocol 1, no deletion vectors,
no column mapping); filters are pushed down to the Parquet files as pyarrow expressions, so a
run's slice of ``recommendations`` is read without the other runs' rows. Column names and
table names are the contract of ``jobs.tables`` (which ``udfs`` may not import).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads


class TableMissing(LookupError):
    """A table the caller needs was never written in this warehouse."""


def table_uri(warehouse: str | Path, name: str) -> str:
    text = str(warehouse)
    if text.startswith("file://"):
        text = text[len("file://"):]
    if "://" in text:
        return text.rstrip("/") + "/" + name
    return str(Path(text).expanduser().resolve() / name)


def has_table(warehouse: str | Path, name: str) -> bool:
    from deltalake import DeltaTable

    return DeltaTable.is_deltatable(table_uri(warehouse, name))


def read_table(warehouse: str | Path, name: str, equal: Mapping[str, object] | None = None,
               within: Mapping[str, Sequence[object]] | None = None,
               columns: Sequence[str] | None = None) -> pa.Table:
    """Rows of table ``name`` whose columns equal ``equal``'s values and lie in ``within``'s
    lists (all conditions AND-ed), with ``columns`` (default: all). ``TableMissing`` names the
    job that writes the table when it does not exist."""
    from deltalake import DeltaTable

    uri = table_uri(warehouse, name)
    if not DeltaTable.is_deltatable(uri):
        raise TableMissing(f"no '{name}' table in warehouse {warehouse}: run the job that writes it "
                           f"(`vlm4rec pipeline`) or pass the warehouse that holds the run")
    table = DeltaTable(uri)
    schema = pa.schema(table.schema().to_arrow())
    conditions = {c: [v] for c, v in (equal or {}).items()} | {c: list(v) for c, v in (within or {}).items()}
    wanted = list(columns) if columns is not None else schema.names
    if "://" in uri or table.protocol().min_reader_version > 1:
        # Object stores and reader features (deletion vectors...) go through delta-rs's own
        # scan; it can abort the interpreter at exit, so local tables avoid it (below).
        result = table.to_pyarrow_dataset().to_table(filter=_expression(conditions),
                                                     columns=[c for c in wanted if c in schema.names])
    else:
        result = _read_local(uri, table, schema, conditions, wanted)
    for column in wanted:
        # A contract column an older writer lacked reads as null, as jobs.tables.read does.
        if column not in result.column_names:
            result = result.append_column(column, pa.nulls(result.num_rows))
    return result.select(wanted)


def _expression(conditions: Mapping[str, list]):
    expression = None
    for column, values in conditions.items():
        term = pc.field(column).isin(values) if len(values) != 1 else pc.field(column) == values[0]
        expression = term if expression is None else expression & term
    return expression


def _read_local(uri: str, table, schema: pa.Schema, conditions: Mapping[str, list], wanted: list[str]) -> pa.Table:
    """The snapshot's Parquet files read with pyarrow: delta-rs lists the live files (its log
    replay) and their partition values; partitions are pruned on those values and the other
    conditions are pushed into the Parquet scan. (delta-rs's own pyarrow dataset leaves Rust
    I/O threads behind that abort the interpreter at exit: "terminate called without an
    active exception", delta-io/delta-rs#2184.)"""
    partitions = list(table.metadata().partition_columns)
    actions = pa.table(table.get_add_actions(flatten=True))
    paths = actions.column("path").to_pylist()
    values = {p: actions.column(f"partition.{p}").to_pylist() for p in partitions}
    data_conditions = {c: v for c, v in conditions.items() if c not in partitions}
    data_columns = [c for c in wanted if c in schema.names and c not in partitions]
    scan_columns = list(dict.fromkeys(data_columns + list(data_conditions)))
    groups: dict[tuple, list[str]] = {}
    for i, path in enumerate(paths):
        key = tuple(values[p][i] for p in partitions)
        if all(key[partitions.index(c)] in set(v) for c, v in conditions.items() if c in partitions):
            local = unquote(path).removeprefix("file://")  # relative, or absolute (a cloned table)
            groups.setdefault(key, []).append(str(Path(uri) / local))
    pieces = []
    file_schema = pa.schema([schema.field(c) for c in schema.names if c not in partitions])
    for key, files in groups.items():
        piece = pads.dataset(files, schema=file_schema, format="parquet").to_table(
            filter=_expression(data_conditions), columns=scan_columns)
        for p, value in zip(partitions, key):
            if p in wanted:
                piece = piece.append_column(schema.field(p).with_nullable(True),
                                            pa.array([value] * piece.num_rows, schema.field(p).type))
        pieces.append(piece.select([c for c in wanted if c in piece.column_names]))
    if not pieces:
        return pa.table({c: pa.array([], schema.field(c).type) for c in wanted if c in schema.names})
    return pa.concat_tables(pieces, promote_options="permissive")


def read_frame(warehouse: str | Path, name: str, **kwargs):
    """``read_table`` as a pandas frame."""
    return read_table(warehouse, name, **kwargs).to_pandas()
