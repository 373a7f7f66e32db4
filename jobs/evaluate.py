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
  evaluated on: the mean difference (a - b) with a paired bootstrap CI, the effect size
  (Cohen's d_z), the p-value of ``experiment.evaluate.test`` (the paired t-test by default;
  ``randomization``: 20,000 seeded sign flips; ``wilcoxon``), stored with the test's name, and
  Holm's correction over all the pairs of each metric@k.

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

Whether the descriptions carry any signal (``udfs.description_stats``): for each LVLM
representation the job measures its texts and vectors as ``caption`` and ``embed`` do (counts
``descriptions_*``) and, when two items one user consumed (train split) have descriptions no
more alike than two random ones, prints a warning under the table that names the figures and
the fix (another engine, model or prompt), marks the ``lvlm`` row, and counts
``descriptions_without_signal``.

Two paths, chosen by size alone (``jobs.driver_inputs``): while the run's recommendations and
candidates and the dataset's interactions are under ``spark.driver_compute_mb``, ``DriverPath``
reads them with delta-rs and calls the same ``udfs`` functions on pandas frames (the joins as
``udfs.protocol.relevant_rows`` and ``udfs.evaluate_udfs.user_lists``); otherwise ``SparkPath``
runs each step as a Spark job. Both write the same rows through the same three commits and
count, warn and fail alike; the runs row says ``computed_on_driver`` when the driver computed.
"""
from __future__ import annotations

if not __package__:  # run as a file (`spark-submit jobs/<job>.py`): see jobs/_as_package.py
    from _as_package import PACKAGE as __package__

import argparse
import logging

import pandas as pd
import pyarrow as pa
from pyspark import StorageLevel
from pyspark.sql import DataFrame, Observation
from pyspark.sql import functions as F
from pyspark.sql.types import StructType

from udfs import evaluate_udfs, protocol, warehouse_writer
from udfs.metrics import METRICS
from udfs.results_table import results_table
from udfs.spark import schemas

from . import description_figures, tables
from .config import ConfigError
from .driver_inputs import Slice, read_on_driver
from .facts import collect_facts
from .job_run import Job, JobRun, NothingUsable, add_plan_arguments
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


def input_slices(run_id: str, wanted: list[str], dataset: str) -> dict[str, Slice]:
    """What the job reads: the run's lists and stored candidates of ``wanted``, the dataset's splits."""
    of_run = {"equal": {"run_id": run_id}, "within": {"representation": wanted}}
    return {"recommendations": Slice("recommendations", **of_run,
                                     columns=["representation", "user_id", "rank", "item_id", "topk_id"]),
            "candidates": Slice("candidates", **of_run, columns=["representation", "item_id", "topk_id"]),
            "interactions": Slice("interactions", equal={"dataset": dataset}, columns=["user_id", "item_id", "split"])}


class SparkPath:
    """Every step a Spark job over the tables: what full catalogs and clusters run."""

    def __init__(self, run: JobRun, run_id: str, wanted: list[str], plan: ExperimentPlan):
        spark, wh = self.spark, self.warehouse = run.spark, run.warehouse
        self.run_id = run_id
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
        self.joined = per_user.join(lists, ["representation", "user_id"], "left").persist(StorageLevel.MEMORY_AND_DISK)
        self.cached = [self.joined]
        # Every check and count comes from this one Spark job (which also fills ``joined``'s
        # cache): a job per question cost more than the questions on small data.
        self.facts = prepare_facts(recommendations, stored_rows, interactions, self.joined)

    def _cache(self, frame: DataFrame) -> DataFrame:
        self.cached.append(frame.persist(StorageLevel.MEMORY_AND_DISK))
        return frame

    def user_metrics(self, order: list[str], ks: list[int], n_groups: int, where: dict) -> int:
        scored = (self.joined.filter(F.col("representation").isin(order) & (F.size("relevant") > 0)
                                     & F.col("recommended").isNotNull())
                  .select("representation", "user_id", "relevant", "recommended")
                  .withColumn("_group", F.pmod(F.xxhash64("user_id"), F.lit(n_groups))))
        self.values = self._cache(scored.groupBy("_group").applyInPandas(evaluate_udfs.user_metric_groups(ks),
                                                                          schemas.USER_METRICS_DDL))
        # The write computes (and caches) the values and counts them on the way.
        written = Observation("user_metrics")
        out = self.values.observe(written, F.count(F.lit(1)).alias("n")).withColumn("run_id", F.lit(self.run_id))
        tables.replace_slice(self.spark, self.warehouse, "user_metrics", out, where)
        return int(written.get["n"])

    def summary(self, n_samples: int, seed: int, where: dict) -> list[dict]:
        summary = self._cache(self.values.groupBy("representation", "metric", "k")
                              .applyInPandas(evaluate_udfs.metric_summary(n_samples, seed), schemas.METRICS_DDL))
        rows = [r.asDict() for r in summary.collect()]
        tables.replace_slice(self.spark, self.warehouse, "metrics", summary.withColumn("run_id", F.lit(self.run_id)),
                             where)
        return rows

    def comparisons(self, order: list[str], n_samples: int, seed: int, test: str, where: dict) -> list[dict]:
        comparisons = self._cache(self.values.select("representation", "user_id", "metric", "k", "value")
                                  .groupBy("metric", "k")
                                  .applyInPandas(evaluate_udfs.comparison_groups(order, n_samples, seed, test),
                                                 schemas.COMPARISONS_DDL))
        # Collected first (it fills the cache the write then reads): the rows are printed.
        rows = [r.asDict() for r in comparisons.collect()]
        tables.replace_slice(self.spark, self.warehouse, "comparisons",
                             comparisons.withColumn("run_id", F.lit(self.run_id)), where)
        return rows

    def release(self) -> None:
        for frame in self.cached:
            frame.unpersist()


class DriverPath:
    """The same steps on the driver over the inputs ``read_on_driver`` read (small inputs): the
    same udfs functions on pandas frames, written through the same Spark commits."""

    def __init__(self, run: JobRun, run_id: str, read: dict, plan: ExperimentPlan):
        self.spark, self.warehouse, self.run_id = run.spark, run.warehouse, run_id
        recommendations, stored, interactions = (read[k].to_pandas() for k in
                                                 ("recommendations", "candidates", "interactions"))
        relevant = protocol.relevant_rows(interactions, stored, plan.exclude)
        self.lists = evaluate_udfs.user_lists(relevant, recommendations)
        self.facts = evaluate_udfs.evaluation_facts(recommendations, stored, interactions, self.lists)

    def _write(self, name: str, frame: pd.DataFrame, where: dict) -> None:
        rows = warehouse_writer.with_constants(pa.Table.from_pandas(frame, preserve_index=False),
                                               {"run_id": self.run_id})
        tables.replace_slice(self.spark, self.warehouse, name, rows, where)

    def user_metrics(self, order: list[str], ks: list[int], n_groups: int, where: dict) -> int:
        self.values = evaluate_udfs.user_metric_groups(ks)(evaluate_udfs.scored_users(self.lists, order))
        self._write("user_metrics", self.values, where)
        return len(self.values)

    def summary(self, n_samples: int, seed: int, where: dict) -> list[dict]:
        summary = evaluate_udfs.apply_by_group(self.values, ["representation", "metric", "k"],
                                               evaluate_udfs.metric_summary(n_samples, seed),
                                               _columns(schemas.METRICS_DDL))
        self._write("metrics", summary, where)
        return summary.to_dict("records")

    def comparisons(self, order: list[str], n_samples: int, seed: int, test: str, where: dict) -> list[dict]:
        comparisons = evaluate_udfs.apply_by_group(self.values[["representation", "user_id", "metric", "k", "value"]],
                                                   ["metric", "k"],
                                                   evaluate_udfs.comparison_groups(order, n_samples, seed, test),
                                                   _columns(schemas.COMPARISONS_DDL))
        self._write("comparisons", comparisons, where)
        return comparisons.to_dict("records")

    def release(self) -> None:
        pass


def _columns(ddl: str) -> list[str]:
    return StructType.fromDDL(ddl).fieldNames()


def checked_representations(run: JobRun, facts: dict[str, dict], run_id: str, wanted: list[str],
                            plan: ExperimentPlan) -> tuple[list[str], int, int]:
    """From the facts: the representations to measure (in ``wanted``'s order), the user groups
    of the Spark path and the users to measure; counts what is left out and why, warns, and
    raises ``NothingUsable`` where nothing can be measured or the inputs disagree."""
    ranked_by = {rep: (row["lo"], row["hi"]) for rep, row in facts["ranked"].items()}
    order = [r for r in wanted if r in ranked_by]
    for rep in wanted:
        if rep not in ranked_by:
            run.count("representations_without_recommendations")
            log.warning("representation %s has no recommendations under run id %s: run `vlm4rec topk "
                        "--run-id %s` with it first; it is left out of this evaluation",
                        rep, run_id, run_id)
    if not order:
        raise NothingUsable(f"no recommendations under run id {run_id} for {wanted}: "
                            "run `vlm4rec topk` first")
    stored = facts["stored"]
    n_candidates = {rep: row["a"] for rep, row in stored.items()}
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

    totals = facts["tests"].get(None)
    n_test_rows, n_test_users, no_train = (int(totals[c] or 0) if totals else 0 for c in ("a", "b", "c"))
    run.count("test_rows", n_test_rows)
    run.count("test_users", n_test_users)
    run.count("test_users_without_train", no_train)
    if n_test_rows == 0:
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
    return order, n_groups, n_evaluated


def evaluate(run: JobRun, args: argparse.Namespace) -> None:
    if not args.run_id:
        raise ConfigError("--run-id is required: pass the run id that topk keyed recommendations by")
    run_id = args.run_id
    # The run's plan: the settings topk ranked with; a flag that disagrees is refused (exit 2).
    plan = plan_for_run(run, run_id, EVALUATE_FIELDS)
    ks = list(plan.ks)
    wanted = list(plan.ranked)
    n_samples, seed = plan.bootstrap_samples, plan.evaluate_seed

    path: SparkPath | DriverPath | None = None
    try:
        with run.stage("prepare"):
            # Small inputs (under spark.driver_compute_mb) are measured on the driver: the same
            # functions and the same commits without a Spark job per step (jobs.driver_inputs).
            read = read_on_driver(run, input_slices(run_id, wanted, plan.dataset))
            path = SparkPath(run, run_id, wanted, plan) if read is None else DriverPath(run, run_id, read, plan)
            order, n_groups, n_evaluated = checked_representations(run, path.facts, run_id, wanted, plan)

        # Each table's slice of this run is replaced in one atomic commit (replaceWhere): a
        # representation dropped from the run loses its old rows, and readers see no mix.
        where = {"run_id": run_id, "representation": order}
        with run.stage("user_metrics"):
            if n_evaluated == 0:
                raise NothingUsable(f"run id {run_id}: no user has both a relevant test item and a list")
            run.count("user_metrics_rows", path.user_metrics(order, ks, n_groups, where))

        with run.stage("summary"):
            summary_rows = path.summary(n_samples, seed, where)
            run.count("metrics_rows", len(summary_rows))

        with run.stage("comparisons"):
            comparison_rows = path.comparisons(order, n_samples, seed, plan.significance_test,
                                               {"run_id": run_id, "representation_a": order})
            n_pairs = len(comparison_rows)
            run.count("comparisons_rows", n_pairs)
            expected = len(order) * (len(order) - 1) // 2 * len(ks) * len(METRICS)
            run.count("pairs_without_common_users", expected - n_pairs)
    finally:
        if path is not None:
            path.release()
    print(f"evaluation of run {run_id} on {plan.dataset} ({plan.candidates} candidates, "
          f"excluding {'+'.join(plan.exclude) or 'nothing'}):")
    with run.stage("descriptions"):
        # Whether the descriptions carry any signal: metrics of lvlm near random otherwise
        # read as the method's failure (udfs.description_stats).
        warnings = description_figures.check_descriptions(run, plan.dataset, order)
    print(results_table(summary_rows, comparison_rows, order, ks, notes=warnings))


JOB = Job("evaluate", __doc__.splitlines()[0], evaluate, add_plan_arguments)


def main(argv: list[str] | None = None, spark=None) -> int:
    return JOB.main(argv, spark=spark)


if __name__ == "__main__":
    raise SystemExit(main())
