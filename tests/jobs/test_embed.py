"""The ``embed`` job on the tiny synthetic catalog: real Spark + Delta, real MiniLM, real
EfficientNet-Lite0.

One catalog is ingested and embedded once per test session (``embedded_catalog``, shared with
``test_profiles``): run A without a ``descriptions`` table, then descriptions written, run B,
then run C on the same inputs. Three items are damaged before ingest: one has no title, one no
description text, one a truncated image file.
"""
from __future__ import annotations

import csv
import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytestmark = [pytest.mark.spark, pytest.mark.slow]

LVLM = "lvlm:tags:efficientnet-lite0:p-test"
REPRESENTATIONS = ["title", "text", "visual", "naive", "concat", LVLM]
NO_TITLE, NO_TEXT, BAD_IMAGE = "i00001", "i00002", "i00003"
# Descriptions written before run B: ok, failed, ok-but-blank; the rest have none.
DESCRIBED = [f"i{n:05d}" for n in range(4, 44)]
FAILED = [f"i{n:05d}" for n in range(44, 49)]
BLANK = "i00049"
# Users added to the synthetic interactions: one whose only early (train) item is the item with
# the broken image, one whose only interaction comes after every other (no train row).
ONLY_BAD_IMAGE_USER, LATE_USER = "u_bad_image", "u_late"


@dataclass
class Catalog:
    warehouse: Path
    data: Path
    argv: list[str]
    counts: dict[str, dict[str, int]]  # run label -> the run's counts from the runs table
    snapshots: dict[str, pd.DataFrame]  # run label -> item_embeddings after it


_SHARED: dict[str, Catalog] = {}


def job_argv(warehouse: Path, data: Path) -> list[str]:
    return ["--conf", "datasets/synthetic.yaml", "--set", f"warehouse={warehouse}",
            "--set", f"dataset.paths.root={data}", "--set", "spark.master=local[2]",
            "--set", "log_level=WARNING",
            # A global time cut leaves the late user without any train interaction.
            "--set", "dataset.split.protocol=global_time",
            "--set", f"experiment.representations=[{','.join(REPRESENTATIONS)}]"]


def last_run_counts(spark, warehouse: Path, job: str) -> dict[str, int]:
    from jobs import tables

    runs = tables.read(spark, warehouse, "runs").filter(f"job = '{job}'").orderBy("started_at").toPandas()
    assert len(runs), f"no {job} run recorded"
    last = runs.iloc[-1]
    assert last["status"] == "succeeded", last["error"]
    return dict(last["counts"])


def embeddings(spark, warehouse: Path) -> pd.DataFrame:
    from jobs import tables

    frame = tables.read(spark, warehouse, "item_embeddings").toPandas()
    return frame.sort_values(["dataset", "representation", "item_id"]).reset_index(drop=True)


def damage_catalog(data: Path) -> None:
    items_path, inter_path = data / "items.csv", data / "interactions.csv"
    with items_path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        if row["item_id"] == NO_TITLE:
            row["title"] = ""
        if row["item_id"] == NO_TEXT:
            row["description"] = ""
    with items_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    image = data / "images" / f"{BAD_IMAGE}.png"
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])

    interactions = pd.read_csv(inter_path)
    first, last = int(interactions["timestamp"].min()), int(interactions["timestamp"].max())
    extra = pd.DataFrame({
        "user_id": [ONLY_BAD_IMAGE_USER] * 3 + [LATE_USER],
        "item_id": [BAD_IMAGE] * 3 + ["i00010"],
        "rating": [4, 5, 4, 5],
        "timestamp": [first, first + 60, first + 120, last + 86_400],
    })
    pd.concat([interactions, extra]).to_csv(inter_path, index=False)


