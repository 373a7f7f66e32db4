"""Why an item was recommended: each history item's share of the score, and the description
phrases the item shares with those history items.

Shares (``history_shares``). A profile is ``p = S / |S|`` with ``S = sum_j w_j h_j`` over the
user's history vectors ``h_j`` (unit norm; ``w_j = 1`` for the paper's plain mean, recency
weights with a half-life), so the cosine score of a unit item vector ``x`` splits EXACTLY into

    <p, x> = sum_j  w_j <h_j, x> / |S|

one term per history item. For the plain mean, ``|S| = n |mean(h)|``, i.e. each item's share
is ``<h_j, x> / (n |mean(h)|)``. The shares sum to the score (up to float rounding), and a
negative share is a history item that pulls the item down.

Phrases (``shared_phrases``): word n-grams (1 to 3 words) of two descriptions, lower-cased,
that neither start nor end with a stop word; only the longest are kept (a shared "red
leather" hides the shared "leather").
"""
from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import pandas as pd

STOP_WORDS = frozenset("""
a an and are as at be been being but by can could does for from has have in into is it its
may might of on or such that the their them then there these this those to was were which while
with would very also some any other more most image photo picture shows showing shown appears
looks like featuring features suitable item product
""".split())
MAX_PHRASE_WORDS = 3
DESCRIPTION_OK = "ok"  # the descriptions table's status of a usable text
_WORD = re.compile(r"[a-z0-9]+(?:[-'][a-z0-9]+)*")


def item_descriptions(items: pd.DataFrame, texts: pd.DataFrame) -> dict[str, str]:
    """item id -> the text described for its image: ``items`` (item_id, image_sha256), ``texts``
    (image_sha256, text, status) of one engine, model and prompt; only ``ok`` texts, the first
    of an image; an item without an image hash has none."""
    ok = texts[texts["status"] == DESCRIPTION_OK].drop_duplicates("image_sha256").set_index("image_sha256")["text"]
    return {i: ok[s] for i, s in zip(items["item_id"], items["image_sha256"]) if isinstance(s, str) and s in ok.index}


def history_shares(history: np.ndarray, item: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """(n,) each history row's exact share of ``<normalise(sum_j w_j h_j), item>``.

    ``history`` (n, d) unit rows, ``item`` (d,) or (m, d) unit rows (then (m, n) shares);
    ``weights`` (n,) non-negative, default 1. A history whose weighted sum is zero has no
    direction: an error, as for its profile."""
    h = np.asarray(history, np.float64)
    if h.ndim != 2 or h.shape[0] == 0:
        raise ValueError(f"history must be a non-empty (n, d) array of item vectors, got shape {h.shape}")
    w = np.ones(h.shape[0]) if weights is None else np.asarray(weights, np.float64)
    if w.shape != (h.shape[0],):
        raise ValueError(f"weights has shape {w.shape}, history has {h.shape[0]} rows: pass one weight per row")
    total = np.linalg.norm(w @ h)
    if not np.isfinite(total) or total < 1e-12:
        raise ValueError("the history's vectors cancel out (their weighted sum is zero): it has no profile")
    x = np.asarray(item, np.float64)
    return (x @ h.T) * w / total


def phrases(text: str | None, max_words: int = MAX_PHRASE_WORDS) -> set[str]:
    """The word n-grams (1..``max_words``) of ``text`` that neither start nor end with a stop word."""
    words = _WORD.findall((text or "").lower())
    grams = (words[start:start + n] for n in range(1, max_words + 1) for start in range(len(words) - n + 1))
    return {" ".join(gram) for gram in grams if gram[0] not in STOP_WORDS and gram[-1] not in STOP_WORDS}


def shared_phrases(item_text: str | None, history_texts: Sequence[str | None], limit: int = 8) -> list[str]:
    """The phrases ``item_text`` shares with any of ``history_texts``, longest first (at most ``limit``)."""
    mine = phrases(item_text)
    theirs = set().union(*(phrases(t) for t in history_texts))
    # Longest first, without the phrases contained (as whole words) in a longer one kept.
    kept: list[str] = []
    for phrase in sorted(mine & theirs, key=lambda p: (-len(p.split()), p)):
        if not any(f" {phrase} " in f" {longer} " for longer in kept):
            kept.append(phrase)
    return kept[:limit]
