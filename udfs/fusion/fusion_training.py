"""Training a fusion model (``udfs.fusion.fusion_models``) on the method's own recommender.

Objectives (``TrainSettings.objective``):

- ``bpr`` (default) and ``sampled_softmax``: the user signal. For each TRAIN interaction
  (u, i) of a user with at least two train interactions, the user's vector is the mean of the
  L2-normalised fused vectors of u's train history with that one row of i left out, the score
  is the cosine between it and a fused item vector, and ``negatives`` items are drawn uniformly
  from the catalog. ``bpr``: mean over negatives of -log sigmoid((s_pos - s_neg) / temperature);
  ``sampled_softmax``: cross-entropy of the positive among [pos, negatives] / temperature.
  This is the ranking the pipeline evaluates (``profiles``: mean of the history's vectors;
  ``topk``: cosine), so the model is fitted to what it will be measured on.
- ``item_contrastive``: the paper's code, for reproduction only. The anchor is the item's
  fused vector, the positive is the same vector, ``negatives`` (paper: 4) random items, InfoNCE
  at temperature 0.07 (paper's). No interaction reaches the loss: it has NO user signal and
  only spreads items apart; the interactions are used for early stopping alone.

Data: ``TrainData`` holds the parts' item vectors and the train and valid interactions as
item/user indices; it has no field for test interactions, and the ``fuse`` job reads the
interactions with a filter on ``split IN ('train', 'valid')``. Train rows are the only rows
that reach the loss; valid rows only pick the epoch (early stopping on valid Recall@``eval_k``
computed by ``udfs.evaluate.metrics``, users' train items excluded from their ranking as in ``topk``).
The best epoch's weights are kept (epoch 0: the untrained model, is a candidate too).

Determinism: the sampling uses one ``numpy`` Generator seeded from ``seed``; the weights are
initialised under ``torch.random.fork_rng`` seeded with ``seed`` (the caller's torch random
state is left as it was); torch runs with ``threads`` intra-op threads and
``torch.use_deterministic_algorithms(True)`` (both restored afterwards). On the CPU, the same
inputs, settings and library versions give byte-identical weights and vectors.
"""
from __future__ import annotations

import contextlib
import copy
import io
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
import torch.nn.functional as F

from udfs.fusion.fusion_models import FusionSpec, build_model, graph_batch, item_graphs
from udfs.evaluate.metrics import hit_matrix, ranking_metrics

log = logging.getLogger(__name__)

OBJECTIVES = ("bpr", "sampled_softmax", "item_contrastive")
USER_OBJECTIVES = ("bpr", "sampled_softmax")


@dataclass(frozen=True)
class TrainSettings:
    objective: str = "bpr"
    epochs: int = 15
    batch_size: int = 256
    lr: float = 1e-3
    negatives: int = 4
    temperature: float = 0.07
    patience: int = 3  # epochs without a better valid recall before stopping
    eval_k: int = 20
    seed: int = 42
    threads: int = 1
    knn_k: tuple[int, ...] = ()  # smore: kNN graph k per part; empty: no graph propagation

    def to_dict(self) -> dict:
        return {**asdict(self), "knn_k": list(self.knn_k)}

    @classmethod
    def from_fields(cls, source, knn_k: Sequence[int] = ()) -> "TrainSettings":
        """Every field but ``knn_k`` read from ``source``'s same-named attribute (the job's
        ``experiment.fuse``, ``jobs.config.FuseConf``, where the settings are typed and checked):
        a setting is named once there and cannot be forgotten on the way here."""
        return cls(**{f.name: getattr(source, f.name) for f in fields(cls) if f.name != "knn_k"},
                   knn_k=tuple(int(k) for k in knn_k))


