"""``udfs.encode.embed_inputs``: embed's rules as pandas functions, without Spark or an encoder model.

The Spark path calls these functions per bucket of a hash of the rows' key, the driver path on
the whole input; the bucket tests below are the property that makes the two agree: the output
for a set of buckets is the whole input's output for their keys.
"""
from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pytest

from udfs.encode.embed_inputs import (VECTOR_COLUMNS, Encoding, Fusion, encoded_or_reused, fused, input_rows,
                               split_reusable, status_counts)
from udfs.fusion.fusion import fuse
from udfs.representations import parse_representation

LVLM = parse_representation("lvlm:tags:m:p1")
TEXT_SHARE = Encoding("all-MiniLM-L6-v2", (parse_representation("title"), LVLM), batch_size=8)


def catalog() -> tuple[pd.DataFrame, pd.DataFrame]:
    """Items i0..i5 and descriptions: i0 ok, i1 failed, i2 none, i3 no image, i4 another prompt's
    only, i5 ok but shares i0's image."""
    items = pd.DataFrame({
        "item_id": [f"i{n}" for n in range(6)],
        "title": ["red shoe", "", "blue hat", None, "green scarf", "red shoe again"],
        "text": ["t"] * 6,
        "image_uri": [f"/img/{n}.png" for n in range(6)],
        "image_sha256": ["h0", "h1", "h2", None, "h4", "h0"],
    })
    descriptions = pd.DataFrame({
        "image_sha256": ["h0", "h1", "h4"],
        "engine": ["tags"] * 3,
        "model": ["m"] * 3,
        "prompt_id": ["p1", "p1", "p2"],
        "status": ["ok", "error", "ok"],
        "text": ["a red shoe", None, "a green scarf"],
    })
    return items, descriptions