def write_descriptions(spark, warehouse: Path) -> None:
    from jobs import tables

    items = tables.read(spark, warehouse, "items").toPandas().set_index("item_id")
    now = dt.datetime(2026, 1, 1)
    rows = []
    for item_id in DESCRIBED + FAILED + [BLANK]:
        attrs = items.loc[item_id, "attrs"]
        ok = item_id not in FAILED
        text = (f"A {attrs['colour']} {attrs['category']} with a {attrs['pattern']} pattern"
                if item_id != BLANK else "   ") if ok else None
        rows.append((items.loc[item_id, "image_sha256"], "tags", "efficientnet-lite0", "p-test", item_id,
                     "describe", text, 8, 1.0, "ok" if ok else "error",
                     None if ok else "RuntimeError: test failure", now))
    tables.merge(spark, warehouse, "descriptions", spark.createDataFrame(rows, tables.SCHEMAS["descriptions"]))


def stale_rows(spark, warehouse: Path) -> None:
    """One row the catalog no longer has (pruned by the next run) and one of another dataset."""
    from jobs import tables

    vector = [1.0] + [0.0] * 383
    rows = [("synthetic", "ghost", "title", "old", 384, vector, None),
            ("other", "i00004", "title", "old", 384, vector, None)]
    tables.merge(spark, warehouse, "item_embeddings",
                 spark.createDataFrame(rows, tables.SCHEMAS["item_embeddings"]))


def embedded_catalog(spark, tmp_path_factory) -> Catalog:
    """The shared catalog, built once per session (see the module docstring)."""
    if "catalog" in _SHARED:
        return _SHARED["catalog"]
    from jobs import embed, ingest
    from udfs.synth import generate

    root = tmp_path_factory.mktemp("embedded")
    data, warehouse = root / "data", root / "warehouse"
    generate(data, seed=0, n_items=60, n_users=30)
    damage_catalog(data)
    argv = job_argv(warehouse, data)
    assert ingest.main(argv) == 0
    counts, snapshots = {}, {}
    # Run A only needs the LVLM representation (and one other, to see it is still written).
    assert embed.main(argv + ["--set", f"experiment.representations=[title,{LVLM}]"]) == 0
    counts["A"], snapshots["A"] = last_run_counts(spark, warehouse, "embed"), embeddings(spark, warehouse)
    write_descriptions(spark, warehouse)
    stale_rows(spark, warehouse)
    for label in ("B", "C"):
        assert embed.main(argv) == 0
        counts[label] = last_run_counts(spark, warehouse, "embed")
        snapshots[label] = embeddings(spark, warehouse)
    _SHARED["catalog"] = Catalog(warehouse, data, argv, counts, snapshots)
    return _SHARED["catalog"]


@pytest.fixture(scope="module")
def catalog(spark, tmp_path_factory) -> Catalog:
    return embedded_catalog(spark, tmp_path_factory)


def synthetic(frame: pd.DataFrame, representation: str) -> pd.DataFrame:
    rows = frame[(frame["dataset"] == "synthetic") & (frame["representation"] == representation)]
    return rows.set_index("item_id")


def stacked(frame: pd.DataFrame) -> np.ndarray:
    return np.stack([np.asarray(v, dtype=np.float64) for v in frame["vector"]])


@pytest.mark.parametrize("representation, dim", [
    ("title", 384), ("text", 384), (LVLM, 384), ("visual", 1280), ("naive", 384 + 1280),
    ("concat", 384 + 1280),
])
def test_vectors_are_unit_norm_with_the_encoders_dimension(catalog, representation, dim):
    rows = synthetic(catalog.snapshots["C"], representation)
    assert len(rows) > 0
    assert (rows["dim"] == dim).all()
    vectors = stacked(rows)
    assert vectors.shape == (len(rows), dim)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_items_without_an_input_are_skipped_and_counted(catalog):
    final, counts = catalog.snapshots["C"], catalog.counts["C"]
    items = {f"i{n:05d}" for n in range(1, 61)}
    assert set(synthetic(final, "title").index) == items - {NO_TITLE}
    assert set(synthetic(final, "text").index) == items - {NO_TEXT}
    assert set(synthetic(final, "visual").index) == items - {BAD_IMAGE}
    assert set(synthetic(final, "naive").index) == items - {NO_TITLE, BAD_IMAGE}
    assert counts["items_read"] == 60
    assert counts["skipped_title_empty"] == 1
    assert counts["skipped_text_empty"] == 1
    assert counts["skipped_visual_truncated"] == 1
    assert counts["skipped_naive_missing_part"] == 2
    assert counts["written_title"] == counts["written_visual"] == 59
    assert counts["rows_written"] == len(final[final["dataset"] == "synthetic"])
    assert counts["rows_written"] + counts["rows_skipped"] == 60 * len(REPRESENTATIONS)


