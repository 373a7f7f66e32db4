"""The ``als`` reference through the jobs: trained by ``profiles`` on the train split only,
ranked by ``topk`` by dot product through the shared blockwise top-k over the same candidates
and seen-item rule as every representation."""
from __future__ import annotations

import json

import numpy as np
import pytest

from jobs import profiles, tables, topk
from tests.jobs.test_topk import make_dataset, recommendation_lists, write_dataset

pytestmark = [pytest.mark.spark, pytest.mark.slow]

COLD = "i999"  # in the catalog, never interacted with: no factor


def write_items(spark, warehouse, data) -> None:
    rows = [(data.name, item, item, None, None, None, None, None) for item in [*data.items, COLD]]
    tables.replace_slice(spark, warehouse, "items", spark.createDataFrame(rows, tables.SCHEMAS["items"]),
                         {"dataset": data.name})


def run(job, spark, warehouse, run_id, capsys, *extra, code=0):
    argv = ["--set", f"warehouse={warehouse}", "--set", "dataset.name=rand", "--set", "log_level=WARNING",
            "--set", "experiment.representations=[als]", "--set", "experiment.profiles.als.rank=6",
            "--set", "experiment.profiles.als.max_iter=5", "--set", "experiment.topk.baselines=[popularity]",
            "--set", "experiment.evaluate.ks=[5]", "--run-id", run_id, *extra]
    assert (job.main(argv, spark=spark) if job is topk else job.main(argv)) == code
    out = capsys.readouterr()
    return (json.loads(out.out.strip().splitlines()[-1])["counts"] if code == 0 else None), out.err


def als_rows(spark, warehouse, table, key, run_id=None):
    frame = tables.read(spark, warehouse, table).filter("representation = 'als'")
    if run_id:
        frame = frame.filter(f"run_id = '{run_id}'")
    return {r[key]: r for r in frame.collect()}


def test_als_trains_on_train_only_and_ranks_by_dot_over_the_shared_candidates(spark, tmp_path, capsys):
    data = make_dataset(seed=11)
    warehouse = tmp_path / "warehouse"
    write_dataset(spark, warehouse, data, "other")
    write_items(spark, warehouse, data)
    counts, _ = run(profiles, spark, warehouse, "run-a", capsys)

    items = als_rows(spark, warehouse, "item_embeddings", "item_id")
    warm = set(data.train_counts())
    assert set(items) == {*data.items, COLD}  # every catalog item: als never shrinks the common set
    assert counts["items_without_factor_als"] == len(items) - len(warm) >= 1
    for item, row in items.items():
        assert row.encoder == "spark-ml-als:run-a" and row.dim == 6 and len(row.vector) == 6
        assert (not any(row.vector)) == (item not in warm), item  # zeros exactly where no train row
    norms = [np.linalg.norm(r.vector) for i, r in items.items() if i in warm]
    assert np.ptp(norms) > 1e-3  # factors, not normalised vectors
    users = als_rows(spark, warehouse, "user_profiles", "user_id", "run-a")
    train_rows = {}
    for _, user, _, _, _, split in data.interactions:
        train_rows[user] = train_rows.get(user, 0) + (split == "train")
    assert {u: r.n_history for u, r in users.items()} == {u: n for u, n in train_rows.items() if n}
    assert counts["users_without_profile_als"] == 0

    k, exclude = 5, ("train", "valid")
    counts, _ = run(topk, spark, warehouse, "run-a", capsys, "--user-block", "16", "--item-block", "9")
    assert counts["candidates_als"] == counts["candidates_popularity"] == len(items)
    got = recommendation_lists(spark, warehouse, "run-a")["als"]
    ids = sorted(items)
    matrix = np.stack([np.asarray(items[i].vector, np.float32) for i in ids])
    for user, row in users.items():
        scores = matrix @ np.asarray(row.vector, np.float32)  # dot, not cosine
        seen = data.seen(user, exclude)
        ranked = sorted((-float(s), i) for i, s in zip(ids, scores) if i not in seen)[:k]
        assert [i for i, _ in got[user]] == [i for _, i in ranked], user
        np.testing.assert_allclose([s for _, s in got[user]], [-s for s, _ in ranked], rtol=1e-5, atol=1e-6)

    # Other test labels (a test item moved, another dropped) leave every factor as it was: the
    # test split is never read; the same seed gives the same factors to the bit.
    moved = [(*row[:2], data.items[-1] if row[5] == "test" else row[2], *row[3:]) for row in data.interactions
             if not (row[5] == "test" and row[1] == data.users[0])]
    data.interactions = moved
    write_dataset(spark, warehouse, data, "other")
    run(profiles, spark, warehouse, "run-b", capsys)
    again = als_rows(spark, warehouse, "item_embeddings", "item_id")
    assert all(np.array_equal(again[i].vector, items[i].vector) for i in items)
    again_users = als_rows(spark, warehouse, "user_profiles", "user_id", "run-b")
    assert all(np.array_equal(again_users[u].vector, users[u].vector) for u in users)

    # run-b's profiles replaced the dataset's item factors: ranking run-a now would pair its
    # user factors with another fit's item factors, so topk refuses and names the fix.
    _, err = run(topk, spark, warehouse, "run-a", capsys, code=1)
    assert "spark-ml-als:run-b" in err and "vlm4rec profiles --run-id run-a" in err