@dataclass
class TrainData:
    """Item vectors of every part (rows aligned on one item index) and the train / valid
    interactions as (user index, item index) arrays. No test interaction has a place here."""

    parts: list[np.ndarray]
    train_users: np.ndarray
    train_items: np.ndarray
    valid_users: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    valid_items: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    @property
    def n_items(self) -> int:
        return int(self.parts[0].shape[0])

    def check(self) -> None:
        n = self.n_items
        for m, p in enumerate(self.parts):
            if p.ndim != 2 or p.shape[0] != n:
                raise ValueError(f"part {m} has shape {p.shape}; every part needs ({n}, d) rows aligned on the items")
            if not np.isfinite(p).all():
                raise ValueError(f"part {m} holds a non-finite value: leave such items out before training")
        for name in ("train", "valid"):
            users, items = getattr(self, f"{name}_users"), getattr(self, f"{name}_items")
            if len(users) != len(items):
                raise ValueError(f"{name}: {len(users)} users but {len(items)} items")
            if len(items) and (items.min() < 0 or items.max() >= n):
                raise ValueError(f"{name} interactions name item indices outside 0..{n - 1}")


@dataclass
class TrainResult:
    model: torch.nn.Module
    curve: list[dict]  # per epoch: epoch, loss, valid_recall
    best_epoch: int
    epochs_run: int
    valid_recall: float | None
    seconds: float
    n_examples: int
    n_valid_users: int
    graphs: list | None = None


@contextlib.contextmanager
def deterministic_torch(threads: int, seed: int) -> Iterator[None]:
    """Fixed threads, deterministic kernels and a seeded torch RNG, all restored on exit."""
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(max(1, int(threads)))
    torch.use_deterministic_algorithms(True)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            yield
    finally:
        torch.use_deterministic_algorithms(old_det)
        torch.set_num_threads(old_threads)


def _histories(users: np.ndarray, items: np.ndarray, n_users: int) -> tuple[np.ndarray, np.ndarray]:
    """CSR (pointer, items) of each user's rows, items in a fixed order (by item index)."""
    order = np.lexsort((items, users))
    ptr = np.zeros(n_users + 1, np.int64)
    np.add.at(ptr, users + 1, 1)
    return np.cumsum(ptr), items[order].astype(np.int64)


def _forward(model, parts_t: list[torch.Tensor], index: np.ndarray, graphs) -> torch.Tensor:
    """L2-normalised fused vectors of the items ``index`` (propagated one layer over ``graphs``)."""
    if graphs is None:
        idx = torch.from_numpy(index)
        return F.normalize(model([p[idx] for p in parts_t]), dim=1)
    sources, batch = graph_batch(graphs, index)
    src = torch.from_numpy(sources)
    return F.normalize(model([p[src] for p in parts_t], batch), dim=1)


def fused_table(model, parts: Sequence[np.ndarray], graphs=None, batch_size: int = 8192) -> np.ndarray:
    """L2-normalised float32 fused vector of every item (eval mode, no gradient)."""
    parts_t = [torch.from_numpy(np.ascontiguousarray(p, dtype=np.float32)) for p in parts]
    n = parts_t[0].shape[0]
    was_training = model.training
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, n, batch_size):
            out.append(_forward(model, parts_t, np.arange(start, min(n, start + batch_size)), graphs).numpy())
    model.train(was_training)
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def valid_recall(table: np.ndarray, hist_ptr: np.ndarray, hist_items: np.ndarray, valid_users: np.ndarray,
                 valid_items: np.ndarray, k: int, block: int = 1024) -> tuple[float | None, int]:
    """Mean Recall@k over the users with a valid item and a train history (their train items
    excluded from the ranking); (None, 0) when there are none."""
    users = np.unique(valid_users)
    users = users[hist_ptr[users + 1] > hist_ptr[users]]
    if len(users) == 0:
        return None, 0
    order = np.argsort(valid_users, kind="stable")
    vu, vi = valid_users[order], valid_items[order]
    values = []
    k_eff = min(k, table.shape[0])
    for start in range(0, len(users), block):
        chunk = users[start:start + block]
        profiles = np.zeros((len(chunk), table.shape[1]), np.float64)
        for r, u in enumerate(chunk):
            profiles[r] = table[hist_items[hist_ptr[u]:hist_ptr[u + 1]]].mean(axis=0)
        profiles /= np.maximum(np.linalg.norm(profiles, axis=1, keepdims=True), 1e-12)
        scores = profiles @ table.T.astype(np.float64)
        for r, u in enumerate(chunk):
            scores[r, hist_items[hist_ptr[u]:hist_ptr[u + 1]]] = -np.inf
        top = np.argpartition(scores, -k_eff, axis=1)[:, -k_eff:]
        top_scores = np.take_along_axis(scores, top, axis=1)
        top = np.take_along_axis(top, np.argsort(-top_scores, axis=1, kind="stable"), axis=1)
        lo, hi = np.searchsorted(vu, chunk, "left"), np.searchsorted(vu, chunk, "right")
        relevant = [vi[a:b] for a, b in zip(lo, hi)]
        hits, n_rel = hit_matrix(top.astype(np.int64), relevant)
        values.append(ranking_metrics(hits, n_rel, [k_eff])[("recall", k_eff)])
    return float(np.concatenate(values).mean()), int(len(users))