def test_lvlm_rows_come_from_ok_descriptions_and_the_rest_are_counted(catalog):
    counts = catalog.counts["C"]
    assert set(synthetic(catalog.snapshots["C"], LVLM).index) == set(DESCRIBED)
    assert counts[f"written_{LVLM}"] == len(DESCRIBED)
    assert counts["lvlm_failed_caption"] == len(FAILED)
    assert counts["lvlm_empty_description"] == 1
    assert counts["lvlm_no_image"] == 1  # the truncated image got no hash at ingest
    assert counts["lvlm_missing_description"] == 60 - len(DESCRIBED) - len(FAILED) - 1 - 1


def test_without_a_descriptions_table_every_lvlm_item_is_missing(catalog):
    counts = catalog.counts["A"]
    assert counts["lvlm_missing_description"] + counts["lvlm_no_image"] == 60
    assert counts[f"written_{LVLM}"] == 0
    assert synthetic(catalog.snapshots["A"], LVLM).empty
    assert counts["written_title"] == 59  # the other representation is still written


def test_text_vectors_equal_the_encoder_run_outside_spark(catalog):
    from udfs.encode.text_encoder import encode_texts

    items = pd.read_csv(catalog.data / "items.csv").set_index("item_id")
    ids = ["i00004", "i00017", "i00060"]
    for representation, column in (("title", "title"), ("text", "description")):
        expected, valid = encode_texts(items.loc[ids, column].tolist())
        assert valid.all()
        got = stacked(synthetic(catalog.snapshots["C"], representation).loc[ids])
        np.testing.assert_allclose(got, expected, atol=2e-5)


def test_visual_vectors_equal_the_image_encoder_run_outside_spark(catalog):
    from udfs.encode.image_encoder import encode_images
    from udfs.io.images import load_image

    ids = ["i00005", "i00042"]
    expected = encode_images([load_image(catalog.data / "images" / f"{i}.png") for i in ids])
    got = stacked(synthetic(catalog.snapshots["C"], "visual").loc[ids])
    np.testing.assert_allclose(got, expected, atol=2e-5)


def test_fused_item_vectors_equal_the_fusion_of_their_parts(catalog):
    from udfs.fusion.fusion import fuse

    final = catalog.snapshots["C"]
    for method in ("naive", "concat"):
        fused = synthetic(final, method)
        ids = sorted(fused.index)
        parts = {p: stacked(synthetic(final, p).loc[ids]) for p in ("title", "visual")}
        np.testing.assert_allclose(stacked(fused.loc[ids]), fuse(method, parts), atol=1e-5)


def test_rerun_gives_the_same_table(catalog):
    before, after = catalog.snapshots["B"], catalog.snapshots["C"]
    key = ["dataset", "representation", "item_id"]
    assert len(before) == len(after)
    assert before[key].equals(after[key])
    assert (before["dim"] == after["dim"]).all() and (before["encoder"] == after["encoder"]).all()
    for representation in REPRESENTATIONS:
        np.testing.assert_allclose(stacked(synthetic(after, representation)),
                                   stacked(synthetic(before, representation)), atol=1e-6)
    assert catalog.counts["C"]["stale_rows_removed"] == 0


