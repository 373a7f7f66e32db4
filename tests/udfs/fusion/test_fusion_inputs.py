"""udfs.fusion.fusion_inputs (the fuse job's arrays and its reuse hash) and the one mapping from the
typed ``experiment.fuse`` settings to ``TrainSettings``; no Spark."""
from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

from udfs.fusion.fusion_inputs import aligned_parts, indexed_interactions, inputs_digest
from udfs.representations import parse_representation

REP = parse_representation("gating:title+visual")


def frames():
    title = pd.DataFrame({"item_id": ["c", "a", "b", "d"], "vector": [[3.0, 3], [1.0, 1], [2.0, 2], [4.0, 4]]})
    visual = pd.DataFrame({"item_id": ["b", "d", "a"], "vector": [[20.0], [40.0], [10.0]]})
    return {"title": title, "visual": visual}


def test_aligned_parts_keep_the_items_with_every_part_each_row_its_own_items():
    ids, (title, visual) = aligned_parts(frames(), REP)
    assert ids.tolist() == ["a", "b", "d"]  # c has no visual vector: left out
    assert title.dtype == visual.dtype == np.float32
    np.testing.assert_array_equal(title, [[1, 1], [2, 2], [4, 4]])
    np.testing.assert_array_equal(visual, [[10], [20], [40]])


def test_aligned_parts_name_a_part_with_mixed_dimensions_or_a_duplicated_item():
    bad = frames()
    bad["visual"].loc[0, "vector"] = [20.0, 0.0]
    with pytest.raises(ValueError, match=r"'visual' holds vectors of dimensions \[1, 2\]"):
        aligned_parts(bad, REP)
    twice = frames()
    twice["title"] = pd.concat([twice["title"], twice["title"].iloc[:1]], ignore_index=True)
    with pytest.raises(ValueError, match="'title' holds an item more than once"):
        aligned_parts(twice, REP)


def test_indexed_interactions_number_users_by_id_and_count_rows_of_unknown_items():
    rows = pd.DataFrame({"user_id": ["u2", "u1", "u1", "u2", "u3"], "item_id": ["b", "a", "c", "d", "a"],
                         "split": ["train", "train", "valid", "valid", "valid"]})
    (tu, ti, vu, vi), unknown = indexed_interactions(rows, np.array(["a", "b", "d"], dtype=object))
    assert unknown == 1  # u1's valid row names c, which is not among the items
    assert tu.tolist() == [1, 0] and ti.tolist() == [1, 0]
    assert vu.tolist() == [1, 2] and vi.tolist() == [2, 0]
    assert all(a.dtype == np.int64 for a in (tu, ti, vu, vi))


def test_indexed_interactions_refuse_a_test_row():
    rows = pd.DataFrame({"user_id": ["u1"], "item_id": ["a"], "split": ["test"]})
    with pytest.raises(ValueError, match=r"split\(s\) \['test'\]"):
        indexed_interactions(rows, np.array(["a"], dtype=object))


def test_inputs_digest_changes_with_every_input_and_not_with_row_order():
    ids, matrices = aligned_parts(frames(), REP)
    rows = pd.DataFrame({"user_id": ["u1", "u2"], "item_id": ["a", "b"], "split": ["train", "valid"]})
    params = {"spec": {"hidden": 8}}
    base = inputs_digest(REP, params, ids, matrices, rows)
    assert inputs_digest(REP, params, ids, matrices, rows.iloc[::-1]) == base
    changed_vector = [matrices[0].copy(), matrices[1]]
    changed_vector[0][0, 0] += 1e-3
    others = [
        inputs_digest(parse_representation("attention:title+visual"), params, ids, matrices, rows),
        inputs_digest(REP, {"spec": {"hidden": 16}}, ids, matrices, rows),
        inputs_digest(REP, params, np.array(["a", "b", "e"], dtype=object), matrices, rows),
        inputs_digest(REP, params, ids, changed_vector, rows),
        inputs_digest(REP, params, ids, matrices, rows.assign(split=["train", "train"])),
        inputs_digest(REP, params, ids, matrices, rows.assign(user_id=["u1", "u3"])),
    ]
    assert len({base, *others}) == 1 + len(others)


def test_train_settings_read_every_field_from_the_typed_fuse_settings():
    from jobs.config import FuseConf
    from udfs.fusion.fusion_training import TrainSettings

    mapped = [f.name for f in dataclasses.fields(TrainSettings) if f.name != "knn_k"]
    conf_fields = {f.name for f in dataclasses.fields(FuseConf)}
    assert set(mapped) <= conf_fields, set(mapped) - conf_fields
    # every mapped field is taken from the config: give each a value unlike its default
    conf = FuseConf(objective="sampled_softmax", epochs=7, batch_size=33, lr=0.5, negatives=9, temperature=0.3,
                    patience=5, eval_k=11, seed=3, threads=4)
    settings = TrainSettings.from_fields(conf, [5, 6])
    for name in mapped:
        assert getattr(settings, name) == getattr(conf, name) != getattr(TrainSettings(), name), name
    assert settings.knn_k == (5, 6)
    # the defaults agree too, but for the driver's threads (the job's default uses both cores)
    defaults = TrainSettings.from_fields(FuseConf())
    assert {n: getattr(defaults, n) for n in mapped if n != "threads"} == \
        {n: getattr(TrainSettings(), n) for n in mapped if n != "threads"}
