"""delta-rs reads what delta-spark 4.0 writes: partitions with names that need escaping, a
table rewritten in place, and a column added after the first files were written; the same
table in an object store (moto's S3 server, the ``s3`` fixture) reads back row for row."""
from __future__ import annotations

import pyarrow as pa
import pytest
from pyarrow import fs as pafs

from jobs import tables
from udfs.io import storage
from udfs.io.warehouse_reader import (TableMissing, TooLarge, check_size, read_frame, read_table,
                                   table_uri)

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

    # max_bytes counts the live files the partition filter keeps, not the whole table.
    from deltalake import DeltaTable

    actions = pa.table(DeltaTable(table_uri(warehouse, "items")).get_add_actions(flatten=True))
    sizes: dict[str, int] = {}
    for dataset, size in zip(actions.column("partition.dataset").to_pylist(), actions.column("size_bytes").to_pylist()):
        sizes[dataset] = sizes.get(dataset, 0) + size
    assert read_table(warehouse, "items", equal={"dataset": "plain"}, max_bytes=sizes["plain"]).num_rows == 1
    with pytest.raises(TooLarge, match="'items'"):
        read_table(warehouse, "items", equal={"dataset": "plain"}, max_bytes=sizes["plain"] - 1)
    assert read_table(warehouse, "items", max_bytes=sum(sizes.values())).num_rows == 3
    with pytest.raises(TooLarge):
        read_table(warehouse, "items", within={"dataset": ["plain", "data set/2 %"]},
                   max_bytes=sizes["plain"] + sizes["data set/2 %"] - 1)
    # max_rows counts the kept files' rows from the log's statistics, before a data file is read.
    assert read_table(warehouse, "items", equal={"dataset": "plain"}, max_rows=1).num_rows == 1
    check_size(warehouse, "items", equal={"dataset": "plain"}, max_bytes=sizes["plain"], max_rows=1)
    with pytest.raises(TooLarge, match="'items'.*2 rows to read, more than 1"):
        check_size(warehouse, "items", within={"dataset": ["plain", "data set/2 %"]}, max_rows=1)
    with pytest.raises(TableMissing, match="no 'metrics' table"):
        check_size(warehouse, "metrics", max_rows=1)


def test_a_table_delta_spark_wrote_reads_back_from_an_object_store(spark, warehouse, s3):
    rows = [("O'Neill's catalog", "a", "t1", None, None, None, None, "x"),
            ("data set/2 %", "b", "t2", None, None, None, None, "x"),
            ("data set/2 %", "e", "t5", None, None, None, None, "z"),
            ("plain", "c", "t3", None, None, None, None, "x")]
    frame = spark.createDataFrame(rows, tables.SCHEMAS["items"])
    tables.replace_slice(spark, warehouse, "items", frame, {"dataset": ["O'Neill's catalog", "data set/2 %", "plain"]})
    tables.replace_slice(spark, warehouse, "items", spark.createDataFrame(
        [("plain", "d", "t4", None, None, None, None, "y")], tables.SCHEMAS["items"]), {"dataset": "plain"})
    # The folder delta-spark wrote, log and data files as they are, copied into the bucket.
    remote = "s3a://vlm4rec-unit/reader-wh"
    store, root = storage.filesystem(remote)
    pafs.copy_files(str(warehouse / "items"), f"{root}/items", source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=store)
    cases = [{}, {"equal": {"dataset": "plain"}}, {"equal": {"dataset": "data set/2 %", "title": "t5"}},
             {"within": {"dataset": ["O'Neill's catalog", "plain"]}, "columns": ["item_id", "dataset"]},
             {"equal": {"dataset": "no such"}}, {"columns": ["item_id", "no_such"]}]
    for case in cases:
        local, got = read_table(warehouse, "items", **case), read_table(remote, "items", **case)
        assert got.schema == local.schema, case
        assert got.sort_by("item_id").to_pylist() == local.sort_by("item_id").to_pylist(), case
    assert sorted(read_table(remote, "items", columns=["item_id"]).column("item_id").to_pylist()) == ["a", "b", "d", "e"]
    assert read_table(remote, "items", equal={"dataset": "plain"}, columns=["item_id"]).to_pylist() == [{"item_id": "d"}]
    with pytest.raises(TableMissing, match=r"no 'metrics' table in warehouse s3a://vlm4rec-unit/reader-wh"):
        read_frame(remote, "metrics")


