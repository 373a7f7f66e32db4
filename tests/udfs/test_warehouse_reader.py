"""delta-rs reads what delta-spark 4.0 writes: partitions with names that need escaping, a
table rewritten in place, and a column added after the first files were written."""
from __future__ import annotations

import pytest

from jobs import tables
from udfs.warehouse_reader import TableMissing, read_frame

pytestmark = pytest.mark.spark


def test_reads_the_live_rows_of_partitioned_rewritten_tables(spark, warehouse):
    rows = [("O'Neill's catalog", "a", "t1", None, None, None, None, "x"),
            ("data set/2 %", "b", "t2", None, None, None, None, "x"),
            ("plain", "c", "t3", None, None, None, None, "x")]
    frame = spark.createDataFrame(rows, tables.SCHEMAS["items"])
    tables.replace_slice(spark, warehouse, "items", frame.filter("dataset = \"O'Neill's catalog\""),
                         {"dataset": "O'Neill's catalog"})
    tables.replace_slice(spark, warehouse, "items", frame.filter("dataset != \"O'Neill's catalog\""),
                         {"dataset": ["data set/2 %", "plain"]})
    # A rewrite of one slice: only its new rows are live.
    tables.replace_slice(spark, warehouse, "items", spark.createDataFrame(
        [("plain", "d", "t4", None, None, None, None, "y")], tables.SCHEMAS["items"]), {"dataset": "plain"})
    got = read_frame(warehouse, "items", columns=["dataset", "item_id", "title"]).sort_values("item_id")
    assert got.values.tolist() == [["O'Neill's catalog", "a", "t1"], ["data set/2 %", "b", "t2"], ["plain", "d", "t4"]]
    one = read_frame(warehouse, "items", equal={"dataset": "data set/2 %"}, columns=["item_id", "dataset"])
    assert one.values.tolist() == [["b", "data set/2 %"]]
    assert read_frame(warehouse, "items", equal={"dataset": "plain", "title": "t3"}).empty
    # A column the reader asks for but an older writer never wrote reads as null.
    assert read_frame(warehouse, "items", equal={"dataset": "plain"}, columns=["item_id", "no_such"]
                      )["no_such"].isna().all()
    with pytest.raises(TableMissing, match="no 'metrics' table"):
        read_frame(warehouse, "metrics")