def test_a_rerun_reuses_every_vector_whose_input_and_encoder_are_unchanged(catalog):
    a, b, c = (catalog.counts[run] for run in "ABC")
    assert not [key for key in a if key.startswith("reused_")]  # nothing stored before run A
    # Run B: the titles are those run A encoded; the other representations are new.
    assert b["reused_title"] == b["written_title"] == 59
    assert not [key for key in b if key.startswith("reused_") and key != "reused_title"]
    # Run C: nothing changed since run B.
    for representation in ("title", "text", "visual", LVLM):
        assert c[f"reused_{representation}"] == c[f"written_{representation}"] > 0
    assert c[f"reused_{LVLM}"] == len(DESCRIBED)
    final = catalog.snapshots["C"]
    for representation in ("title", "text", "visual", LVLM):
        assert synthetic(final, representation)["source_sha256"].notna().all()
    assert synthetic(final, "naive")["source_sha256"].isna().all()  # fusions are rebuilt, never reused


def test_only_the_items_whose_input_changed_are_encoded_again(spark, catalog, tmp_path):
    """An edited title (as a re-ingest of an edited catalog leaves it) is encoded again, with the
    fusions that use it; every other stored vector is reused."""
    import shutil

    from jobs import embed
    from udfs.fusion.fusion import fuse
    from udfs.encode.text_encoder import encode_texts

    warehouse = tmp_path / "warehouse"
    shutil.copytree(catalog.warehouse, warehouse)
    edited, title = "i00007", "A striped wool scarf for the winter"
    spark.sql(f"UPDATE delta.`{warehouse}/items` SET title = '{title}' "
              f"WHERE dataset = 'synthetic' AND item_id = '{edited}'")
    assert embed.main(catalog.argv + ["--set", f"warehouse={warehouse}"]) == 0
    counts = last_run_counts(spark, warehouse, "embed")
    assert counts["reused_title"] == counts["written_title"] - 1 == 58
    for representation in ("text", "visual", LVLM):
        assert counts[f"reused_{representation}"] == counts[f"written_{representation}"]

    after, before = embeddings(spark, warehouse), catalog.snapshots["C"]
    expected, valid = encode_texts([title])
    assert valid.all()
    new_title = stacked(synthetic(after, "title").loc[[edited]])
    np.testing.assert_allclose(new_title, expected, atol=2e-5)
    unchanged = sorted(set(synthetic(after, "title").index) - {edited})
    np.testing.assert_array_equal(stacked(synthetic(after, "title").loc[unchanged]),
                                  stacked(synthetic(before, "title").loc[unchanged]))
    visual = stacked(synthetic(after, "visual").loc[[edited]])
    np.testing.assert_allclose(stacked(synthetic(after, "naive").loc[[edited]]),
                               fuse("naive", {"title": new_title, "visual": visual}), atol=1e-5)


def test_reuse_can_be_turned_off(spark, catalog, tmp_path):
    import shutil

    from jobs import embed

    warehouse = tmp_path / "warehouse"
    shutil.copytree(catalog.warehouse, warehouse)
    argv = catalog.argv + ["--set", f"warehouse={warehouse}",
                           "--set", "experiment.representations=[title]",
                           "--set", "experiment.embed.reuse_vectors=false"]
    assert embed.main(argv) == 0
    counts = last_run_counts(spark, warehouse, "embed")
    assert counts["written_title"] == 59 and "reused_title" not in counts
    assert embed.main(argv[:-2] + ["--set", "experiment.embed.reuse_vectors='no'"]) == 2


def test_a_table_written_before_the_input_hash_gets_the_column(spark, tmp_path):
    """A warehouse from an older version: its rows are kept, the new column is null in them (so
    none of them is reused), and writes go on."""
    from pyspark.sql import types as T

    from jobs import tables

    path = tmp_path / "warehouse" / "item_embeddings"
    old = T.StructType([f for f in tables.SCHEMAS["item_embeddings"].fields if f.name != "source_sha256"])
    spark.createDataFrame([("d", "i1", "title", "old", 2, [1.0, 0.0])], old) \
        .write.format("delta").save(str(path))
    tables.ensure(spark, tmp_path / "warehouse", "item_embeddings")
    table = tables.read(spark, tmp_path / "warehouse", "item_embeddings")
    assert table.columns == tables.SCHEMAS["item_embeddings"].fieldNames()
    assert [tuple(r) for r in table.select("item_id", "source_sha256").collect()] == [("i1", None)]


