"""The ``fuse`` job's inputs as arrays, and the hash that decides whether a stored model is reused.

- ``aligned_parts``: the items having a vector in every part of a fusion, sorted by id, and each
  part's rows in that order (an item missing a part is left out, never paired with another's row);
- ``indexed_interactions``: train / valid rows as (user index, item index) arrays over those items;
- ``inputs_digest``: sha256 over everything a trained model depends on (representation,
  settings, library versions, item ids, part vectors, train and valid rows), so that a rerun with
  equal inputs finds the model it would train again.

Pure numpy / pandas: no Spark, no torch (``library_versions`` reads installed versions only).
"""
from __future__ import annotations

import hashlib
import json
import platform

import numpy as np
import pandas as pd

from udfs.encode.text_encoder import package_version
from udfs.evaluate.protocol import TRAIN_SPLIT, VALID_SPLIT
from udfs.representations import Representation

# The interaction splits a fusion may see: train in the loss, valid for early stopping.
FUSE_SPLITS = (TRAIN_SPLIT, VALID_SPLIT)


def library_versions() -> dict[str, str]:
    return {"python": platform.python_version(),
            **{package: package_version(package) or "absent" for package in ("torch", "numpy")}}


def aligned_parts(frames: dict[str, pd.DataFrame], rep: Representation) -> tuple[np.ndarray, list[np.ndarray]]:
    """(item ids having every part, sorted; each part's (n, d) float32 rows in that order).

    ``frames``: part -> (item_id, vector) frame. A part whose vectors differ in length, or that
    holds an item twice, is a ``ValueError`` naming it."""
    ids = set.intersection(*[set(frames[part]["item_id"]) for part in rep.parts])
    item_ids = np.array(sorted(ids), dtype=object)
    matrices = []
    for part in rep.parts:
        if not frames[part]["item_id"].is_unique:
            raise ValueError(f"representation '{part}' holds an item more than once: rerun `vlm4rec embed` for it")
        frame = frames[part].set_index("item_id").loc[item_ids]
        dims = {len(v) for v in frame["vector"]}
        if len(dims) > 1:
            raise ValueError(f"representation '{part}' holds vectors of dimensions {sorted(dims)}: "
                             "rerun `vlm4rec embed` for it")
        matrices.append(np.stack(frame["vector"].to_numpy()).astype(np.float32) if len(frame)
                        else np.zeros((0, 1), np.float32))
    return item_ids, matrices


def indexed_interactions(interactions: pd.DataFrame, item_ids: np.ndarray):
    """((train users, train items, valid users, valid items) as int64 indices, users numbered in
    sorted id order; the number of rows whose item is not among ``item_ids``).

    ``interactions``: (user_id, item_id, split) with split in ``FUSE_SPLITS``; any other split
    is a ``ValueError`` (the caller filters test rows out before they get here)."""
    other = sorted(set(interactions["split"]) - set(FUSE_SPLITS))
    if other:
        raise ValueError(f"interactions of split(s) {other} given to a fusion: only {list(FUSE_SPLITS)} may be read")
    items = pd.Index(item_ids).get_indexer(interactions["item_id"])
    known = items >= 0
    kept = interactions[known]
    users = pd.Index(sorted(kept["user_id"].unique())).get_indexer(kept["user_id"])
    items = items[known]
    train = (kept["split"] == TRAIN_SPLIT).to_numpy()
    return (users[train].astype(np.int64), items[train].astype(np.int64), users[~train].astype(np.int64),
            items[~train].astype(np.int64)), int((~known).sum())


def inputs_digest(rep: Representation, params: dict, item_ids: np.ndarray, matrices: list[np.ndarray],
                  interactions: pd.DataFrame) -> str:
    """sha256 (hex) of the representation, ``params``, library versions, item ids, the parts'
    float32 rows and the interactions (order-independent: rows are sorted first)."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"representation": rep.name, "params": params, "versions": library_versions()},
                             sort_keys=True).encode())
    digest.update("\n".join(item_ids.tolist()).encode())
    for matrix in matrices:
        digest.update(np.ascontiguousarray(matrix, dtype=np.float32).tobytes())
    rows = interactions.sort_values(["split", "user_id", "item_id"], kind="stable")
    for column in ("split", "user_id", "item_id"):
        digest.update("\x1f".join(rows[column].astype(str).tolist()).encode())
    return digest.hexdigest()
