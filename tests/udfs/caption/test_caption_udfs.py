"""The caption job's image reading on the Ray workers (``load_one``, ``load_image_bytes``): the
same bounded reader as ingest, with the caption cache's retry policy. No Spark, no Ray."""
from __future__ import annotations

import io
import os
import threading

import pandas as pd
import pyarrow as pa
import pytest
from PIL import Image

from udfs.caption import caption_udfs as cu
from udfs.caption.kinds import KINDS
from udfs.io.images import ReadLimits, sha256_bytes


def _png(path, size=(30, 20)):
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 35)).save(buffer, "PNG")
    path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


def _load_in_thread(*args):
    """``load_one(*args)`` with a join timeout: a hang guard, so that a FIFO read regression fails
    this test instead of hanging the run."""
    result = []
    thread = threading.Thread(target=lambda: result.append(cu.load_one(*args)), daemon=True)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive(), f"load_one{args} hung"
    return result[0]


def test_oversized_file_is_an_error_that_is_retried(tmp_path):
    path = tmp_path / "big.png"
    data = _png(path)
    os.truncate(path, 512 << 20)  # sparse: refused from its size, never read
    img, error = cu.load_one(str(path), sha256_bytes(data), 448, ReadLimits(max_bytes=1 << 20))
    assert img is None and cu.error_kind(error) == "too_big"
    assert "dataset.images.max_bytes=1,048,576" in error and not cu.is_permanent_error(error)


