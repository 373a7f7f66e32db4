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
from pyspark.sql import DataFrame, Observation
from pyspark.sql import functions as F

from udfs import evaluate_udfs, protocol
from udfs.metrics import METRICS
from udfs.results_table import results_table
from udfs.spark import schemas

from . import tables
from .config import ConfigError
from .facts import collect_facts
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


def prepare_facts(recommendations: DataFrame, stored: DataFrame, interactions: DataFrame,
                  joined: DataFrame) -> dict[str, dict]:
    """kind -> representation -> row, from one Spark job over a union of small aggregates:
    ``ranked`` (the topk ids of the recommendations: lo, hi), ``stored`` (the stored candidates:
    a = how many, lo/hi = topk ids), ``tests`` (representation None: a = distinct test rows,
    b = test users, c = test users without train) and ``status`` (per representation: a = test
    rows that are candidates, b = of those in an excluded split, c = users with a relevant item,
    d = of those without a list)."""
    rep = F.col("representation")
    ranked = recommendations.groupBy("representation").agg(F.min("topk_id").alias("lo"), F.max("topk_id").alias("hi"))
    candidates = stored.groupBy("representation").agg(
        F.count(F.lit(1)).alias("n"), F.min("topk_id").alias("lo"), F.max("topk_id").alias("hi"))
    # Per user: their distinct test items and whether they have train history.
    user_tests = interactions.groupBy("user_id").agg(
        F.countDistinct(F.when(F.col("split") == protocol.RELEVANT_SPLIT, F.col("item_id"))).alias("test_items"),
        F.max((F.col("split") == protocol.TRAIN_SPLIT).cast("int")).alias("has_train"))
    tests = user_tests.agg(F.sum("test_items").alias("rows"), F.count_if(F.col("test_items") > 0).alias("users"),
                           F.count_if((F.col("test_items") > 0) & (F.col("has_train") == 0)).alias("no_train"))
    has_relevant = F.size("relevant") > 0
    status = joined.groupBy("representation").agg(
        F.sum("_rows").alias("rows"), F.sum("_excluded").alias("excluded"),
        F.count_if(has_relevant).alias("users"),
        F.count_if(has_relevant & F.col("recommended").isNull()).alias("no_list"))
    rows = collect_facts(
        {"representation": "string", "a": "long", "b": "long", "c": "long", "d": "long", "lo": "string", "hi": "string"},
        [("ranked", ranked, {"representation": rep, "lo": F.col("lo"), "hi": F.col("hi")}),
         ("stored", candidates, {"representation": rep, "a": F.col("n"), "lo": F.col("lo"), "hi": F.col("hi")}),
         ("tests", tests, {"a": F.col("rows"), "b": F.col("users"), "c": F.col("no_train")}),
         ("status", status, {"representation": rep, "a": F.col("rows"), "b": F.col("excluded"),
                             "c": F.col("users"), "d": F.col("no_list")})])
    facts: dict[str, dict] = {"ranked": {}, "stored": {}, "tests": {}, "status": {}}
    for row in rows:
        facts[row["kind"]][row["representation"]] = row
    return facts


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
        # The items the ranking was computed over, as topk stored them: never derived again here.
        stored_rows = (tables.read(spark, wh, "candidates")
                       .filter((F.col("run_id") == run_id) & F.col("representation").isin(wanted)))
        candidates = stored_rows.select("representation", "item_id")
        interactions = (tables.read(spark, wh, "interactions").filter(F.col("dataset") == plan.dataset)
                        .select("user_id", "item_id", "split"))
        # Per representation and user: the relevant items (excluded ones left out), how many test
        # rows were candidates and how many of those an excluded split holds, and the ranked list.
        relevant = relevant_lists(interactions, candidates, plan)
        per_user = relevant.groupBy("representation", "user_id").agg(
            F.collect_list(F.when(~F.col("excluded"), F.col("item_id"))).alias("relevant"),
            F.count(F.lit(1)).alias("_rows"), F.sum(F.col("excluded").cast("long")).alias("_excluded"))
        lists = (recommendations.groupBy("representation", "user_id")
                 .agg(F.array_sort(F.collect_list(F.struct("rank", "item_id"))).alias("_ranked"))
                 .select("representation", "user_id", F.col("_ranked.item_id").alias("recommended")))
        joined = per_user.join(lists, ["representation", "user_id"], "left").persist(StorageLevel.MEMORY_AND_DISK)
        # Every check and count below comes from this one Spark job (which also fills ``joined``'s
        # cache): a job per question cost more than the questions on small data.
        facts = prepare_facts(recommendations, stored_rows, interactions, joined)
        ranked_by = {rep: (row["lo"], row["hi"]) for rep, row in facts["ranked"].items()}
        present = set(ranked_by)
        order = [r for r in wanted if r in present]
        for rep in wanted:
            if rep not in present:
                run.count("representations_without_recommendations")
                log.warning("representation %s has no recommendations under run id %s: run `vlm4rec topk "
                            "--run-id %s` with it first; it is left out of this evaluation",
                            rep, run_id, run_id)
        if not order:
            joined.unpersist()
            raise NothingUsable(f"no recommendations under run id {run_id} for {wanted}: "
                                "run `vlm4rec topk` first")
        stored = facts["stored"]
        n_candidates = {rep: row["a"] for rep, row in stored.items()}
        missing = [rep for rep in order if not n_candidates.get(rep)]
        if missing:
            joined.unpersist()
            raise NothingUsable(f"run id {run_id}: no stored candidate set for {missing} (ranked by a topk "
                                f"that predates the candidates table): run `vlm4rec topk --run-id {run_id}` again")
        for rep in order:
            # A topk killed between its candidates and recommendations commits leaves the two from
            # different rankings (rows written before the column existed are null: not checked).
            ids = {*ranked_by[rep], stored[rep]["lo"], stored[rep]["hi"]} - {None}
            if len(ids) > 1:
                joined.unpersist()
                raise NothingUsable(
                    f"run id {run_id}, representation {rep}: the candidates and the recommendations come from "
                    f"different topk runs ({', '.join(sorted(ids))}; a topk stopped between its two commits): "
                    f"run `vlm4rec topk --run-id {run_id}` again")

        totals = facts["tests"].get(None)
        n_test_rows, n_test_users, no_train = (int(totals[c] or 0) if totals else 0 for c in ("a", "b", "c"))
        run.count("test_rows", n_test_rows)
        run.count("test_users", n_test_users)
        run.count("test_users_without_train", no_train)
        if n_test_rows == 0:
            joined.unpersist()
            raise NothingUsable(f"dataset '{plan.dataset}' has no test interactions: check the split settings "
                                "and run `vlm4rec ingest` again")

        status = facts["status"]
        n_groups, n_evaluated = 1, 0
        for rep in order:
            row = status.get(rep)
            rows, excluded, users, no_list = (int(row[c] or 0) for c in ("a", "b", "c", "d")) if row else (0, 0, 0, 0)
            run.count(f"test_rows_outside_candidates_{rep}", n_test_rows - rows)
            run.count(f"test_rows_excluded_{rep}", excluded)
            run.count(f"users_without_relevant_{rep}", n_test_users - users)
            run.count(f"users_without_recommendations_{rep}", no_list)
            run.count(f"users_evaluated_{rep}", users - no_list)
            n_evaluated += users - no_list
            n_groups = max(n_groups, -(-users // USERS_PER_GROUP))
            if no_list:
                log.warning("representation %s: %d users with relevant test items have no recommendation list "
                            "(no profile: no train item with a vector); they are left out of its metrics", rep, no_list)

    with run.stage("user_metrics"):
        if n_evaluated == 0:
            joined.unpersist()
            raise NothingUsable(f"run id {run_id}: no user has both a relevant test item and a list")
        scored = (joined.filter(F.col("representation").isin(order) & (F.size("relevant") > 0)
                                & F.col("recommended").isNotNull())
                  .select("representation", "user_id", "relevant", "recommended")
                  .withColumn("_group", F.pmod(F.xxhash64("user_id"), F.lit(n_groups))))
        values = (scored.groupBy("_group").applyInPandas(evaluate_udfs.user_metric_groups(ks),
                                                         schemas.USER_METRICS_DDL)
                  .persist(StorageLevel.MEMORY_AND_DISK))
        # Each table's slice of this run is replaced in one atomic commit (replaceWhere): a
        # representation dropped from the run loses its old rows, and readers see no mix.
        # The write computes (and caches) the values and counts them on the way.
        where = {"run_id": run_id, "representation": order}
        written = Observation("user_metrics")
        out = values.observe(written, F.count(F.lit(1)).alias("n")).withColumn("run_id", F.lit(run_id))
        tables.replace_slice(spark, wh, "user_metrics", out, where)
        run.count("user_metrics_rows", int(written.get["n"]))

    with run.stage("summary"):
        n_samples, seed = plan.bootstrap_samples, plan.evaluate_seed
        summary = (values.groupBy("representation", "metric", "k")
                   .applyInPandas(evaluate_udfs.metric_summary(n_samples, seed), schemas.METRICS_DDL)
                   .persist(StorageLevel.MEMORY_AND_DISK))
        summary_rows = [r.asDict() for r in summary.collect()]
        tables.replace_slice(spark, wh, "metrics", summary.withColumn("run_id", F.lit(run_id)), where)
        run.count("metrics_rows", len(summary_rows))

    with run.stage("comparisons"):
        comparisons = (values.select("representation", "user_id", "metric", "k", "value").groupBy("metric", "k")
                       .applyInPandas(evaluate_udfs.comparison_groups(order, n_samples, seed),
                                      schemas.COMPARISONS_DDL)
                       .persist(StorageLevel.MEMORY_AND_DISK))
        # Collected first (it fills the cache the write then reads): the rows are printed below.
        comparison_rows = [r.asDict() for r in comparisons.collect()]
        n_pairs = len(comparison_rows)
        run.count("comparisons_rows", n_pairs)
        expected = len(order) * (len(order) - 1) // 2 * len(ks) * len(METRICS)
        run.count("pairs_without_common_users", expected - n_pairs)
        tables.replace_slice(spark, wh, "comparisons", comparisons.withColumn("run_id", F.lit(run_id)),
                             {"run_id": run_id, "representation_a": order})

    for frame in (joined, values, summary, comparisons):
        frame.unpersist()
    print(f"evaluation of run {run_id} on {plan.dataset} ({plan.candidates} candidates, "
          f"excluding {'+'.join(plan.exclude) or 'nothing'}):")
    print(results_table(summary_rows, comparison_rows, order, ks))


def main(argv: list[str] | None = None, spark=None) -> int:
    return run_job("evaluate", __doc__.splitlines()[0], evaluate, argv, add_plan_arguments, spark=spark)


if __name__ == "__main__":
    raise SystemExit(main())
