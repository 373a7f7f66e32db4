"""The description figures and the warning: hand-computed values, a catalog of identical texts
(warned about), and one whose texts follow what users like (not warned about)."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from udfs.caption.description_stats import (Thresholds, as_counts, co_consumption, description_warning,
                                    mean_pairwise_cosine, text_figures, vector_figures)


def test_text_figures_by_hand():
    figures = text_figures(["a red shirt", "a red shirt", "blue Jeans", None, "a dress for a party"])
    assert figures["texts"] == 4 and figures["distinct"] == 3
    assert figures["distinct_ratio"] == 0.75
    assert figures["top_text_share"] == 0.5  # "a red shirt" twice of four
    # Words: 3, 3, 2, 5; lower-cased vocabulary: a red shirt blue jeans dress for party.
    assert figures["words_mean"] == 3.25 and figures["words_p50"] == 3.0
    assert figures["words_p10"] == pytest.approx(2.3) and figures["words_p90"] == pytest.approx(4.4)
    assert figures["vocabulary"] == 8
    assert text_figures([None]) == {"texts": 0}


def test_mean_pairwise_cosine_of_two_rows_is_their_cosine_and_is_seeded():
    v = np.array([[1.0, 0.0], [1.0, 1.0]])
    assert mean_pairwise_cosine(v, n_pairs=50) == pytest.approx(1 / math.sqrt(2))
    rng = np.random.default_rng(3)
    many = rng.normal(size=(40, 8))
    assert mean_pairwise_cosine(many, seed=1) == mean_pairwise_cosine(many, seed=1)
    assert math.isnan(mean_pairwise_cosine(v[:1]))


def test_co_consumption_by_hand():
    # Two users, two items each: u1 (a, b), u2 (c, d); a and b are alike, c and d orthogonal.
    ids = ["a", "b", "c", "d", "unused"]
    vectors = np.array([[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 1, 1]], dtype=float)
    train = pd.DataFrame({"user_id": ["u1", "u1", "u2", "u2", "u3"], "item_id": ["a", "b", "c", "d", "a"]})
    got = co_consumption(ids, vectors, train, n_pairs=4000, seed=0)
    # Same-user pairs: (a, b) cos 1 or (c, d) cos 0, each half the time.
    assert got["co_consumed_cosine"] == pytest.approx(0.5, abs=0.03)
    # Independent pairs of distinct items among a, b, c, d (u3's lone "a" takes no part): only
    # {a, b} of the six unordered pairs has cosine 1.
    assert got["random_cosine"] == pytest.approx(1 / 6, abs=0.03)
    assert got["lift"] == pytest.approx(got["co_consumed_cosine"] - got["random_cosine"])
    assert co_consumption(ids, vectors, train, seed=5) == co_consumption(ids, vectors, train, seed=5)


def test_co_consumption_without_any_user_of_two_items_is_nan():
    got = co_consumption(["a", "b"], np.eye(2), pd.DataFrame({"user_id": ["u1", "u2"], "item_id": ["a", "b"]}))
    assert math.isnan(got["lift"])


def _catalog(n_items: int = 200, n_users: int = 300, n_tastes: int = 5, per_user: int = 8, seed: int = 0):
    """Items in ``n_tastes`` groups; each user consumes items of one group only."""
    rng = np.random.default_rng(seed)
    taste = rng.integers(n_tastes, size=n_items)
    ids = [f"i{j}" for j in range(n_items)]
    rows = []
    for u in range(n_users):
        group = np.flatnonzero(taste == u % n_tastes)
        for j in rng.choice(group, size=per_user, replace=False):
            rows.append((f"u{u}", ids[j]))
    return ids, taste, pd.DataFrame(rows, columns=["user_id", "item_id"])


def _vectors(codes: np.ndarray, dim: int = 16, noise: float = 0.3, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(codes.max() + 1, dim))
    v = centres[codes] + noise * rng.normal(size=(len(codes), dim))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_identical_descriptions_are_warned_about():
    ids, taste, train = _catalog()
    texts = ["a comic book"] * len(ids)
    same = np.tile(_vectors(np.zeros(1, dtype=int)), (len(ids), 1))
    figures = {**text_figures(texts),
               **vector_figures({"lvlm": (ids, same), "title": (ids, _vectors(taste))}, train)}
    assert figures["distinct"] == 1 and figures["lvlm_cosine"] == pytest.approx(1.0)
    assert figures["lvlm_lift"] == pytest.approx(0.0, abs=1e-9)
    warning = description_warning(figures, "lvlm:tags:m:p")
    assert warning is not None
    for fact in ("lvlm:tags:m:p", "co-consumption lift +0.0000", "1 distinct of 200", "experiment.caption.engine",
                 "prompt"):
        assert fact in warning


def test_descriptions_that_follow_taste_are_not_warned_about_even_when_few_are_distinct():
    ids, taste, train = _catalog()
    # Ten distinct texts over 200 items (5%), yet each says which taste the item is for.
    texts = [f"a poster in {'red green blue black white'.split()[t]}" + (" and gold" if j % 2 else "")
             for j, t in enumerate(taste)]
    figures = {**text_figures(texts),
               **vector_figures({"lvlm": (ids, _vectors(taste, seed=2)), "title": (ids, _vectors(taste))}, train)}
    assert figures["distinct"] == 10
    assert figures["lvlm_lift"] > 0.3
    assert description_warning(figures) is None


def test_random_descriptions_are_warned_about_and_the_titles_lift_is_named():
    ids, taste, train = _catalog()
    noise = _vectors(np.arange(len(ids)), dim=64, seed=4)  # every item its own random direction
    figures = vector_figures({"lvlm": (ids, noise), "title": (ids, _vectors(taste))}, train)
    assert abs(figures["lvlm_lift"]) < Thresholds().min_lift
    warning = description_warning(figures)
    assert warning is not None and f"the titles' is {figures['title_lift']:+.4f}" in warning
    alone = {k: v for k, v in figures.items() if not k.startswith("title_")}
    assert "titles" not in description_warning(alone)


def test_no_lift_measured_is_no_warning():
    assert description_warning({"lvlm_lift": float("nan")}) is None
    assert description_warning({"texts": 3, "distinct": 1}) is None


def test_counts_in_thousandths():
    figures = {"texts": 1624, "distinct": 1082, "vocabulary": 310, "distinct_ratio": 0.6662, "lvlm_lift": -0.0123,
               "words_p50": 5.0, "title_cosine": float("nan")}
    counts = as_counts(figures)
    assert counts == {"descriptions_texts": 1624, "descriptions_distinct": 1082, "descriptions_vocabulary": 310,
                      "descriptions_distinct_ratio_x1000": 666, "descriptions_lvlm_lift_x1000": -12,
                      "descriptions_words_p50_x1000": 5000}


@pytest.fixture(scope="module")
def ml100k_train(ml100k) -> pd.DataFrame:
    """ml100k's train split as ``ingest`` makes it (conf/datasets/ml100k.yaml: per user, the
    earliest 80% of their ratings by time)."""
    ratings = pd.read_csv(ml100k / "u.data", sep="\t", names=["user_id", "item_id", "rating", "ts"], dtype=str)
    ratings = ratings.assign(ts=ratings["ts"].astype(int)).sort_values(["user_id", "ts", "item_id"])
    position = ratings.groupby("user_id").cumcount()
    size = ratings.groupby("user_id")["item_id"].transform("size")
    return ratings[position < (0.8 * size).astype(int)][["user_id", "item_id"]]


@pytest.mark.realdata
@pytest.mark.slow
def test_the_warning_fires_on_ml100k_tags_descriptions(ml100k, ml100k_train):
    """The CPU ``tags`` engine on ml100k's own posters: the 300 most-rated movies of the train
    split (a sample, so that the test captions in seconds; docs/BENCHMARKS.md, "Twelfth
    session", has the figures of the whole catalog), their descriptions and titles through the
    paper's encoder."""
    from udfs.caption import make_engine
    from udfs.io.images import load_image
    from udfs.encode.text_encoder import encode_texts

    ids = ml100k_train["item_id"].value_counts().index[:300].tolist()
    titles = pd.read_csv(ml100k / "u.item", sep="|", header=None, encoding="latin-1", dtype=str).set_index(0)[1]
    engine = make_engine("tags", batch_size=32)
    texts = [c.text for c in engine.describe([load_image(ml100k / "posters" / f"{i}.jpg") for i in ids])]
    described, _ = encode_texts(texts)
    titled, _ = encode_texts([titles[i] for i in ids])
    figures = {**text_figures(texts),
               **vector_figures({"lvlm": (ids, described), "title": (ids, titled)}, ml100k_train)}
    warning = description_warning(figures, "lvlm:tags")
    assert warning is not None, figures
    assert figures["title_lift"] > Thresholds().min_lift  # the titles do carry some


def test_vector_figures_do_not_depend_on_the_row_order():
    ids, taste, train = _catalog()
    vectors = _vectors(taste, seed=2)
    turned = np.arange(len(ids))[::-1]
    assert vector_figures({"lvlm": (ids, vectors)}, train) == vector_figures(
        {"lvlm": ([ids[i] for i in turned], vectors[turned])}, train.sample(frac=1.0, random_state=3))
