"""``evaluate``: recommendations + the test split -> ``user_metrics``, ``metrics``, ``comparisons``.

For one run id (``--run-id``, the key of ``recommendations``) and every representation the
``topk`` job ranked (the vector representations and the baselines):

- ``user_metrics``: Recall, NDCG, Precision, MAP, HitRate and MRR at each ``experiment.evaluate.ks``
  per user (``udfs.metrics``). A user's relevant items are their test items that are in the
  candidate set ``topk`` stored for the run (the ``candidates`` table: never derived again from
  the current ``item_embeddings``) and not excluded from their ranking (``udfs.protocol``).
  The settings are the run's plan (``jobs.plan``); ``--candidates``, ``--exclude``, the
  representations, Ks or seeds that disagree with it exit 2, naming both values.
  Users without any relevant item are excluded.
- ``metrics``: the mean over users with a percentile bootstrap CI
  (``experiment.evaluate.bootstrap_samples``, seeded with ``experiment.evaluate.seed``) and ``n_users``.
- ``comparisons``: for every pair of representations, paired over the users both were
  evaluated on: the mean difference (a - b) with a paired bootstrap CI, the Wilcoxon
  signed-rank p-value, and Holm's correction over all the pairs of each metric@k.

Nothing is dropped silently; the counts say: ``test_rows``, ``test_users``,
``test_users_without_train``, per representation ``test_rows_outside_candidates_<rep>``
(test items that are not candidates), ``test_rows_excluded_<rep>`` (test items also in an
excluded split), ``users_without_relevant_<rep>``, ``users_without_recommendations_<rep>``
(users with relevant items but no list, e.g. no profile) and ``users_evaluated_<rep>``.

Prints the results (``udfs.results_table``): the paper's rows in the paper's order (lvlm, title,
vision, title+vision and lvlm+vision fusions, als, popularity, random, then the others), one
block per K with each metric's mean and 95% CI, then each representation's paired difference
against the run's ``lvlm`` representation (mean, bootstrap CI, Holm-corrected p).
Rewrites of the same run id replace the run's rows for these representations.
"""
from __future__ import annotations

if not __package__:  # run as a file (`spark-submit jobs/<job>.py`): see jobs/_as_package.py
    from _as_package import PACKAGE as __package__

import argparse
import logging

from pyspark import StorageLevel
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from udfs import evaluate_udfs, protocol
from udfs.metrics import METRICS
from udfs.results_table import results_table

from . import tables
from .config import ConfigError
from .job_run import JobRun, NothingUsable, add_plan_arguments, run_job
from .plan import EVALUATE_FIELDS, ExperimentPlan, plan_for_run

log = logging.getLogger(__name__)

# Users per applyInPandas group when computing per-user metrics.
USERS_PER_GROUP = 50_000


def relevant_lists(interactions: DataFrame, candidates: DataFrame, plan: ExperimentPlan) -> DataFrame:
    """(representation, user_id, item_id, excluded): each user's test items that are candidates,
    flagged when the item is also in one of the excluded splits."""
    # udfs.protocol's relevance and seen-item rules, over the whole table.
    test = interactions.filter(F.col("split") == protocol.RELEVANT_SPLIT).select("user_id", "item_id").distinct()
    excluded = (interactions.filter(F.col("split").isin(list(protocol.seen_splits(plan.exclude))))
                .select("user_id", "item_id")
                .distinct().withColumn("excluded", F.lit(True)))
    return (test.join(candidates, "item_id")
            .join(excluded, ["user_id", "item_id"], "left")
            .select("representation", "user_id", "item_id", F.coalesce("excluded", F.lit(False)).alias("excluded")))