def test_rows_the_catalog_no_longer_has_are_removed_and_other_datasets_kept(catalog):
    after = catalog.snapshots["B"]
    assert "ghost" not in set(after["item_id"])
    assert catalog.counts["B"]["stale_rows_removed"] == 1
    other = after[after["dataset"] == "other"]
    assert list(other["item_id"]) == ["i00004"] and list(other["encoder"]) == ["old"]


def test_encoders_and_library_versions_are_recorded(catalog):
    keys = catalog.counts["C"]
    text = [k for k in keys if k.startswith("text_encoder:all-MiniLM-L6-v2,")]
    image = [k for k in keys if k.startswith("image_encoder:efficientnet-lite0,")]
    assert len(text) == 1 and "sentence-transformers:" in text[0] and "torch:" in text[0]
    assert keys[text[0]] == 384
    assert len(image) == 1 and keys[image[0]] == 1280
    final = catalog.snapshots["C"]
    assert set(synthetic(final, "title")["encoder"]) == {"all-MiniLM-L6-v2"}
    assert set(synthetic(final, "naive")["encoder"]) == {
        "naive[title=all-MiniLM-L6-v2,visual=efficientnet-lite0]"}


def plan_of(*overrides: str):
    from jobs.config import load_config
    from jobs.plan import ExperimentPlan

    return ExperimentPlan.resolve(load_config(["datasets/synthetic.yaml"], list(overrides)))


def test_an_unknown_representation_is_a_config_error_naming_the_entry():
    from jobs.config import ConfigError

    with pytest.raises(ConfigError, match=r"experiment.representations.*'clip'"):
        plan_of("experiment.representations=[title, clip]")


def test_a_fusion_brings_its_parts_into_the_plan():
    from jobs.embed import planned_representations

    base, fusions = planned_representations(plan_of("experiment.representations=[concat:text+visual, naive]"))
    assert [r.name for r in base] == ["text", "visual", "title"]
    assert [r.name for r in fusions] == ["concat:text+visual", "naive"]


# A plan with a weighted concat, a trained fusion (the fuse job's, not embed's) and a baseline.
PLANNED = ["--set", "experiment.representations=[title, concat:text+visual, gating:text+visual, popularity]",
           "--set", "experiment.embed.concat_weights={text: 2}"]


def test_embed_builds_exactly_the_plan_stored_under_its_run_id_and_refuses_another(spark, catalog, tmp_path, capsys):
    import shutil

    from jobs import embed, tables
    from jobs.plan import store_plan
    from udfs.fusion.fusion import fuse

    warehouse = tmp_path / "warehouse"
    shutil.copytree(catalog.warehouse, warehouse)
    argv = catalog.argv + ["--set", f"warehouse={warehouse}", *PLANNED]
    plan = plan_of(*argv[3::2])  # the same --set overrides as the job gets
    assert plan.trained == ("gating:text+visual",) and "popularity" in plan.baselines
    store_plan(spark, str(warehouse), "run-embed", plan)
    plans_before = sorted(r.run_id for r in tables.read(spark, warehouse, "plans").collect())
    assert "run-embed" in plans_before

    assert embed.main(argv + ["--run-id", "run-embed"]) == 0
    counts = last_run_counts(spark, warehouse, "embed")
    assert sorted(k[len("written_"):] for k in counts if k.startswith("written_")) == sorted(
        ["title", "text", "visual", "concat:text+visual"])
    # It read the run's plan and stored none of its own.
    assert sorted(r.run_id for r in tables.read(spark, warehouse, "plans").collect()) == plans_before
    after = embeddings(spark, warehouse)
    assert not {"gating:text+visual", "popularity"} & set(after["representation"])
    concat = synthetic(after, "concat:text+visual")
    parts = {p: stacked(synthetic(after, p).loc[concat.index]) for p in ("text", "visual")}
    np.testing.assert_allclose(stacked(concat), fuse("concat", parts, {"text": 2.0}), atol=1e-5)

    capsys.readouterr()
    assert embed.main(argv + ["--run-id", "run-embed", "--set", "experiment.embed.concat_weights={text: 3}"]) == 2
    message = capsys.readouterr().err
    assert "experiment.embed.concat_weights" in message and "'run-embed'" in message
    assert '[["text", 3.0]]' in message and '[["text", 2.0]]' in message
    assert embed.main(argv + ["--run-id", "run-embed", "--set", "experiment.representations=[title, text]"]) == 2
    message = capsys.readouterr().err
    assert "experiment.representations" in message and '["title", "text"]' in message
    assert '["title", "concat:text+visual", "gating:text+visual"]' in message


