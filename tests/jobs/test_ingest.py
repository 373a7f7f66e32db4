"""The ingest job end to end: real MovieLens, the synthetic data, idempotency, the runs table."""
from __future__ import annotations

import contextlib
import json
import os
import threading

import pytest
import yaml
from pyspark.sql import functions as F

from jobs import ingest

pytestmark = pytest.mark.spark


def table(spark, wh, name):
    return spark.read.format("delta").load(f"{wh}/{name}")


def snapshot(spark, wh, name, key):
    # ingest_id is the writing run's id: a rerun's rows differ there and nowhere else.
    return sorted(tuple(r) for r in table(spark, wh, name).drop("attrs", "ingest_id").orderBy(*key).collect())


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


# --- image files that must not be read, or not read whole ----------------------------------

MARKER = "MARKER-9d4e-secret-file-content"


def _hostile_catalog(tmp_path):
    """A csv dataset whose image paths are a good JPEG and PNG, an oversized (sparse) file, a
    FIFO, a symlink out of the root, a ``../`` path and ``/dev/zero``; the file outside the root
    holds ``MARKER``."""
    from PIL import Image

    root, outside = tmp_path / "shop", tmp_path / "outside"
    (root / "img").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret.jpg").write_text(f"{MARKER}\n" * 20)
    Image.new("RGB", (16, 12), (200, 10, 10)).save(root / "img" / "good1.jpg")
    Image.new("RGB", (16, 12), (10, 200, 10)).save(root / "img" / "good2.png")
    Image.new("RGB", (16, 12), (10, 10, 200)).save(root / "img" / "big.jpg")
    os.truncate(root / "img" / "big.jpg", 8 << 20)  # sparse: cheap to make, refused by its size
    os.mkfifo(root / "img" / "pipe.jpg")
    (root / "img" / "link.jpg").symlink_to(outside / "secret.jpg")
    images = {"good1": "img/good1.jpg", "good2": "img/good2.png", "big": "img/big.jpg", "fifo": "img/pipe.jpg",
              "link": "img/link.jpg", "dotdot": "../outside/secret.jpg", "zero": "/dev/zero"}
    (root / "items.csv").write_text("item_id,title,image_path\n"
                                    + "".join(f"{i},Item {i},{p}\n" for i, p in images.items()))
    rows = [f"u{u},{i},{100 * u + n}" for u in range(3) for n, i in enumerate(images)]
    (root / "interactions.csv").write_text("user_id,item_id,timestamp\n" + "\n".join(rows) + "\n")
    return root, root / "img" / "pipe.jpg", len(rows)


def _ingest(tmp_path, warehouse, name, root, *extra):
    conf = tmp_path / f"{name}.yaml"
    conf.write_text(yaml.safe_dump({"dataset": {
        "name": name, "adapter": "csv", "paths": {"root": str(root)},
        "options": {"image": "image_path"}, "split": {"protocol": "leave_one_out"}}}))
    return ingest.main(["--conf", str(conf), "--set", f"warehouse={warehouse}", "--set", "log_level=WARNING",
                        "--set", "dataset.images.max_bytes=1048576", *extra])


@contextlib.contextmanager
def _fifo_hang_guard(fifo):
    """If a reader ever blocks on the FIFO, a writer opening and closing it after a long wait
    gives that reader EOF: the test then fails on its reasons instead of hanging the run."""
    def unblock():
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass  # no reader waiting (ENXIO): nothing hangs

    timer = threading.Timer(300, unblock)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def test_hostile_image_paths_become_rejects_without_reading_or_quoting_them(spark, warehouse, tmp_path):
    root, fifo, n_interactions = _hostile_catalog(tmp_path)
    with _fifo_hang_guard(fifo):
        assert _ingest(tmp_path, warehouse, "hostile", root) == 0
    items = {r.item_id: r for r in table(spark, warehouse, "items").filter("dataset = 'hostile'").collect()}
    assert set(items) == {"good1", "good2", "big", "fifo", "link", "dotdot", "zero"}  # every item kept
    assert {i for i, r in items.items() if r.image_sha256} == {"good1", "good2"}
    assert table(spark, warehouse, "interactions").filter("dataset = 'hostile'").count() == n_interactions
    rejects = table(spark, warehouse, "rejects").filter("dataset = 'hostile'")
    reasons = {r.row: r.reason for r in rejects.collect()}
    assert set(reasons) == {f"item_id={i}" for i in ("big", "fifo", "link", "dotdot", "zero")}
    assert "8,388,608 bytes, above dataset.images.max_bytes=1,048,576" in reasons["item_id=big"]
    assert "is a FIFO (named pipe): only regular files are read" in reasons["item_id=fifo"]
    for item in ("link", "dotdot", "zero"):
        reason = reasons[f"item_id={item}"]
        assert "outside the dataset's images root" in reason and "dataset.images.allow_outside_root" in reason
        assert "the item is kept without an image" in reason
    assert MARKER not in json.dumps([r.asDict() for r in rejects.collect()], default=str)

    # Allowed outside the root, the files are read (and still never quoted); /dev/zero is refused
    # as a device, not read until memory runs out.
    with _fifo_hang_guard(fifo):
        assert _ingest(tmp_path, warehouse, "hostile_open", root,
                       "--set", "dataset.images.allow_outside_root=true") == 0
    rejects = table(spark, warehouse, "rejects").filter("dataset = 'hostile_open'")
    reasons = {r.row: r.reason for r in rejects.collect()}
    assert set(reasons) == {f"item_id={i}" for i in ("big", "fifo", "link", "dotdot", "zero")}
    assert "is a character device: only regular files are read" in reasons["item_id=zero"]
    for item in ("link", "dotdot"):
        assert "not an image format Pillow can read" in reasons[f"item_id={item}"]
    assert MARKER not in json.dumps([r.asDict() for r in rejects.collect()], default=str)


