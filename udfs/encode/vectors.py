"""The one L2 normaliser: every stage that scales vectors to unit length calls it.

Zero-vector policy: a row with no direction (its norm is at most ``min_norm``, or not finite)
comes back as a row of zeros, never NaN, and is flagged in the returned mask. Each caller then
states what such a row means for it: the image encoder keeps it at zero, profiles leave a
cancelled-out user without a profile, and fusion and profiles' inputs refuse it with an error
naming the row.
"""
from __future__ import annotations

import numpy as np


def l2_normalise(vectors: np.ndarray, *, min_norm: float = 0.0,
                 dtype: type = np.float32) -> tuple[np.ndarray, np.ndarray]:
    """``(unit rows, no_direction)`` of a 2-D array, computed in ``dtype``: each row divided by
    its L2 norm, and a boolean mask of the rows that had none (those come back as zeros)."""
    matrix = np.asarray(vectors, dtype=dtype)
    norms = np.linalg.norm(matrix, axis=1)
    no_direction = ~np.isfinite(norms) | (norms <= min_norm)
    if not no_direction.any():
        return matrix / norms[:, None], no_direction
    unit = matrix / np.where(no_direction, 1, norms).astype(dtype)[:, None]
    unit[no_direction] = 0
    return unit, no_direction