def evaluate(run: JobRun, args: argparse.Namespace) -> None:
    spark, wh = run.spark, run.warehouse
    if not args.run_id:
        raise ConfigError("--run-id is required: pass the run id that topk keyed recommendations by")
    run_id = args.run_id
    # The run's plan: the settings topk ranked with; a flag that disagrees is refused (exit 2).
    plan = plan_for_run(run, run_id, EVALUATE_FIELDS)
    ks = list(plan.ks)
    wanted = list(plan.ranked)

    with run.stage("prepare"):
        recommendations = (tables.read(spark, wh, "recommendations")
                           .filter((F.col("run_id") == run_id) & F.col("representation").isin(wanted)))
        ranked_by = {r["representation"]: (r["lo"], r["hi"]) for r in recommendations.groupBy("representation")
                     .agg(F.min("topk_id").alias("lo"), F.max("topk_id").alias("hi")).collect()}
        present = set(ranked_by)
        order = [r for r in wanted if r in present]
        for rep in wanted:
            if rep not in present:
                run.count("representations_without_recommendations")
                log.warning("representation %s has no recommendations under run id %s: run `vlm4rec topk "
                            "--run-id %s` with it first; it is left out of this evaluation",
                            rep, run_id, run_id)
        if not order:
            raise NothingUsable(f"no recommendations under run id {run_id} for {wanted}: "
                                "run `vlm4rec topk` first")
        # The items the ranking was computed over, as topk stored them: never derived again here.
        stored_rows = (tables.read(spark, wh, "candidates")
                       .filter((F.col("run_id") == run_id) & F.col("representation").isin(order)))
        candidates = stored_rows.select("representation", "item_id")
        stored = {r["representation"]: r for r in stored_rows.groupBy("representation").agg(
            F.count(F.lit(1)).alias("n"), F.min("topk_id").alias("lo"), F.max("topk_id").alias("hi")).collect()}
        n_candidates = {rep: row["n"] for rep, row in stored.items()}
        missing = [rep for rep in order if not n_candidates.get(rep)]
        if missing:
            raise NothingUsable(f"run id {run_id}: no stored candidate set for {missing} (ranked by a topk "
                                f"that predates the candidates table): run `vlm4rec topk --run-id {run_id}` again")
        for rep in order:
            # A topk killed between its candidates and recommendations commits leaves the two from
            # different rankings (rows written before the column existed are null: not checked).
            ids = {*ranked_by[rep], stored[rep]["lo"], stored[rep]["hi"]} - {None}
            if len(ids) > 1:
                raise NothingUsable(
                    f"run id {run_id}, representation {rep}: the candidates and the recommendations come from "
                    f"different topk runs ({', '.join(sorted(ids))}; a topk stopped between its two commits): "
                    f"run `vlm4rec topk --run-id {run_id}` again")

        interactions = (tables.read(spark, wh, "interactions").filter(F.col("dataset") == plan.dataset)
                        .select("user_id", "item_id", "split"))
        # One pass: per user, their distinct test items and whether they have train history.
        user_tests = interactions.groupBy("user_id").agg(
            F.countDistinct(F.when(F.col("split") == protocol.RELEVANT_SPLIT, F.col("item_id"))).alias("test_items"),
            F.max((F.col("split") == protocol.TRAIN_SPLIT).cast("int")).alias("has_train"))
        totals = user_tests.agg(F.sum("test_items").alias("rows"), F.count_if(F.col("test_items") > 0).alias("users"),
                           F.count_if((F.col("test_items") > 0) & (F.col("has_train") == 0)).alias("no_train")).first()
        n_test_rows, n_test_users = int(totals["rows"] or 0), int(totals["users"] or 0)
        run.count("test_rows", n_test_rows)
        run.count("test_users", n_test_users)
        run.count("test_users_without_train", int(totals["no_train"] or 0))
        if n_test_rows == 0:
            raise NothingUsable(f"dataset '{plan.dataset}' has no test interactions: check the split settings "
                                "and run `vlm4rec ingest` again")

        relevant = relevant_lists(interactions, candidates, plan).persist(StorageLevel.MEMORY_AND_DISK)
        by_rep = {r["representation"]: r for r in relevant.groupBy("representation").agg(
            F.count(F.lit(1)).alias("rows"), F.sum(F.col("excluded").cast("long")).alias("excluded")).collect()}
        for rep in order:
            row = by_rep.get(rep)
            run.count(f"test_rows_outside_candidates_{rep}", n_test_rows - (row["rows"] if row else 0))
            run.count(f"test_rows_excluded_{rep}", row["excluded"] if row else 0)

        per_user = (relevant.filter(~F.col("excluded")).groupBy("representation", "user_id")
                    .agg(F.collect_list("item_id").alias("relevant")))
        lists = (recommendations.groupBy("representation", "user_id")
                 .agg(F.array_sort(F.collect_list(F.struct("rank", "item_id"))).alias("_ranked"))
                 .select("representation", "user_id", F.col("_ranked.item_id").alias("recommended")))
        joined = per_user.join(lists, ["representation", "user_id"], "left").persist(StorageLevel.MEMORY_AND_DISK)
        status = {r["representation"]: r for r in joined.groupBy("representation").agg(
            F.count(F.lit(1)).alias("users"), F.sum(F.col("recommended").isNull().cast("long")).alias("no_list"))
            .collect()}
        n_groups = 1
        for rep in order:
            row = status.get(rep)
            users, no_list = (int(row["users"]), int(row["no_list"])) if row else (0, 0)
            run.count(f"users_without_relevant_{rep}", n_test_users - users)
            run.count(f"users_without_recommendations_{rep}", no_list)
            run.count(f"users_evaluated_{rep}", users - no_list)
            n_groups = max(n_groups, -(-users // USERS_PER_GROUP))
            if no_list:
                log.warning("representation %s: %d users with relevant test items have no recommendation list "
                            "(no profile: no train item with a vector); they are left out of its metrics", rep, no_list)

    with run.stage("user_metrics"):
        scored = (joined.filter(F.col("recommended").isNotNull())
                  .withColumn("_group", F.pmod(F.xxhash64("user_id"), F.lit(n_groups))))
        values = (scored.groupBy("_group").applyInPandas(evaluate_udfs.user_metric_groups(ks),
                                                         evaluate_udfs.USER_METRICS_DDL)
                  .persist(StorageLevel.MEMORY_AND_DISK))
        n_values = values.count()
        run.count("user_metrics_rows", n_values)
        if n_values == 0:
            for frame in (relevant, joined, values):
                frame.unpersist()
            raise NothingUsable(f"run id {run_id}: no user has both a relevant test item and a list")

        # Each table's slice of this run is replaced in one atomic commit (replaceWhere): a
        # representation dropped from the run loses its old rows, and readers see no mix.
        where = {"run_id": run_id, "representation": order}
        out = values.withColumn("run_id", F.lit(run_id))
        tables.replace_slice(spark, wh, "user_metrics", out, where)

    with run.stage("summary"):
        n_samples, seed = plan.bootstrap_samples, plan.evaluate_seed
        summary = (values.groupBy("representation", "metric", "k")
                   .applyInPandas(evaluate_udfs.metric_summary(n_samples, seed), evaluate_udfs.METRICS_DDL)
                   .persist(StorageLevel.MEMORY_AND_DISK))
        summary_rows = [r.asDict() for r in summary.collect()]
        tables.replace_slice(spark, wh, "metrics", summary.withColumn("run_id", F.lit(run_id)), where)
        run.count("metrics_rows", len(summary_rows))

    with run.stage("comparisons"):
        comparisons = (values.select("representation", "user_id", "metric", "k", "value").groupBy("metric", "k")
                       .applyInPandas(evaluate_udfs.comparison_groups(order, n_samples, seed),
                                      evaluate_udfs.COMPARISONS_DDL)
                       .persist(StorageLevel.MEMORY_AND_DISK))
        n_pairs = comparisons.count()
        run.count("comparisons_rows", n_pairs)
        expected = len(order) * (len(order) - 1) // 2 * len(ks) * len(METRICS)
        run.count("pairs_without_common_users", expected - n_pairs)
        tables.replace_slice(spark, wh, "comparisons", comparisons.withColumn("run_id", F.lit(run_id)),
                             {"run_id": run_id, "representation_a": order})

    comparison_rows = [r.asDict() for r in comparisons.collect()]
    for frame in (relevant, joined, values, summary, comparisons):
        frame.unpersist()
    print(f"evaluation of run {run_id} on {plan.dataset} ({plan.candidates} candidates, "
          f"excluding {'+'.join(plan.exclude) or 'nothing'}):")
    print(results_table(summary_rows, comparison_rows, order, ks))


def main(argv: list[str] | None = None, spark=None) -> int:
    return run_job("evaluate", __doc__.splitlines()[0], evaluate, argv, add_plan_arguments, spark=spark)


if __name__ == "__main__":
    raise SystemExit(main())
