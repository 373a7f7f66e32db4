"""The collaborative-filtering reference ``als``: Spark ML's ALS with implicit preferences.

``train_als`` fits one model on a frame of TRAIN interactions (user_id, item_id) and returns the
user and item factors keyed by the string ids, so that the ``profiles`` job can store them as
the ``als`` representation (user factors in ``user_profiles``, item factors in
``item_embeddings``) and ``topk`` can rank them by dot product with the same blockwise kernel as
every other representation.

- Preference strength: the number of train interactions of the (user, item) pair (1 for a
  plain implicit dataset); Spark turns it into the confidence ``1 + alpha * count``.
- Ids: Spark's ALS takes integer ids; they are indexed alphabetically (``StringIndexer``,
  ``alphabetAsc``), so the same train set gives the same integer ids whatever the row order,
  and mapped back to the string ids before anything leaves this module.
- Factors are NOT normalised: the score of an implicit ALS model is the plain inner product
  (its prediction of the preference), and normalising would rank by cosine instead.
"""
from __future__ import annotations

from dataclasses import dataclass

from pyspark import StorageLevel
from pyspark.ml.feature import StringIndexer
from pyspark.ml.recommendation import ALS
from pyspark.sql import DataFrame
from pyspark.sql import functions as F


@dataclass(frozen=True)
class AlsSettings:
    """The model's hyper-parameters (``experiment.profiles.als``)."""

    rank: int
    reg_param: float
    alpha: float
    max_iter: int
    seed: int


def train_als(train: DataFrame, settings: AlsSettings) -> tuple[DataFrame, DataFrame]:
    """(user factors (user_id, vector array<float>), item factors (item_id, vector)) of an
    implicit ALS fitted on ``train`` (user_id, item_id, ...); every user and item of ``train``
    gets a factor. Deterministic for one ``settings.seed`` and one partitioning of ``train``."""
    pairs = (train.groupBy("user_id", "item_id").agg(F.count(F.lit(1)).cast("float").alias("strength"))
             .persist(StorageLevel.MEMORY_AND_DISK))
    try:
        # Both columns' labels in one pass (sorted per column, as two fits would sort them); the
        # aggregate is cached because the fit reads it again.
        ids = StringIndexer(inputCols=["user_id", "item_id"], outputCols=["_user", "_item"],
                            stringOrderType="alphabetAsc").fit(pairs)
        indexed = ids.transform(pairs).select(
            F.col("_user").cast("int").alias("_user"), F.col("_item").cast("int").alias("_item"), "strength")
        model = ALS(rank=settings.rank, maxIter=settings.max_iter, regParam=settings.reg_param,
                    alpha=settings.alpha, implicitPrefs=True, seed=settings.seed, userCol="_user",
                    itemCol="_item", ratingCol="strength", nonnegative=False).fit(indexed)
    finally:
        pairs.unpersist()
    user_labels, item_labels = ids.labelsArray
    return (_by_label(model.userFactors, user_labels, "user_id"),
            _by_label(model.itemFactors, item_labels, "item_id"))


def _by_label(factors: DataFrame, labels: list[str], column: str) -> DataFrame:
    """Factors (id int, features) -> (column string, vector): index i is ``labels[i]``."""
    ids = factors.sparkSession.createDataFrame(list(enumerate(labels)), f"id int, {column} string")
    return factors.join(ids, "id").select(column, F.col("features").alias("vector"))
