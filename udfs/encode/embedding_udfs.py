"""Thin pandas-UDF wrappers that Spark ships to executors for the ``embed`` and ``profiles`` jobs.

Each factory returns a plain function over pandas frames (``mapInPandas`` or
``groupBy(...).applyInPandas``); the numeric work stays in ``udfs.encode.text_encoder``,
``udfs.encode.image_encoder``, ``udfs.fusion.fusion`` and ``udfs.rank.profiles``, so everything here runs without
a Spark session too (tests feed it lists of frames).

Every input row comes out as one output row with a ``status``: ``ok`` with its vector, or a
short reason with a null vector, so the job counts what it skipped and why instead of losing
rows. Rows that arrive with a non-null ``pre_status`` (decided on the driver's side, e.g. "no
description for this image") pass through untouched.

Models are loaded once per Python worker (the encoders cache them per process, and Spark
reuses its Python workers between tasks). Each task sets torch's thread count to the cores
Spark gave it (``spark.task.cpus``): two tasks on two cores with two threads each would
oversubscribe the machine.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

OK = "ok"
# Statuses the text wrapper gives (beyond pass-through pre-statuses).
EMPTY_TEXT = "empty"
# Statuses the image wrapper gives beyond ``udfs.io.images.ImageError.kind``
# (missing, empty, not_image, truncated, too_large, unreadable).
NO_IMAGE = "no_image"
REMOTE_IMAGE = "remote_uri"
ENCODE_FAILED = "encode_failed"
# Status the fusion wrapper gives to a row whose parts cancel out.
ZERO_FUSION = "zero_fusion"

# Images are decoded at no more than twice the encoder's 224-pixel input: JPEGs then decode at a
# reduced DCT scale, and the model's own resize still has enough pixels to antialias.
IMAGE_MAX_SIDE = 448


def _set_torch_threads(threads: int) -> None:
    import torch

    if threads > 0 and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def _pre_status(batch: pd.DataFrame) -> np.ndarray:
    """The pass-through statuses as an object array (None where the row is to be encoded)."""
    if "pre_status" not in batch.columns:
        return np.full(len(batch), None, dtype=object)
    pre = batch["pre_status"].to_numpy(dtype=object, na_value=None)
    return np.where(pd.isna(pre), None, pre)


# Input columns a result row carries through unchanged when the input has them.
PASS_THROUGH = ("representation", "source_sha256")


def _result(batch: pd.DataFrame, key: str, vectors: list[Any], status: Sequence[str]) -> pd.DataFrame:
    passed = {c: batch[c].to_numpy() for c in PASS_THROUGH if c in batch.columns}
    return pd.DataFrame({**passed, key: batch[key].to_numpy(), "vector": vectors, "status": list(status)})


def text_vector_batches(
    model_name: str, batch_size: int = 64, threads: int = 1
) -> Callable[[Iterator[pd.DataFrame]], Iterator[pd.DataFrame]]:
    """``mapInPandas`` function: (representation, item_id, text[, pre_status]) ->
    (representation, item_id, vector, status) with the sentence encoder ``model_name``.

    A blank or missing text gets status ``empty`` (``encode_texts`` marks it invalid); rows of
    every representation in a batch share the encoder calls (one model for titles, texts and
    descriptions).
    """
    from udfs.encode.text_encoder import encode_texts

    def run(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        _set_torch_threads(threads)
        for batch in batches:
            pre = _pre_status(batch)
            todo = np.flatnonzero(pd.isna(pre))
            vectors: list[Any] = [None] * len(batch)
            status = [s if s is not None else EMPTY_TEXT for s in pre]
            if todo.size:
                encoded, valid = encode_texts(list(batch["text"].to_numpy(dtype=object)[todo]), model_name, batch_size)
                for row, vector, ok in zip(todo, encoded, valid):
                    if ok:
                        vectors[row] = vector
                        status[row] = OK
            yield _result(batch, "item_id", vectors, status)

    return run


def local_image_path(uri: object) -> tuple[str | None, str | None]:
    """``(path, None)`` for a local image reference, ``(None, status)`` when there is none."""
    if uri is None or (isinstance(uri, float) and np.isnan(uri)) or not str(uri).strip():
        return None, NO_IMAGE
    from udfs.io.images import readable_source

    path = readable_source(str(uri))
    return (None, REMOTE_IMAGE) if path is None else (path, None)


def _loaded_image(item_id: object, uri: object, max_side: int) -> tuple[Any, str | None]:
    """(the decoded image, None), or (None, why there is none: ``local_image_path``'s status or
    the ``ImageError.kind``, logged with its reason)."""
    from udfs.io.images import ImageError, load_image

    path, reason = local_image_path(uri)
    if path is None:
        return None, reason
    try:
        return load_image(path, max_side=max_side), None
    except ImageError as err:
        log.warning("item %s: %s", item_id, err.reason)
        return None, err.kind
    except Exception as err:  # noqa: BLE001 - one bad image never stops a catalog
        log.warning("item %s: image %r could not be read (%s: %s)", item_id, path, type(err).__name__, err)
        return None, "unreadable"


def image_vector_batches(
    encoder: str, batch_size: int = 32, threads: int = 1, max_side: int = IMAGE_MAX_SIDE
) -> Callable[[Iterator[pd.DataFrame]], Iterator[pd.DataFrame]]:
    """``mapInPandas`` function: (representation, item_id, image_uri[, pre_status]) ->
    (representation, item_id, vector, status) with image encoder ``encoder``.

    Images are decoded ``batch_size`` at a time (never a whole Arrow batch in memory). A missing,
    truncated or otherwise unreadable file gets the ``ImageError.kind`` as status and is logged
    with its reason; an ``http(s)://`` URI gets ``remote_uri`` (local files and object stores are
    read); a chunk the encoder fails on gets ``encode_failed``, logged once.
    """
    from udfs.encode.image_encoder import encode_images

    def run(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        _set_torch_threads(threads)
        for batch in batches:
            pre = _pre_status(batch)
            for start in range(0, len(batch), batch_size):
                chunk = batch.iloc[start:start + batch_size]
                status = list(pre[start:start + batch_size])
                loaded = {row: _loaded_image(item_id, uri, max_side)
                          for row, (item_id, uri) in enumerate(zip(chunk["item_id"], chunk["image_uri"]))
                          if status[row] is None}
                rows = [row for row, (image, reason) in loaded.items() if image is not None]
                status = [loaded[row][1] if row in loaded else s for row, s in enumerate(status)]
                vectors: list[Any] = [None] * len(chunk)
                try:
                    encoded = encode_images([loaded[row][0] for row in rows], batch_size, encoder) if rows else []
                except Exception as err:  # noqa: BLE001 - counted per item, logged once per chunk
                    log.warning("image encoder %s failed on a chunk of %d images (%s: %s)",
                                encoder, len(rows), type(err).__name__, err)
                    encoded = None
                for i, row in enumerate(rows):
                    vectors[row] = None if encoded is None else encoded[i]
                    status[row] = ENCODE_FAILED if encoded is None else OK
                yield _result(chunk, "item_id", vectors, status)

    return run


def stack_vectors(column: pd.Series) -> np.ndarray:
    """A column of equal-length arrays as one (n, d) float32 array."""
    if len(column) == 0:
        return np.zeros((0, 0), dtype=np.float32)
    return np.stack([np.asarray(v, dtype=np.float32) for v in column.to_numpy()])


def fused_vector_batches(
    method: str, parts: Sequence[str], weights: dict[str, float] | None = None, key: str = "item_id"
) -> Callable[[Iterator[pd.DataFrame]], Iterator[pd.DataFrame]]:
    """``mapInPandas`` function: (``key``, part_0, ..., part_{k-1}[, n_history]) ->
    (``key``, vector, status[, n_history]) fused with ``udfs.fusion.fusion.fuse``.

    ``part_j`` holds the vector of ``parts[j]``. Serves both item vectors (``key="item_id"``)
    and user profiles (``key="user_id"``; fusing per-modality profiles, as the fusion module
    prescribes). A row whose parts cancel out gets status ``zero_fusion``.
    """
    from udfs.fusion.fusion import fuse

    names = list(parts)

    def fused_row(arrays: dict[str, np.ndarray], i: int) -> np.ndarray | None:
        try:
            return fuse(method, {n: a[i:i + 1] for n, a in arrays.items()}, weights)[0]
        except ValueError:
            return None

    def fuse_rows(batch: pd.DataFrame) -> tuple[list[Any], list[str]]:
        arrays = {name: stack_vectors(batch[f"part_{j}"]) for j, name in enumerate(names)}
        try:
            return list(fuse(method, arrays, weights)), [OK] * len(batch)
        except ValueError:
            # Rare (parts that cancel out): redo row by row so only the bad rows are lost.
            vectors = [fused_row(arrays, i) for i in range(len(batch))]
            return vectors, [OK if v is not None else ZERO_FUSION for v in vectors]

    def run(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for batch in batches:
            if batch.empty:
                continue
            vectors, status = fuse_rows(batch)
            out = pd.DataFrame({key: batch[key].to_numpy(), "vector": vectors, "status": status})
            if "n_history" in batch.columns:
                out["n_history"] = batch["n_history"].to_numpy(dtype=np.int32)
            yield out

    return run


def profile_groups(
    half_life_days: float | None = None,
) -> Callable[[tuple, pd.DataFrame], pd.DataFrame]:
    """``groupBy("representation", <bucket>).applyInPandas`` function: history rows
    (representation, user_id, vector[, ts]) of whole users -> (representation, user_id, vector,
    n_history), via ``udfs.rank.profiles.profiles_frame``. A group holds many users (a hash bucket),
    so the profile arithmetic stays vectorised over users.
    """
    from udfs.rank.profiles import profiles_frame

    def run(key: tuple, history: pd.DataFrame) -> pd.DataFrame:
        profiles = profiles_frame(history, half_life_days)
        profiles.insert(0, "representation", key[0])
        return profiles

    return run
