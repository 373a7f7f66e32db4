"""The evaluate job on real Spark + Delta: per-user metrics equal ``udfs.evaluate.metrics`` computed in numpy
on the same lists, means and CIs agree with the per-user rows, Holm never lowers a p-value, and a
popularity ranking beats the seeded random one on skewed data. Its two paths, the Spark one
(``spark.driver_compute_mb=0``) and the driver one (the default on small inputs), write the same
rows and count, warn, print and fail alike on the same warehouse, the Spark one in many buckets
of users and items or in few."""
from __future__ import annotations

import contextlib
import io
import json
import logging
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from pyspark.sql import functions as F

from jobs import evaluate, tables, topk
from tests.jobs.test_topk import make_dataset, write_dataset
from udfs.evaluate import metrics as ranking
from udfs.evaluate import significance

pytestmark = pytest.mark.spark

KS = [3, 5, 10]
REPRESENTATIONS = ["title", "visual", "popularity", "random"]


def run_quietly(main, argv: list[str], spark) -> str:
    """Run a job's ``main``, assert it succeeded, return what it printed."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert main(argv, spark=spark) == 0
    return buffer.getvalue()


# The Spark path, which the default takes only above 1 GiB of inputs.
SPARK_PATH = ["--set", "spark.driver_compute_mb=0"]
OUTPUTS = {"user_metrics": ["representation", "user_id", "metric", "k"],
           "metrics": ["representation", "metric", "k"],
           "comparisons": ["representation_a", "representation_b", "metric", "k"]}


class KeptWarnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records: list[tuple[str, str]] = []

    def emit(self, record):
        self.records.append((record.levelname, record.getMessage()))


def run_evaluate(spark, argv: list[str]) -> SimpleNamespace:
    """evaluate's exit code, printed lines (the results), counts (from its summary line, stage
    times left out), warnings and error lines."""
    out, err, kept = io.StringIO(), io.StringIO(), KeptWarnings()
    logger = logging.getLogger(evaluate.__name__)
    logger.addHandler(kept)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = evaluate.main(argv, spark=spark)
    finally:
        logger.removeHandler(kept)
    lines = out.getvalue().strip().splitlines()
    summary = next(i for i, line in enumerate(lines) if line.startswith("evaluate evaluate-"))
    counts = dict(pair.split("=") for pair in lines[summary].split(": ", 1)[1].split())
    return SimpleNamespace(code=code, stdout=out.getvalue(), printed=lines[:summary], warnings=kept.records,
                           counts={k: int(v) for k, v in counts.items() if not k.startswith("ms_")},
                           errors=[line for line in err.getvalue().splitlines() if line.startswith("vlm4rec evaluate:")])


def with_edge_cases(data):
    """Adds to the dataset (rows and splits alike): u000 holds item 12 as a train and a test item
    (an excluded test row beside relevant ones); u001 holds its test items and item 10 in its
    train split too (candidate test rows, none relevant); u900's one test item, item 0, has no
    visual vector (no candidate)."""
    by_user = {user: items for user, items in data.splits["test"].items()}
    extra = [("u000", data.items[12], "train"), ("u000", data.items[12], "test"),
             *[("u001", item, "train") for item in sorted(by_user["u001"])],
             ("u001", data.items[10], "train"), ("u001", data.items[10], "test"),
             ("u900", data.items[6], "train"), ("u900", data.items[0], "test")]
    for t, (user, item, split) in enumerate(extra):
        data.interactions.append((data.name, user, item, 900_000 + t, 1.0, split))
        data.splits[split].setdefault(user, set()).add(item)
    return data


def output_slices(spark, warehouse) -> dict[str, pd.DataFrame]:
    return {name: tables.read(spark, warehouse, name).filter("run_id = 'run-e'").drop("run_id").toPandas()
            .sort_values(key, ignore_index=True) for name, key in OUTPUTS.items()}


@pytest.fixture(scope="module")
def evaluated(spark, tmp_path_factory):
    data = with_edge_cases(make_dataset(seed=11, n_users=150, n_items=40, per_user=9))
    warehouse = tmp_path_factory.mktemp("evaluate") / "warehouse"
    write_dataset(spark, warehouse, data, "run-e")
    common = ["--set", f"warehouse={warehouse}", "--set", "dataset.name=rand", "--set", "log_level=WARNING",
              "--set", "experiment.representations=[title,visual]", "--set", f"experiment.evaluate.ks={KS}",
              "--set", "experiment.evaluate.bootstrap_samples=300", "--run-id", "run-e"]
    run_quietly(topk.main, common + ["--user-block", "32", "--item-block", "16"], spark)
    with pytest.MonkeyPatch.context() as patch:
        # Many small buckets (about 15): each step's function sees a part of the users or the
        # items, and what the parts give must add up to the driver's answer over whole frames.
        patch.setattr(evaluate, "ROWS_PER_BUCKET", 500)
        on_spark = run_evaluate(spark, common + SPARK_PATH)
    spark_outputs = output_slices(spark, warehouse)
    on_driver = run_evaluate(spark, common)
    assert on_driver.code == 0, on_driver.errors
    printed = on_driver.stdout
    counts = json.loads(printed.strip().splitlines()[-1])["counts"]

    def frame(name):
        return tables.read(spark, warehouse, name).filter("run_id = 'run-e'").toPandas()

    return SimpleNamespace(data=data, counts=counts, printed=printed, warehouse=warehouse, argv=common,
                           on_spark=on_spark, on_driver=on_driver, spark_outputs=spark_outputs,
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
    # The default test, stored by name beside its p-value and the effect size.
    assert set(comparisons.test) == {"t"}
    differences = (wide.visual - wide.random).to_numpy().reshape(-1, 1)
    assert row.p_value == pytest.approx(significance.paired_t_ps(differences)[0], rel=1e-12)
    assert row.effect_size == pytest.approx(significance.effect_sizes(differences)[0], rel=1e-12)


def test_the_test_is_part_of_the_runs_plan(evaluated, spark, capsys):
    assert evaluate.main(evaluated.argv + ["--set", "experiment.evaluate.test=wilcoxon"], spark=spark) == 2
    message = capsys.readouterr().err
    assert "experiment.evaluate.test" in message and '"wilcoxon"' in message and '"t"' in message, message


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


def test_spark_and_driver_paths_write_the_same_rows(evaluated, spark):
    on_driver = output_slices(spark, evaluated.warehouse)
    for name in OUTPUTS:
        assert len(evaluated.spark_outputs[name]) > 0, name
        # The same rows of each group reach the same kernels in the same order: equal to the bit.
        pd.testing.assert_frame_equal(evaluated.spark_outputs[name], on_driver[name], check_exact=True, obj=name)


def test_spark_and_driver_paths_count_warn_and_print_alike(evaluated):
    on_spark, on_driver = evaluated.on_spark, evaluated.on_driver
    assert on_spark.code == on_driver.code == 0
    assert "computed_on_driver" not in on_spark.counts and on_driver.counts["computed_on_driver"] == 1
    # The path each took and why, then the same counts.
    assert on_spark.counts.pop("driver_fallback_disabled") == 1
    assert on_spark.counts == {k: v for k, v in on_driver.counts.items() if k != "computed_on_driver"}
    # The edge cases reached their counts: u000's and u001's excluded rows, item 0 no candidate.
    assert on_spark.counts["test_rows_excluded_title"] >= 2
    assert on_spark.warnings == on_driver.warnings and len(on_spark.warnings) == 4  # users without a list
    assert on_spark.printed == on_driver.printed and any("recall@10" in line for line in on_spark.printed)
    measured = set(evaluated.user_metrics.user_id)
    assert "u000" in measured and not {"u001", "u900"} & measured


@pytest.mark.parametrize("case", ["two topk runs", "no stored candidates", "random not ranked"])
def test_spark_and_driver_paths_fail_or_leave_out_alike(evaluated, spark, case):
    """What a topk stopped between its commits leaves, a run from before the candidates table,
    and a representation of the plan without recommendations (left out with a warning)."""
    wh = evaluated.warehouse
    table = "recommendations" if case == "random not ranked" else "candidates"
    stored = tables.read(spark, wh, table).filter("run_id = 'run-e'").localCheckpoint()
    broken = {"two topk runs": lambda: stored.withColumn("topk_id", F.lit("topk-later-000000")),
              "no stored candidates": lambda: stored.filter("representation != 'title'"),
              "random not ranked": lambda: stored.filter("representation != 'random'")}[case]()
    try:
        tables.replace_slice(spark, wh, table, broken, {"run_id": "run-e"})
        on_spark = run_evaluate(spark, evaluated.argv + SPARK_PATH)
        on_driver = run_evaluate(spark, evaluated.argv)
    finally:
        tables.replace_slice(spark, wh, table, stored, {"run_id": "run-e"})
    assert on_spark.code == on_driver.code == (0 if case == "random not ranked" else 1)
    assert on_driver.counts.pop("computed_on_driver") == 1 and on_spark.counts.pop("driver_fallback_disabled") == 1
    assert on_spark.counts == on_driver.counts
    assert on_spark.errors == on_driver.errors and on_spark.warnings == on_driver.warnings
    assert on_spark.printed == on_driver.printed
    expected = {"two topk runs": "different topk runs", "no stored candidates": "no stored candidate set for ['title']",
                "random not ranked": "random has no recommendations"}[case]
    assert expected in " ".join(on_spark.errors + [m for _, m in on_spark.warnings])


def test_a_comparisons_table_written_before_the_test_was_stored_still_works(spark, tmp_path):
    """A warehouse of the older contract (no effect_size, no test): the next write adds the two
    columns (null in the old rows), and the old rows print as the Wilcoxon rows they were."""
    import pyarrow as pa
    from delta.tables import DeltaTable
    from pyspark.sql.types import StructType

    from udfs.report.results_table import results_table

    warehouse = tmp_path / "warehouse"
    old = StructType([f for f in tables.SCHEMAS["comparisons"].fields if f.name not in ("effect_size", "test")])
    DeltaTable.createIfNotExists(spark).location(str(warehouse / "comparisons")).addColumns(old).execute()
    row = {"representation_a": "title", "representation_b": "random", "metric": "ndcg", "k": 10, "mean_diff": 0.1,
           "ci_low": 0.05, "ci_high": 0.15, "p_value": 0.001, "p_holm": 0.002}
    spark.createDataFrame([{"run_id": "old", **row}], old).write.format("delta").mode("append").save(
        str(warehouse / "comparisons"))
    new = pa.Table.from_pylist([{"run_id": "new", **row, "effect_size": 0.8, "test": "t"}],
                               schema=tables.arrow_schema("comparisons"))
    tables.replace_slice(spark, warehouse, "comparisons", new, {"run_id": "new"})
    got = {r.run_id: r for r in tables.read(spark, warehouse, "comparisons").collect()}
    assert (got["old"].test, got["old"].effect_size) == (None, None)
    assert (got["new"].test, got["new"].effect_size) == ("t", 0.8)
    assert "Holm-corrected wilcoxon p" in results_table([], [{**got["old"].asDict(), "representation_b": "lvlm:x:y:z"}],
                                                        ["title", "lvlm:x:y:z"], [10])
