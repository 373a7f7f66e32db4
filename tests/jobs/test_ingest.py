"""The ingest job end to end: real MovieLens, the synthetic data, idempotency, the runs table."""
from __future__ import annotations

import json

import pytest
from pyspark.sql import functions as F

from jobs import ingest

pytestmark = pytest.mark.spark


def table(spark, wh, name):
    return spark.read.format("delta").load(f"{wh}/{name}")


def snapshot(spark, wh, name, key):
    return sorted(tuple(r) for r in table(spark, wh, name).drop("attrs").orderBy(*key).collect())


@pytest.mark.realdata
@pytest.mark.slow
def test_movielens_real_data_defects_counted_and_idempotent(spark, warehouse, ml100k, capsys):
    argv = ["--conf", "datasets/ml100k.yaml", "--set", f"warehouse={warehouse}",
            "--set", f"dataset.paths.root={ml100k}"]
    assert ingest.main(argv) == 0
    counts = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["counts"]
    assert counts["items"] == 1682
    assert counts["interactions"] == 100_000
    assert counts["items_without_poster"] == 19
    assert counts["tmdb_duplicate_ids"] == 55
    assert counts["tmdb_suspect_items"] > 0
    assert counts["items_without_image"] == counts["items_without_poster"] + counts["tmdb_suspect_items"]
    assert counts["users_with_test"] == 943

    items = table(spark, warehouse, "items")
    # Item 72 ("Mask, The") carries Pulp Fiction's overview and poster in the TMDB file.
    mask = items.filter("item_id = '72'").first()
    assert mask.text is None and mask.image_uri is None and "56" in mask.attrs["content_suspect"]
    toy = items.filter("item_id = '1'").first()
    assert toy.title == "Toy Story (1995)" and "Woody" in toy.text and len(toy.image_sha256) == 64
    assert toy.attrs["genres"] == "Animation|Children|Comedy"

    inter_before = snapshot(spark, warehouse, "interactions", ["user_id", "item_id", "ts"])
    items_before = snapshot(spark, warehouse, "items", ["item_id"])
    assert ingest.main(argv) == 0
    assert snapshot(spark, warehouse, "interactions", ["user_id", "item_id", "ts"]) == inter_before
    assert snapshot(spark, warehouse, "items", ["item_id"]) == items_before

    runs = table(spark, warehouse, "runs").filter("job = 'ingest'").collect()
    assert len(runs) == 2 and {r.status for r in runs} == {"succeeded"}
    assert all(r.finished_at >= r.started_at and r.counts["items"] == 1682 for r in runs)
    assert json.loads(runs[0].config)["dataset"]["split"]["protocol"] == "temporal_ratio"


@pytest.fixture(scope="module")
def synthetic_data(tmp_path_factory):
    from udfs.synth import generate

    root = tmp_path_factory.mktemp("synth")
    generate(root, seed=3, n_items=40, n_users=25)
    return root


def test_synthetic_csv_ingest_with_kcore(spark, warehouse, synthetic_data, capsys):
    argv = ["--conf", "datasets/synthetic.yaml", "--set", f"warehouse={warehouse}",
            "--set", f"dataset.paths.root={synthetic_data}", "--set", "dataset.kcore=3"]
    assert ingest.main(argv) == 0
    counts = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["counts"]
    inter = table(spark, warehouse, "interactions")
    per_user = inter.groupBy("user_id").count().agg(F.min("count")).first()[0]
    per_item = inter.groupBy("item_id").count().agg(F.min("count")).first()[0]
    assert per_user >= 3 and per_item >= 3
    assert counts["kcore_removed"] >= 0 and counts["interactions"] == inter.count()
    items = table(spark, warehouse, "items")
    assert items.filter(F.col("image_sha256").isNull()).count() == 0
    row = items.orderBy("item_id").first()
    assert set(row.attrs) == {"category", "colour", "pattern", "material"}
    # Leave-one-out: exactly one test interaction per eligible user, and it is their latest.
    last = inter.groupBy("user_id").agg(F.max("ts").alias("ts"))
    tests = inter.filter("split = 'test'")
    assert tests.count() == tests.select("user_id").distinct().count()
    assert tests.join(last, ["user_id", "ts"]).count() == tests.count()


def test_ingest_without_dataset_is_a_config_error(spark, warehouse, capsys):
    assert ingest.main(["--set", f"warehouse={warehouse}"]) == 2
    assert "no dataset configured" in capsys.readouterr().err


def test_cli_dispatches_to_jobs(capsys):
    from jobs.cli import main

    assert main(["--help"]) == 0
    assert "ingest" in capsys.readouterr().out
    assert main(["nope"]) == 2
