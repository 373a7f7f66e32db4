"""The online half: top-K of one representation of one run, for known users or ad-hoc
histories, read from the Delta tables without Spark, with explanations.

``Recommender.load(warehouse, run_id, representation)`` reads, once, what the run's
``topk`` ranked with: the run's plan (dataset, excluded splits, half-life, concat weights),
its stored candidate set (``candidates``), the candidates' vectors (``item_embeddings``), the
run's user profiles (``user_profiles``) and the dataset's interactions (seen items and train
histories). ``recommend(users=[...])`` or ``recommend(histories=[[...], ...])`` then costs one
matrix product and one top-k selection per batch, by the same kernel the ``topk`` job uses
(``udfs.rank.topk.ItemBlock``: score descending, ties by item id ascending, seen items -inf).
``load(..., users=[...])`` reads only those users' profiles and interactions (the command
line's case: a cold process answering one user pays for one user's rows, not the run's);
``users=[]`` for ad-hoc histories only. ``latest_pipeline_run`` finds the run to serve when
none is named: the latest ``pipeline`` row of ``runs`` with status ``succeeded``.

The kernel runs on numpy by default, so that serving never imports torch (about a second of a
cold start). numpy's BLAS rounds the float32 dot products differently from torch's: scores
agree with the run's stored ones to about 1e-6, and two candidates whose scores lie that close
(near-duplicate items: ml100k's 101/1079 and 833/1122 under ``lvlm``) may come in the other
order; measured on ml100k, 46 of 943 users' ``lvlm`` lists and 0-2 of the other
representations'. ``use_torch=True`` scores with the ``topk`` job's own torch arithmetic: a
known user's list then equals the run's ``recommendations`` bit for bit.

Rules, the same as ``topk``'s:
- candidates: the run's stored candidate set for the representation (never recomputed);
- a known user is scored with their stored profile; their items in the plan's excluded splits
  (``train,valid`` by default) are removed;
- an ad-hoc history (a user the tables have never seen: a list of item ids) is profiled like
  a train history (``udfs.rank.profiles``: the plain mean; it carries no timestamps, so a run's
  half-life does not apply), fusions ``naive``/``concat`` from per-part profiles
  (``udfs.fusion.fusion``); its own items are removed. Its items without a vector in the
  representation are left out of the profile and reported (``Recommendations.unknown``); a
  history with no known item at all is an error.

Explanations (``explain=True``): for each recommended item, the history items with the largest
share of its score. For a base representation or a trained fusion (profiles are the mean of
item vectors) the shares are exact (``udfs.rank.explanations``: they sum to the score); for a
parameter-free fusion (``naive``/``concat``, fused from per-part profiles) and for ``als``
(fitted user factors), the history items are ranked by their similarity with the item, which
orders them but does not decompose the score (``exact`` is false, no share). ``als`` serves
known users only. For an LVLM representation (or a fusion with an LVLM part) each
explanation also lists the description phrases the item shares with those history items.
Recommended and history items carry their ``items`` title where the catalog has one.
"""
from __future__ import annotations

import datetime as dt
import difflib
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.compute as pc

from udfs.rank import explanations
from udfs.fusion import fusion
from udfs.rank.profiles import recency_weights, user_profiles
from udfs.evaluate.protocol import TRAIN_SPLIT, seen_items
from udfs.representations import ALS, FUSIONS, LVLM, RepresentationError, parse_representation, spell_out_lvlm
from udfs.rank.topk import ItemBlock, block_item_ids
from udfs.io.warehouse_reader import read_table

log = logging.getLogger(__name__)

# The ``runs`` row of a finished pipeline (``jobs.job_run``: job name and final status).
PIPELINE_JOB, SUCCEEDED = "pipeline", "succeeded"


class RecommendError(ValueError):
    """A request the recommender cannot serve; the message names the input and the fix."""


@dataclass(frozen=True)
class Contribution:
    item_id: str
    share: float | None  # the history item's exact part of the score; None for a fusion
    similarity: float  # cosine of the history item with the recommended item


