"""Thin ``mapInArrow`` wrapper that applies a trained fusion model (``udfs.fusion.fusion_models``) to
item vectors on the executors, for the ``fuse`` job.

Input batches: ``item_id`` and ``part_0`` .. ``part_{k-1}`` (list<float>, the parts in the
model's canonical order, joined on the item id by Spark, so a row can never pair one item's
part with another's). Output: ``item_id``, ``vector`` (L2-normalised float32) and ``status``
(``ok``, or ``bad_dim`` for a part whose length is not the model's input dimension). The model
is loaded once per Python worker from the broadcast bytes (Spark reuses workers across tasks).
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator

import numpy as np
import pyarrow as pa

OK = "ok"
BAD_DIM = "bad_dim"

OUTPUT = pa.schema([("item_id", pa.string()), ("vector", pa.list_(pa.float32())), ("status", pa.string())])

_MODELS: dict[str, object] = {}


def _model(blob: bytes):
    from udfs.fusion.fusion_training import load_model

    key = hashlib.sha256(blob).hexdigest()
    if key not in _MODELS:
        _MODELS.clear()
        _MODELS[key] = load_model(blob)
    return _MODELS[key]


def _matrix(column: pa.Array, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, dim) float32 rows and a mask of the rows whose list is null or not ``dim`` long; the
    Arrow values reach numpy in one piece (no per-row Python)."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    n = len(column)
    lengths = column.value_lengths().fill_null(-1).to_numpy(zero_copy_only=False)
    bad = np.asarray(lengths != dim)
    if not bad.any():
        # flatten() honours the slice's offsets; the copy gives torch a writable array
        values = np.array(column.flatten().to_numpy(zero_copy_only=False), dtype=np.float32)
        return values.reshape(n, dim), bad
    out = np.zeros((n, dim), np.float32)
    good = np.flatnonzero(~bad)
    if len(good):
        values = column.take(pa.array(good)).flatten().to_numpy(zero_copy_only=False)
        out[good] = values.astype(np.float32).reshape(len(good), dim)
    return out, bad


_STATUSES = pa.array([OK, BAD_DIM])


def apply_batches(blob: bytes, threads: int) -> Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]:
    """The ``mapInArrow`` function applying the model in ``blob`` (``fusion_training.model_bytes``)."""

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        from udfs.fusion.fusion_training import apply_fusion

        model, spec = _model(blob)
        for batch in batches:
            if batch.num_rows == 0:
                continue
            parts, bad = [], np.zeros(batch.num_rows, bool)
            for j, dim in enumerate(spec.dims):
                matrix, wrong = _matrix(batch.column(f"part_{j}"), int(dim))
                parts.append(matrix)
                bad |= wrong
            vectors = apply_fusion(model, parts, threads=threads)
            status = pa.DictionaryArray.from_arrays(pa.array(bad.astype(np.int8)), _STATUSES).cast(pa.string())
            flat = pa.array(vectors.ravel(), pa.float32())
            offsets = pa.array(np.arange(0, vectors.size + 1, vectors.shape[1], dtype=np.int32))
            column = pa.ListArray.from_arrays(offsets, flat, mask=pa.array(bad))
            yield pa.RecordBatch.from_arrays([batch.column("item_id"), column, status],
                                             schema=OUTPUT)

    return run