def test_devices_and_fifos_return_promptly_with_an_error(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    for path, what in (("/dev/zero", "a character device"), (str(fifo), "a FIFO")):
        img, error = _load_in_thread(path, "0" * 64, 448, ReadLimits())
        assert img is None and cu.error_kind(error) == "not_regular" and f"is {what}" in error
        assert not cu.is_permanent_error(error)
    # The vllm branch reads through the same reader.
    out = cu.load_image_bytes(pd.DataFrame({"image_uri": ["/dev/zero"], "image_sha256": ["0" * 64]}))
    assert out["image_bytes"].iat[0] is None and cu.error_kind(out["error"].iat[0]) == "not_regular"


def test_a_changed_file_is_described_without_quoting_it(tmp_path):
    path = tmp_path / "a.png"
    data = _png(path)
    marker = "MARKER-3b1f-content-that-must-not-leak"
    path.write_text(f"{marker}\n" * 3)
    _, error = cu.load_one(str(path), sha256_bytes(data), 448)
    assert cu.error_kind(error) == "changed" and "not an image format" in error and marker not in error


def test_timeout_is_not_permanent():
    assert not cu.is_permanent_error("timeout: image 'x': read timed out after 30 s")
    assert cu.is_permanent_error("not_image: image 'x' is a damaged JPEG")


def test_vllm_bytes_are_the_bytes_that_were_checked(tmp_path):
    path = tmp_path / "a.png"
    data = _png(path)
    out = cu.load_image_bytes(pd.DataFrame({"image_uri": [str(path)], "image_sha256": [sha256_bytes(data)]}),
                              ReadLimits(max_bytes=len(data)))
    assert out["image_bytes"].iat[0] == data and out["error"].iat[0] is None
    out = cu.load_image_bytes(pd.DataFrame({"image_uri": [str(path)], "image_sha256": [sha256_bytes(data)]}),
                              ReadLimits(max_bytes=len(data) - 1))
    assert out["image_bytes"].iat[0] is None and cu.error_kind(out["error"].iat[0]) == "too_big"


def _plan_inputs():
    import pyarrow as pa

    items = pa.table({
        "item_id": ["b", "a", "c", "d", "e", "f", "g"],
        "image_uri": ["u/b.png", "u/a.png", "u/c.png", "u/d.png", None, "u/f.png", "u/g.png"],
        # a and b share an image; e has none; f was described, g failed for good, d transiently.
        "image_sha256": ["s1", "s1", "s2", "s3", None, "s4", "s5"],
    })
    cache = pa.table({"image_sha256": ["s3", "s4", "s5", "s9"],
                      "status": ["error", "ok", "error", "ok"],
                      "error": ["changed: the file changed since ingest", None, "truncated: cut short", None]})
    return items, cache


def test_caption_plan_describes_each_image_once_and_skips_what_is_settled():
    items, cache = _plan_inputs()
    todo, facts = cu.caption_todo(items, cache)
    # One item per image (the smallest id), sorted by hash; ok rows and permanent errors settled.
    assert todo.to_pylist() == [{"image_sha256": "s1", "item_id": "a", "image_uri": "u/a.png"},
                                {"image_sha256": "s2", "item_id": "c", "image_uri": "u/c.png"},
                                {"image_sha256": "s3", "item_id": "d", "image_uri": "u/d.png"}]
    assert facts == {"n": 7, "with_image": 6, "images": 5, "ok": 1, "final_errors": 1, "retry": 1}
    forced, forced_facts = cu.caption_todo(items, cache, force=True)
    assert forced.column("image_sha256").to_pylist() == ["s1", "s2", "s3", "s4", "s5"]
    assert forced_facts == facts


@pytest.mark.parametrize("buckets", [1, 2, 3, 7])
def test_the_plan_by_buckets_of_image_hash_is_the_plan_of_the_whole(buckets):
    """What the Spark plan does: ``caption_todo_rows`` on each bucket (an image's items and cache
    rows in one; an item without an image by its id), added up by ``caption_todo_of_rows``."""
    import zlib

    import pyarrow.compute as pc

    items, cache = _plan_inputs()

    def bucket(keys):
        return pa.array([zlib.crc32(k.encode()) % buckets for k in keys])

    item_buckets = bucket([s or i for s, i in zip(items["image_sha256"].to_pylist(), items["item_id"].to_pylist())])
    cache_buckets = bucket(cache["image_sha256"].to_pylist())
    for force in (False, True):
        rows = pa.concat_tables([
            cu.caption_todo_rows(items.filter(pc.equal(item_buckets, b)),
                                 cache.filter(pc.equal(cache_buckets, b)), force)
            for b in range(buckets)])
        todo, facts = cu.caption_todo_of_rows(rows)
        whole, whole_facts = cu.caption_todo(items, cache, force)
        assert todo.to_pylist() == whole.to_pylist() and facts == whole_facts
    # No item at all: every fact is there, at 0.
    assert cu.caption_todo_of_rows(cu.caption_todo_rows(items.slice(0, 0), None).slice(0, 0))[1] == dict.fromkeys(
        cu.FACT_NAMES, 0)


def test_caption_plan_counts_a_doubled_cache_row_once_and_as_settled():
    import pyarrow as pa

    items, cache = _plan_inputs()
    # s3 has a transient error row and, after it in file order, an ok row.
    ok_again = pa.table({"image_sha256": ["s3"], "status": ["ok"], "error": [None]}, schema=cache.schema)
    todo, facts = cu.caption_todo(items, pa.concat_tables([cache, ok_again]))
    assert todo.column("image_sha256").to_pylist() == ["s1", "s2"]
    assert facts == {"n": 7, "with_image": 6, "images": 5, "ok": 2, "final_errors": 1, "retry": 0}


def test_staged_winners_rank_ok_then_error_then_no_status_and_keep_new_keys():
    import datetime as dt

    from udfs.caption.caption_udfs import ERROR, OK, STAGING_SCHEMA, staged_winners

    def row(sha, status, day):
        return {"image_sha256": sha, "engine": "e", "model": "m", "prompt_id": "p", "status": status,
                "created_at": dt.datetime(2026, 1, day, tzinfo=dt.timezone.utc)}

    staged = pa.Table.from_pylist([row("a", ERROR, 1), row("a", None, 2), row("b", OK, 1), row("b", ERROR, 3),
                                   row("c", ERROR, 1), row("c", ERROR, 2)], schema=STAGING_SCHEMA)
    keys = ["image_sha256", "engine", "model", "prompt_id"]
    for current in (None, STAGING_SCHEMA.empty_table()):  # no table yet, or no row of these images
        won = sorted((r["image_sha256"], r["status"], r["created_at"].day)
                     for r in staged_winners(staged, current, keys).to_pylist())
        assert won == [("a", ERROR, 1), ("b", OK, 1), ("c", ERROR, 2)]


def test_a_cpu_actor_reading_its_own_files_describes_as_the_loading_stage_does(tmp_path, ml100k, monkeypatch):
    """The two shapes of the caption pipeline (a CPU actor reads and writes its own files; a GPU
    actor takes the loading stage's pixels and a writer stage stages them) give the same rows,
    bad files included; the CPU actor describes one engine batch (here 2 images) at a time, and
    never builds its engine for a block whose every file is bad."""
    import pyarrow.parquet as pq

    import udfs.caption as caption

    posters = [ml100k / "posters" / f"{i}.jpg" for i in (1, 2, 50, 98)]
    rows = [(str(p), sha256_bytes(p.read_bytes())) for p in posters]
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(posters[0].read_bytes()[:300])
    rows += [(str(corrupt), sha256_bytes(corrupt.read_bytes())), (str(tmp_path / "gone.jpg"), "0" * 64)]
    rows.insert(1, rows.pop())  # a failure between two good images of one engine batch
    # good, missing, good, good, raises, truncated: engine batches of 1, 2 and no image.
    real_read_checked, raising = cu.read_checked, rows[4][0]

    def read_or_a_disk_fault(uri, *args):
        # A fault no reader rule expects, which no file on a healthy disk produces.
        if uri == raising:
            raise OSError("disk gone")
        return real_read_checked(uri, *args)

    monkeypatch.setattr(cu, "read_checked", read_or_a_disk_fault)
    engine_batches = []
    real_describe = caption.describe_isolated
    monkeypatch.setattr(caption, "describe_isolated",
                        lambda engine, images: engine_batches.append(len(images)) or real_describe(engine, images))

    def frame(picked):
        return pd.DataFrame({"image_sha256": [s for _, s in picked], "item_id": [str(i) for i in range(len(picked))],
                             "image_uri": [u for u, _ in picked]})

    batch = frame(rows)
    load = {"max_side": KINDS["tags"].max_side, "limits": ReadLimits()}
    spec = dict(engine="tags", model="efficientnet-lite0", prompt="", batch_size=2, max_new_tokens=16)
    own = tmp_path / "own"
    write = dict(staging_dir=str(own), engine="tags", model="efficientnet-lite0", prompt_id="p", prompt="recipe")

    summary = cu.CaptionActor(**spec, load=load, staging=write)(batch)
    assert engine_batches == [1, 2]
    assert [p.name.startswith(cu.STAGED_FILE_PREFIX) for p in own.iterdir()] == [True]
    staged = pq.read_table(summary["file"].iat[0]).to_pandas()
    assert staged["image_sha256"].tolist() == batch["image_sha256"].tolist()
    loaded = cu.CaptionActor(**spec)(cu.load_images(batch, **load))

    assert summary[["ok", "error"]].iloc[0].tolist() == [3, 3]
    assert staged["status"].tolist() == loaded["status"].tolist() == ["ok", "error", "ok", "ok", "error", "error"]
    assert staged["text"].tolist() == loaded["text"].tolist()
    assert [cu.error_kind(e) for e in staged["error"]] == [None, "missing", None, None, "unreadable", "truncated"]
    assert "disk gone" in staged["error"].iat[4]
    assert staged["error"].fillna("").tolist() == loaded["error"].fillna("").tolist()
    assert (staged["latency_ms"].dropna() > 0).all() and staged["latency_ms"].notna().sum() == 3

    def no_engine(**_):
        raise AssertionError("an engine was built for a block without a readable image")

    monkeypatch.setattr(caption, "make_engine", no_engine)
    bad = frame([rows[1], rows[4], rows[5]])
    summary = cu.CaptionActor(**spec, load=load, staging=dict(write, staging_dir=str(tmp_path / "bad")))(bad)
    assert summary[["ok", "error"]].iloc[0].tolist() == [0, 3]