@dataclass(frozen=True)
class Explanation:
    contributors: tuple[Contribution, ...]
    exact: bool  # the shares of ALL history items sum to the score
    shared_phrases: tuple[str, ...] = ()


@dataclass
class Recommendations:
    """One row per query (a user id, or None for an ad-hoc history): ``item_ids`` (q, k)
    object and ``scores`` (q, k) float32; a row shorter than k (its unseen candidates ran out)
    is padded with None / -inf. ``explanations[q][r]`` explains ``item_ids[q, r]``."""

    run_id: str
    representation: str
    queries: list[str | None]
    item_ids: np.ndarray
    scores: np.ndarray
    explanations: list[list[Explanation]] | None = None
    titles: dict[str, str] = field(default_factory=dict)
    # Per ad-hoc history: its item ids without a vector in the representation, left out of its
    # profile (None for known users).
    unknown: list[list[str]] | None = None

    def records(self) -> list[dict]:
        """One JSON-ready dict per query: user, run, representation, and its ranked items."""
        out = []
        for q, query in enumerate(self.queries):
            items = []
            for r, item in enumerate(self.item_ids[q]):
                if item is None:
                    break
                entry = {"rank": r + 1, "item_id": item, "score": float(self.scores[q, r])}
                if item in self.titles:
                    entry["title"] = self.titles[item]
                if self.explanations is not None:
                    why = self.explanations[q][r]
                    entry["because"] = [{"item_id": c.item_id, "title": self.titles.get(c.item_id),
                                         "share": None if c.share is None else round(c.share, 6),
                                         "similarity": round(c.similarity, 6)} for c in why.contributors]
                    entry["shares_exact"] = why.exact
                    if why.shared_phrases:
                        entry["shared_phrases"] = list(why.shared_phrases)
                items.append(entry)
            record = {"user_id": query, "run_id": self.run_id, "representation": self.representation,
                      "items": items}
            if self.unknown is not None:
                record["unknown_items"] = list(self.unknown[q])
            out.append(record)
        return out


@dataclass
class _Vectors:
    """One representation's item vectors: ids, a (n, d) float32 matrix and an id -> row map."""

    ids: np.ndarray
    matrix: np.ndarray
    row: dict[str, int]

    @classmethod
    def from_table(cls, table) -> "_Vectors":
        ids = np.asarray(table.column("item_id").to_pylist(), dtype=object)
        flat = pc.list_flatten(table.column("vector")).to_numpy(zero_copy_only=False)
        matrix = np.ascontiguousarray(flat.reshape(len(ids), -1) if len(ids) else np.empty((0, 0)),
                                      dtype=np.float32)
        return cls(ids, matrix, {item: i for i, item in enumerate(ids)})

    def of(self, items: Sequence[str]) -> np.ndarray:
        """The (len(items), d) vectors of ``items``, in their order (a repeated item twice)."""
        return self.matrix[[self.row[i] for i in items]]


