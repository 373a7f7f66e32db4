"""Several small questions about the tables answered by ONE Spark job.

On small data a Spark job per question (its scheduling, its Python workers, the log replay of
each table it reads) costs more than the question itself: profiles, topk, evaluate and the
pipeline's closing counts each ask theirs in one ``collect`` of a union of small aggregates.
"""
from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

from pyspark.sql import Column, DataFrame, Row
from pyspark.sql import functions as F

Part = tuple[str, DataFrame, Mapping[str, Column]]


def collect_facts(columns: Mapping[str, str], parts: Sequence[Part]) -> list[Row]:
    """The rows of every part, each with a ``kind`` column naming its part. A part is
    ``(kind, frame, {column: expression over frame})``; every part is shaped to ``kind`` plus
    ``columns`` (name -> Spark SQL type; a column a part does not give is null) so that the
    parts union into one frame, collected once."""
    shaped = []
    for kind, frame, given in parts:
        unknown = set(given) - set(columns)
        if unknown:
            raise ValueError(f"part '{kind}' gives columns {sorted(unknown)} outside {sorted(columns)}")
        shaped.append(frame.select(F.lit(kind).alias("kind"),
                                   *[given.get(name, F.lit(None)).cast(kind_of).alias(name)
                                     for name, kind_of in columns.items()]))
    if not shaped:
        return []
    return functools.reduce(DataFrame.unionByName, shaped).collect()
