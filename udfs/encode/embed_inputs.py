"""The ``embed`` job's rules, each written once, as pandas functions over rows of its inputs.

Both of the job's paths call the same functions: the driver path on the whole of each input
(``jobs.driver_inputs``), the Spark path on each bucket of a bounded hash of the rows' key
(``applyInPandas``; ``jobs.embed``). A bucket holds every row of its keys (an image hash for
``input_rows``, an item for ``encoded_or_reused`` and ``fused``), so a bucket's output is the
whole input's output restricted to those keys. No function here needs a Spark session.

Frames: items (item_id, title, text, image_uri, image_sha256); descriptions (image_sha256,
engine, model, prompt_id, status, text); inputs (``INPUT_COLUMNS``: what an encoder gets, with
``pre_status`` the reason it gets nothing, decided here); previous vectors (representation,
item_id, source_sha256, encoder, vector); vectors (``VECTOR_COLUMNS``: every row gets one, with
a ``status``: ``ok``, or why there is no vector).
"""
from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from udfs.encode.embedding_udfs import OK, fused_vector_batches, image_vector_batches, text_vector_batches
from udfs.representations import LVLM, VISUAL, Representation

INPUT_COLUMNS = ["representation", "item_id", "text", "image_uri", "pre_status", "source_sha256"]
VECTOR_COLUMNS = ["representation", "item_id", "vector", "status", "source_sha256", "encoder", "_reused"]


@dataclass(frozen=True)
class Encoding:
    """One encoder's share of a run: the representations it makes (the text ones, or
    ``visual``), the model name the table records, and its batch size and torch threads."""

    encoder: str
    representations: tuple[Representation, ...]
    batch_size: int
    threads: int = 1
    dim: int = 0  # the vectors' dimension, when known before encoding

    @property
    def is_image(self) -> bool:
        return self.representations[0].kind == VISUAL

    def batches(self) -> Callable[[Iterator[pd.DataFrame]], Iterator[pd.DataFrame]]:
        """The batch function of ``udfs.encode.embedding_udfs`` that encodes this share's inputs."""
        factory = image_vector_batches if self.is_image else text_vector_batches
        return factory(self.encoder, self.batch_size, self.threads)


@dataclass(frozen=True)
class Fusion:
    """A parameter-free fusion to build: its representation, concat weights (None: equal) and the
    ``encoder`` the table records (``naive[title=<encoder>,visual=<encoder>]``)."""

    representation: Representation
    weights: dict[str, float] | None
    encoder: str


def _objects(column: pd.Series) -> np.ndarray:
    """A column as Python objects with None for every missing value (NaN included)."""
    values = column.to_numpy(dtype=object)
    return np.where(pd.isna(values), None, values)


def _empty(columns: Sequence[str]) -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series([], dtype=object) for c in columns})


def _inputs(representation: str, item_ids: pd.Series, **columns: object) -> pd.DataFrame:
    """``INPUT_COLUMNS`` of one representation; the columns not given are None."""
    frame = pd.DataFrame({"representation": representation, "item_id": _objects(item_ids)})
    for name in INPUT_COLUMNS[2:]:
        value = columns.get(name)
        frame[name] = _objects(value) if isinstance(value, pd.Series) else np.full(len(frame), value, dtype=object)
    return frame


def description_rows(items: pd.DataFrame, descriptions: pd.DataFrame | None, rep: Representation) -> pd.DataFrame:
    """Inputs of an LVLM representation: the description of each item's image, or why there is
    none (``no_image``, ``missing_description``, ``failed_caption``: a status other than ok)."""
    found = _empty(["image_sha256", "_found", "_status", "_text"])
    if descriptions is not None and not descriptions.empty:
        chosen = descriptions[(descriptions["engine"] == rep.engine) & (descriptions["model"] == rep.model)
                              & (descriptions["prompt_id"] == rep.prompt_id)]
        found = pd.DataFrame({"image_sha256": _objects(chosen["image_sha256"]), "_found": True,
                              "_status": _objects(chosen["status"]), "_text": _objects(chosen["text"])})
    left = pd.DataFrame({"item_id": _objects(items["item_id"]), "image_sha256": _objects(items["image_sha256"])})
    # A null hash joins nothing, as in SQL.
    joined = left.merge(found[found["image_sha256"].notna()], on="image_sha256", how="left")
    sha, seen, status = (_objects(joined[c]) for c in ("image_sha256", "_found", "_status"))
    pre = pd.Series(["no_image" if h is None else "missing_description" if f is None
                     else "failed_caption" if s != OK else None for h, f, s in zip(sha, seen, status)], dtype=object)
    return _inputs(rep.name, joined["item_id"], text=joined["_text"], pre_status=pre)


