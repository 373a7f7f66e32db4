"""The table contract written twice must say the same thing twice."""
from __future__ import annotations

import threading

import pyarrow as pa
import pytest
from deltalake import DeltaTable
from pyspark.sql import functions as F
from pyspark.sql.pandas.types import from_arrow_schema

from jobs import tables
from jobs.adapters.base import REJECT_SCHEMA
from udfs.caption.caption_udfs import STAGING_SCHEMA


def test_caption_staging_files_have_the_descriptions_table_schema():
    # The Ray workers write Arrow without Spark; the merge reads those files as the table's rows.
    assert from_arrow_schema(STAGING_SCHEMA) == tables.SCHEMAS["descriptions"]


def test_adapters_emit_the_rejects_table_without_its_dataset_column():
    table = tables.SCHEMAS["rejects"]
    assert ["dataset", *REJECT_SCHEMA.names] == table.names
    assert all(table[f.name] == f for f in REJECT_SCHEMA.fields)


# --- commits of rows the driver holds (delta-rs on a local master) ------------------------------

def _profiles(run_id: str, users: list[str], marker: int = 1) -> pa.Table:
    return pa.Table.from_pylist([{"run_id": run_id, "user_id": u, "representation": "text", "vector": [float(marker)],
                                  "n_history": marker} for u in users], schema=tables.arrow_schema("user_profiles"))


def _items(dataset: str, ids: list[str]) -> pa.Table:
    return pa.Table.from_pylist([{"dataset": dataset, "item_id": i, "title": f"t {i}", "attrs": [("k", i)]}
                                 for i in ids], schema=tables.arrow_schema("items"))


def _sorted(spark, wh, name):
    frame = tables.read(spark, wh, name)
    if "attrs" in frame.columns:
        frame = frame.withColumn("attrs", F.to_json("attrs"))
    return sorted(tuple(r) for r in frame.collect())


def _engine(wh, name) -> str:
    return DeltaTable(str(wh / name)).history(1)[0]["engineInfo"]


@pytest.mark.spark
def test_rows_held_by_the_driver_make_the_commits_spark_makes(spark, tmp_path):
    writes = [("user_profiles", _profiles("a", ["u1", "u2"]), {"run_id": "a"}),
              ("user_profiles", _profiles("b", ["u1"]), {"run_id": "b"}),
              ("user_profiles", _profiles("a", ["u3"], 2), {"run_id": "a", "representation": ["text"]}),
              ("items", _items("d1", ["1", "2"]), {"dataset": "d1"}),
              ("items", _items("d2", ["3"]), {"dataset": "d2"}),
              ("items", _items("d1", ["4"]), {"dataset": "d1"})]
    by_spark, by_driver = tmp_path / "spark", tmp_path / "driver"
    for name, rows, where in writes:
        tables.replace_slice(spark, by_spark, name, spark.createDataFrame(rows, schema=tables.SCHEMAS[name]), where)
        tables.replace_slice(spark, by_driver, name, rows, where)
    tables.append(spark, by_driver, "user_profiles", _profiles("c", ["u9"]))
    tables.append(spark, by_spark, "user_profiles", spark.createDataFrame(_profiles("c", ["u9"]),
                                                                          schema=tables.SCHEMAS["user_profiles"]))
    for name in ("user_profiles", "items"):
        assert _sorted(spark, by_driver, name) == _sorted(spark, by_spark, name)
        assert tables.read(spark, by_driver, name).schema == tables.read(spark, by_spark, name).schema
        assert _engine(by_driver, name).startswith("delta-rs") and not _engine(by_spark, name).startswith("delta-rs")
    assert [r[:2] for r in _sorted(spark, by_driver, "items")] == [("d1", "4"), ("d2", "3")]
    assert DeltaTable(str(by_driver / "items")).metadata().partition_columns == ["dataset"]
    # Spark keeps committing to a table delta-rs created, and the reverse.
    tables.replace_slice(spark, by_driver, "items", spark.createDataFrame(_items("d2", ["5"]), schema=tables.SCHEMAS["items"]),
                         {"dataset": "d2"})
    tables.replace_slice(spark, by_spark, "items", _items("d2", ["5"]), {"dataset": "d2"})
    assert _sorted(spark, by_driver, "items") == _sorted(spark, by_spark, "items")


