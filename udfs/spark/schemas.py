"""Every Spark output schema in one place: the Delta table contract (``SCHEMAS``, keyed by table
name, and ``VECTOR``, the stored vector type) and the schemas of the frames the jobs build on
the executors (``mapInPandas``/``mapInArrow``/``applyInPandas`` outputs, and the frames they
create for a table).

``jobs.tables`` holds the contract's keys, partitions and writes and re-exports ``SCHEMAS`` and
``VECTOR`` under its own name. Schemas that *parse input* stay with the reader that needs them:
the adapters' permissive CSV/JSON readers build a string column per header field plus
``_corrupt_record`` from the file itself (``jobs/adapters/base.py`` ``read_table_file``,
``jobs/adapters/amazon.py`` ``_parse``); ``tests/test_layers.py`` allows those two sites and no
other ``StructType`` outside this module. The outputs of the top-k and evaluate functions are
Spark DDL strings (``*_DDL``, below): the Arrow/pandas functions in ``udfs.rank.topk_udfs`` and
``udfs.evaluate.evaluate_udfs`` emit them, and DDL is what ``applyInArrow``/``applyInPandas`` take.
"""
from __future__ import annotations

from pyspark.sql import types as T

# --- the table contract ----------------------------------------------------------------------

VECTOR = T.ArrayType(T.FloatType(), containsNull=False)