def with_text_hash(rows: pd.DataFrame) -> pd.DataFrame:
    """``source_sha256``: the sha256 (hex) of the UTF-8 text the encoder gets; None when it gets none."""
    hashes = [hashlib.sha256(t.encode("utf-8")).hexdigest() if p is None and t is not None else None
              for t, p in zip(_objects(rows["text"]), _objects(rows["pre_status"]))]
    return rows.assign(source_sha256=pd.Series(hashes, index=rows.index, dtype=object))


def input_rows(items: pd.DataFrame, descriptions: pd.DataFrame | None, encoding: Encoding) -> pd.DataFrame:
    """``INPUT_COLUMNS`` of ``encoding``'s representations, one row per item each: the catalog's
    title or text, the item's description (``description_rows``), or its image with the image
    bytes' hash taken at ingest (null for a remote or unreadable image: never reused)."""
    if encoding.is_image:
        return _inputs(VISUAL, items["item_id"], image_uri=items["image_uri"], source_sha256=items["image_sha256"])
    frames = [description_rows(items, descriptions, rep) if rep.kind == LVLM
              else _inputs(rep.name, items["item_id"], text=items[rep.kind]) for rep in encoding.representations]
    return with_text_hash(pd.concat(frames, ignore_index=True))


def split_reusable(rows: pd.DataFrame, previous: pd.DataFrame | None,
                   encoder: str) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """(rows to encode, reused rows: representation, item_id, vector, status, source_sha256): a
    stored vector is reused when it came from ``encoder`` and an input with the same hash."""
    if previous is None or previous.empty:
        return rows, None
    stored = previous[["representation", "item_id", "source_sha256", "encoder", "vector"]].rename(
        columns={"source_sha256": "_prev_source", "encoder": "_prev_encoder", "vector": "_prev_vector"})
    joined = rows.merge(stored, on=["representation", "item_id"], how="left")
    source, prev = _objects(joined["source_sha256"]), _objects(joined["_prev_source"])
    same = np.array([s is not None and p is not None and s == p for s, p in zip(source, prev)], dtype=bool)
    same &= (_objects(joined["_prev_encoder"]) == encoder)
    reused = pd.DataFrame({"representation": joined["representation"].to_numpy()[same],
                           "item_id": joined["item_id"].to_numpy()[same],
                           "vector": joined["_prev_vector"].to_numpy()[same], "status": OK,
                           "source_sha256": source[same]})
    return joined.loc[~same, list(rows.columns)].reset_index(drop=True), reused


def encoded_or_reused(inputs: pd.DataFrame, previous: pd.DataFrame | None, encoding: Encoding) -> pd.DataFrame:
    """``VECTOR_COLUMNS`` of ``inputs``: the reusable stored vectors (``split_reusable``) and the
    encoder's batch function over the rest; nothing to encode loads no model."""
    todo, reused = split_reusable(inputs, previous, encoding.encoder)
    frames = []
    if len(todo):
        frames.append(pd.concat(list(encoding.batches()(iter([todo]))), ignore_index=True).assign(_reused=False))
    if reused is not None:
        frames.append(reused.assign(_reused=True))
    if not frames:
        return _empty(VECTOR_COLUMNS)
    return pd.concat(frames, ignore_index=True).assign(encoder=encoding.encoder)[VECTOR_COLUMNS]


def fusion_parts(vectors: pd.DataFrame, parts: Sequence[str]) -> pd.DataFrame:
    """(item_id, part_0, ..., part_{k-1}) of the items with an ``ok`` vector in every part."""
    ok = vectors[vectors["status"] == OK]
    frames = [ok.loc[ok["representation"] == part, ["item_id", "vector"]].rename(columns={"vector": f"part_{j}"})
              for j, part in enumerate(parts)]
    return functools.reduce(lambda joined, frame: joined.merge(frame, on="item_id"), frames).reset_index(drop=True)


def fused(vectors: pd.DataFrame, fusions: Sequence[Fusion]) -> pd.DataFrame:
    """``VECTOR_COLUMNS`` of every fusion (``udfs.fusion.fusion.fuse``) for the items with an ``ok``
    vector in each of its parts; a fusion has no input hash (it is always rebuilt)."""
    frames = []
    for fusion in fusions:
        rep = fusion.representation
        made = list(fused_vector_batches(rep.kind, rep.parts, fusion.weights)(iter([fusion_parts(vectors, rep.parts)])))
        if made:
            frames.append(pd.concat(made, ignore_index=True).assign(
                representation=rep.name, encoder=fusion.encoder, source_sha256=None, _reused=False))
    return pd.concat(frames, ignore_index=True)[VECTOR_COLUMNS] if frames else _empty(VECTOR_COLUMNS)


def status_counts(vectors: pd.DataFrame) -> pd.DataFrame:
    """(representation, status, _reused, count) of ``vectors``: what the job counts."""
    return vectors.groupby(["representation", "status", "_reused"]).size().reset_index(name="count")
