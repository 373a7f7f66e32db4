"""The ``embed`` job's table rules in pandas, for its driver path (``jobs.driver_inputs``).

The Spark path states the same rules as joins and column expressions (``jobs.embed``); both feed
the same batch functions (``udfs.embedding_udfs``), and the job's tests prove the two write the
same rows and counts. Frames here are the Spark path's row shapes: (representation, item_id,
text | image_uri, pre_status, source_sha256).
"""
from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd

from udfs.embedding_udfs import OK


def _nulls(n: int) -> np.ndarray:
    return np.full(n, None, dtype=object)


def _objects(column: pd.Series) -> np.ndarray:
    """A column as Python objects with None for every missing value (NaN included)."""
    values = column.to_numpy(dtype=object)
    return np.where(pd.isna(values), None, values)


def catalog_text_rows(items: pd.DataFrame, representation: str, column: str) -> pd.DataFrame:
    """(representation, item_id, text, pre_status) of ``title`` or ``text``."""
    return pd.DataFrame({"representation": representation, "item_id": _objects(items["item_id"]),
                         "text": _objects(items[column]), "pre_status": _nulls(len(items))})


def description_rows(items: pd.DataFrame, descriptions: pd.DataFrame | None, representation: str,
                     engine: str, model: str, prompt_id: str) -> pd.DataFrame:
    """(representation, item_id, text, pre_status) of an LVLM representation: the description of
    each item's image, or why there is none (``no_image``, ``missing_description``,
    ``failed_caption``: a status other than ok, or none)."""
    columns = ["image_sha256", "_found", "_status", "_text"]
    if descriptions is None or descriptions.empty:
        found = pd.DataFrame({c: pd.Series([], dtype=object) for c in columns})
    else:
        chosen = descriptions[(descriptions["engine"] == engine) & (descriptions["model"] == model)
                              & (descriptions["prompt_id"] == prompt_id)]
        found = pd.DataFrame({"image_sha256": _objects(chosen["image_sha256"]), "_found": True,
                              "_status": _objects(chosen["status"]), "_text": _objects(chosen["text"])})
    left = pd.DataFrame({"item_id": _objects(items["item_id"]), "image_sha256": _objects(items["image_sha256"])})
    # A null hash joins nothing, as in SQL.
    joined = left.merge(found[found["image_sha256"].notna()], on="image_sha256", how="left")
    sha, seen, status = (_objects(joined[c]) for c in ("image_sha256", "_found", "_status"))
    pre = np.array(["no_image" if h is None else "missing_description" if f is None
                    else "failed_caption" if s != OK else None for h, f, s in zip(sha, seen, status)], dtype=object)
    return pd.DataFrame({"representation": representation, "item_id": _objects(joined["item_id"]),
                         "text": _objects(joined["_text"]), "pre_status": pre})


def with_text_hash(rows: pd.DataFrame) -> pd.DataFrame:
    """``source_sha256``: the sha256 (hex) of the text's UTF-8 bytes the encoder gets, as Spark's
    ``sha2(text, 256)``; None when it gets none."""
    hashes = [hashlib.sha256(t.encode("utf-8")).hexdigest() if p is None and t is not None else None
              for t, p in zip(_objects(rows["text"]), _objects(rows["pre_status"]))]
    return rows.assign(source_sha256=pd.Series(hashes, index=rows.index, dtype=object))


def image_rows(items: pd.DataFrame, representation: str) -> pd.DataFrame:
    """(representation, item_id, image_uri, pre_status, source_sha256): the image bytes' hash
    taken at ingest."""
    return pd.DataFrame({"representation": representation, "item_id": _objects(items["item_id"]),
                         "image_uri": _objects(items["image_uri"]), "pre_status": _nulls(len(items)),
                         "source_sha256": _objects(items["image_sha256"])})


def split_reusable(rows: pd.DataFrame, previous: pd.DataFrame | None,
                   encoder: str) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """(rows to encode, reused rows: representation, item_id, vector, status, source_sha256): a
    stored vector (``previous``: representation, item_id, source_sha256, encoder, vector, with a
    hash) is reused when it came from ``encoder`` and an input with the same hash."""
    if previous is None:
        return rows, None
    stored = previous.rename(columns={"source_sha256": "_prev_source", "encoder": "_prev_encoder",
                                      "vector": "_prev_vector"})
    joined = rows.merge(stored, on=["representation", "item_id"], how="left")
    source, prev = _objects(joined["source_sha256"]), _objects(joined["_prev_source"])
    same = np.array([s is not None and p is not None and s == p for s, p in zip(source, prev)], dtype=bool)
    same &= (_objects(joined["_prev_encoder"]) == encoder)
    reused = pd.DataFrame({"representation": joined["representation"].to_numpy()[same],
                           "item_id": joined["item_id"].to_numpy()[same],
                           "vector": joined["_prev_vector"].to_numpy()[same], "status": OK,
                           "source_sha256": source[same]})
    return joined.loc[~same, list(rows.columns)].reset_index(drop=True), reused


def fusion_parts(encoded: pd.DataFrame, parts: list[str]) -> pd.DataFrame:
    """(item_id, part_0, ..., part_{k-1}) of the items with an ``ok`` vector in every part."""
    ok = encoded[encoded["status"] == OK]
    joined = None
    for j, part in enumerate(parts):
        frame = ok.loc[ok["representation"] == part, ["item_id", "vector"]].rename(columns={"vector": f"part_{j}"})
        joined = frame if joined is None else joined.merge(frame, on="item_id")
    return joined.reset_index(drop=True)
