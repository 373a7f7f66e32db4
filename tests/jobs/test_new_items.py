"""New items without a full recompute: items added to a catalog after a run are described and
encoded by the caches' incremental path when ``pipeline`` runs again, and ``recommend`` ranks
them at once."""
from __future__ import annotations

import csv
import shutil

import pytest
from PIL import Image
from pyspark.sql import functions as F

from jobs import pipeline
from udfs.recommender import Recommender
from udfs.io.warehouse_reader import read_frame

pytestmark = [pytest.mark.spark, pytest.mark.slow]


def latest(spark, warehouse, job):
    return (spark.read.format("delta").load(f"{warehouse}/runs").filter(F.col("job") == job)
            .orderBy(F.col("started_at").desc()).first())


def test_added_items_are_described_encoded_and_recommended(spark, synthetic_run, tmp_path):
    # A copy of the shared run's catalog and warehouse (the shared one stays as it is).
    data, warehouse = tmp_path / "synth", tmp_path / "warehouse"
    shutil.copytree(synthetic_run.data, data)
    shutil.copytree(synthetic_run.warehouse, warehouse)
    before = read_frame(warehouse, "recommendations", equal={"run_id": synthetic_run.run_id})
    lvlm = [r for r in before["representation"].unique() if r.startswith("lvlm:")][0]
    # The new item looks like a user's best unseen match: that item's picture with one pixel
    # changed (new bytes, so a new image to describe, with the same content).
    user, twin = before[(before["representation"] == lvlm) & (before["rank"] == 1)].sort_values(
        "user_id")[["user_id", "item_id"]].iloc[0]
    with open(data / "items.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    columns = list(rows[0])
    source = next(r for r in rows if r["item_id"] == twin)
    image = Image.open(data / source["image_path"]).convert("RGB")
    image.putpixel((0, 0), tuple(255 - c for c in image.getpixel((0, 0))))
    image.save(data / "images" / "new-twin.png")
    other = next(r for r in rows if r["item_id"] not in (twin,))
    Image.open(data / other["image_path"]).convert("RGB").rotate(90).save(data / "images" / "new-other.png")
    added = [dict(source, item_id="n00001", title=f"New {source['title']}", image_path="images/new-twin.png"),
             dict(other, item_id="n00002", title=f"New {other['title']}", image_path="images/new-other.png")]
    with open(data / "items.csv", "a", newline="") as handle:
        csv.DictWriter(handle, fieldnames=columns).writerows(added)

    argv = list(synthetic_run.argv)
    argv[argv.index(f"warehouse={synthetic_run.warehouse}")] = f"warehouse={warehouse}"
    argv[argv.index(f"dataset.paths.root={synthetic_run.data}")] = f"dataset.paths.root={data}"
    assert pipeline.main(argv) == 0

    caption = latest(spark, warehouse, "caption").counts
    assert caption["to_describe"] == 2 and caption["described"] == 2 and caption["cached"] == 30
    embed = latest(spark, warehouse, "embed").counts
    for rep in (lvlm, "title", "visual"):
        assert embed[f"written_{rep}"] == 32 and embed[f"reused_{rep}"] == 30, rep
    run_id = latest(spark, warehouse, "pipeline").run_id
    assert run_id != synthetic_run.run_id
    recommender = Recommender.load(warehouse, run_id, "lvlm")
    assert {"n00001", "n00002"} <= set(recommender.candidate_ids)
    listed = recommender.recommend(users=[user], k=10)
    assert "n00001" in set(listed.item_ids[0]), (user, twin, listed.item_ids[0])
