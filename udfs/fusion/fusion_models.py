"""Trained fusions of two or more item representations: ``attention``, ``gating``,
``crossmodal`` and ``smore`` (pure torch; the training is in ``udfs.fusion.fusion_training``).

Every model takes ``parts``: a list of (n, d_m) float tensors, one per part representation in
the canonical (sorted) order of the fusion's name, dimensions free to differ, and returns one
(n, out_dim) vector per row (the caller L2-normalises it for the cosine top-k). Each part is
first projected to ``hidden`` (a Linear per part), as the paper's code does with its 512.

- ``attention`` (the paper's): softmax weights over the parts from
  Linear(k*hidden -> hidden) -> ReLU -> Linear(hidden -> k) of the concatenated projections;
  output = Linear(hidden -> out) -> LayerNorm -> ReLU of the weighted sum.
- ``gating`` (the paper's): a per-dimension gate from the same MLP shape. For two parts the
  paper's g = sigmoid(l), g*h_t + (1-g)*h_v; here the gate is a softmax over the k parts of
  per-dimension logits (k*hidden outputs), which for k = 2 is the same function class
  (sigmoid(l_1 - l_2)) and extends to any k. Output head as for attention.
- ``crossmodal``: the paper's two 4-head ``MultiheadAttention`` blocks run over sequences of
  length 1, where softmax over one key is always 1: each side is then a fixed linear map of
  the other (W_o W_v x) and no attention happens. Here each projected vector is split into
  ``tokens`` tokens of hidden/tokens dimensions (with a learned position embedding per token,
  since the slices are different coordinates, not a bag); each part's tokens attend (4 heads)
  over the tokens of all the other parts, so the weights depend on the content of both sides.
  Splitting was chosen over attending to kNN neighbours because it keeps an item's vector a
  function of that item alone (it can be applied to any item, batch by batch, in Spark).
  The attended tokens are flattened, concatenated over the parts, and go through
  Linear -> LayerNorm -> ReLU.
- ``smore`` (Ong & Khong, WSDM 2025): projections h_m to ``hidden``; H_m = rfft(h_m,
  norm="ortho") along the features; learnable complex filters (initialised randn) W_m per part
  and W_f for the fused view. Views: v_m = irfft(H_m * W_m); fused f = irfft(prod_m H_m * W_f),
  the product in frequency space being a circular convolution of the parts across features
  (``product_term=False`` drops it). Optionally (``graphs``) each view is propagated one layer
  over an item-item kNN graph: per part, cosine top-``k`` of its input vectors, symmetrised and
  normalised D^-1/2 A D^-1/2; the fused view over the element-wise max of the part graphs
  (``item_graphs``). Gates a = softmax(MLP(f)) over the parts; output = sum_m a_m v_m + f
  (without the product term: sum_m a_m v_m with gates from the mean of the views).

Checked in tests/udfs/fusion/test_fusion_models.py against an explicit numpy circular convolution.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

METHODS = ("attention", "gating", "crossmodal", "smore")


@dataclass(frozen=True)
class FusionSpec:
    """Everything that builds a model's architecture (and is stored beside its weights)."""

    method: str
    dims: tuple[int, ...]  # input dimension of each part, canonical part order
    hidden: int = 512
    out_dim: int = 512
    heads: int = 4  # crossmodal
    tokens: int = 8  # crossmodal: tokens per projected vector
    product_term: bool = True  # smore

    def problems(self) -> list[str]:
        found = []
        if self.method not in METHODS:
            found.append(f"method {self.method!r} is not one of {list(METHODS)}")
        if len(self.dims) < 2 or any(int(d) < 1 for d in self.dims):
            found.append(f"dims {list(self.dims)}: a fusion needs at least two parts of dimension >= 1")
        if self.hidden < 2 or self.out_dim < 1:
            found.append(f"hidden {self.hidden} / out_dim {self.out_dim} must be >= 2 / >= 1")
        if self.method == "crossmodal":
            if self.hidden % self.tokens:
                found.append(f"crossmodal: hidden {self.hidden} is not a multiple of tokens {self.tokens}")
            elif (self.hidden // self.tokens) % self.heads:
                found.append(f"crossmodal: token size {self.hidden // self.tokens} (hidden / tokens) is not a "
                             f"multiple of heads {self.heads}")
        return found

    def to_dict(self) -> dict:
        return {**asdict(self), "dims": list(self.dims)}

    @classmethod
    def from_dict(cls, data: dict) -> "FusionSpec":
        return cls(**{**data, "dims": tuple(int(d) for d in data["dims"])})


def build_model(spec: FusionSpec) -> nn.Module:
    """A fresh model for ``spec`` (initialised from torch's current random state)."""
    problems = spec.problems()
    if problems:
        raise ValueError("fusion spec: " + "; ".join(problems))
    return {"attention": AttentionFusion, "gating": GatingFusion, "crossmodal": CrossModalFusion,
            "smore": SmoreFusion}[spec.method](spec)


def _head(in_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.LayerNorm(out_dim), nn.ReLU())


class _Projected(nn.Module):
    def __init__(self, spec: FusionSpec):
        super().__init__()
        self.spec = spec
        self.proj = nn.ModuleList(nn.Linear(int(d), spec.hidden) for d in spec.dims)

    def project(self, parts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(parts) != len(self.proj):
            raise ValueError(f"got {len(parts)} parts, the model fuses {len(self.proj)}")
        return [p(x) for p, x in zip(self.proj, parts)]


class AttentionFusion(_Projected):
    def __init__(self, spec: FusionSpec):
        super().__init__(spec)
        k, h = len(spec.dims), spec.hidden
        self.scorer = nn.Sequential(nn.Linear(k * h, h), nn.ReLU(), nn.Linear(h, k))
        self.out = _head(h, spec.out_dim)

    def forward(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        hs = self.project(parts)
        w = torch.softmax(self.scorer(torch.cat(hs, dim=1)), dim=1)
        return self.out(torch.einsum("nk,nkh->nh", w, torch.stack(hs, dim=1)))


class GatingFusion(_Projected):
    def __init__(self, spec: FusionSpec):
        super().__init__(spec)
        k, h = len(spec.dims), spec.hidden
        self.gate = nn.Sequential(nn.Linear(k * h, h), nn.ReLU(), nn.Linear(h, k * h))
        self.out = _head(h, spec.out_dim)

    def forward(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        hs = self.project(parts)
        stacked = torch.stack(hs, dim=1)  # (n, k, h)
        g = torch.softmax(self.gate(torch.cat(hs, dim=1)).view(stacked.shape), dim=1)
        return self.out((g * stacked).sum(dim=1))


class CrossModalFusion(_Projected):
    def __init__(self, spec: FusionSpec):
        super().__init__(spec)
        k, h, t = len(spec.dims), spec.hidden, spec.tokens
        self.token_dim = h // t
        self.position = nn.Parameter(torch.randn(k, t, self.token_dim) * 0.02)
        self.attend = nn.ModuleList(nn.MultiheadAttention(self.token_dim, spec.heads, batch_first=True)
                                    for _ in range(k))
        self.out = _head(k * h, spec.out_dim)

    def forward(self, parts: Sequence[torch.Tensor], return_weights: bool = False):
        hs = self.project(parts)
        n, t = hs[0].shape[0], self.spec.tokens
        tokens = [x.view(n, t, self.token_dim) + self.position[m] for m, x in enumerate(hs)]
        attended, weights = [], []
        for m, query in enumerate(tokens):
            others = torch.cat([tok for j, tok in enumerate(tokens) if j != m], dim=1)
            out, w = self.attend[m](query, others, others, need_weights=return_weights)
            attended.append(out.reshape(n, -1))
            weights.append(w)
        fused = self.out(torch.cat(attended, dim=1))
        return (fused, weights) if return_weights else fused


class SmoreFusion(_Projected):
    def __init__(self, spec: FusionSpec):
        super().__init__(spec)
        k, h = len(spec.dims), spec.hidden
        self.freqs = h // 2 + 1
        # Complex filters as (real, imag) pairs: randn, as the original initialises them.
        self.filters = nn.Parameter(torch.randn(k, self.freqs, 2))
        self.fused_filter = nn.Parameter(torch.randn(self.freqs, 2))
        self.gate = nn.Sequential(nn.Linear(h, h), nn.Tanh(), nn.Linear(h, k))
        self.out = nn.Linear(h, spec.out_dim) if spec.out_dim != h else nn.Identity()

    def spectral_views(self, hs: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """(per-part views irfft(H_m W_m), fused view irfft(prod H_m * W_f) or None)."""
        h = self.spec.hidden
        spectra = [torch.fft.rfft(x, dim=1, norm="ortho") for x in hs]
        filters = torch.view_as_complex(self.filters)
        views = [torch.fft.irfft(s * filters[m], n=h, dim=1, norm="ortho") for m, s in enumerate(spectra)]
        if not self.spec.product_term:
            return views, None
        product = spectra[0]
        for s in spectra[1:]:
            product = product * s
        fused = torch.fft.irfft(product * torch.view_as_complex(self.fused_filter), n=h, dim=1, norm="ortho")
        return views, fused

    def forward(self, parts: Sequence[torch.Tensor], graphs: list[torch.Tensor] | None = None) -> torch.Tensor:
        """``graphs``: ``graph_batch``'s sparse matrices, one per part and the fused view's last."""
        views, fused = self.spectral_views(self.project(parts))
        if graphs is not None:
            views = [torch.sparse.mm(a, v) for a, v in zip(graphs, views)]
            if fused is not None:
                fused = torch.sparse.mm(graphs[-1], fused)
        stacked = torch.stack(views, dim=1)  # (n, k, h)
        gate_input = fused if fused is not None else stacked.mean(dim=1)
        a = torch.softmax(self.gate(gate_input), dim=1)
        mixed = torch.einsum("nk,nkh->nh", a, stacked)
        return self.out(mixed + fused if fused is not None else mixed)


# --- item-item kNN graphs (smore's option) -------------------------------------------------

def knn_graph(vectors: np.ndarray, k: int, block: int = 4096) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Symmetrically normalised item-item kNN graph as COO (rows, cols, weights), float64.

    Each item's top-``k`` other items by cosine of ``vectors`` (ties broken by index), the edges
    symmetrised (A = max(A, A^T)), weights D^-1/2 A D^-1/2. Blockwise, so memory is block x n.
    """
    x = np.asarray(vectors, dtype=np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    n = x.shape[0]
    k = min(int(k), n - 1)
    if k < 1:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    rows, cols = [], []
    for start in range(0, n, block):
        sims = x[start:start + block] @ x.T
        local = np.arange(sims.shape[0])
        sims[local, start + local] = -np.inf  # no self loop
        # stable order: highest similarity first, lower index on ties
        top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        rows.append(np.repeat(start + local, k))
        cols.append(top.ravel())
    r, c = np.concatenate(rows), np.concatenate(cols)
    keys = np.unique(np.concatenate([r * n + c, c * n + r]))
    r, c = keys // n, keys % n
    degree = np.bincount(r, minlength=n).astype(np.float64)
    w = 1.0 / np.sqrt(degree[r] * degree[c])
    return r.astype(np.int64), c.astype(np.int64), w


def fused_graph(graphs: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], n: int):
    """Element-wise max of the part graphs (COO), SMORE's fused graph."""
    keys = np.concatenate([r * n + c for r, c, _ in graphs])
    weights = np.concatenate([w for _, _, w in graphs])
    order = np.lexsort((-weights, keys))  # per key, the largest weight first
    # np.unique's first index of each (sorted) key is its largest weight's row
    keys, first = np.unique(keys[order], return_index=True)
    weights = weights[order][first]
    return (keys // n).astype(np.int64), (keys % n).astype(np.int64), weights


def item_graphs(parts: Sequence[np.ndarray], ks: Sequence[int]):
    """Per-part kNN graphs (``knn_graph`` with that part's k) and their element-wise max, last."""
    graphs = [knn_graph(p, k) for p, k in zip(parts, ks)]
    return graphs + [fused_graph(graphs, parts[0].shape[0])]


def graph_batch(graphs, targets: np.ndarray) -> tuple[np.ndarray, list[torch.Tensor]]:
    """(source item indices, one-layer propagation of the batch) to compute the propagated vectors
    of ``targets``: the sources are the targets' neighbours in any graph (one layer needs nothing
    further); the propagation is one (n_targets, n_sources) sparse matrix per part and one for the
    fused view (last)."""
    targets = np.asarray(targets, dtype=np.int64)
    pos = {int(t): i for i, t in enumerate(targets)}
    picked = []
    for r, c, w in graphs:
        mask = np.isin(r, targets)
        picked.append((r[mask], c[mask], w[mask]))
    sources = np.unique(np.concatenate([c for _, c, _ in picked]))
    rows = []
    for r, c, w in picked:
        out_rows = np.fromiter((pos[int(x)] for x in r), dtype=np.int64, count=len(r))
        col_of = np.searchsorted(sources, c)
        index = torch.from_numpy(np.stack([out_rows, col_of]))
        rows.append(torch.sparse_coo_tensor(index, torch.from_numpy(w.astype(np.float32)),
                                            (len(targets), len(sources))).coalesce())
    return sources, rows
