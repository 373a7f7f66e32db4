"""Spark wrapper: check and hash every item's image on the executors, in parallel.

Local paths are confined to the dataset's images root (``udfs.io.images.resolve_under``: symbolic
links and ``..`` resolved; a path outside is rejected without being opened, unless
``allow_outside_root``; the resolved path is the one opened), then read within ``ReadLimits``, fully decoded (so a truncated file is
caught here, not in the caption job) and hashed; object-store URIs (``s3a://``, ``gs://``...)
are read and hashed the same way through ``udfs.io.storage``, not confined to the local root;
other remote URIs (``http://``) get no hash.
"""
from __future__ import annotations

import functools
from typing import Iterator

import pandas as pd

from udfs.io.images import ReadLimits, check_image, readable_source


def _check_batches(batches: Iterator[pd.DataFrame], images_root: str | None, limits: ReadLimits,
                   allow_outside_root: bool) -> Iterator[pd.DataFrame]:
    for batch in batches:
        checked = []
        for uri in batch["image_uri"]:
            # No image (null, NaN or ""), or http(s), hashed when something fetches it: no check.
            path = readable_source(uri) if isinstance(uri, str) and uri else None
            checked.append((None, None) if path is None else check_image(
                path, limits=limits, name=uri, images_root=images_root, confine=not allow_outside_root))
        # Each reason already names the file.
        yield batch.assign(image_sha256=[digest for digest, _ in checked],
                           _image_error=[reason for _, reason in checked])


def with_image_hashes(items, images_root: str | None = None, limits: ReadLimits | None = None,
                      allow_outside_root: bool = False):
    """``items`` (a Spark frame with ``image_uri``) plus ``image_sha256`` and ``_image_error``.

    ``images_root``: the folder every local image path must resolve into (the adapter's
    ``AdapterOutput.images_root``); ``None`` with ``allow_outside_root=False`` rejects every
    local path, since there is nothing to confine it to."""
    from udfs.spark.schemas import with_image_check

    base = items.drop("image_sha256")  # a no-op without the column
    check = functools.partial(_check_batches, images_root=images_root, limits=limits or ReadLimits(),
                              allow_outside_root=allow_outside_root)
    return base.mapInPandas(check, with_image_check(base.schema))
