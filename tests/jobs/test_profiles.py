"""The ``profiles`` job on the shared embedded synthetic catalog (see ``test_embed``): the stored
profiles are checked against numpy computations on the tables read back."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest

from tests.jobs.test_embed import (
    LATE_USER, LVLM, ONLY_BAD_IMAGE_USER, embedded_catalog, last_run_counts, stacked,
)

pytestmark = [pytest.mark.spark, pytest.mark.slow]

BASE = ["title", "text", "visual", LVLM]
HALF_LIFE_DAYS = 30.0


@dataclass
class Profiled:
    plain: pd.DataFrame  # user_profiles rows of run "plain"
    recency: pd.DataFrame  # user_profiles rows of the recency-weighted run (its own run id)
    counts: dict[str, int]
    train: pd.DataFrame  # user_id, item_id, ts of the train split
    users: set[str]  # every user of the dataset
    vectors: pd.DataFrame  # item_embeddings of the dataset


@pytest.fixture(scope="module")
def profiled(spark, tmp_path_factory) -> Profiled:
    from jobs import profiles, tables

    catalog = embedded_catalog(spark, tmp_path_factory)
    wh = catalog.warehouse
    assert profiles.main(catalog.argv + ["--run-id", "plain"]) == 0
    counts = last_run_counts(spark, wh, "profiles")
    assert profiles.main(catalog.argv + ["--set", f"experiment.profiles.half_life_days={HALF_LIFE_DAYS}",
                                         "--set", "experiment.representations=[title]"]) == 0
    runs = tables.read(spark, wh, "runs").filter("job = 'profiles'").orderBy("started_at").toPandas()
    own_run_id = runs.iloc[-1]["run_id"]
    stored = tables.read(spark, wh, "user_profiles").toPandas()
    interactions = tables.read(spark, wh, "interactions").filter("dataset = 'synthetic'").toPandas()
    vectors = tables.read(spark, wh, "item_embeddings").filter("dataset = 'synthetic'").toPandas()
    return Profiled(
        plain=stored[stored["run_id"] == "plain"],
        recency=stored[stored["run_id"] == own_run_id],
        counts=counts,
        train=interactions[interactions["split"] == "train"][["user_id", "item_id", "ts"]],
        users=set(interactions["user_id"]),
        vectors=vectors,
    )


def expected_profiles(p: Profiled, representation: str, half_life_days: float | None = None):
    """{user: (profile, n_history)} computed with plain numpy from the tables."""
    vectors = p.vectors[p.vectors["representation"] == representation].set_index("item_id")["vector"]
    out = {}
    for user, rows in p.train.groupby("user_id"):
        rows = rows[rows["item_id"].isin(vectors.index)]
        if rows.empty:
            continue
        x = np.stack([np.asarray(vectors[i], dtype=np.float64) for i in rows["item_id"]])
        weights = np.ones(len(rows))
        if half_life_days is not None:
            age_days = (rows["ts"].max() - rows["ts"].to_numpy()) / 86_400
            weights = 0.5 ** (age_days / half_life_days)
        mean = (weights[:, None] * x).sum(axis=0)
        out[user] = (mean / np.linalg.norm(mean), len(rows))
    return out


def stored(frame: pd.DataFrame, representation: str) -> pd.DataFrame:
    return frame[frame["representation"] == representation].set_index("user_id")


@pytest.mark.parametrize("representation", BASE)
def test_profiles_are_the_normalised_mean_of_the_train_item_vectors(profiled, representation):
    expected = expected_profiles(profiled, representation)
    got = stored(profiled.plain, representation)
    assert set(got.index) == set(expected)
    for user, (vector, n_history) in expected.items():
        np.testing.assert_allclose(np.asarray(got.loc[user, "vector"], dtype=np.float64), vector, atol=1e-5)
        assert got.loc[user, "n_history"] == n_history


def test_recency_weighted_profiles_under_the_jobs_own_run_id(profiled):
    expected = expected_profiles(profiled, "title", HALF_LIFE_DAYS)
    got = stored(profiled.recency, "title")
    assert set(profiled.recency["representation"]) == {"title"}
    assert set(got.index) == set(expected)
    for user, (vector, _) in expected.items():
        np.testing.assert_allclose(np.asarray(got.loc[user, "vector"], dtype=np.float64), vector, atol=1e-5)
    # Recency weighting changes the direction for users with spread-out histories.
    plain = stored(profiled.plain, "title")
    assert max(np.abs(np.asarray(got.loc[u, "vector"]) - np.asarray(plain.loc[u, "vector"])).max()
               for u in expected) > 1e-3


def test_users_without_train_or_without_a_vector_are_counted(profiled):
    counts = profiled.counts
    train_users = set(profiled.train["user_id"])
    assert LATE_USER not in train_users
    assert counts["users_without_train"] == len(profiled.users - train_users) >= 1
    assert counts["users_with_train"] == len(train_users)
    for representation in BASE + ["naive", "concat"]:
        n_profiles = len(stored(profiled.plain, representation))
        assert counts[f"profiles_{representation}"] == n_profiles
        assert counts[f"users_without_profile_{representation}"] == len(train_users) - n_profiles
    # Their only train item has a truncated image: a title profile, no visual or fused one.
    assert ONLY_BAD_IMAGE_USER in stored(profiled.plain, "title").index
    assert ONLY_BAD_IMAGE_USER not in stored(profiled.plain, "visual").index
    assert ONLY_BAD_IMAGE_USER not in stored(profiled.plain, "naive").index
    assert counts["users_without_profile_visual"] >= 1
    visual_items = set(profiled.vectors.loc[profiled.vectors["representation"] == "visual", "item_id"])
    assert counts["history_rows_without_vector_visual"] == int((~profiled.train["item_id"].isin(visual_items)).sum())


@pytest.mark.parametrize("method", ["naive", "concat"])
def test_fused_profiles_are_the_fusion_of_the_per_modality_profiles(profiled, method):
    from udfs.fusion.fusion import fuse

    title, visual = stored(profiled.plain, "title"), stored(profiled.plain, "visual")
    fused = stored(profiled.plain, method)
    users = sorted(set(title.index) & set(visual.index))
    assert sorted(fused.index) == users
    expected = fuse(method, {"title": stacked(title.loc[users]), "visual": stacked(visual.loc[users])})
    np.testing.assert_allclose(stacked(fused.loc[users]), expected, atol=1e-5)
    assert (fused.loc[users, "n_history"]
            == np.minimum(title.loc[users, "n_history"], visual.loc[users, "n_history"])).all()
    # Not the profile of the fused item vectors, which reweights the modalities per user.
    of_fused_items = expected_profiles(profiled, method)
    gaps = [np.abs(np.asarray(fused.loc[u, "vector"]) - of_fused_items[u][0]).max() for u in users]
    assert max(gaps) > 1e-3


# --- the driver path against the Spark path ---------------------------------------------------
# The catalog is small, so the default settings compute on the driver (jobs.driver_inputs);
# ``spark.driver_compute_mb=0`` forces the distributed path. Both must agree on everything.

SPARK_PATH = ["--set", "spark.driver_compute_mb=0"]
# A recency-weighted run (timestamps read by delta-rs), two fusions, and a trained fusion that
# ``fuse`` never wrote: a representation without any row.
EQUIVALENCE = ["--set", f"experiment.profiles.half_life_days={HALF_LIFE_DAYS}",
               "--set", f"experiment.representations=[title,visual,{LVLM},naive,concat:title+{LVLM},attention]"]


def printed_results(out: str, run_id: str) -> list[str]:
    """The job's printed lines with its own run id and the path's markers taken out."""
    lines = []
    for line in out.replace(run_id, "<run>").splitlines():
        if line.startswith("{"):
            printed = json.loads(line)
            printed["counts"].pop("computed_on_driver", None)
            printed["counts"].pop("driver_fallback_disabled", None)
            line = json.dumps(printed, sort_keys=True)
        lines.append(re.sub(r" ?(computed_on_driver|driver_fallback_disabled)=1\b", "", line).rstrip())
    return lines


def run_both(spark, capsys, caplog, argv: list[str], label: str = "paths") -> dict[str, tuple]:
    """Per path: (exit code, the run's counts, printed lines, the job's warnings and errors); the
    profiles are keyed by run id ``<label>-<path>``."""
    from jobs import tables

    results = {}
    for path, extra in (("spark", SPARK_PATH), ("driver", [])):
        capsys.readouterr()
        caplog.clear()
        code = profiles_main(argv + extra + ["--run-id", f"{label}-{path}"])
        captured = capsys.readouterr()
        warned = [r.getMessage() for r in caplog.records if r.name == "jobs.profiles" and r.levelname == "WARNING"]
        runs = tables.read(spark, warehouse_of(argv), "runs").filter("job = 'profiles'").orderBy("started_at")
        last = runs.toPandas().iloc[-1]
        results[path] = (code, dict(last["counts"]), printed_results(captured.out, last["run_id"]),
                         warned + printed_results(captured.err, last["run_id"]))
    return results


def profiles_main(argv):
    from jobs import profiles

    return profiles.main(argv)


def warehouse_of(argv: list[str]) -> str:
    return [a.split("=", 1)[1] for a in argv if a.startswith("warehouse=")][-1]


def test_the_driver_path_writes_what_the_spark_path_writes(spark, capsys, caplog, tmp_path_factory):
    from jobs import tables

    catalog = embedded_catalog(spark, tmp_path_factory)
    results = run_both(spark, capsys, caplog, catalog.argv + EQUIVALENCE)
    (spark_code, spark_counts, spark_out, spark_warnings) = results["spark"]
    (driver_code, driver_counts, driver_out, driver_warnings) = results["driver"]
    assert spark_code == driver_code == 0
    assert "computed_on_driver" not in spark_counts and driver_counts.pop("computed_on_driver") == 1
    assert spark_counts.pop("driver_fallback_disabled") == 1  # the Spark path, chosen by the setting
    assert driver_counts == spark_counts
    assert spark_counts["profiles_attention"] == 0 and spark_counts["users_without_train"] >= 1
    assert driver_out == spark_out and driver_warnings == spark_warnings
    assert any("attention" in w for w in spark_warnings)

    stored = tables.read(spark, catalog.warehouse, "user_profiles").toPandas()
    by_path = {path: stored[stored["run_id"] == f"paths-{path}"].drop(columns="run_id")
               .sort_values(["representation", "user_id"]).reset_index(drop=True) for path in ("spark", "driver")}
    assert len(by_path["spark"]) == spark_counts["rows_written"] > 0
    pd.testing.assert_frame_equal(by_path["driver"].drop(columns="vector"), by_path["spark"].drop(columns="vector"))
    np.testing.assert_allclose(stacked_rows(by_path["driver"]), stacked_rows(by_path["spark"]), atol=1e-6, rtol=0)
    assert set(by_path["driver"]["representation"]) == {"title", "visual", LVLM, "naive", f"concat:{LVLM}+title"}


def stacked_rows(frame: pd.DataFrame) -> np.ndarray:
    return np.concatenate([np.asarray(v, dtype=np.float64) for v in frame["vector"]])


def mixed_ingest_copy(spark, catalog, root) -> list[str]:
    """A copy of the catalog's warehouse whose interactions another ingest wrote (what an ingest
    killed between its two commits leaves)."""
    import shutil

    from pyspark.sql import functions as F

    from jobs import tables

    wh = root / "warehouse"
    shutil.copytree(catalog.warehouse, wh)
    interactions = tables.read(spark, wh, "interactions").filter(F.col("dataset") == "synthetic")
    tables.replace_slice(spark, wh, "interactions", interactions.withColumn("ingest_id", F.lit("ingest-later-000000")),
                         {"dataset": "synthetic"})
    return ["--set", f"warehouse={wh}"]


@pytest.mark.parametrize("case", ["mixed_ingest", "no_train"])
def test_both_paths_refuse_the_same_inputs_with_the_same_error(spark, capsys, caplog, tmp_path, tmp_path_factory, case):
    catalog = embedded_catalog(spark, tmp_path_factory)
    # Another dataset of the same warehouse: no interaction at all (one stale item vector).
    extra = mixed_ingest_copy(spark, catalog, tmp_path) if case == "mixed_ingest" else ["--set", "dataset.name=other"]
    results = run_both(spark, capsys, caplog, catalog.argv + extra, label=case.replace("_", "-"))
    (spark_code, spark_counts, spark_out, spark_err) = results["spark"]
    (driver_code, driver_counts, driver_out, driver_err) = results["driver"]
    assert spark_code == driver_code == 1
    assert driver_counts.pop("computed_on_driver") == 1 and spark_counts.pop("driver_fallback_disabled") == 1
    assert driver_counts == spark_counts
    assert driver_out == spark_out and driver_err == spark_err
    expected = "ingest-later-000000" if case == "mixed_ingest" else "has no train interactions"
    assert any(expected in line and "nothing usable" in line for line in spark_err)


# A plan with ``als`` keeps the driver path: only the fit is Spark ML's (on the same Spark frame
# of the train split on both paths, so the same factors to the bit).
WITH_ALS = ["--set", f"experiment.representations=[title,{LVLM},naive,als]",
            "--set", "experiment.profiles.als.rank=4", "--set", "experiment.profiles.als.max_iter=3"]


def test_a_plan_with_als_computes_on_the_driver_and_writes_what_the_spark_path_writes(
        spark, capsys, tmp_path, tmp_path_factory):
    import shutil

    from jobs import tables

    catalog = embedded_catalog(spark, tmp_path_factory)
    # A copy: the als item factors must not reach the session's shared warehouse.
    wh = tmp_path / "warehouse"
    shutil.copytree(catalog.warehouse, wh)
    argv = catalog.argv + ["--set", f"warehouse={wh}", *WITH_ALS]
    counts, factors = {}, {}
    for path, extra in (("spark", SPARK_PATH), ("driver", [])):
        assert profiles_main(argv + extra + ["--run-id", f"als-{path}"]) == 0
        capsys.readouterr()
        runs = tables.read(spark, wh, "runs").filter("job = 'profiles'").orderBy("started_at").toPandas()
        counts[path] = {k: v for k, v in runs.iloc[-1]["counts"].items()
                        if not k.startswith(("ms_", "driver_fallback_"))}
        items = tables.read(spark, wh, "item_embeddings").filter("representation = 'als'").toPandas()
        assert set(items["encoder"]) == {f"spark-ml-als:als-{path}"}
        factors[path] = items.drop(columns="encoder").sort_values("item_id").reset_index(drop=True)

    assert "computed_on_driver" not in counts["spark"] and counts["driver"].pop("computed_on_driver") == 1
    assert counts["driver"] == counts["spark"]
    assert counts["spark"]["profiles_als"] == counts["spark"]["users_with_train"] > 0
    catalog_items = tables.read(spark, wh, "items").filter("dataset = 'synthetic'").select("item_id").distinct()
    assert len(factors["spark"]) >= catalog_items.count()  # every catalog item has a row
    pd.testing.assert_frame_equal(factors["driver"].drop(columns="vector"), factors["spark"].drop(columns="vector"))
    assert all(np.array_equal(a, b) for a, b in zip(factors["driver"]["vector"], factors["spark"]["vector"]))

    stored = tables.read(spark, wh, "user_profiles").toPandas()
    by_path = {path: stored[stored["run_id"] == f"als-{path}"].drop(columns="run_id")
               .sort_values(["representation", "user_id"]).reset_index(drop=True) for path in ("spark", "driver")}
    assert set(by_path["driver"]["representation"]) == {"title", "visual", LVLM, "naive", "als"}
    pd.testing.assert_frame_equal(by_path["driver"].drop(columns="vector"), by_path["spark"].drop(columns="vector"))
    als = by_path["driver"]["representation"] == "als"
    np.testing.assert_allclose(stacked_rows(by_path["driver"][~als]), stacked_rows(by_path["spark"][~als]),
                               atol=1e-6, rtol=0)
    assert all(np.array_equal(a, b) for a, b in zip(by_path["driver"][als]["vector"], by_path["spark"][als]["vector"]))
