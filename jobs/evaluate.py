"""``evaluate``: recommendations + the test split -> ``user_metrics``, ``metrics``, ``comparisons``.

For one run id (``--run-id``, the key of ``recommendations``) and every representation the
``topk`` job ranked (the vector representations and the baselines):

- ``user_metrics``: Recall, NDCG, Precision, MAP, HitRate and MRR at each ``experiment.evaluate.ks``
  per user (``udfs.evaluate.metrics``). A user's relevant items are their test items that are in the
  candidate set ``topk`` stored for the run (the ``candidates`` table: never derived again from
  the current ``item_embeddings``) and not excluded from their ranking (``udfs.evaluate.protocol``).
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

Prints the results (``udfs.report.results_table``): the paper's rows in the paper's order (lvlm, title,
vision, title+vision and lvlm+vision fusions, als, popularity, random, then the others), one
block per K with each metric's mean and 95% CI, then each representation's paired difference
against the run's ``lvlm`` representation (mean, bootstrap CI, Holm-corrected p).
Rewrites of the same run id replace the run's rows for these representations.

Whether the descriptions carry any signal (``udfs.caption.description_stats``): for each LVLM
representation the job measures its texts and vectors as ``caption`` and ``embed`` do (counts
``descriptions_*``) and, when two items one user consumed (train split) have descriptions no
more alike than two random ones, prints a warning under the table that names the figures and
the fix (another engine, model or prompt), marks the ``lvlm`` row, and counts
``descriptions_without_signal``.

Each step is one ``udfs.evaluate.evaluate_udfs`` function (the relevance rule is
``udfs.evaluate.protocol.relevant_rows``), and where it runs is decided by size alone
(``jobs.driver_inputs``): while the run's recommendations and candidates and the dataset's
interactions are under ``spark.driver_compute_mb``, ``OnDriver`` reads them with delta-rs and
calls each function once over the whole frames; otherwise ``OnSpark`` reads them with Spark,
splits them into buckets of whole users or whole items (``jobs.spark_groups``: ``n`` buckets
of a key's hash, ``n`` growing with the rows so that a bucket stays bounded) and has Spark call the same functions per
bucket (``applyInPandas``, cogrouped where a step takes two inputs) and the summary and
comparisons per metric@k group. Both write through the same three commits and count, warn and
fail alike from the same ``EvaluationFacts``; the runs row says ``computed_on_driver`` when the
driver computed.
"""
from __future__ import annotations

if not __package__:  # run as a file (`spark-submit jobs/<job>.py`): see jobs/_as_package.py
    from _as_package import PACKAGE as __package__

import argparse
import functools
import logging
from collections.abc import Callable

import pandas as pd
import pyarrow as pa
from pyspark import StorageLevel
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql.types import StructType

from udfs.evaluate import evaluate_udfs, protocol
from udfs.io import warehouse_writer
from udfs.evaluate.evaluate_udfs import EvaluationFacts
from udfs.evaluate.metrics import METRICS
from udfs.report.results_table import results_table
from udfs.spark import schemas

from . import description_figures, tables
from .config import ConfigError
from .driver_inputs import Slice, read_on_driver
from .job_run import Job, JobRun, NothingUsable, add_plan_arguments
from .plan import EVALUATE_FIELDS, ExperimentPlan, plan_for_run
from .spark_groups import ROWS_PER_GROUP, bucket, n_groups

log = logging.getLogger(__name__)

# Input rows per bucket on Spark (jobs.spark_groups' rule): a bucket is one pandas frame in one
# Python worker.
ROWS_PER_BUCKET = ROWS_PER_GROUP


def input_slices(run_id: str, wanted: list[str], dataset: str) -> dict[str, Slice]:
    """What the job reads: the run's lists and stored candidates of ``wanted``, the dataset's splits."""
    of_run = {"equal": {"run_id": run_id}, "within": {"representation": wanted}}
    return {"recommendations": Slice("recommendations", **of_run,
                                     columns=["representation", "user_id", "rank", "item_id", "topk_id"]),
            "candidates": Slice("candidates", **of_run, columns=["representation", "item_id", "topk_id"]),
            "interactions": Slice("interactions", equal={"dataset": dataset}, columns=["user_id", "item_id", "split"])}


class OnDriver:
    """Each function called once over the whole inputs, read with delta-rs (small inputs)."""

    def __init__(self, run: JobRun, run_id: str, read: dict[str, pa.Table]):
        self.run, self.run_id = run, run_id
        self.inputs = {name: table.to_pandas() for name, table in read.items()}

    def per_bucket(self, key: str, function: Callable, ddl: str, *frames: pd.DataFrame) -> pd.DataFrame:
        return function(*frames)

    def per_group(self, frame: pd.DataFrame, keys: list[str], function: Callable, ddl: str) -> pd.DataFrame:
        return evaluate_udfs.apply_by_group(frame, keys, function, StructType.fromDDL(ddl).fieldNames())

    def gather(self, *frames: pd.DataFrame) -> pd.DataFrame:
        return pd.concat(frames, ignore_index=True)

    def write(self, name: str, frame: pd.DataFrame, where: dict) -> int:
        rows = warehouse_writer.with_constants(pa.Table.from_pandas(frame, preserve_index=False),
                                               {"run_id": self.run_id})
        tables.replace_slice(self.run.spark, self.run.warehouse, name, rows, where)
        return len(frame)

    def release(self) -> None:
        pass


