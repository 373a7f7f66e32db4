"""The parts of ``benchmarks/bench_pipeline_vs_script.py`` that restate a job's rule or read its
output: if they drift from the jobs, the benchmark compares different work."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytestmark = pytest.mark.spark

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_pipeline_vs_script",
                                                  REPO / "benchmarks" / "bench_pipeline_vs_script.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_scripts_split_is_the_ingest_jobs_temporal_ratio(spark, bench):
    from udfs.spark.splits import assign_split
    from udfs.splits import SplitSpec

    rng = np.random.default_rng(7)
    n = 400
    # Few distinct timestamps: ties, broken by item id as strings ("10" before "9").
    frame = pd.DataFrame({"user_id": rng.integers(0, 30, n).astype(str), "item_id": rng.integers(0, 60, n).astype(str),
                          "rating": 4.0, "ts": rng.integers(0, 8, n).astype("int64")})
    frame = frame.drop_duplicates(["user_id", "item_id", "ts"])
    expected = (assign_split(spark.createDataFrame(frame), SplitSpec("temporal_ratio", (0.7, 0.1, 0.2)))
                .toPandas().sort_values(["user_id", "ts", "item_id"]).reset_index(drop=True))
    got = bench.temporal_ratio_split(frame, (0.7, 0.1, 0.2), 3).reset_index(drop=True)
    assert got[["user_id", "item_id", "ts", "split"]].equals(expected[["user_id", "item_id", "ts", "split"]])


def test_read_delta_gives_the_live_rows_of_a_rewritten_table(spark, bench, tmp_path):
    path = str(tmp_path / "metrics")
    spark.createDataFrame([("a", 1.0)], "representation string, value double").write.format("delta").save(path)
    spark.createDataFrame([("b", 2.0), ("c", 3.0)], "representation string, value double") \
        .write.format("delta").mode("overwrite").save(path)
    spark.createDataFrame([("d", 4.0)], "representation string, value double").write.format("delta").mode("append").save(path)
    rows = bench.read_delta(Path(path)).sort_values("representation")
    assert rows["representation"].tolist() == ["b", "c", "d"]
    assert rows["value"].tolist() == [2.0, 3.0, 4.0]


def test_compare_values_counts_equal_values_and_the_largest_difference(bench):
    pipeline = [{"representation": "a", "value": 0.5}, {"representation": "b", "value": 0.25},
                {"representation": "c", "value": 1.0}]
    script = [{"representation": "a", "value": 0.5 + 1e-12}, {"representation": "b", "value": 0.2}]
    out = bench.compare_values(pipeline, script, ["representation"], ["value"])
    assert (out["values"], out["equal_1e-9"], out["only_in_pipeline"], out["only_in_script"]) == (2, 1, 1, 0)
    assert out["max_abs_diff"] == pytest.approx(0.05)
    assert out["max_abs_diff_at"] == {"representation": "b", "column": "value"}
