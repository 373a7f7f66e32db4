"""The evaluate job on real Spark + Delta: per-user metrics equal ``udfs.metrics`` computed in numpy
on the same lists, means and CIs agree with the per-user rows, Holm never lowers a p-value, and a
popularity ranking beats the seeded random one on skewed data."""
from __future__ import annotations

import contextlib
import io
import json
from types import SimpleNamespace

import numpy as np
import pytest
from pyspark.sql import functions as F

from jobs import evaluate, tables, topk
from tests.jobs.test_topk import make_dataset, write_dataset
from udfs import metrics as ranking
from udfs import significance

pytestmark = pytest.mark.spark

KS = [3, 5, 10]
REPRESENTATIONS = ["title", "visual", "popularity", "random"]


def run_quietly(main, argv: list[str], spark) -> str:
    """Run a job's ``main``, assert it succeeded, return what it printed."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert main(argv, spark=spark) == 0
    return buffer.getvalue()


@pytest.fixture(scope="module")
def evaluated(spark, tmp_path_factory):
    data = make_dataset(seed=11, n_users=150, n_items=40, per_user=9)
    warehouse = tmp_path_factory.mktemp("evaluate") / "warehouse"
    write_dataset(spark, warehouse, data, "run-e")
    common = ["--set", f"warehouse={warehouse}", "--set", "dataset.name=rand", "--set", "log_level=WARNING",
              "--set", "experiment.representations=[title,visual]", "--set", f"experiment.evaluate.ks={KS}",
              "--set", "experiment.evaluate.bootstrap_samples=300", "--run-id", "run-e"]
    run_quietly(topk.main, common + ["--user-block", "32", "--item-block", "16"], spark)
    printed = run_quietly(evaluate.main, common, spark)
    counts = json.loads(printed.strip().splitlines()[-1])["counts"]

    def frame(name):
        return tables.read(spark, warehouse, name).filter("run_id = 'run-e'").toPandas()

    return SimpleNamespace(data=data, counts=counts, printed=printed, warehouse=warehouse, argv=common,
                           recommendations=frame("recommendations"),
                           user_metrics=frame("user_metrics"), metrics=frame("metrics"),
                           comparisons=frame("comparisons"))


def relevant_items(data, user: str, candidates: set) -> set:
    return (data.splits["test"].get(user, set()) & candidates) - data.seen(user, ("train", "valid"))


def test_user_metrics_equal_numpy_metrics_on_the_same_lists(evaluated):
    data = evaluated.data
    candidates = set(data.common(["title", "visual"]))
    recs = evaluated.recommendations.sort_values(["representation", "user_id", "rank"])
    stored = evaluated.user_metrics.set_index(["representation", "user_id", "metric", "k"])["value"]
    checked = 0
    for rep in REPRESENTATIONS:
        lists = {u: g["item_id"].tolist() for u, g in recs[recs.representation == rep].groupby("user_id")}
        users = sorted(u for u in lists if relevant_items(data, u, candidates))
        assert users, rep
        recommended = np.full((len(users), max(KS)), "", dtype=object)
        for row, user in enumerate(users):
            recommended[row, :len(lists[user][:max(KS)])] = lists[user][:max(KS)]
        hits, n_relevant = ranking.hit_matrix(recommended, [relevant_items(data, u, candidates) for u in users])
        values = ranking.ranking_metrics(hits, n_relevant, KS)
        assert len(stored.loc[rep]) == len(users) * len(KS) * len(ranking.METRICS)
        for (metric, k), per_user in values.items():
            got = np.array([stored.loc[(rep, u, metric, k)] for u in users])
            np.testing.assert_allclose(got, per_user, rtol=0, atol=1e-12)
            checked += 1
        assert evaluated.counts[f"users_evaluated_{rep}"] == len(users)
    assert checked == len(REPRESENTATIONS) * len(KS) * len(ranking.METRICS)


def test_users_without_profile_or_train_are_counted(evaluated):
    data, counts = evaluated.data, evaluated.counts
    candidates = set(data.common(["title", "visual"]))
    with_relevant = {u for u in data.splits["test"] if relevant_items(data, u, candidates)}
    assert counts["test_users_without_train"] == 1
    # No visual profile (3 users) or no train history at all: relevant items but no list.
    no_visual = with_relevant - set(data.profiles["visual"])
    assert counts["users_without_recommendations_visual"] == len(no_visual) > 0
    assert counts["users_without_recommendations_popularity"] == len(with_relevant - set(data.splits["train"]))
    test_rows = sum(len(v) for v in data.splits["test"].values())
    outside = sum(len(v - candidates) for v in data.splits["test"].values())
    assert counts["test_rows"] == test_rows
    assert counts["test_rows_outside_candidates_title"] == outside > 0
    assert counts["users_without_relevant_title"] == len(data.splits["test"]) - len(with_relevant)


def test_metrics_are_means_of_user_metrics_with_their_bootstrap_ci(evaluated):
    user_metrics = evaluated.user_metrics
    for row in evaluated.metrics.itertuples():
        values = user_metrics[(user_metrics.representation == row.representation) & (user_metrics.metric == row.metric)
                              & (user_metrics.k == row.k)].sort_values("user_id")["value"].to_numpy()
        assert row.n_users == len(values)
        mean, lo, hi = significance.bootstrap_mean_ci(values, 300, seed=42)
        assert (row.value, row.ci_low, row.ci_high) == pytest.approx((mean, lo, hi), abs=1e-12)
        assert row.ci_low <= row.value <= row.ci_high
    assert len(evaluated.metrics) == len(REPRESENTATIONS) * len(KS) * len(ranking.METRICS)
    assert "recall@10" in evaluated.printed and "popularity" in evaluated.printed


def test_comparisons_are_paired_and_holm_corrected_per_metric_at_k(evaluated):
    comparisons, user_metrics = evaluated.comparisons, evaluated.user_metrics
    n_pairs = len(REPRESENTATIONS) * (len(REPRESENTATIONS) - 1) // 2
    assert len(comparisons) == n_pairs * len(KS) * len(ranking.METRICS)
    assert (comparisons.p_holm >= comparisons.p_value - 1e-15).all()
    assert (comparisons.p_holm <= 1).all()
    for (metric, k), group in comparisons.groupby(["metric", "k"]):
        assert len(group) == n_pairs
        np.testing.assert_allclose(group.p_holm, significance.holm(group.p_value.to_numpy()), atol=1e-15)
    row = comparisons[(comparisons.representation_a == "visual") & (comparisons.representation_b == "random")
                      & (comparisons.metric == "recall") & (comparisons.k == 10)].iloc[0]
    wide = user_metrics[(user_metrics.metric == "recall") & (user_metrics.k == 10)].pivot(
        index="user_id", columns="representation", values="value")[["visual", "random"]].dropna()
    assert row.mean_diff == pytest.approx((wide.visual - wide.random).mean(), abs=1e-12)
    assert row.p_value == pytest.approx(significance.wilcoxon_p(wide.visual.to_numpy(), wide.random.to_numpy()))


def test_popularity_beats_random_on_skewed_data(evaluated):
    metrics = evaluated.metrics.set_index(["representation", "metric", "k"])["value"]
    for metric in ("recall", "ndcg", "hit_rate"):
        assert metrics[("popularity", metric, 10)] > metrics[("random", metric, 10)], metric
    row = evaluated.comparisons[(evaluated.comparisons.representation_a == "popularity")
                                & (evaluated.comparisons.representation_b == "random")
                                & (evaluated.comparisons.metric == "recall") & (evaluated.comparisons.k == 10)].iloc[0]
    assert row.ci_low > 0 and row.p_holm < 0.05


def test_candidates_are_the_ones_topk_ranked_over_not_recomputed(evaluated, spark):
    """topk stores the candidate set per representation; evaluate measures over it even after
    item_embeddings changes under the run (an embed rerun that lost an item's vectors)."""
    data, warehouse = evaluated.data, evaluated.warehouse
    expected = set(data.common(["title", "visual"]))
    stored = tables.read(spark, warehouse, "candidates").filter("run_id = 'run-e'").toPandas()
    assert set(stored.representation) == set(REPRESENTATIONS)
    for rep, group in stored.groupby("representation"):
        assert set(group.item_id) == expected, rep
    # One item that users hold as a relevant test item loses its title vector: a recomputed
    # `common` set would shrink, and with it the relevant lists and the metrics.
    gone = sorted(i for i in expected if any(i in v for v in data.splits["test"].values()))[0]
    embeddings = tables.read(spark, warehouse, "item_embeddings")
    kept = embeddings.filter(f"dataset = 'rand' AND NOT (item_id = '{gone}' AND representation = 'title')")
    tables.replace_slice(spark, warehouse, "item_embeddings", kept.localCheckpoint(), {"dataset": "rand"})
    assert tables.read(spark, warehouse, "item_embeddings").filter(f"item_id = '{gone}'").count() == 1
    printed = run_quietly(evaluate.main, evaluated.argv, spark)
    counts = json.loads(printed.strip().splitlines()[-1])["counts"]
    after = tables.read(spark, warehouse, "metrics").filter("run_id = 'run-e'").toPandas()
    key = ["representation", "metric", "k"]
    before = evaluated.metrics.sort_values(key).reset_index(drop=True)
    after = after.sort_values(key).reset_index(drop=True)
    assert len(after) == len(before)
    np.testing.assert_array_equal(after[["value", "ci_low", "ci_high"]].to_numpy(),
                                  before[["value", "ci_low", "ci_high"]].to_numpy())
    assert counts["test_rows_outside_candidates_title"] == evaluated.counts["test_rows_outside_candidates_title"]


@pytest.mark.parametrize("flag, value, stored", [
    ("--candidates", "all", '"common"'),
    ("--exclude", "train", '["train","valid"]'),
])
def test_a_flag_that_disagrees_with_the_ranking_exits_2_naming_both_values(evaluated, spark, capsys, flag, value,
                                                                            stored):
    assert evaluate.main(evaluated.argv + [flag, value], spark=spark) == 2
    message = capsys.readouterr().err
    shown = '["train"]' if flag == "--exclude" else f'"{value}"'
    assert flag in message and shown in message and stored.replace(",", ", ") in message, message
    assert "run-e" in message


def test_representations_not_ranked_exit_2(evaluated, spark, capsys):
    argv = evaluated.argv + ["--set", "experiment.representations=[title,visual,text]"]
    assert evaluate.main(argv, spark=spark) == 2
    message = capsys.readouterr().err
    assert "experiment.representations" in message and "text" in message, message


def test_topk_refuses_a_k_other_than_the_runs_plan_before_ranking(evaluated, spark, capsys):
    before = tables.read(spark, evaluated.warehouse, "recommendations").filter("run_id = 'run-e'").count()
    assert topk.main(evaluated.argv + ["--k", "12"], spark=spark) == 2
    message = capsys.readouterr().err
    assert "experiment.topk.k" in message and "12" in message and "10" in message, message
    assert tables.read(spark, evaluated.warehouse, "recommendations").filter("run_id = 'run-e'").count() == before


def test_candidates_and_lists_of_two_topk_runs_are_refused(evaluated, spark, capsys):
    """What a topk killed between its candidates and recommendations commits leaves behind."""
    wh = evaluated.warehouse
    stored = tables.read(spark, wh, "candidates").filter("run_id = 'run-e'").localCheckpoint()
    ranked_by = stored.first().topk_id
    assert ranked_by.startswith("topk-")
    try:
        tables.replace_slice(spark, wh, "candidates", stored.withColumn("topk_id", F.lit("topk-later-000000")),
                             {"run_id": "run-e"})
        assert evaluate.main(evaluated.argv, spark=spark) == 1
        message = capsys.readouterr().err
        assert ranked_by in message and "topk-later-000000" in message and "vlm4rec topk --run-id run-e" in message
    finally:
        tables.replace_slice(spark, wh, "candidates", stored, {"run_id": "run-e"})