class OnSpark:
    """The same functions called by Spark per bucket of whole users or items and per group:
    what full catalogs and clusters run. Every step's output is cached until ``release``."""

    def __init__(self, run: JobRun, run_id: str, slices: dict[str, Slice]):
        self.run, self.run_id, self.cached = run, run_id, []
        self.inputs = {name: tables.read(run.spark, run.warehouse, part.table)
                       .filter(tables.slice_filter({**part.equal, **part.within})).select(*part.columns)
                       for name, part in slices.items()}
        rows = functools.reduce(DataFrame.unionByName, [f.select(F.lit(1).alias("row"))
                                                        for f in self.inputs.values()]).count()
        self.n_buckets = n_groups(run.spark, rows, ROWS_PER_BUCKET)

    def _kept(self, frame: DataFrame) -> DataFrame:
        self.cached.append(frame.persist(StorageLevel.MEMORY_AND_DISK))
        return frame

    def per_bucket(self, key: str, function: Callable, ddl: str, *frames: DataFrame) -> DataFrame:
        first, *other = [f.groupBy(bucket(key, self.n_buckets)) for f in frames]
        return self._kept((first.cogroup(*other) if other else first).applyInPandas(function, ddl))

    def per_group(self, frame: DataFrame, keys: list[str], function: Callable, ddl: str) -> DataFrame:
        return self._kept(frame.groupBy(*keys).applyInPandas(function, ddl))

    def gather(self, *frames: DataFrame) -> pd.DataFrame:
        return functools.reduce(DataFrame.unionByName, frames).toPandas()

    def write(self, name: str, frame: DataFrame, where: dict) -> int:
        # The write computes (and caches) the rows: the count then reads the cache.
        tables.replace_slice(self.run.spark, self.run.warehouse, name, frame.withColumn("run_id", F.lit(self.run_id)),
                             where)
        return frame.count()

    def release(self) -> None:
        for frame in self.cached:
            frame.unpersist()


def user_lists_and_facts(path: OnDriver | OnSpark,
                         exclude: tuple[str, ...]) -> tuple[pd.DataFrame | DataFrame, EvaluationFacts]:
    """Each user's lists (``udfs.evaluate.evaluate_udfs.user_lists``) and the facts of the inputs."""
    recommendations, candidates, interactions = (path.inputs[k] for k in ("recommendations", "candidates",
                                                                           "interactions"))
    relevant = path.per_bucket("item_id", lambda rows, stored: protocol.relevant_rows(rows, stored, exclude),
                               schemas.RELEVANT_DDL, interactions, candidates)
    lists = path.per_bucket("user_id", evaluate_udfs.user_lists, schemas.USER_LISTS_DDL, relevant,
                            recommendations)
    facts = [path.per_bucket("user_id", evaluate_udfs.topk_facts("recommendations"), schemas.FACTS_DDL,
                             recommendations),
             path.per_bucket("item_id", evaluate_udfs.topk_facts("candidates"), schemas.FACTS_DDL, candidates),
             path.per_bucket("user_id", evaluate_udfs.test_facts, schemas.FACTS_DDL, interactions),
             path.per_bucket("user_id", evaluate_udfs.list_facts, schemas.FACTS_DDL, lists)]
    return lists, evaluate_udfs.evaluation_facts(path.gather(*facts))