SCHEMAS: dict[str, T.StructType] = {
    "items": T.StructType([
        T.StructField("dataset", T.StringType(), False),
        T.StructField("item_id", T.StringType(), False),
        T.StructField("title", T.StringType()),
        T.StructField("text", T.StringType()),
        T.StructField("image_uri", T.StringType()),
        T.StructField("image_sha256", T.StringType()),
        T.StructField("attrs", T.MapType(T.StringType(), T.StringType())),
        # The run id of the ingest that wrote the row: see ``jobs.tables.same_ingest``.
        T.StructField("ingest_id", T.StringType()),
    ]),
    "interactions": T.StructType([
        T.StructField("dataset", T.StringType(), False),
        T.StructField("user_id", T.StringType(), False),
        T.StructField("item_id", T.StringType(), False),
        T.StructField("ts", T.LongType(), False),
        T.StructField("rating", T.DoubleType()),
        T.StructField("split", T.StringType(), False),
        T.StructField("ingest_id", T.StringType()),
    ]),
    "rejects": T.StructType([
        T.StructField("dataset", T.StringType(), False),
        T.StructField("source", T.StringType(), False),
        T.StructField("row", T.StringType(), False),
        T.StructField("reason", T.StringType(), False),
        T.StructField("content", T.StringType()),
    ]),
    "descriptions": T.StructType([
        T.StructField("image_sha256", T.StringType(), False),
        T.StructField("engine", T.StringType(), False),
        T.StructField("model", T.StringType(), False),
        T.StructField("prompt_id", T.StringType(), False),
        T.StructField("item_id", T.StringType()),
        T.StructField("prompt", T.StringType()),
        T.StructField("text", T.StringType()),
        T.StructField("n_tokens", T.IntegerType()),
        T.StructField("latency_ms", T.DoubleType()),
        T.StructField("status", T.StringType()),
        T.StructField("error", T.StringType()),
        T.StructField("created_at", T.TimestampType()),
    ]),
    "item_embeddings": T.StructType([
        T.StructField("dataset", T.StringType(), False),
        T.StructField("item_id", T.StringType(), False),
        T.StructField("representation", T.StringType(), False),
        T.StructField("encoder", T.StringType()),
        T.StructField("dim", T.IntegerType()),
        T.StructField("vector", VECTOR),
        # sha256 of the encoder's input (the text, or the image's bytes); null for fusions
        T.StructField("source_sha256", T.StringType()),
    ]),
    "user_profiles": T.StructType([
        T.StructField("run_id", T.StringType(), False),
        T.StructField("user_id", T.StringType(), False),
        T.StructField("representation", T.StringType(), False),
        T.StructField("vector", VECTOR),
        T.StructField("n_history", T.IntegerType()),
    ]),
    "recommendations": T.StructType([
        T.StructField("run_id", T.StringType(), False),
        T.StructField("user_id", T.StringType(), False),
        T.StructField("representation", T.StringType(), False),
        T.StructField("rank", T.IntegerType(), False),
        T.StructField("item_id", T.StringType()),
        T.StructField("score", T.FloatType()),
        T.StructField("topk_id", T.StringType()),
    ]),
    "user_metrics": T.StructType([
        T.StructField("run_id", T.StringType(), False),
        T.StructField("user_id", T.StringType(), False),
        T.StructField("representation", T.StringType(), False),
        T.StructField("metric", T.StringType(), False),
        T.StructField("k", T.IntegerType(), False),
        T.StructField("value", T.DoubleType()),
    ]),
    "metrics": T.StructType([
        T.StructField("run_id", T.StringType(), False),
        T.StructField("representation", T.StringType(), False),
        T.StructField("metric", T.StringType(), False),
        T.StructField("k", T.IntegerType(), False),
        T.StructField("value", T.DoubleType()),
        T.StructField("n_users", T.LongType()),
        T.StructField("ci_low", T.DoubleType()),
        T.StructField("ci_high", T.DoubleType()),
    ]),
    "comparisons": T.StructType([
        T.StructField("run_id", T.StringType(), False),
        T.StructField("representation_a", T.StringType(), False),
        T.StructField("representation_b", T.StringType(), False),
        T.StructField("metric", T.StringType(), False),
        T.StructField("k", T.IntegerType(), False),
        T.StructField("mean_diff", T.DoubleType()),
        T.StructField("ci_low", T.DoubleType()),
        T.StructField("ci_high", T.DoubleType()),
        # Cohen's d_z of the per-user differences; the test that gave p_value (t, randomization,
        # wilcoxon: null in rows written before the test was a setting, which were Wilcoxon's).
        T.StructField("effect_size", T.DoubleType()),
        T.StructField("test", T.StringType()),
        T.StructField("p_value", T.DoubleType()),
        T.StructField("p_holm", T.DoubleType()),
    ]),
    # The resolved experiment plan every job of a run reads (``jobs.plan.ExperimentPlan``).
    "plans": T.StructType([
        T.StructField("run_id", T.StringType(), False),
        T.StructField("plan", T.StringType(), False),
        T.StructField("plan_hash", T.StringType(), False),
        T.StructField("created_at", T.TimestampType()),
    ]),
    # The items ``topk`` ranked over, per representation: ``evaluate`` measures over these.
    "candidates": T.StructType([
        T.StructField("run_id", T.StringType(), False),
        T.StructField("representation", T.StringType(), False),
        T.StructField("item_id", T.StringType(), False),
        # The topk job run that wrote the row; recommendations carry it too (see evaluate).
        T.StructField("topk_id", T.StringType()),
    ]),
    # One trained fusion model per run and representation (``jobs.fuse``); the weights, the
    # settings, the training curve and the library versions lie under ``path``.
    "fusion_models": T.StructType([
        T.StructField("run_id", T.StringType(), False),
        T.StructField("representation", T.StringType(), False),
        T.StructField("parts", T.ArrayType(T.StringType())),
        T.StructField("objective", T.StringType()),
        T.StructField("params", T.StringType()),  # json: architecture and training settings
        T.StructField("epochs", T.IntegerType()),  # epochs run
        T.StructField("best_epoch", T.IntegerType()),
        T.StructField("valid_recall", T.DoubleType()),  # at params.eval_k, of the kept epoch
        T.StructField("train_seconds", T.DoubleType()),
        T.StructField("path", T.StringType()),
        T.StructField("sha256", T.StringType()),  # of the model file
        # sha256 of the training inputs, settings and library versions: equal means reusable
        T.StructField("inputs_sha256", T.StringType()),
        T.StructField("reused", T.BooleanType()),
        T.StructField("created_at", T.TimestampType()),
    ]),
    "runs": T.StructType([
        T.StructField("run_id", T.StringType(), False),
        T.StructField("job", T.StringType()),
        T.StructField("config", T.StringType()),
        T.StructField("code_version", T.StringType()),
        T.StructField("started_at", T.TimestampType()),
        T.StructField("finished_at", T.TimestampType()),
        T.StructField("status", T.StringType()),
        T.StructField("counts", T.MapType(T.StringType(), T.LongType())),
        T.StructField("error", T.StringType()),
        # Who runs it, so that the next job can tell a killed run from a running one.
        T.StructField("host", T.StringType()),
        T.StructField("pid", T.LongType()),
        T.StructField("driver_token", T.StringType()),
        T.StructField("heartbeat_at", T.TimestampType()),
    ]),
}


