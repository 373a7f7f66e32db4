"""udfs.fusion.fusion_udfs without Spark: the mapInArrow function fed Arrow batches as Spark sends them
(list<float> columns, sliced batches, a null or short vector) gives each good row the vector a
direct forward pass over the same batch gives it, byte for byte, and marks the others bad_dim.
(Over the same batch: a row's last bits may depend on the batch it is computed in, since the
matrix kernels block by rows.)"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from udfs.fusion import fusion_udfs
from udfs.fusion.fusion_models import FusionSpec, build_model
from udfs.fusion.fusion_training import apply_fusion, model_bytes


def column(rows):
    return pa.array(rows, pa.list_(pa.float32()))


def test_batches_give_each_row_its_own_vector_and_mark_bad_rows():
    rng = np.random.default_rng(0)
    title, visual = rng.normal(size=(7, 6)).astype(np.float32), rng.normal(size=(7, 4)).astype(np.float32)
    spec = FusionSpec("gating", (6, 4), hidden=8, out_dim=5)
    torch.manual_seed(0)
    model = build_model(spec).eval()
    visual_rows = [list(v) for v in visual]
    visual_rows[2] = None  # a null vector
    visual_rows[5] = list(visual[5][:3])  # too short
    fed = visual.copy()
    fed[[2, 5]] = 0  # what the function feeds the model for a bad row
    expected = np.concatenate([apply_fusion(model, [title[a:b], fed[a:b]], threads=1) for a, b in ((0, 3), (3, 7))])
    whole = pa.RecordBatch.from_arrays([pa.array([f"i{i}" for i in range(7)]), column([list(v) for v in title]),
                                        column(visual_rows)], names=["item_id", "part_0", "part_1"])
    # Spark's batches can be slices of larger buffers: offsets that do not start at 0
    batches = [whole.slice(0, 3), whole.slice(3, 4), whole.slice(7, 0)]
    out = pa.Table.from_batches(list(fusion_udfs.apply_batches(model_bytes(model, spec), 1)(iter(batches))))
    assert out.schema == fusion_udfs.OUTPUT
    assert out.column("item_id").to_pylist() == [f"i{i}" for i in range(7)]
    status = out.column("status").to_pylist()
    assert status == ["ok", "ok", "bad_dim", "ok", "ok", "bad_dim", "ok"]
    vectors = out.column("vector").to_pylist()
    for i, (state, vector) in enumerate(zip(status, vectors)):
        if state == "ok":
            assert np.asarray(vector, np.float32).tobytes() == expected[i].tobytes(), i
        else:
            assert vector is None