def checked_representations(run: JobRun, facts: EvaluationFacts, run_id: str, wanted: list[str],
                            plan: ExperimentPlan) -> tuple[list[str], int]:
    """From the facts: the representations to measure (in ``wanted``'s order) and the users to
    measure; counts what is left out and why, warns, and raises ``NothingUsable`` where nothing
    can be measured or the inputs disagree."""
    order = [rep for rep in wanted if facts.of(rep).recommendations]
    for rep in wanted:
        if rep not in order:
            run.count("representations_without_recommendations")
            log.warning("representation %s has no recommendations under run id %s: run `vlm4rec topk "
                        "--run-id %s` with it first; it is left out of this evaluation",
                        rep, run_id, run_id)
    if not order:
        raise NothingUsable(f"no recommendations under run id {run_id} for {wanted}: "
                            "run `vlm4rec topk` first")
    missing = [rep for rep in order if not facts.of(rep).candidates]
    if missing:
        raise NothingUsable(f"run id {run_id}: no stored candidate set for {missing} (ranked by a topk "
                            f"that predates the candidates table): run `vlm4rec topk --run-id {run_id}` again")
    for rep in order:
        # A topk killed between its candidates and recommendations commits leaves the two from
        # different rankings (rows written before the column existed are null: not checked).
        if len(facts.of(rep).topk_ids) > 1:
            raise NothingUsable(
                f"run id {run_id}, representation {rep}: the candidates and the recommendations come from "
                f"different topk runs ({', '.join(facts.of(rep).topk_ids)}; a topk stopped between its two "
                f"commits): run `vlm4rec topk --run-id {run_id}` again")

    for name in ("test_rows", "test_users", "test_users_without_train"):
        run.count(name, getattr(facts, name))
    if facts.test_rows == 0:
        raise NothingUsable(f"dataset '{plan.dataset}' has no test interactions: check the split settings "
                            "and run `vlm4rec ingest` again")
    n_evaluated = 0
    for rep in order:
        found = facts.of(rep)
        evaluated = found.users_with_relevant - found.users_without_list
        counts = {"test_rows_outside_candidates": facts.test_rows - found.candidate_test_rows,
                  "test_rows_excluded": found.excluded_test_rows,
                  "users_without_relevant": facts.test_users - found.users_with_relevant,
                  "users_without_recommendations": found.users_without_list, "users_evaluated": evaluated}
        for name, n in counts.items():
            run.count(f"{name}_{rep}", n)
        n_evaluated += evaluated
        if found.users_without_list:
            log.warning("representation %s: %d users with relevant test items have no recommendation list "
                        "(no profile: no train item with a vector); they are left out of its metrics",
                        rep, found.users_without_list)
    return order, n_evaluated


def evaluate(run: JobRun, args: argparse.Namespace) -> None:
    if not args.run_id:
        raise ConfigError("--run-id is required: pass the run id that topk keyed recommendations by")
    run_id = args.run_id
    # The run's plan: the settings topk ranked with; a flag that disagrees is refused (exit 2).
    plan = plan_for_run(run, run_id, EVALUATE_FIELDS)
    ks, wanted = list(plan.ks), list(plan.ranked)

    path: OnDriver | OnSpark | None = None
    try:
        with run.stage("prepare"):
            # Small inputs (under spark.driver_compute_mb) are measured on the driver: the same
            # functions and the same commits without a Spark job per step (jobs.driver_inputs).
            slices = input_slices(run_id, wanted, plan.dataset)
            read = read_on_driver(run, slices)
            path = OnSpark(run, run_id, slices) if read is None else OnDriver(run, run_id, read)
            lists, facts = user_lists_and_facts(path, plan.exclude)
            order, n_evaluated = checked_representations(run, facts, run_id, wanted, plan)

        # Each table's slice of this run is replaced in one atomic commit (replaceWhere): a
        # representation dropped from the run loses its old rows, and readers see no mix.
        where = {"run_id": run_id, "representation": order}
        with run.stage("user_metrics"):
            if n_evaluated == 0:
                raise NothingUsable(f"run id {run_id}: no user has both a relevant test item and a list")
            values = path.per_bucket("user_id", evaluate_udfs.user_metric_rows(ks, order), schemas.USER_METRICS_DDL,
                                     lists)
            run.count("user_metrics_rows", path.write("user_metrics", values, where))

        with run.stage("summary"):
            summary = path.per_group(values, ["representation", "metric", "k"],
                                     evaluate_udfs.metric_summary(plan.bootstrap_samples, plan.evaluate_seed),
                                     schemas.METRICS_DDL)
            # Collected first (it fills the cache the write then reads): the rows are printed.
            summary_rows = path.gather(summary).to_dict("records")
            path.write("metrics", summary, where)
            run.count("metrics_rows", len(summary_rows))

        with run.stage("comparisons"):
            comparisons = path.per_group(values, ["metric", "k"], evaluate_udfs.comparison_groups(
                order, plan.bootstrap_samples, plan.evaluate_seed, plan.significance_test), schemas.COMPARISONS_DDL)
            comparison_rows = path.gather(comparisons).to_dict("records")
            path.write("comparisons", comparisons, {"run_id": run_id, "representation_a": order})
            run.count("comparisons_rows", len(comparison_rows))
            expected = len(order) * (len(order) - 1) // 2 * len(ks) * len(METRICS)
            run.count("pairs_without_common_users", expected - len(comparison_rows))
    finally:
        if path is not None:
            path.release()
    print(f"evaluation of run {run_id} on {plan.dataset} ({plan.candidates} candidates, "
          f"excluding {'+'.join(plan.exclude) or 'nothing'}):")
    with run.stage("descriptions"):
        # Whether the descriptions carry any signal: metrics of lvlm near random otherwise
        # read as the method's failure (udfs.caption.description_stats).
        warnings = description_figures.check_descriptions(run, plan.dataset, order)
    print(results_table(summary_rows, comparison_rows, order, ks, notes=warnings))


JOB = Job("evaluate", __doc__.splitlines()[0], evaluate, add_plan_arguments)


def main(argv: list[str] | None = None, spark=None) -> int:
    return JOB.main(argv, spark=spark)


if __name__ == "__main__":
    raise SystemExit(main())