def _user_loss(model, parts_t, graphs, batch_users, batch_targets, negatives, ptr, hist, settings):
    b = len(batch_users)
    lengths = ptr[batch_users + 1] - ptr[batch_users]
    hist_rows = np.concatenate([hist[ptr[u]:ptr[u + 1]] for u in batch_users])
    needed, inverse = np.unique(np.concatenate([hist_rows, batch_targets, negatives.ravel()]), return_inverse=True)
    f = _forward(model, parts_t, needed, graphs)
    n_hist = len(hist_rows)
    hist_pos = torch.from_numpy(inverse[:n_hist])
    target_pos = torch.from_numpy(inverse[n_hist:n_hist + b])
    neg_pos = torch.from_numpy(inverse[n_hist + b:]).view(b, -1)
    owner = torch.from_numpy(np.repeat(np.arange(b), lengths))
    sums = torch.zeros(b, f.shape[1]).index_add(0, owner, f[hist_pos])
    # the target's own row left out of the user's vector
    users = F.normalize(sums - f[target_pos], dim=1)
    pos = (users * f[target_pos]).sum(dim=1, keepdim=True)
    neg = torch.einsum("bh,bnh->bn", users, f[neg_pos])
    if settings.objective == "bpr":
        return -F.logsigmoid((pos - neg) / settings.temperature).mean()
    logits = torch.cat([pos, neg], dim=1) / settings.temperature
    return F.cross_entropy(logits, torch.zeros(b, dtype=torch.long))


def _item_contrastive_loss(model, parts_t, graphs, batch_items, negatives, settings):
    needed, inverse = np.unique(np.concatenate([batch_items, negatives.ravel()]), return_inverse=True)
    f = _forward(model, parts_t, needed, graphs)
    b = len(batch_items)
    anchor = f[torch.from_numpy(inverse[:b])]
    neg = f[torch.from_numpy(inverse[b:])].view(b, -1, f.shape[1])
    pos = (anchor * anchor).sum(dim=1, keepdim=True)  # the item itself: always 1
    logits = torch.cat([pos, torch.einsum("bh,bnh->bn", anchor, neg)], dim=1) / settings.temperature
    return F.cross_entropy(logits, torch.zeros(b, dtype=torch.long))


