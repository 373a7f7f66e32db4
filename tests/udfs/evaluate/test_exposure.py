"""Beyond-accuracy figures against values worked out by hand."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from udfs.evaluate import exposure


def test_gini_by_hand():
    assert exposure.gini(np.array([3, 3, 3, 3])) == 0.0
    # One item of four takes all: sum (2i - n - 1) e_(i) / (n sum e) = (3 * 4) / (4 * 4).
    assert exposure.gini(np.array([0, 4, 0, 0])) == pytest.approx(0.75)
    # e = 1, 2, 3: (-2*1 + 0*2 + 2*3) / (3 * 6) = 4 / 18.
    assert exposure.gini(np.array([3, 1, 2])) == pytest.approx(4 / 18)
    assert exposure.gini(np.array([])) == 0.0 and exposure.gini(np.zeros(3)) == 0.0


def test_popularity_percentiles_are_mid_ranks():
    # counts 0, 5, 5, 9: below/equal -> (0 + .5)/4, (1 + 1)/4, (1 + 1)/4, (3 + .5)/4
    assert exposure.popularity_percentiles(np.array([0, 5, 5, 9])).tolist() == [0.125, 0.5, 0.5, 0.875]


def test_beyond_accuracy_by_hand():
    candidates = ["a", "b", "c", "d"]
    counts = {"a": 9, "b": 5, "c": 5}  # d: 0
    # Two lists: [a, b] and [a, d]: a shown twice, b once, d once, c never.
    got = exposure.beyond_accuracy(["a", "b", "a", "d"], candidates, counts)
    assert got["coverage"] == 0.75
    # percentiles a .875, b .5, c .5, d .125; slots: a, b, a, d
    assert got["popularity_percentile"] == pytest.approx((0.875 * 2 + 0.5 + 0.125) / 4)
    # exposure sorted 0, 1, 1, 2: (-3*0 - 1*1 + 1*1 + 3*2) / (4 * 4)
    assert got["exposure_gini"] == pytest.approx(6 / 16)


def test_a_recommended_item_outside_the_candidates_is_an_error():
    with pytest.raises(ValueError, match="'z' is not a candidate"):
        exposure.exposure_counts(["a", "z"], ["a", "b"])


def test_frame_measures_each_representation_against_its_own_candidates():
    recs = pd.DataFrame({"representation": ["x", "x", "y"], "item_id": ["a", "b", "a"]})
    cands = pd.DataFrame({"representation": ["x", "x", "y", "y"], "item_id": ["a", "b", "a", "c"]})
    frame = exposure.beyond_accuracy_frame(recs, cands, {}).set_index("representation")
    assert frame.loc["x", "coverage"] == 1.0 and frame.loc["y", "coverage"] == 0.5
    assert frame.loc["x", "exposure_gini"] == 0.0 and frame.loc["y", "exposure_gini"] == pytest.approx(0.5)
