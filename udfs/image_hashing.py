"""Spark wrapper: check and hash every item's image on the executors, in parallel.

Local paths are opened, fully decoded (so a truncated file is caught here, not in the caption
job) and hashed; remote URIs (``http://``, ``s3://``) are left for the caption job to fetch and
get no hash yet.
"""
from __future__ import annotations

from typing import Iterator

import pandas as pd

from .images import check_image

REMOTE_PREFIXES = ("http://", "https://", "s3://", "s3a://", "gs://", "abfs://", "hdfs://")


def _check_batches(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
    for batch in batches:
        hashes, errors = [], []
        for uri in batch["image_uri"]:
            if uri is None or (isinstance(uri, float) and pd.isna(uri)) or uri == "":
                hashes.append(None)
                errors.append(None)
            elif str(uri).startswith(REMOTE_PREFIXES):
                hashes.append(None)
                errors.append(None)
            else:
                path = str(uri)[7:] if str(uri).startswith("file://") else str(uri)
                digest, reason = check_image(path)
                hashes.append(digest)
                errors.append(reason)  # check_image's reason already names the file
        yield batch.assign(image_sha256=hashes, _image_error=errors)


def with_image_hashes(items):
    """``items`` (a Spark frame with ``image_uri``) plus ``image_sha256`` and ``_image_error``."""
    from pyspark.sql import types as T

    base = items.drop("image_sha256") if "image_sha256" in items.columns else items
    schema = T.StructType(base.schema.fields + [T.StructField("image_sha256", T.StringType()),
                                                T.StructField("_image_error", T.StringType())])
    return base.mapInPandas(_check_batches, schema)
