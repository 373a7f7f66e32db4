"""The one L2 normaliser and its zero-vector policy."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from udfs.encode.vectors import l2_normalise


def test_rows_without_direction_come_back_zero_and_flagged():
    unit, none = l2_normalise(np.array([[3.0, 4.0], [0.0, 0.0], [np.nan, 1.0], [np.inf, 0.0]]))
    np.testing.assert_allclose(unit, [[0.6, 0.8], [0, 0], [0, 0], [0, 0]], rtol=1e-7)
    assert none.tolist() == [False, True, True, True]
    assert unit.dtype == np.float32


def test_min_norm_flags_rows_too_short_to_have_a_meaningful_direction():
    unit, none = l2_normalise(np.array([[1e-7, 0.0], [2.0, 0.0]]), min_norm=1e-6, dtype=np.float64)
    assert none.tolist() == [True, False] and unit.dtype == np.float64
    np.testing.assert_array_equal(unit, [[0.0, 0.0], [1.0, 0.0]])


@settings(max_examples=50, deadline=None)
@given(arrays(np.float64, st.tuples(st.integers(1, 6), st.integers(1, 5)),
              elements=st.floats(-1e3, 1e3, allow_nan=False)))
def test_result_equals_division_by_the_norm_bit_for_bit(x):
    # The callers' results must not change: each used to divide by np.linalg.norm itself.
    unit, none = l2_normalise(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1)
    ok = norms > 0
    np.testing.assert_array_equal(unit[ok], x[ok] / norms[ok, None])
    assert (none == ~ok).all() and not unit[~ok].any()


@pytest.mark.parametrize("module, call", [
    ("udfs.fusion.fusion", lambda m: m.fuse("naive", {"a": np.array([[1.0, 0.0]]), "b": np.array([[-1.0, 0.0]])})),
    ("udfs.rank.profiles", lambda m: m.user_profiles(np.array([0]), np.zeros((1, 2)), None, 1)),
])
def test_callers_that_refuse_a_zero_row_still_refuse_it(module, call):
    import importlib

    with pytest.raises(ValueError, match="zero"):
        call(importlib.import_module(module))
