"""The protocol's rules on small frames with a known answer: candidates (common vs all, with
and without baselines), the seen-item rule and the relevance rule."""
from __future__ import annotations

import pandas as pd
import pytest

from udfs.evaluate import protocol

EMBEDDED = pd.DataFrame({
    "representation": ["title", "title", "title", "visual", "visual", "text", "title"],
    "item_id":        ["a",     "b",     "c",     "b",      "c",      "a",    "a"],
})
CATALOG = ["a", "b", "c", "d"]


def by_rep(frame: pd.DataFrame) -> dict[str, list[str]]:
    return {rep: sorted(group["item_id"]) for rep, group in frame.groupby("representation")}


def test_common_is_the_items_with_a_vector_in_every_representation_for_all_including_baselines():
    got = protocol.candidate_items(EMBEDDED, ["title", "visual"], ["popularity"], CATALOG, "common")
    assert by_rep(got) == {"title": ["b", "c"], "visual": ["b", "c"], "popularity": ["b", "c"]}
    assert list(got.columns) == ["representation", "item_id"]


def test_all_gives_each_representation_its_own_items_and_baselines_the_catalog():
    got = protocol.candidate_items(EMBEDDED, ["title", "visual"], ["random"], CATALOG, "all")
    assert by_rep(got) == {"title": ["a", "b", "c"], "visual": ["b", "c"], "random": CATALOG}


def test_baselines_alone_rank_the_catalog_and_nothing_is_an_empty_frame():
    got = protocol.candidate_items(EMBEDDED.iloc[:0], [], ["popularity"], CATALOG, "common")
    assert by_rep(got) == {"popularity": CATALOG}
    empty = protocol.candidate_items(EMBEDDED, ["text", "visual"], [], [], "common")
    assert empty.empty and list(empty.columns) == ["representation", "item_id"]
    with pytest.raises(ValueError, match="unknown candidate policy 'commons'"):
        protocol.candidate_items(EMBEDDED, ["title"], [], CATALOG, "commons")


def test_the_catalog_is_the_items_table_else_the_items_interacted_with():
    listed = protocol.candidate_items(EMBEDDED.iloc[:0], [], ["random"], ["b", "a"], "all", ["z"])
    assert by_rep(listed) == {"random": ["a", "b"]}
    interacted = protocol.candidate_items(EMBEDDED.iloc[:0], [], ["random"], [], "all", ["z", "y", "z"])
    assert by_rep(interacted) == {"random": ["y", "z"]}
    # The catalog is read only where the rule uses it.
    assert protocol.needs_catalog(["title"], ["random"], "all") and protocol.needs_catalog([], ["random"], "common")
    assert not protocol.needs_catalog(["title"], ["random"], "common") and not protocol.needs_catalog(["t"], [], "all")


INTERACTIONS = pd.DataFrame({
    "user_id": ["u1", "u1", "u1", "u1", "u2", "u2", "u3"],
    "item_id": ["a",  "b",  "c",  "b",  "a",  "d",  "c"],
    "split":   ["train", "valid", "test", "test", "train", "test", "test"],
})


def test_seen_items_are_the_excluded_splits_items():
    assert protocol.seen_items(INTERACTIONS, ["train", "valid"]) == {"u1": {"a", "b"}, "u2": {"a"}}
    assert protocol.seen_items(INTERACTIONS, ["train"]) == {"u1": {"a"}, "u2": {"a"}}
    with pytest.raises(ValueError, match="cannot exclude split"):
        protocol.seen_items(INTERACTIONS, ["test"])


def relevant(exclude: list[str]) -> dict[str, set[str]]:
    """user -> the relevant items ``relevant_rows`` gives over the candidates a, b, c (the
    excluded rows dropped)."""
    candidates = pd.DataFrame({"representation": "title", "item_id": ["a", "b", "c"]})
    rows = protocol.relevant_rows(INTERACTIONS, candidates, exclude)
    return {user: set(items) for user, items in rows.loc[~rows["excluded"]].groupby("user_id")["item_id"]}


def test_relevant_items_are_test_candidates_not_seen():
    # u1's test item b is also a valid item: excluded at test time, so not relevant.
    assert relevant(["train", "valid"]) == {"u1": {"c"}, "u3": {"c"}}
    assert relevant(["train"]) == {"u1": {"b", "c"}, "u3": {"c"}}
    # u2's test item d is not a candidate: u2 has no relevant item.
    assert "u2" not in relevant(["train"])