@pytest.mark.spark
def test_a_driver_commit_with_a_row_outside_its_slice_fails_and_keeps_the_table(spark, warehouse):
    tables.replace_slice(spark, warehouse, "user_profiles", _profiles("a", ["u1"]), {"run_id": "a"})
    before = _sorted(spark, warehouse, "user_profiles")
    with pytest.raises(Exception, match="failed validation"):
        tables.replace_slice(spark, warehouse, "user_profiles",
                             pa.concat_tables([_profiles("a", ["u2"]), _profiles("victim", ["u3"])]), {"run_id": "a"})
    assert _sorted(spark, warehouse, "user_profiles") == before


@pytest.mark.spark
def test_crafted_values_in_driver_rows_go_through_spark_and_touch_only_their_slice(spark, warehouse):
    tables.replace_slice(spark, warehouse, "user_profiles", _profiles("victim", ["u1"]), {"run_id": "victim"})
    for value in ("x' OR '1'='1", "a\\", "名前"):
        tables.replace_slice(spark, warehouse, "user_profiles", _profiles(value, ["u2"]), {"run_id": value})
        assert not _engine(warehouse, "user_profiles").startswith("delta-rs")
    assert sorted(r[0] for r in _sorted(spark, warehouse, "user_profiles")) == sorted(["victim", "x' OR '1'='1", "a\\",
                                                                                       "名前"])


@pytest.mark.spark
def test_a_table_of_an_older_contract_is_brought_up_to_date_by_spark(spark, warehouse):
    from delta.tables import DeltaTable as SparkDeltaTable
    from pyspark.sql.types import StructType

    old = StructType([f for f in tables.SCHEMAS["user_profiles"].fields if f.name != "n_history"])
    SparkDeltaTable.createIfNotExists(spark).location(str(warehouse / "user_profiles")).addColumns(old).execute()
    tables.replace_slice(spark, warehouse, "user_profiles", _profiles("a", ["u1"], 3), {"run_id": "a"})
    assert [r.n_history for r in tables.read(spark, warehouse, "user_profiles").collect()] == [3]
    assert not _engine(warehouse, "user_profiles").startswith("delta-rs")


@pytest.mark.spark
def test_concurrent_driver_commits_all_land(spark, warehouse):
    tables.replace_slice(spark, warehouse, "user_profiles", _profiles("first", ["u0"]), {"run_id": "first"})
    errors = []

    def commit(n):
        try:
            for round_ in range(3):
                tables.replace_slice(spark, warehouse, "user_profiles", _profiles(f"r{n}", ["u1", "u2"], round_),
                                     {"run_id": f"r{n}"})
                tables.append(spark, warehouse, "runs", pa.Table.from_pylist(
                    [{"run_id": f"r{n}-{round_}", "job": "t"}], schema=tables.arrow_schema("runs")))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=commit, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    got = _sorted(spark, warehouse, "user_profiles")
    assert sorted((r[0], r[1], r[4]) for r in got) == sorted(
        [("first", "u0", 1)] + [(f"r{n}", u, 2) for n in range(4) for u in ("u1", "u2")])
    assert len(tables.read(spark, warehouse, "runs").collect()) == 12


@pytest.mark.spark
def test_first_driver_commits_racing_to_create_a_table_leave_one_slice(spark, tmp_path):
    for trial in range(3):
        wh = tmp_path / f"trial-{trial}"
        errors = []

        def commit(n):
            try:
                tables.replace_slice(spark, wh, "user_profiles", _profiles("r", [f"u{n}"]), {"run_id": "r"})
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=commit, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        assert len(_sorted(spark, wh, "user_profiles")) == 1  # the last writer's slice, alone


@pytest.mark.spark
def test_arrow_rows_that_spark_must_write_keep_their_values(spark, tmp_path):
    """Where delta-rs may not commit (a cluster, an object store, a value that is not plain
    text), Arrow rows become a Spark frame of the contract: maps, timestamps and vectors intact."""
    import datetime as dt

    at = dt.datetime(2026, 12, 1, 10, 0, 0, 123000)
    run = pa.Table.from_pylist([{"run_id": "r'1", "job": "embed", "started_at": at, "counts": [("rows", 3), ("ms", 7)],
                                 "pid": 12}], schema=tables.arrow_schema("runs"))
    tables.append(spark, tmp_path, "runs", tables._spark_frame(spark, "runs", run))
    row = tables.read(spark, tmp_path, "runs").first()
    assert (row.run_id, row.started_at, row.counts, row.pid) == ("r'1", at, {"rows": 3, "ms": 7}, 12)
    assert not _engine(tmp_path, "runs").startswith("delta-rs")
    profiles = tables._spark_frame(spark, "user_profiles", _profiles("a", ["u1"], 4))
    assert profiles.schema == tables.SCHEMAS["user_profiles"]
    assert [tuple(r) for r in profiles.collect()] == [("a", "u1", "text", [4.0], 4)]
