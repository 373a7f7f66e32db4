"""Scorers: how much a user is predicted to like each item, one interface for all of them.

A scorer maps a block of users and a block of items to a (users x items) float32 score matrix:
``scores(user_ids, user_vectors, item_ids, item_vectors)``. The top-k selection, the seen-item
mask and the tie rule (score descending, then item id ascending) are the caller's
(``udfs.rank.topk``), the same for every scorer.

- ``cosine``: the inner product of L2-normalised vectors (the stored representations are).
- ``dot``: the plain inner product (unnormalised vectors: the ``als`` factors; ``scorer_for``).
- ``popularity``: the item's train interaction count, carried as its one-dimensional "vector";
  the same list for every user.
- ``random``: a seeded hash of (seed, user id, item id) in [0, 1): an independent, reproducible
  order per user (``random_scores``).

``by_inner_product`` says whether the scores are an inner product of the vectors, so that the
blockwise BLAS kernel (``udfs.rank.topk.ItemBlock``) can score without materialising anything else.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from udfs.representations import ALS

# Random scores keep 24 bits so that every value is exact in float32: ties are then real ties,
# broken by item id like all others, and the order does not depend on the block layout.
_RANDOM_BITS = 24
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _stable_hashes(ids: np.ndarray, seed: int) -> np.ndarray:
    """A 64-bit hash of each string id and the seed, identical in every process (unlike ``hash``)."""
    key = int(seed).to_bytes(8, "little", signed=True)
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(str(i).encode(), digest_size=8, key=key).digest(), "little")
         for i in ids),
        dtype=np.uint64, count=len(ids),
    )


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
        return x ^ (x >> np.uint64(31))


def random_scores(user_ids: np.ndarray, item_ids: np.ndarray, seed: int) -> np.ndarray:
    """(u, n) float32 scores in [0, 1): a pure function of (seed, user id, item id).

    Each user gets an independent pseudo-random order of the items; the same seed gives the
    same order on any machine and for any block layout.
    """
    users = _stable_hashes(np.asarray(user_ids), seed)
    items = _stable_hashes(np.asarray(item_ids), seed + 1)
    with np.errstate(over="ignore"):
        mixed = _splitmix64(users[:, None] ^ _splitmix64(items)[None, :])
    top = (mixed >> np.uint64(64 - _RANDOM_BITS)).astype(np.float32)
    return top / np.float32(1 << _RANDOM_BITS)


class Scorer:
    """Base of all scorers; ``name`` is the value of ``experiment.topk`` baselines / the kernel
    choice in ``udfs.rank.topk_udfs.pair_topk``."""

    name: str = ""
    by_inner_product: bool = False

    def scores(self, user_ids: np.ndarray, user_vectors: np.ndarray, item_ids: np.ndarray,
               item_vectors: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    @staticmethod
    def _check(user_ids: np.ndarray, user_vectors: np.ndarray, item_ids: np.ndarray,
               item_vectors: np.ndarray) -> None:
        if len(user_ids) != len(user_vectors):
            raise ValueError(f"{len(user_ids)} user ids for {len(user_vectors)} user vectors: pass one row per user")
        if len(item_ids) != len(item_vectors):
            raise ValueError(f"{len(item_ids)} item ids for {len(item_vectors)} item vectors: pass one row per item")


class DotScorer(Scorer):
    name = "dot"
    by_inner_product = True

    def scores(self, user_ids, user_vectors, item_ids, item_vectors) -> np.ndarray:
        self._check(user_ids, user_vectors, item_ids, item_vectors)
        return _matrix(user_vectors) @ _matrix(item_vectors).T


class CosineScorer(DotScorer):
    """The inner product: callers pass L2-normalised vectors, as every stored representation is
    (normalising again here would make the kernel's path and this one differ in the last bit)."""

    name = "cosine"


class PopularityScorer(Scorer):
    """Each item's train count, the same for every user; ``item_vectors`` is (n, 1) counts."""

    name = "popularity"

    def scores(self, user_ids, user_vectors, item_ids, item_vectors) -> np.ndarray:
        self._check(user_ids, user_vectors, item_ids, item_vectors)
        counts = _matrix(item_vectors)
        if counts.shape[1] != 1:
            raise ValueError(f"popularity scores one count per item; got item vectors of width {counts.shape[1]}")
        return np.broadcast_to(counts[:, 0], (len(user_ids), len(item_ids))).copy()


@dataclass(frozen=True)
class RandomScorer(Scorer):
    seed: int = 0
    name = "random"

    def scores(self, user_ids, user_vectors, item_ids, item_vectors) -> np.ndarray:
        return random_scores(np.asarray(user_ids), np.asarray(item_ids), self.seed)


def _matrix(vectors: np.ndarray) -> np.ndarray:
    """(n, d) float32; a 1-d input is n vectors of dimension 1."""
    matrix = np.asarray(vectors, np.float32)
    return matrix[:, None] if matrix.ndim == 1 else matrix


SCORERS: dict[str, type[Scorer]] = {s.name: s for s in (CosineScorer, DotScorer, PopularityScorer, RandomScorer)}


def scorer_for(name: str) -> str:
    """The scorer that ranks ``name``: a baseline's own (``popularity``, ``random``); ``dot`` for
    ``als`` (its unnormalised factors score by their inner product, the model's prediction);
    ``cosine`` for every content representation (stored L2-normalised)."""
    if name in (PopularityScorer.name, RandomScorer.name):
        return name
    return DotScorer.name if name == ALS else CosineScorer.name


def make_scorer(name: str, seed: int = 0) -> Scorer:
    """The scorer called ``name``; ``seed`` is read by ``random`` only."""
    if name not in SCORERS:
        raise ValueError(f"unknown scorer {name!r}: choose one of {sorted(SCORERS)}")
    return RandomScorer(seed) if name == RandomScorer.name else SCORERS[name]()
