"""delta-rs commits of rows the driver holds: the slice's predicate, its guard, the contract's types."""
from __future__ import annotations

import pyarrow as pa
import pytest
from deltalake import DeltaTable

from udfs.io import warehouse_writer

SCHEMA = pa.schema([pa.field("run_id", pa.string(), nullable=False), pa.field("user_id", pa.string(), nullable=False),
                    pa.field("value", pa.float64())])


def rows(run_id: str, users: list[str], value: float = 1.0) -> pa.Table:
    return pa.Table.from_pylist([{"run_id": run_id, "user_id": u, "value": value} for u in users], schema=SCHEMA)


def fresh(tmp_path) -> str:
    path = str(tmp_path / "t")
    warehouse_writer.create(path, SCHEMA)
    warehouse_writer.create(path, SCHEMA)  # a second create leaves the table as it is
    return path


def read(path: str) -> list[tuple]:
    return sorted(tuple(r.values()) for r in DeltaTable(path).to_pyarrow_table().to_pylist())


def test_plain_values_make_the_predicate():
    assert warehouse_writer.predicate({"run_id": "r 1", "representation": ["text", "lvlm:tags"]}) == \
        "run_id = 'r 1' AND representation IN ('text', 'lvlm:tags')"


@pytest.mark.parametrize("where", [
    {"run_id": "x' OR '1'='1"}, {"run_id": "a\\"}, {"run_id": "名前"}, {"run_id": "new\nline"},
    {"dataset": ["ok", "O'Neill"]}, {"run_id": 5}, {"run_id": []}, {"Run Id": "r"}, {"run_id;--": "r"}, {},
])
def test_anything_else_is_left_to_spark(where):
    # None: the caller commits through Spark, whose literals are hex-encoded (jobs.tables.sql_literal).
    assert warehouse_writer.predicate(where) is None


def test_a_commit_replaces_its_slice_and_nothing_else(tmp_path):
    path = fresh(tmp_path)
    warehouse_writer.write(path, rows("a", ["u1", "u2"]), slice_predicate="run_id = 'a'")
    warehouse_writer.write(path, rows("b", ["u1"]), slice_predicate="run_id = 'b'")
    warehouse_writer.write(path, rows("a", ["u3"], 2.0), slice_predicate="run_id = 'a'")
    assert read(path) == [("a", "u3", 2.0), ("b", "u1", 1.0)]
    warehouse_writer.write(path, rows("c", ["u9"]))  # no slice: an append
    assert ("c", "u9", 1.0) in read(path)


def test_a_row_outside_the_slice_aborts_the_commit(tmp_path):
    path = fresh(tmp_path)
    warehouse_writer.write(path, rows("a", ["u1"]), slice_predicate="run_id = 'a'")
    version = DeltaTable(path).version()
    with pytest.raises(Exception, match="failed validation"):
        warehouse_writer.write(path, pa.concat_tables([rows("a", ["u2"]), rows("b", ["u3"])]),
                               slice_predicate="run_id = 'a'")
    assert DeltaTable(path).version() == version and read(path) == [("a", "u1", 1.0)]


def test_a_null_key_aborts_the_commit(tmp_path):
    path = fresh(tmp_path)
    warehouse_writer.write(path, rows("a", ["u1"]), slice_predicate="run_id = 'a'")
    loose = pa.schema([pa.field("run_id", pa.string()), pa.field("user_id", pa.string()), pa.field("value", pa.float64())])
    with pytest.raises(Exception):
        warehouse_writer.write(path, pa.Table.from_pylist([{"run_id": "a", "user_id": None, "value": 0.0}], schema=loose),
                               slice_predicate="run_id = 'a'")
    assert read(path) == [("a", "u1", 1.0)]


def test_conform_orders_and_types_the_columns_and_names_a_missing_one():
    given = pa.table({"value": pa.array([1], pa.int64()), "user_id": ["u"], "run_id": ["r"], "extra": [0]})
    out = warehouse_writer.conform(given, SCHEMA, "t")
    assert out.schema == SCHEMA and out.to_pylist() == [{"run_id": "r", "user_id": "u", "value": 1.0}]
    with pytest.raises(ValueError, match=r"'t' lacks columns \['user_id'\]"):
        warehouse_writer.conform(given.drop(["user_id"]), SCHEMA, "t")


def test_with_constants_adds_one_value_per_row():
    out = warehouse_writer.with_constants(pa.table({"x": [1, 2]}), {"run_id": "r", "topk_id": "t"})
    assert out.column("run_id").to_pylist() == ["r", "r"] and out.column("topk_id").type == pa.string()


def test_only_a_local_warehouse_has_a_local_table(tmp_path):
    assert warehouse_writer.local_table(tmp_path, "items") == str(tmp_path.resolve() / "items")
    assert warehouse_writer.local_table("s3a://bucket/w", "items") is None


def test_map_columns_from_spark_arrow_write_with_their_values(spark, tmp_path):
    # delta-rs 1.6 panicked ("range start index ... out of range") overwriting a partition with
    # the map arrays Spark's toArrow() gives for create_map() (the adapters' empty attrs): conform
    # rebuilds them, and the values written are the values Spark held.
    from pyspark.sql import functions as F

    schema = pa.schema([pa.field("dataset", pa.string(), nullable=False),
                        pa.field("item_id", pa.string(), nullable=False),
                        pa.field("attrs", pa.map_(pa.string(), pa.string()))])
    empty = F.create_map().cast("map<string,string>")
    frame = (spark.createDataFrame([("pq", "e"), ("pq", "f")], "dataset string, item_id string")
             .select("dataset", "item_id", empty.alias("attrs"))
             .unionByName(spark.createDataFrame([("pq", "g", {"genre": "Drama"})],
                                                "dataset string, item_id string, attrs map<string,string>")))
    path = str(tmp_path / "items")
    warehouse_writer.create(path, schema, ["dataset"])
    warehouse_writer.write(path, warehouse_writer.conform(frame.toArrow(), schema, "items"),
                           slice_predicate="dataset = 'pq'")
    got = {r["item_id"]: dict(r["attrs"]) for r in DeltaTable(path).to_pyarrow_table().to_pylist()}
    assert got == {"e": {}, "f": {}, "g": {"genre": "Drama"}}
