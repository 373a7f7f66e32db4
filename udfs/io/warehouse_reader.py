"""Reading the warehouse's Delta tables without Spark: delta-rs (the ``deltalake`` package) and
pyarrow, for the online half (``recommend``) and the report, which must not pay a JVM start.

delta-rs reads the tables delta-spark 4.0 writes here (reader protocol 1, no deletion vectors,
no column mapping); filters are pushed down to the Parquet files as pyarrow expressions, so a
run's slice of ``recommendations`` is read without the other runs' rows. Column names and
table names are the contract of ``jobs.tables`` (which ``udfs`` may not import).

An object-store warehouse (``s3a://bucket/w``) is read the same way: delta-rs opens the log
with ``udfs.io.storage.delta_location`` (``s3://`` and the AWS environment's endpoint, region and
credentials) and the Parquet files are read through ``udfs.io.storage``'s pyarrow file system.
"""
from __future__ import annotations

import datetime
import functools
import operator

from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
from deltalake import DeltaTable
from deltalake.exceptions import DeltaError

from udfs.io import storage
from udfs.io.warehouse_writer import local_table


class TableMissing(LookupError):
    """A table the caller needs was never written in this warehouse."""


class TooLarge(RuntimeError):
    """The rows asked for lie in more Parquet bytes than the caller's ``max_bytes``: a job
    that reads small tables on the driver reads this one with Spark."""


class StoreUnreadable(OSError):
    """delta-rs cannot open the object store the warehouse lives in (its credentials given only
    to Hadoop's s3a, say, or a scheme delta-rs has no client for): a job that reads small
    tables on the driver reads them with Spark. A local warehouse never raises this: an error
    there is the job's error."""


class UnreadableTable(OSError):
    """A local table whose Delta log delta-rs cannot read (a corrupt or unreadable commit file):
    the job's error, with the table, its log's path and the fix."""


# Why a job that reads small tables on the driver reads with Spark instead: the named
# conditions, and the reason each is counted under (``driver_fallback_<reason>``).
FALLBACK_REASONS: dict[type, str] = {TooLarge: "too_large", TableMissing: "no_table",
                                     StoreUnreadable: "store_unreadable"}


def fallback_reason(exc: Exception) -> str:
    """The reason ``exc`` (one of ``FALLBACK_REASONS``' exceptions, or a subclass) is counted under."""
    return next(reason for kind, reason in FALLBACK_REASONS.items() if isinstance(exc, kind))


def table_uri(warehouse: str | Path, name: str) -> str:
    return local_table(warehouse, name) or storage.join(str(warehouse), name)