def train_fusion(spec: FusionSpec, data: TrainData, settings: TrainSettings) -> TrainResult:
    """Train ``spec`` on ``data`` (see the module doc); returns the best epoch's model."""
    if settings.objective not in OBJECTIVES:
        raise ValueError(f"objective {settings.objective!r} is not one of {list(OBJECTIVES)}")
    data.check()
    if [p.shape[1] for p in data.parts] != list(spec.dims):
        raise ValueError(f"parts have dims {[p.shape[1] for p in data.parts]}, the spec {list(spec.dims)}")
    if settings.knn_k and spec.method != "smore":
        raise ValueError(f"kNN graph propagation is a smore option; {spec.method} takes no knn_k")
    started = time.perf_counter()
    rng = np.random.default_rng(settings.seed)
    n_items = data.n_items
    n_users = int(max(data.train_users.max(initial=-1), data.valid_users.max(initial=-1))) + 1
    ptr, hist = _histories(data.train_users.astype(np.int64), data.train_items.astype(np.int64), n_users)
    graphs = None
    if settings.knn_k:
        if len(settings.knn_k) != len(data.parts):
            raise ValueError(f"knn_k has {len(settings.knn_k)} values for {len(data.parts)} parts: give one per part")
        graphs = item_graphs(data.parts, settings.knn_k)
    parts_t = [torch.from_numpy(np.ascontiguousarray(p, dtype=np.float32)) for p in data.parts]

    lengths = ptr[1:] - ptr[:-1]
    if settings.objective in USER_OBJECTIVES:
        eligible = np.repeat(lengths >= 2, lengths)
        ex_users = np.repeat(np.arange(n_users), lengths)[eligible]
        ex_items = hist[eligible]
        if len(ex_users) == 0:
            raise ValueError("no user has two train interactions: the user objective has nothing to learn from "
                             "(use objective item_contrastive, or more data)")
    else:
        ex_users, ex_items = np.zeros(0, np.int64), np.arange(n_items, dtype=np.int64)

    with deterministic_torch(settings.threads, settings.seed):
        model = build_model(spec)
        optimiser = torch.optim.Adam(model.parameters(), lr=settings.lr)
        recall, n_valid = valid_recall(fused_table(model, data.parts, graphs), ptr, hist, data.valid_users,
                                       data.valid_items, settings.eval_k)
        curve = [{"epoch": 0, "loss": None, "valid_recall": recall}]
        best_recall, best_epoch, best_state, since_best = recall, 0, copy.deepcopy(model.state_dict()), 0
        epoch = 0
        for epoch in range(1, settings.epochs + 1):
            model.train()
            order = rng.permutation(len(ex_items))
            losses = []
            for start in range(0, len(order), settings.batch_size):
                chosen = order[start:start + settings.batch_size]
                negatives = rng.integers(0, n_items, size=(len(chosen), settings.negatives))
                if settings.objective in USER_OBJECTIVES:
                    loss = _user_loss(model, parts_t, graphs, ex_users[chosen], ex_items[chosen], negatives,
                                      ptr, hist, settings)
                else:
                    loss = _item_contrastive_loss(model, parts_t, graphs, ex_items[chosen], negatives, settings)
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                losses.append(float(loss.detach()))
            recall, _ = valid_recall(fused_table(model, data.parts, graphs), ptr, hist, data.valid_users,
                                     data.valid_items, settings.eval_k)
            curve.append({"epoch": epoch, "loss": sum(losses) / max(1, len(losses)), "valid_recall": recall})
            log.info("fusion %s epoch %d: loss %.4f, valid recall@%d %s", spec.method, epoch,
                     curve[-1]["loss"], settings.eval_k, recall)
            # No valid user (recall None at every epoch): nothing to stop on, the last epoch is kept.
            if recall is None or recall > best_recall:
                best_recall, best_epoch, best_state, since_best = recall, epoch, copy.deepcopy(model.state_dict()), 0
            else:
                since_best += 1
                if since_best >= settings.patience:
                    break
        model.load_state_dict(best_state)
        model.eval()
    return TrainResult(model=model, curve=curve, best_epoch=best_epoch,
                       epochs_run=epoch, valid_recall=best_recall, seconds=time.perf_counter() - started,
                       n_examples=int(len(ex_items)), n_valid_users=n_valid, graphs=graphs)


def apply_fusion(model, parts: Sequence[np.ndarray], threads: int = 1, graphs=None,
                 batch_size: int = 8192) -> np.ndarray:
    """Fused, L2-normalised float32 vectors of ``parts``' rows (deterministic kernels, ``threads``)."""
    with deterministic_torch(threads, 0):
        return fused_table(model, parts, graphs, batch_size)


def model_bytes(model, spec: FusionSpec) -> bytes:
    """The model as bytes (``torch.save`` of the spec and the state dict)."""
    buffer = io.BytesIO()
    torch.save({"spec": spec.to_dict(), "state": model.state_dict()}, buffer)
    return buffer.getvalue()


def load_model(blob: bytes) -> tuple[torch.nn.Module, FusionSpec]:
    saved = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    spec = FusionSpec.from_dict(saved["spec"])
    with torch.random.fork_rng(devices=[]):
        model = build_model(spec)
    model.load_state_dict(saved["state"])
    model.eval()
    return model, spec