def test_partitions_are_pruned_before_any_object_is_read(s3):
    from deltalake import write_deltalake

    remote = "s3a://vlm4rec-unit/pruned-wh"
    location, options = storage.delta_location(f"{remote}/metrics")
    assert location == "s3://vlm4rec-unit/pruned-wh/metrics" and options["AWS_ALLOW_HTTP"] == "true"
    data = pa.table({"run_id": ["r1", "r1", "r2"], "metric": ["ndcg", "recall", "ndcg"], "value": [0.1, 0.2, 0.3]})
    write_deltalake(location, data, partition_by=["run_id"], storage_options=options)
    assert read_table(remote, "metrics", equal={"run_id": "r2"}).to_pylist() == [
        {"run_id": "r2", "metric": "ndcg", "value": 0.3}]
    # The other run's objects gone: a read of r2 never touches them; a read of r1 fails naming them.
    store, root = storage.filesystem(f"{remote}/metrics")
    store.delete_dir(f"{root}/run_id=r1")
    assert read_table(remote, "metrics", equal={"run_id": "r2"}, columns=["value"]).to_pylist() == [{"value": 0.3}]
    with pytest.raises(OSError, match="run_id=r1"):
        read_table(remote, "metrics", equal={"run_id": "r1"})


def test_files_of_other_runs_are_skipped_by_their_statistics(spark, warehouse):
    """``candidates`` is keyed by run id but not partitioned by it: a run's read and its
    ``max_bytes`` check count that run's files only (their min/max statistics), so a warehouse
    of many runs does not push a small run's job off the driver; a string statistic Delta cut
    short (32 characters) still finds its rows."""
    from deltalake import DeltaTable

    long_id = "run-" + "b" * 40
    for run_id, n in (("run-a", 3), (long_id, 5), ("run-z", 40)):
        frame = spark.createDataFrame([(run_id, "title", f"i{k}", "topk-1") for k in range(n)],
                                      tables.SCHEMAS["candidates"])
        tables.replace_slice(spark, warehouse, "candidates", frame, {"run_id": run_id})
    actions = pa.table(DeltaTable(table_uri(warehouse, "candidates")).get_add_actions(flatten=True))
    sizes: dict[str, int] = {}
    for low, size in zip(actions.column("min.run_id").to_pylist(), actions.column("size_bytes").to_pylist()):
        key = "run-a" if low == "run-a" else "run-z" if low == "run-z" else long_id
        sizes[key] = sizes.get(key, 0) + size
    assert sizes["run-a"] < sum(sizes.values())
    got = read_table(warehouse, "candidates", equal={"run_id": "run-a"}, max_bytes=sizes["run-a"])
    assert sorted(got.column("item_id").to_pylist()) == ["i0", "i1", "i2"]
    with pytest.raises(TooLarge):
        read_table(warehouse, "candidates", equal={"run_id": "run-a"}, max_bytes=sizes["run-a"] - 1)
    # The long id's maximum is cut short: its files are kept (and so are those of any id after
    # it whose maximum is not cut, as run-z's would be if it were), and its rows are all there.
    assert read_table(warehouse, "candidates", equal={"run_id": long_id}).num_rows == 5
    assert read_table(warehouse, "candidates", equal={"run_id": long_id}, max_bytes=sizes[long_id]).num_rows == 5
    assert read_table(warehouse, "candidates", equal={"run_id": "run-0"}, max_bytes=0).num_rows == 0
    assert read_table(warehouse, "candidates", within={"run_id": ["run-a", "run-z"]}).num_rows == 43


def test_reads_with_filters_what_a_delta_rs_merge_wrote_as_string_views(tmp_path):
    """delta-rs writes a MERGE's files with string_view columns; a filtered read (caption's merge on
    the driver asks for its images' rows this way) must still find them, not fail in pyarrow's
    row-group pruning."""
    import pyarrow.parquet as pq
    from deltalake import DeltaTable, write_deltalake

    path = str(tmp_path / "descriptions")
    write_deltalake(path, pa.table({"image_sha256": pa.array([], pa.string()), "text": pa.array([], pa.string())}))
    source = pa.table({"image_sha256": ["a", "b", "c"], "text": ["x", "y", "z"]})
    (DeltaTable(path).merge(source, "t.image_sha256 = s.image_sha256", source_alias="s", target_alias="t")
     .when_not_matched_insert_all().execute())
    written = [f for f in (tmp_path / "descriptions").glob("*.parquet") if pq.read_metadata(f).num_rows]
    assert pq.read_schema(written[0]).field("image_sha256").type == pa.string_view()  # the case itself
    assert read_table(tmp_path, "descriptions", equal={"image_sha256": "b"}).to_pylist() == [
        {"image_sha256": "b", "text": "y"}]
    assert sorted(read_table(tmp_path, "descriptions", within={"image_sha256": ["a", "c"]},
                             columns=["text"]).column("text").to_pylist()) == ["x", "z"]