def test_the_spark_path_writes_the_rows_and_counts_of_the_driver_path(spark, catalog, tmp_path):
    """The shared catalog's runs A, B and C took the driver path (a local master, small tables:
    ``jobs.driver_inputs``); the same runs through the executors (``spark.driver_compute_mb=0``)
    write the same rows and count the same things, reuse and stale rows included. Few rows per
    task split every step into several tasks of several buckets: each function of
    ``udfs.encode.embed_inputs`` runs on parts of the catalog there and on all of it on the driver."""
    from jobs import embed, ingest

    warehouse = tmp_path / "warehouse"
    argv = catalog.argv + ["--set", f"warehouse={warehouse}", "--set", "spark.driver_compute_mb=0",
                           "--set", "experiment.embed.rows_per_task=40"]
    assert ingest.main(argv) == 0
    assert embed.main(argv + ["--set", f"experiment.representations=[title,{LVLM}]"]) == 0
    counts, snapshots = {"A": last_run_counts(spark, warehouse, "embed")}, {"A": embeddings(spark, warehouse)}
    write_descriptions(spark, warehouse)
    stale_rows(spark, warehouse)
    for label in ("B", "C"):
        assert embed.main(argv) == 0
        counts[label], snapshots[label] = last_run_counts(spark, warehouse, "embed"), embeddings(spark, warehouse)

    key = ["dataset", "representation", "item_id", "encoder", "dim", "source_sha256"]
    for label in "ABC":
        on_driver, in_spark = catalog.counts[label], counts[label]
        assert on_driver.get("computed_on_driver") == 1 and "computed_on_driver" not in in_spark
        assert in_spark.get("driver_fallback_disabled") == 1 and "driver_fallback_disabled" not in on_driver
        drop = {"computed_on_driver", "driver_fallback_disabled"}
        assert ({k: v for k, v in on_driver.items() if not k.startswith("ms_") and k not in drop}
                == {k: v for k, v in in_spark.items() if not k.startswith("ms_") and k not in drop}), label
        driver_rows, spark_rows = catalog.snapshots[label], snapshots[label]
        assert driver_rows[key].fillna("").equals(spark_rows[key].fillna("")), label
        for representation in set(driver_rows["representation"]):
            np.testing.assert_allclose(stacked(driver_rows[driver_rows["representation"] == representation]),
                                       stacked(spark_rows[spark_rows["representation"] == representation]),
                                       atol=1e-5, err_msg=f"{label} {representation}")


def test_vectors_too_large_to_hold_take_the_spark_path(spark, catalog, tmp_path, caplog):
    """The inputs fit ``spark.driver_compute_mb`` (60 items) but the vectors to write would not
    (60 x 5,760 floats: 1.4 MB over 1 MiB): the executors encode them."""
    import logging

    from jobs import embed, ingest

    warehouse = tmp_path / "warehouse"
    argv = catalog.argv + ["--set", f"warehouse={warehouse}", "--set", "spark.driver_compute_mb=1"]
    assert ingest.main(argv) == 0
    with caplog.at_level(logging.INFO, logger="jobs.driver_inputs"):
        assert embed.main(argv) == 0
    counts = last_run_counts(spark, warehouse, "embed")
    assert "computed_on_driver" not in counts and counts["driver_fallback_too_large"] == 1
    assert "the vectors to write would hold 1382400 bytes" in caplog.text
    assert counts["written_concat"] == catalog.counts["C"]["written_concat"]