def test_image_settings_are_checked_by_the_config(spark, warehouse, tmp_path, capsys):
    root, _, _ = _hostile_catalog(tmp_path)
    assert _ingest(tmp_path, warehouse, "bad_limits", root, "--set", "dataset.images.max_bytes=0") == 2
    assert "dataset.images.max_bytes" in capsys.readouterr().err
    assert _ingest(tmp_path, warehouse, "bad_limits", root, "--set", "dataset.images.max_byte=5") == 2
    assert "did you mean 'max_bytes'" in capsys.readouterr().err


def test_rows_committed_from_the_driver_are_the_rows_spark_commits(spark, tmp_path, synthetic_data, capsys):
    """A small export's rows are collected and committed by delta-rs on a local master; with the
    driver paths off (``spark.driver_compute_mb=0``) Spark commits them: the same tables, rejects
    included, and the same counts."""
    import shutil

    from deltalake import DeltaTable

    root = tmp_path / "data"
    shutil.copytree(synthetic_data, root)
    first = (root / "items.csv").read_text().splitlines()[1]
    with open(root / "items.csv", "a") as f:
        f.write(first + "\n")  # a duplicate item id
    with open(root / "interactions.csv", "a") as f:
        f.write("u-x,no-such-item,5,1000\nu-y,i00001,5\n")  # an unknown item, a short record
    results = {}
    for name, mb in (("driver", 64), ("spark", 0)):
        wh = tmp_path / name
        assert ingest.main(["--conf", "datasets/synthetic.yaml", "--set", f"warehouse={wh}",
                            "--set", f"dataset.paths.root={root}", "--set", f"spark.driver_compute_mb={mb}"]) == 0
        counts = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["counts"]
        # The path and why it was taken aside, the same counts.
        assert counts.pop("driver_fallback_disabled", 0) == (name == "spark")
        results[name] = ({k: v for k, v in counts.items() if not k.startswith("ms_")},
                         snapshot(spark, wh, "items", ["item_id"]),
                         snapshot(spark, wh, "interactions", ["user_id", "item_id", "ts"]),
                         snapshot(spark, wh, "rejects", ["source", "row"]))
        for table_name in ("items", "interactions", "rejects"):
            engine = DeltaTable(str(wh / table_name)).history(1)[0]["engineInfo"]
            assert engine.startswith("delta-rs") == (name == "driver"), (table_name, engine)
    assert results["driver"] == results["spark"]
    assert results["driver"][0]["rejected"] == 3 and len(results["driver"][3]) == 3


def test_only_inputs_spark_sizes_within_the_limit_are_collected(spark, tmp_path):
    from jobs.config import load_config
    from jobs.driver_inputs import fits_on_driver
    from jobs.job_run import JobRun

    run = JobRun("ingest", load_config([], [f"warehouse={tmp_path}", "spark.driver_compute_mb=64"]), spark)
    small, large = spark.range(1000), spark.range(20_000_000)  # Spark estimates 8 kB and 160 MB
    assert fits_on_driver(run, small, small)
    assert not fits_on_driver(run, small, large)
    assert not fits_on_driver(JobRun("ingest", load_config([], [f"warehouse={tmp_path}", "spark.driver_compute_mb=0"]),
                                     spark), small)