def by_item(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.sort_values(["representation", "item_id"]).reset_index(drop=True)


def test_an_lvlm_input_is_the_ok_description_of_the_items_image_or_why_there_is_none():
    items, descriptions = catalog()
    rows = by_item(input_rows(items, descriptions, TEXT_SHARE))
    lvlm = rows[rows["representation"] == LVLM.name].set_index("item_id")
    assert lvlm["pre_status"].to_dict() == {"i0": None, "i1": "failed_caption", "i2": "missing_description",
                                            "i3": "no_image", "i4": "missing_description", "i5": None}
    assert lvlm.loc["i5", "text"] == "a red shoe"
    assert lvlm.loc["i0", "source_sha256"] == hashlib.sha256(b"a red shoe").hexdigest()
    assert lvlm.loc[["i1", "i2", "i3", "i4"], "source_sha256"].isna().all()
    titles = rows[rows["representation"] == "title"].set_index("item_id")
    assert titles.loc["i2", "source_sha256"] == hashlib.sha256(b"blue hat").hexdigest()
    assert titles.loc["i3", "source_sha256"] is None  # no text: never reused
    assert list(rows.columns) == ["representation", "item_id", "text", "image_uri", "pre_status", "source_sha256"]


def test_without_a_descriptions_table_every_image_is_missing_its_description():
    items, _ = catalog()
    rows = input_rows(items, None, TEXT_SHARE)
    assert set(rows.loc[rows["representation"] == LVLM.name, "pre_status"]) == {"missing_description", "no_image"}


def test_image_inputs_carry_the_ingest_hash():
    items, _ = catalog()
    rows = input_rows(items, None, Encoding("efficientnet-lite0", (parse_representation("visual"),), 4))
    assert list(rows["source_sha256"]) == list(items["image_sha256"])
    assert list(rows["image_uri"]) == list(items["image_uri"]) and rows["pre_status"].isna().all()


@pytest.mark.parametrize("n_buckets", [2, 3, 5])
def test_inputs_of_the_buckets_of_image_hash_are_the_inputs_of_the_whole_catalog(n_buckets):
    items, descriptions = catalog()
    bucket = lambda key: int(hashlib.md5(str(key).encode()).hexdigest(), 16) % n_buckets  # noqa: E731
    item_keys = items["image_sha256"].fillna(items["item_id"]).map(bucket)
    description_keys = descriptions["image_sha256"].map(bucket)
    parts = [input_rows(items[item_keys == b], descriptions[description_keys == b], TEXT_SHARE)
             for b in range(n_buckets)]
    whole = by_item(input_rows(items, descriptions, TEXT_SHARE))
    pd.testing.assert_frame_equal(by_item(pd.concat(parts, ignore_index=True)), whole)


def stored(rows: pd.DataFrame, encoder: str) -> pd.DataFrame:
    return rows.assign(encoder=encoder, vector=[np.full(2, i, np.float32) for i in range(len(rows))])[
        ["representation", "item_id", "source_sha256", "encoder", "vector"]]


def test_a_stored_vector_is_reused_only_from_the_same_encoder_and_input_hash():
    items, descriptions = catalog()
    rows = input_rows(items, descriptions, TEXT_SHARE)
    previous = stored(rows, TEXT_SHARE.encoder)
    previous.loc[previous["item_id"] == "i0", "source_sha256"] = "an older text's hash"
    todo, reused = split_reusable(rows, previous, TEXT_SHARE.encoder)
    hashed = rows["source_sha256"].notna()
    assert len(reused) == hashed.sum() - 2  # i0's title and description changed
    assert set(todo["item_id"] + todo["representation"]) == set(
        (rows["item_id"] + rows["representation"])[~hashed]) | {"i0title", f"i0{LVLM.name}"}
    assert (reused["status"] == "ok").all()
    _, none = split_reusable(rows, stored(rows, "another-model"), TEXT_SHARE.encoder)
    assert none.empty


def test_nothing_to_encode_loads_no_model_and_gives_the_stored_vectors():
    items, _ = catalog()
    share = Encoding("a-model-that-does-not-exist", (parse_representation("title"),), 8)
    rows = input_rows(items, None, share)
    rows = rows[rows["source_sha256"].notna()]
    out = encoded_or_reused(rows, stored(rows, share.encoder), share)
    assert list(out.columns) == VECTOR_COLUMNS
    assert out["_reused"].all() and (out["encoder"] == share.encoder).all() and len(out) == len(rows)


def vectors_of(n_items: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for part, dim in (("title", 4), ("visual", 6)):
        for i in range(n_items):
            ok = not (part == "visual" and i % 4 == 1)
            rows.append({"representation": part, "item_id": f"i{i}", "status": "ok" if ok else "truncated",
                         "vector": rng.standard_normal(dim).astype(np.float32) if ok else None,
                         "source_sha256": None, "encoder": "e", "_reused": False})
    return pd.DataFrame(rows, columns=VECTOR_COLUMNS)


FUSIONS = (Fusion(parse_representation("naive"), None, "naive[...]"),
           Fusion(parse_representation("concat"), {"title": 2.0}, "concat[...]"))


def test_fused_rows_are_the_fusion_of_the_parts_of_the_items_that_have_them_all():
    vectors = vectors_of(8)
    out = fused(vectors, FUSIONS)
    for fusion in FUSIONS:
        made = out[out["representation"] == fusion.representation.name].set_index("item_id")
        assert sorted(made.index) == sorted(f"i{i}" for i in range(8) if i % 4 != 1)
        parts = {p: np.stack(vectors[(vectors["representation"] == p)].set_index("item_id").loc[made.index, "vector"])
                 for p in ("title", "visual")}
        np.testing.assert_array_equal(np.stack(made["vector"]), fuse(fusion.representation.kind, parts, fusion.weights))
        assert (made["encoder"] == fusion.encoder).all() and made["source_sha256"].isna().all()
    counts = status_counts(pd.concat([vectors, out]))
    assert counts.loc[counts["status"] == "truncated", "count"].tolist() == [2]


def test_fused_rows_of_item_buckets_are_the_fused_rows_of_all_items():
    vectors = vectors_of(12, seed=3)
    bucket = vectors["item_id"].str[1:].astype(int) % 3
    parts = pd.concat([fused(vectors[bucket == b], FUSIONS) for b in range(3)], ignore_index=True)
    whole = fused(vectors, FUSIONS)
    key = ["representation", "item_id"]
    parts, whole = parts.sort_values(key).reset_index(drop=True), whole.sort_values(key).reset_index(drop=True)
    assert parts[key].equals(whole[key])
    np.testing.assert_array_equal(np.stack(parts["vector"]), np.stack(whole["vector"]))