def _open(warehouse: str | Path, name: str, equal: Mapping[str, object] | None,
          within: Mapping[str, Sequence[object]] | None):
    """(uri, the table's snapshot, conditions as column -> values), or ``TableMissing``, or
    ``StoreUnreadable``."""
    uri = table_uri(warehouse, name)
    location, options = storage.delta_location(uri)
    try:
        found = DeltaTable.is_deltatable(location, storage_options=options or None)
        table = DeltaTable(location, storage_options=options or None) if found else None
    except (OSError, DeltaError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if not storage.is_object_store(uri):
            raise UnreadableTable(
                f"table '{name}': its Delta log {storage.join(uri, '_delta_log')} cannot be read ({first}): "
                f"restore the table to a readable version (RESTORE TABLE delta.`{uri}` TO VERSION AS OF n) "
                f"or rerun the job that writes it") from exc
        raise StoreUnreadable(f"delta-rs cannot open table '{name}' at {uri} ({type(exc).__name__}: {first})") from exc
    if table is None:
        raise TableMissing(f"no '{name}' table in warehouse {warehouse}: run the job that writes it "
                           f"(`vlm4rec pipeline`) or pass the warehouse that holds the run")
    return uri, table, {c: [v] for c, v in (equal or {}).items()} | {c: list(v) for c, v in (within or {}).items()}


def _check_size(warehouse, name: str, table, conditions: Mapping[str, list], max_bytes: int | None,
                max_rows: int | None) -> None:
    if max_bytes is None and max_rows is None:
        return
    kept = _kept_files(table, conditions)
    size = int(pc.sum(kept.column("size_bytes")).as_py() or 0)
    if max_bytes is not None and size > max_bytes:
        raise TooLarge(f"table '{name}' in {warehouse}: {size} bytes to read, more than {max_bytes}")
    if max_rows is None:
        return
    counted = kept.column("num_records") if "num_records" in kept.column_names else None
    if kept.num_rows and (counted is None or counted.null_count):
        # A writer that kept no statistics: the rows are unknown, so the cap cannot be promised.
        raise TooLarge(f"table '{name}' in {warehouse}: files without a row count in the Delta log")
    rows = int(pc.sum(counted).as_py() or 0) if counted is not None else 0
    if rows > max_rows:
        raise TooLarge(f"table '{name}' in {warehouse}: {rows} rows to read, more than {max_rows}")


def check_size(warehouse: str | Path, name: str, equal: Mapping[str, object] | None = None,
               within: Mapping[str, Sequence[object]] | None = None, max_bytes: int | None = None,
               max_rows: int | None = None) -> None:
    """``read_table``'s checks alone, from the Delta log (no data file is opened):
    ``TableMissing``, or ``TooLarge`` over ``max_bytes`` / ``max_rows``."""
    _, table, conditions = _open(warehouse, name, equal, within)
    _check_size(warehouse, name, table, conditions, max_bytes, max_rows)


def read_table(warehouse: str | Path, name: str, equal: Mapping[str, object] | None = None,
               within: Mapping[str, Sequence[object]] | None = None,
               columns: Sequence[str] | None = None, max_bytes: int | None = None,
               max_rows: int | None = None) -> pa.Table:
    """Rows of table ``name`` whose columns equal ``equal``'s values and lie in ``within``'s
    lists (all conditions AND-ed), with ``columns`` (default: all). ``TableMissing`` names the
    job that writes the table when it does not exist; ``TooLarge`` when the files to read
    (after skipping by partition values and file statistics) hold more than ``max_bytes``, or
    more than ``max_rows`` rows, before any is read."""
    uri, table, conditions = _open(warehouse, name, equal, within)
    schema = pa.schema(table.schema().to_arrow())
    _check_size(warehouse, name, table, conditions, max_bytes, max_rows)
    wanted = list(columns) if columns is not None else schema.names
    if table.protocol().min_reader_version > 1:
        # Reader features (deletion vectors...) go through delta-rs's own scan; it can abort
        # the interpreter at exit, so tables without them avoid it (below).
        result = table.to_pyarrow_dataset().to_table(filter=_expression(conditions),
                                                     columns=[c for c in wanted if c in schema.names])
    else:
        result = _read_files(uri, table, schema, conditions, wanted)
    for column in wanted:
        # A contract column an older writer lacked reads as null, as jobs.tables.read does.
        if column not in result.column_names:
            result = result.append_column(column, pa.nulls(result.num_rows))
    return result.select(wanted)


# Delta's writers keep at most this many leading characters of a string in a file's min/max
# statistics. delta-spark 4 pads a cut maximum so that it still bounds the column, but a writer
# that does not would leave it below the real one: a maximum that long is not relied on.
_STATS_PREFIX = 32
# Statistics trusted for skipping: exact for these types. A float maximum is NaN when the file
# holds one, and a timestamp's is kept to the millisecond (below a microsecond value).
_EXACT_STATS = (str, int, bool, datetime.date)


def _may_hold(actions: pa.Table, column: str, values: list) -> list[bool]:
    """Per file: whether its statistics leave room for a row whose ``column`` is one of
    ``values`` (True wherever they say nothing: no statistics, nulls, a cut-off maximum)."""
    if f"min.{column}" not in actions.column_names or f"max.{column}" not in actions.column_names:
        return [True] * actions.num_rows
    wanted = [v for v in values if v is not None]
    return [_bounds_may_hold(low, high, wanted) for low, high in
            zip(actions.column(f"min.{column}").to_pylist(), actions.column(f"max.{column}").to_pylist())]


def _bounds_may_hold(low, high, wanted: list) -> bool:
    """Whether a file whose statistics are ``low`` and ``high`` may hold one of ``wanted``."""
    if low is None or high is None or not wanted or not all(type(x) in _EXACT_STATS for x in (low, high, *wanted)):
        return True
    bounded = not (isinstance(high, str) and len(high) >= _STATS_PREFIX)
    try:
        return any(low <= v and (not bounded or v <= high) for v in wanted)
    except TypeError:  # statistics of another type than the values: they prove nothing
        return True


def _kept_files(table, conditions: Mapping[str, list]) -> pa.Table:
    """The snapshot's add actions of the files that may hold rows matching ``conditions``:
    partition values must match; other columns are checked against each file's min/max
    statistics (Delta writes them per file, so a table keyed by run id but not partitioned by
    it, such as ``recommendations``, is read and sized by one run's files, not every run's)."""
    partitions = list(table.metadata().partition_columns)
    actions = pa.table(table.get_add_actions(flatten=True))
    terms = [pc.is_in(actions.column(f"partition.{column}"), value_set=pa.array(values)) if column in partitions
             else pa.array(_may_hold(actions, column, list(values)), pa.bool_())
             for column, values in conditions.items()]
    return actions.filter(functools.reduce(pc.and_, terms)) if terms else actions


def _expression(conditions: Mapping[str, list]):
    terms = [pc.field(column).isin(values) if len(values) != 1 else pc.field(column) == values[0]
             for column, values in conditions.items()]
    return functools.reduce(operator.and_, terms) if terms else None


def _file_locator(uri: str):
    """``(pyarrow file system or None, log entry's path -> file's path)`` for the table at
    ``uri``: local paths as they always were; object-store keys through ``udfs.io.storage``."""
    if not storage.is_uri(uri):  # table_uri resolved it: a local path
        return None, lambda path: str(Path(uri) / unquote(path).removeprefix("file://"))
    store, root = storage.filesystem(uri)

    def locate(path: str) -> str:
        path = unquote(path)  # the log holds URL-encoded keys; an absolute one from a cloned table
        if storage.is_uri(path):
            other, key = storage.filesystem(path)
            if type(other) is not type(store):
                raise storage.StorageError(f"table {uri} lists a file in another store ({path}): "
                                           "deep-clone it into the warehouse's store")
            return key
        return root.rstrip("/") + "/" + path

    return store, locate


def _read_files(uri: str, table, schema: pa.Schema, conditions: Mapping[str, list], wanted: list[str]) -> pa.Table:
    """The snapshot's Parquet files read with pyarrow: delta-rs lists the live files (its log
    replay) with their partition values and statistics; files are pruned on those
    (``_kept_files``) and the other conditions filter the rows each scan returns (not pushed
    into it: see below). (delta-rs's own pyarrow dataset leaves Rust
    I/O threads behind that abort the interpreter at exit: "terminate called without an
    active exception", delta-io/delta-rs#2184.) Local files are read from the local file
    system, an object store's through ``udfs.io.storage.filesystem``."""
    store, locate = _file_locator(uri)
    partitions = list(table.metadata().partition_columns)
    actions = _kept_files(table, conditions)
    paths = actions.column("path").to_pylist()
    values = {p: actions.column(f"partition.{p}").to_pylist() for p in partitions}
    data_conditions = {c: v for c, v in conditions.items() if c not in partitions}
    scan_columns = list(dict.fromkeys([c for c in wanted if c in schema.names and c not in partitions]
                                      + list(data_conditions)))
    groups: dict[tuple, list[str]] = {}
    for i, path in enumerate(paths):
        key = tuple(values[p][i] for p in partitions)  # _kept_files matched the partition values
        groups.setdefault(key, []).append(locate(path))  # relative, or absolute (a cloned table)
    pieces = []
    file_schema = pa.schema([schema.field(c) for c in schema.names if c not in partitions])
    for key, files in groups.items():
        # Filtered after the scan, not in it: delta-rs 1.6 writes a MERGE's files with string_view
        # columns, and pyarrow prunes row groups by comparing their string_view statistics with
        # the filter's string values, which it cannot ("no kernel matching input types (string,
        # string_view)"). The scan casts every file's columns to the table's schema first.
        try:
            piece = pads.dataset(files, schema=file_schema, format="parquet", filesystem=store).to_table(
                columns=scan_columns)
        except OSError as exc:
            if store is None:  # a local file: the job's error
                raise
            raise StoreUnreadable(f"table at {uri}: its files cannot be read from the store ({exc})") from exc
        if data_conditions:
            piece = piece.filter(_expression(data_conditions))
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