class Recommender:
    """See the module doc. Build with ``load``; ``recommend`` is batch-first."""

    def __init__(self, warehouse: str, run_id: str, representation: str, plan: dict, vectors: _Vectors,
                 candidates: np.ndarray, profiles: dict[str, np.ndarray], interactions: pd.DataFrame,
                 loaded_users: Sequence[str] | None = None, use_torch: bool = False):
        self.warehouse, self.run_id, self.representation, self.plan = warehouse, run_id, representation, plan
        self.dataset: str = plan["dataset"]
        self.vectors = vectors
        self.parsed = parse_representation(representation)  # a name of the run's plan: canonical
        # The LVLM representation whose descriptions give the shared phrases (itself or a part), if any.
        self.lvlm = next((r for r in (self.parsed, *map(parse_representation, self.parsed.parts)) if r.kind == LVLM),
                         None)
        # Profiles that are the (normalised) mean of the history's item vectors: base
        # representations and trained fusions; not the parameter-free fusions (fused from
        # per-part profiles) nor ALS (fitted user factors).
        self.mean_profile = self.parsed.kind not in FUSIONS and self.parsed.kind != ALS
        self.candidate_ids = np.asarray(candidates, dtype=object)
        self.block = ItemBlock(vectors.of(candidates), self.candidate_ids, use_torch=use_torch)
        self.candidate_index = {item: i for i, item in enumerate(self.candidate_ids)}
        self.profiles = profiles
        # None: every user of the run was loaded; else only these (``load(users=...)``).
        self.loaded_users = None if loaded_users is None else frozenset(loaded_users)
        # The protocol's seen-item rule (the one topk applies), mapped onto candidate positions.
        self.seen = {u: self._positions(items) for u, items in seen_items(interactions, plan["exclude"]).items()}
        train = interactions[interactions["split"] == TRAIN_SPLIT]
        self.train = {u: (list(g["item_id"]), g["ts"].to_numpy(np.float64)) for u, g in train.groupby("user_id")}
        self._descriptions: dict[str, str] | None = None

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, warehouse: str | Path, run_id: str, representation: str, users: Sequence[str] | None = None,
             use_torch: bool = False) -> "Recommender":
        """Read the run's tables once (errors name the run, the representation and the fix):
        every user's profile and interactions, or only ``users``' (``[]``: ad-hoc histories only)."""
        warehouse = str(warehouse)
        plans = read_table(warehouse, "plans", equal={"run_id": run_id}, columns=["plan"])
        if plans.num_rows == 0:
            latest = (read_table(warehouse, "plans", columns=["run_id", "created_at"]).to_pandas()
                      .sort_values("created_at")["run_id"].tolist()[-5:])
            raise RecommendError(f"run '{run_id}' has no plan in {warehouse}/plans: pass the run id a `vlm4rec "
                                 f"pipeline` printed (latest runs: {latest})")
        plan = json.loads(plans.column("plan")[0].as_py())
        name = resolve_representation(representation, plan["representations"], run_id)
        candidates = read_table(warehouse, "candidates", equal={"run_id": run_id, "representation": name},
                                columns=["item_id"]).column("item_id").to_pylist()
        if not candidates:
            raise RecommendError(f"run '{run_id}' stored no candidates for '{name}': its topk stage did not "
                                 f"finish; rerun `vlm4rec pipeline` (or `vlm4rec topk --run-id {run_id}`)")
        vectors = _Vectors.from_table(read_table(
            warehouse, "item_embeddings", equal={"dataset": plan["dataset"], "representation": name},
            columns=["item_id", "vector"]))
        missing = [i for i in candidates if i not in vectors.row]
        if missing:
            raise RecommendError(
                f"{len(missing)} candidate items of run '{run_id}' have no '{name}' vector in item_embeddings now "
                f"(e.g. {missing[:3]}): the catalog was re-embedded without them; rerun `vlm4rec pipeline` for a "
                "run over the current catalog")
        within = None if users is None else {"user_id": [str(u) for u in users]}
        columns = ["user_id", "item_id", "ts", "split"]
        if within is not None and not within["user_id"]:
            profiles, interactions = {}, pd.DataFrame({c: [] for c in columns})
        else:
            profile_vectors = _Vectors.from_table(read_table(
                warehouse, "user_profiles", equal={"run_id": run_id, "representation": name}, within=within,
                columns=["user_id", "vector"]).rename_columns(["item_id", "vector"]))
            profiles = {u: profile_vectors.matrix[i] for u, i in profile_vectors.row.items()}
            interactions = read_table(warehouse, "interactions", equal={"dataset": plan["dataset"]}, within=within,
                                      columns=columns).to_pandas()
        log.info("recommender %s/%s: %d candidates, %d profiles", run_id, name, len(candidates), len(profiles))
        return cls(warehouse, run_id, name, plan, vectors, np.asarray(sorted(candidates), dtype=object),
                   profiles, interactions, loaded_users=None if within is None else within["user_id"],
                   use_torch=use_torch)

    # ------------------------------------------------------------------ ranking
    def recommend(self, users: Sequence[str] | None = None, histories: Sequence[Sequence[str]] | None = None,
                  k: int = 10, explain: bool = False, n_contributors: int = 3) -> Recommendations:
        """Top-``k`` for each of ``users`` (known user ids) or each of ``histories`` (lists of item
        ids, for users the tables have never seen); exactly one of the two."""
        if (users is None) == (histories is None):
            raise RecommendError("pass either users (known user ids) or histories (lists of item ids), not both")
        if isinstance(users, str) or isinstance(histories, str):
            raise RecommendError("users / histories are batches: pass a list, e.g. users=['42']")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise RecommendError(f"k must be a positive integer, got {k!r}")
        if explain and (isinstance(n_contributors, bool) or not isinstance(n_contributors, (int, np.integer))
                        or n_contributors < 1):
            raise RecommendError(f"n_contributors must be a positive integer, got {n_contributors!r} "
                                 "(explain=False leaves the explanations out)")
        if users is not None:
            users = [str(u) for u in users]
            profiles = self._known_profiles(users)
            seen = [self.seen.get(u, np.empty(0, np.int64)) for u in users]
            history_items = [self.train.get(u, ([], None))[0] for u in users]
            queries: list[str | None] = users
            unknown = None
        else:
            checked = [self._checked_history(h, q) for q, h in enumerate(histories)]
            history_items, unknown = [known for known, _ in checked], [missing for _, missing in checked]
            profiles = self._history_profiles(history_items)
            seen = [self._positions(h) for h in history_items]  # its own items
            queries = [None] * len(history_items)
        if len(queries) == 0:
            return Recommendations(self.run_id, self.representation, [], np.empty((0, k), object),
                                   np.empty((0, k), np.float32), unknown=unknown)
        scores, indices = self.block.topk(profiles, int(k), seen)
        pad = ((0, 0), (0, k - indices.shape[1]))  # fewer candidates than k: padded to a rectangle
        ids = np.pad(block_item_ids(indices, self.candidate_ids), pad, constant_values=None)  # empty slot: None
        scores = np.pad(scores, pad, constant_values=-np.inf)
        result = Recommendations(self.run_id, self.representation, queries, ids, scores, unknown=unknown)
        if explain:
            result.explanations = [self._explain(queries[q], history_items[q], ids[q], int(n_contributors))
                                   for q in range(len(queries))]
            named = [i for row in ids for i in row if i is not None]
            named += [c.item_id for per_query in result.explanations for why in per_query for c in why.contributors]
            result.titles = self.titles(named)
        return result

    def _positions(self, items: Iterable[str]) -> np.ndarray:
        """The candidate positions of ``items`` (those that are candidates), sorted: seen items as
        ``ItemBlock.topk`` takes them."""
        return np.unique([self.candidate_index[i] for i in items if i in self.candidate_index]).astype(np.int64)

    def _known_profiles(self, users: list[str]) -> np.ndarray:
        unknown = [u for u in users if u not in self.profiles]
        if unknown:
            # Every user with a profile of this representation in the run (read only for the error).
            everyone = list(self.profiles) if self.loaded_users is None else read_table(
                self.warehouse, "user_profiles", equal={"run_id": self.run_id, "representation": self.representation},
                columns=["user_id"]).column("user_id").to_pylist()
            not_loaded = [u for u in unknown if u in everyone]
            if not_loaded:
                raise RecommendError(f"user '{not_loaded[0]}' is in run '{self.run_id}' but was not loaded: "
                                     "pass every user to Recommender.load(..., users=[...]), or users=None")
            hint = difflib.get_close_matches(unknown[0], everyone, n=3)
            raise RecommendError(
                f"user '{unknown[0]}' ({len(unknown)} unknown in all) has no '{self.representation}' profile in run "
                f"'{self.run_id}'"
                + (f" (did you mean {hint}?)" if hint else f" (its users look like {sorted(everyone)[:5]})")
                + ": for a user the run has not seen, pass their history as a list of item ids "
                "(--history ITEM,ITEM)")
        return np.stack([self.profiles[u] for u in users]).astype(np.float32)

    def _checked_history(self, history: Sequence[str], q: int) -> tuple[list[str], list[str]]:
        """(the items with a vector, in order, the others): an item the representation has no
        vector for is left out of the profile and reported; a history of such items only is an error."""
        if isinstance(history, str):
            raise RecommendError(f"history {q} is a string: pass a list of item ids, e.g. ['12', '40']")
        items = [str(i) for i in history]
        if not items:
            raise RecommendError(f"history {q} is empty: a user needs at least one item to be profiled "
                                 "(for a user without history use the popularity baseline)")
        known = [i for i in items if i in self.vectors.row]
        unknown = list(dict.fromkeys(i for i in items if i not in self.vectors.row))
        if not known:
            hint = difflib.get_close_matches(unknown[0], list(self.vectors.row), n=3)
            raise RecommendError(
                f"history {q}: none of its {len(unknown)} items has a '{self.representation}' vector in dataset "
                f"'{self.dataset}'; item '{unknown[0]}' has none" + (f" (did you mean {hint}?)" if hint else "")
                + ": use item ids of the items table; a new item needs `vlm4rec ingest` and `vlm4rec pipeline` first")
        if unknown:
            log.warning("history %d: %d of its items have no '%s' vector and are left out of its profile: %s",
                        q, len(unknown), self.representation, unknown[:10])
        return known, unknown

    def _history_profiles(self, histories: list[list[str]]) -> np.ndarray:
        if self.parsed.kind == ALS:
            raise RecommendError(f"'{self.representation}' scores users by the factors ALS fitted to the train "
                                 "split, which an ad-hoc history does not have: pass a user of the run, or use a "
                                 "content representation (lvlm, title, visual...) for a new user")
        rows = np.repeat(np.arange(len(histories)), [len(h) for h in histories])
        flat = [i for h in histories for i in h]
        if self.mean_profile:
            return user_profiles(rows, self.vectors.of(flat), n_users=len(histories))[0]
        per_part = {}
        for name, vectors in self._part_vectors.items():
            missing = [i for i in flat if i not in vectors.row]
            if missing:
                raise RecommendError(f"item '{missing[0]}' has no '{name}' vector, a part of '{self.representation}': "
                                     "run `vlm4rec embed` for it")
            per_part[name] = user_profiles(rows, vectors.of(flat), n_users=len(histories))[0]
        # The plan's concat weights of this fusion's parts (naive takes none).
        weights = (None if self.parsed.kind != fusion.CONCAT else
                   {p: w for p, w in self.plan.get("concat_weights") or [] if p in self._part_vectors})
        return fusion.fuse(self.parsed.kind, per_part, weights or None)

    @cached_property
    def _part_vectors(self) -> dict[str, _Vectors]:
        """A fusion's parts' item vectors, read at its first ad-hoc history."""
        return {part: _Vectors.from_table(read_table(
            self.warehouse, "item_embeddings", equal={"dataset": self.dataset, "representation": part},
            columns=["item_id", "vector"])) for part in self.parsed.parts}

    # ------------------------------------------------------------------ explanations
    def _explain(self, user: str | None, history: list[str], items: np.ndarray, n: int) -> list[Explanation]:
        # History rows with a vector, as the profile was built from (a repeated item counts twice).
        rows = [j for j, i in enumerate(history) if i in self.vectors.row]
        known = [history[j] for j in rows]
        chosen = [i for i in items if i is not None]
        if not known or not chosen:
            return [Explanation((), False) for _ in chosen]
        h, x = self.vectors.of(known), self.vectors.of(chosen)
        similarity = x.astype(np.float64) @ h.T.astype(np.float64)
        if self.mean_profile:
            half_life = self.plan.get("half_life_days")  # a known user's profile weighs by recency
            weights = None if user is None or half_life is None else recency_weights(
                np.zeros(len(known), np.int64), self.train[user][1][rows], half_life, 1)
            shares = explanations.history_shares(h, x, weights)
        else:
            shares = similarity
        texts = self.descriptions() if self.lvlm else {}
        out = []
        for r, item in enumerate(chosen):
            top = np.argsort(-shares[r], kind="stable")[:n]
            contributors = tuple(Contribution(known[j], float(shares[r, j]) if self.mean_profile else None,
                                              float(similarity[r, j])) for j in top)
            phrases = () if not texts else tuple(explanations.shared_phrases(
                texts.get(item), [texts.get(c.item_id) for c in contributors]))
            out.append(Explanation(contributors, self.mean_profile, phrases))
        return out

    def descriptions(self) -> dict[str, str]:
        """item id -> the description the run's LVLM engine wrote for its image (read once)."""
        if self._descriptions is None:
            texts = read_table(self.warehouse, "descriptions",
                               equal={"engine": self.lvlm.engine, "model": self.lvlm.model,
                                      "prompt_id": self.lvlm.prompt_id, "status": explanations.DESCRIPTION_OK},
                               columns=["image_sha256", "text", "status"]).to_pandas()
            self._descriptions = explanations.item_descriptions(self._items, texts)
        return self._descriptions

    def titles(self, item_ids: Sequence[str]) -> dict[str, str]:
        """item id -> its ``items`` title, for those of ``item_ids`` that have one."""
        return {i: self._title_of[i] for i in item_ids if i in self._title_of}

    @cached_property
    def _title_of(self) -> dict[str, str]:
        return {i: t for i, t in zip(self._items["item_id"], self._items["title"]) if t}

    @cached_property
    def _items(self) -> pd.DataFrame:
        """The dataset's catalog rows (read once, at the first explanation)."""
        return read_table(self.warehouse, "items", equal={"dataset": self.dataset},
                          columns=["item_id", "title", "image_sha256"]).to_pandas()


