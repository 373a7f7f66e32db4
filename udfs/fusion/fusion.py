"""Parameter-free fusion baselines of VLM4Rec (Valencia et al., 2026): ``naive`` and ``concat``.

Each fusion maps per-item modality vectors (``parts``: name -> (n, d_m) array, rows
L2-normalised; re-normalised here) to one L2-normalised float32 vector per row, so the same
cosine top-k kernel serves fused and single-modality representations. Parts are laid out in
sorted order of their names, so fusing item vectors and fusing profiles with the same part
names always gives the same layout, whatever order the dicts were built in.

Score identity (concatenation forms). With fused item vector
``X_i = [a_1 x_i1, ..., a_k x_ik] / sqrt(sum a_m^2)`` and the profile fused the same way from
the per-modality profiles, ``P_u = [a_1 p_u1, ..., a_k p_uk] / sqrt(sum a_m^2)``, where every
``x_im`` and ``p_um`` is unit-norm:

    <P_u, X_i> = sum_m (a_m^2 / sum_l a_l^2) * <p_um, x_im>

exactly: the fused score is a weighted average of the per-modality cosine scores, and no
re-normalisation is needed (both fused vectors already have norm 1).

Fuse the profiles, do not profile the fused items: the profile of the fused item vectors
(mean of ``X_i`` over the history, re-normalised) scores
``sum_m a_m^2 * r_um * <p_um, x_im> / c_u``, where ``r_um = |mean_i x_im|`` is the mean
resultant length of the user's history in modality m and ``c_u > 0`` a per-user constant.
The per-user constant does not change a ranking, but the ``r_um`` reweight the modalities per
user (towards the modality in which the history is more coherent); the two agree only when
``r_u1 = ... = r_uk`` (e.g. a one-item history).

Fusions that the paper trains (attention, gating, cross-modal attention, SMORE's spectral
fusion) are in ``udfs.fusion.fusion_models``, trained by ``udfs.fusion.fusion_training`` (the ``fuse`` job).
A parameter-free "attention" (softmax of each modality's similarity to the modalities' mean) is
not a useful stand-in: for two unit-norm vectors a, b, cos(a, a+b) = cos(b, a+b), so its weights
are always 50/50 and it reduces to ``naive``.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from udfs.representations import CONCAT, FUSIONS, NAIVE
from udfs.encode.vectors import l2_normalise

__all__ = ["CONCAT", "FUSIONS", "NAIVE", "fuse"]


def fuse(
    name: str, parts: Mapping[str, np.ndarray], weights: Mapping[str, float] | None = None
) -> np.ndarray:
    """Fuse per-row modality vectors with fusion ``name`` (``naive`` or ``concat``).

    ``naive``: the paper's 50/50 combination (1/k each for k parts). When every part has the
    same dimension, ``normalise(mean_m x_m)``, the paper's element-wise average (meaningful
    when the parts share one embedding space, e.g. title and description vectors from the same
    text encoder). Otherwise, the score-level equivalent: the concatenation
    ``[x_1, ..., x_k] / sqrt(k)``, whose inner product with a profile fused the same way is
    the average of the per-modality cosine scores (see the module docstring). Takes no weights.

    ``concat``: ``normalise([w_1 x_1, ..., w_k x_k])`` with ``weights`` (part name -> w >= 0,
    default 1 each). Scores are the per-modality cosines averaged with weights
    ``w_m^2 / sum w^2``. With default weights and unequal dimensions this equals ``naive``.

    Returns an (n, sum or common d) float32 array with L2-normalised rows.
    """
    if name not in FUSIONS:
        raise ValueError(f"unknown fusion {name!r}: choose one of {list(FUSIONS)}")
    names, blocks = _checked_parts(parts)
    if name == NAIVE:
        if weights:
            raise ValueError(
                f"fusion 'naive' is the fixed 50/50 combination and takes no weights, got "
                f"{dict(weights)}: use fusion 'concat' with weights instead"
            )
        if len({b.shape[1] for b in blocks}) == 1:
            return _normalised(np.mean(blocks, axis=0), "naive (element-wise mean)", names)
        scale = np.full(len(blocks), 1.0)
    else:
        scale = _concat_weights(names, weights)
    fused = np.concatenate([w * b for w, b in zip(scale, blocks)], axis=1)
    return _normalised(fused, name, names)


def _checked_parts(parts: Mapping[str, np.ndarray]) -> tuple[list[str], list[np.ndarray]]:
    if len(parts) < 2:
        raise ValueError(
            f"fusion needs at least two parts, got {sorted(parts)}: pass e.g. "
            "{'title': title_vectors, 'visual': visual_vectors}"
        )
    names = sorted(parts)
    blocks: list[np.ndarray] = []
    for part in names:
        block = np.asarray(parts[part], dtype=np.float64)
        if block.ndim != 2:
            raise ValueError(
                f"part {part!r} has shape {block.shape}: pass a 2-D (rows, dim) array "
                "(reshape(1, -1) for a single vector)"
            )
        if blocks and block.shape[0] != blocks[0].shape[0]:
            raise ValueError(
                f"part {part!r} has {block.shape[0]} rows, part {names[0]!r} has {blocks[0].shape[0]}: "
                "align the parts on the same item ids, row for row, before fusing"
            )
        unit, bad = l2_normalise(block, dtype=np.float64)
        if bad.any():
            raise ValueError(
                f"part {part!r} row {int(np.flatnonzero(bad)[0])} is zero or not finite "
                f"({int(bad.sum())} such rows): fuse only items that have a vector in every part"
            )
        blocks.append(unit)
    return names, blocks


def _concat_weights(names: list[str], weights: Mapping[str, float] | None) -> np.ndarray:
    weights = dict(weights or {})
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise ValueError(
            f"concat weights name {unknown}, which are not parts; the parts are {names}"
        )
    a = np.array([float(weights.get(n, 1.0)) for n in names])
    if not np.isfinite(a).all() or (a < 0).any() or not (a > 0).any():
        raise ValueError(
            f"concat weights must be finite, >= 0 and not all 0, got "
            f"{dict(zip(names, a.tolist()))}"
        )
    return a


def _normalised(x: np.ndarray, what: str, names: list[str]) -> np.ndarray:
    unit, bad = l2_normalise(x, min_norm=1e-12, dtype=np.float64)
    if bad.any():
        raise ValueError(
            f"{what} of parts {names}: row {int(np.flatnonzero(bad)[0])} fuses to a zero vector "
            "(its parts cancel out); drop that item or use 'concat'"
        )
    return unit.astype(np.float32)