# --- frames the jobs build -------------------------------------------------------------------

# ``embed``: what an encoder gets, one row per (representation, item) (``udfs.encode.embed_inputs.input_rows``).
ITEM_INPUT_DDL = ("representation string, item_id string, text string, image_uri string, pre_status string, "
                  "source_sha256 string")
# ``embed``: one row per (representation, item) from an encoder, a stored vector or a fusion, with
# its status (``udfs.encode.embed_inputs.VECTOR_COLUMNS``). A StructType: the table's ``VECTOR`` holds no
# null element, which DDL cannot say.
ITEM_VECTOR_SCHEMA = T.StructType([
    T.StructField("representation", T.StringType(), False),
    T.StructField("item_id", T.StringType(), False),
    T.StructField("vector", VECTOR),
    T.StructField("status", T.StringType(), False),
    T.StructField("source_sha256", T.StringType()),
    T.StructField("encoder", T.StringType()),
    T.StructField("_reused", T.BooleanType()),
])
# ``profiles``: one user's profile of one representation, from the history rows.
PROFILE_SCHEMA = T.StructType([
    T.StructField("representation", T.StringType(), False),
    T.StructField("user_id", T.StringType(), False),
    T.StructField("vector", VECTOR),
    T.StructField("n_history", T.IntegerType()),
])
# ``fuse``: a trained fusion model applied to one item's parts (``udfs.fusion.fusion_udfs.OUTPUT``).
APPLIED_SCHEMA = T.StructType([
    T.StructField("item_id", T.StringType(), False),
    T.StructField("vector", VECTOR),
    T.StructField("status", T.StringType(), False),
])
# What an adapter emits as rejects: the rejects table's columns but ``dataset``, which ingest adds.
REJECT_SCHEMA = T.StructType([f for f in SCHEMAS["rejects"].fields if f.name != "dataset"])


def with_image_check(schema: T.StructType) -> T.StructType:
    """``schema`` (an items frame's, without ``image_sha256``) plus what
    ``udfs.spark.image_hashing.with_image_hashes`` adds: ``image_sha256`` and ``_image_error``."""
    return T.StructType(schema.fields + [T.StructField("image_sha256", T.StringType()),
                                         T.StructField("_image_error", T.StringType())])


# --- the top-k and evaluate functions' outputs (udfs.rank.topk_udfs, udfs.evaluate.evaluate_udfs) -----------

BLOCK_DDL = "block_id string, n int, dim int, ids array<string>, vectors binary"
USER_BLOCK_DDL = BLOCK_DDL + ", seen_counts array<int>, seen_ids array<string>"
USERS_SEEN_DDL = "user_id string, has_train boolean, seen array<string>"
PAIR_DDL = "user_block string, user_ids array<string>, width int, scores binary, item_ids array<string>"
RANKS_DDL = "representation string, user_id string, rank int, item_id string, score float"

USER_METRICS_DDL = "representation string, user_id string, metric string, k int, value double"
METRICS_DDL = ("representation string, metric string, k int, value double, n_users long, "
               "ci_low double, ci_high double")
COMPARISONS_DDL = ("representation_a string, representation_b string, metric string, k int, "
                   "mean_diff double, ci_low double, ci_high double, effect_size double, test string, "
                   "p_value double, p_holm double, n_users long")

# evaluate's steps before the metrics, per bucket of items or users: never written to a table.
RELEVANT_DDL = "representation string, user_id string, item_id string, excluded boolean"
USER_LISTS_DDL = ("representation string, user_id string, relevant array<string>, n_rows long, "
                  "n_excluded long, recommended array<string>")
FACTS_DDL = ("representation string, recommendations long, recommendations_from string, "
             "recommendations_to string, candidates long, candidates_from string, candidates_to string, "
             "candidate_test_rows long, excluded_test_rows long, users_with_relevant long, "
             "users_without_list long, test_rows long, test_users long, test_users_without_train long")