@dataclass(frozen=True)
class ServedRun:
    """The run ``latest_pipeline_run`` chose: its id, dataset and when it finished."""

    run_id: str
    dataset: str
    finished_at: dt.datetime | None


def latest_pipeline_run(warehouse: str | Path, dataset: str | None = None) -> ServedRun:
    """The latest (by ``finished_at``) ``pipeline`` run with status ``succeeded`` of ``dataset``
    (its config's ``dataset.name``). Without a dataset, that of the only dataset with one; more
    than one is an error that lists them (which to serve is the caller's choice, not the clock's)."""
    runs = read_table(warehouse, "runs", equal={"job": PIPELINE_JOB, "status": SUCCEEDED},
                      columns=["run_id", "config", "finished_at"]).to_pylist()
    found = [ServedRun(row["run_id"], (json.loads(row["config"] or "{}").get("dataset") or {}).get("name") or "",
                       row["finished_at"]) for row in runs]
    datasets = sorted({run.dataset for run in found})
    if dataset is None and len(datasets) > 1:
        raise RecommendError(f"warehouse {warehouse} holds completed pipeline runs of {len(datasets)} datasets "
                             f"{datasets}: pass --dataset NAME (or --run-id RUN) to say which to serve")
    chosen = [run for run in found if dataset is None or run.dataset == dataset]
    if not chosen:
        of = f" of dataset '{dataset}'" if dataset is not None else ""
        others = f" (it holds completed runs of {datasets})" if datasets else ""
        raise RecommendError(f"no completed pipeline run{of} in warehouse {warehouse}{others}: run `vlm4rec pipeline "
                             "--conf ...` for it to finish first, or pass --run-id RUN of a run that has")
    # delta-rs reads the timestamps as UTC-aware; a row without one (never for a succeeded run)
    # must not be compared with them.
    return max(chosen, key=lambda run: (run.finished_at is not None,
                                        run.finished_at.timestamp() if run.finished_at else 0.0, run.run_id))


def resolve_representation(asked: str, available: Sequence[str], run_id: str) -> str:
    """The run's full representation name for ``asked``: its canonical spelling (fusion parts in
    any order), with the ``lvlm`` shorthand (alone or as a fusion part) spelt out when the run has
    exactly one LVLM representation."""
    if asked in available:  # the baselines too, which are not representation names
        return asked
    lvlm = [n for n in available if n.startswith(f"{LVLM}:")]
    try:
        name = parse_representation(spell_out_lvlm(asked, lvlm[0]) if len(lvlm) == 1 else asked).name
    except RepresentationError:
        name = None
    if name in available:
        return name
    raise RecommendError(f"run '{run_id}' has no representation '{asked}': it ranked {list(available)}; pass one "
                         "of them, or run `vlm4rec pipeline` with it in experiment.representations")
