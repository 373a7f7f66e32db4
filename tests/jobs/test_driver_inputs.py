"""The driver path is chosen by named conditions only, each counted: any other error of the
fast path fails the job instead of turning into a slower Spark run that no test would see."""
from __future__ import annotations

import shutil

import pytest

from jobs import caption, embed, evaluate, ingest, profiles, topk
from udfs.io import warehouse_reader

pytestmark = [pytest.mark.spark, pytest.mark.faults]

# (job, a table its fast path reads with delta-rs, whether it takes the pipeline's run id)
CASES = [(ingest, "interactions", False), (caption, "items", True), (embed, "items", True),
         (profiles, "item_embeddings", True), (topk, "user_profiles", True), (evaluate, "recommendations", True)]


@pytest.mark.parametrize("job, table, with_run_id", CASES, ids=[c[0].__name__.split(".")[-1] for c in CASES])
def test_an_unexpected_error_of_a_fast_path_fails_the_job(spark, synthetic_run, tmp_path, monkeypatch, job, table,
                                                         with_run_id):
    warehouse = tmp_path / "warehouse"
    shutil.copytree(synthetic_run.warehouse, warehouse)
    argv = list(synthetic_run.argv)
    argv[argv.index(f"warehouse={synthetic_run.warehouse}")] = f"warehouse={warehouse}"
    argv += ["--run-id", synthetic_run.run_id] if with_run_id else []
    opened = warehouse_reader._open

    def broken(where, name, *args):
        # Only this table: the plan and the runs rows every job reads first still work.
        if name == table:
            raise RuntimeError(f"injected: delta-rs broke reading {name}")
        return opened(where, name, *args)

    monkeypatch.setattr(warehouse_reader, "_open", broken)
    with pytest.raises(RuntimeError, match="injected"):
        job.main(argv)


def test_spark_estimates_a_frames_size_through_the_public_plan(spark):
    from jobs.driver_inputs import estimated_bytes

    # Spark sizes a range by its rows (8 bytes a long), printed to a tenth of its unit.
    assert estimated_bytes(spark.range(1000)) == pytest.approx(8000, rel=0.01)
    assert estimated_bytes(spark.range(20_000_000)) == pytest.approx(160_000_000, rel=0.01)
    assert estimated_bytes(spark.createDataFrame([(1,)], "x long").selectExpr("x + 1 AS y")) > 0


def test_the_start_of_job_reads_count_their_fallback_to_spark(spark, synthetic_run, tmp_path, monkeypatch):
    """The plan and the ``running`` rows every job reads first take Spark for the same named
    reasons as a stage's inputs, and say so in the job's ``runs`` counts."""
    warehouse = tmp_path / "warehouse"
    shutil.copytree(synthetic_run.warehouse, warehouse)
    argv = list(synthetic_run.argv)
    argv[argv.index(f"warehouse={synthetic_run.warehouse}")] = f"warehouse={warehouse}"
    opened = warehouse_reader._open

    def unreadable(where, name, *args):
        if name in ("plans", "runs"):
            raise warehouse_reader.StoreUnreadable(f"injected: no client for {name}")
        return opened(where, name, *args)

    monkeypatch.setattr(warehouse_reader, "_open", unreadable)
    assert topk.main([*argv, "--run-id", synthetic_run.run_id]) == 0
    monkeypatch.undo()
    rows = warehouse_reader.read_table(warehouse, "runs", equal={"job": "topk"}).to_pylist()
    counts = dict(max(rows, key=lambda r: r["started_at"])["counts"])
    # Two start-of-job reads: the abandoned-runs check (runs) and the run's plan (plans).
    assert counts["driver_fallback_store_unreadable"] == 2
