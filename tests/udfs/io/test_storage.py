"""Storage by URI: local paths behave as before, URIs are never mangled by pathlib, and the object
store is reached for real (moto's S3 server on loopback, a process of its own: the ``s3``
fixture of tests/udfs/conftest.py)."""
from __future__ import annotations

import pytest

from udfs.io import storage


def test_uris_stay_uris_and_paths_stay_paths(tmp_path):
    assert storage.join("s3a://bucket/w/", "items") == "s3a://bucket/w/items"
    assert storage.join("abfss://c@acct.dfs.core.windows.net/w", "_staging", "descriptions") == \
        "abfss://c@acct.dfs.core.windows.net/w/_staging/descriptions"
    assert storage.local_path_of("file:///data/w") == "/data/w"
    assert storage.local_path_of("relative/w") == "relative/w"
    assert storage.local_path_of("s3a://bucket/w") is None
    assert storage.is_object_store("s3a://b/x") and storage.is_object_store("hdfs://nn/x")
    assert not storage.is_object_store("https://example.com/x.jpg") and not storage.is_object_store("/x")


def test_warehouse_and_table_paths_keep_the_scheme(tmp_path, monkeypatch):
    from jobs import tables
    from jobs.config import ConfigError, load_config

    config = load_config(None, ["warehouse=s3a://my-bucket/vlm4rec/warehouse/"])
    assert config.warehouse_uri() == "s3a://my-bucket/vlm4rec/warehouse"
    assert tables.table_path(config.warehouse_uri(), "items") == "s3a://my-bucket/vlm4rec/warehouse/items"
    with pytest.raises(ConfigError, match="not a local folder"):
        config.warehouse_path()
    monkeypatch.chdir(tmp_path)
    local = load_config(None, ["warehouse=wh"])
    assert local.warehouse_uri() == str(tmp_path / "wh") == str(local.warehouse_path())
    assert tables.table_path(local.warehouse_uri(), "items") == str(tmp_path / "wh" / "items")


def test_a_ray_client_address_is_a_config_error_that_says_what_to_use():
    from jobs.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"ray\.address.*Ray Client.*ray job submit"):
        load_config(None, ["ray.address=ray://head:10001"])


def test_local_staging_writes_are_complete_or_absent(tmp_path):
    target = str(tmp_path / "run" / "part-1.parquet")
    storage.write_bytes(target, b"abc")
    assert [e[0] for e in storage.list_entries(str(tmp_path / "run"))] == ["part-1.parquet"]
    assert storage.read_bytes(target) == b"abc"
    storage.move(str(tmp_path / "run"), str(tmp_path / "moved"))
    assert storage.exists(str(tmp_path / "moved" / "part-1.parquet")) and not storage.exists(str(tmp_path / "run"))
    storage.delete_dir(str(tmp_path / "moved"))
    storage.delete_dir(str(tmp_path / "moved"))  # absent: fine
    assert storage.list_entries(str(tmp_path / "moved")) == []


def test_staging_on_an_object_store(s3):
    root = "s3a://vlm4rec-unit/wh/_staging/descriptions"
    storage.write_bytes(f"{root}/run-1/part-a.parquet", b"rows")
    storage.write_bytes(f"{root}/run-1/_OWNER.json", b"{}")
    assert sorted(e[0] for e in storage.list_entries(f"{root}/run-1")) == ["_OWNER.json", "part-a.parquet"]
    assert [(name, is_dir) for name, is_dir, _ in storage.list_entries(root)] == [("run-1", True)]
    storage.move(f"{root}/run-1", f"{root}/run-1.adopted-by-me")
    assert storage.read_bytes(f"{root}/run-1.adopted-by-me/part-a.parquet") == b"rows"
    assert not storage.exists(f"{root}/run-1/part-a.parquet")
    storage.delete_dir(f"{root}/run-1.adopted-by-me")
    assert storage.list_entries(root) == []


def test_a_missing_bucket_is_named_before_any_work(s3):
    storage.check_reachable("s3a://vlm4rec-unit/warehouse")
    with pytest.raises(storage.StorageError, match=r"'s3a://no-such-bucket/w'.*does not exist.*create it"):
        storage.check_reachable("s3a://no-such-bucket/w")


def test_images_are_read_from_the_object_store_within_the_same_limits(s3):
    import io

    from PIL import Image

    from udfs.caption import caption_udfs as cu
    from udfs.io.images import ImageError, ReadLimits, check_image, read_image_file, sha256_bytes

    buffer = io.BytesIO()
    Image.new("RGB", (40, 20), (10, 200, 30)).save(buffer, "PNG")
    data = buffer.getvalue()
    s3.put_object(Bucket="vlm4rec-unit", Key="img/a.png", Body=data)
    uri = "s3a://vlm4rec-unit/img/a.png"
    assert read_image_file(uri) == data
    assert check_image(uri, images_root="/elsewhere", confine=True) == (sha256_bytes(data), None)
    img, error = cu.load_one(uri, sha256_bytes(data), max_side=448)
    assert error is None and img.size == (40, 20)
    with pytest.raises(ImageError) as too_big:
        read_image_file(uri, ReadLimits(max_bytes=len(data) - 1))
    assert too_big.value.kind == "too_big" and "max_bytes" in too_big.value.reason
    with pytest.raises(ImageError) as missing:
        read_image_file("s3a://vlm4rec-unit/img/gone.png")
    assert missing.value.kind == "missing"
    with pytest.raises(ImageError) as prefix:
        read_image_file("s3a://vlm4rec-unit/img")
    assert prefix.value.kind == "not_regular"
