"""``classify`` on the exceptions the libraries really raise: each produced here on a real disk
(a full or read-only tmpfs, a truncated or deleted Parquet file), never built by hand."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable, write_deltalake

from jobs.storage_errors import classify

BIG = pa.table({"x": np.random.default_rng(0).random(50_000)})


def raised(action) -> BaseException:
    with pytest.raises(Exception) as info:
        action()
    return info.value


def test_a_full_disk_is_named_from_pyarrow_s_errno_and_delta_rs_text(small_disk):
    disk = small_disk("64k")
    for exc in (raised(lambda: pq.write_table(BIG, disk / "a.parquet")),
                raised(lambda: write_deltalake(str(disk / "t"), BIG))):
        failure = classify(exc, str(disk))
        assert failure is not None, repr(exc)
        assert failure.what == "no space left on device" and failure.path == str(disk)
        assert "point `warehouse` elsewhere" in failure.line()


def test_a_read_only_disk_stops_root_and_is_named_with_its_path(small_disk):
    disk = small_disk("64k", read_only=True)
    target = disk / "warehouse" / "a.parquet"
    for exc in (raised(lambda: pq.write_table(BIG, target)), raised(lambda: target.write_bytes(b"x")),
                raised(lambda: write_deltalake(str(disk / "warehouse" / "t"), BIG))):
        failure = classify(exc, str(disk / "warehouse"))
        assert failure is not None and failure.what == "permission denied", repr(exc)
        assert str(disk / "warehouse") in failure.path and "permissions" in failure.fix


def test_a_truncated_or_deleted_data_file_names_the_file_and_restore(tmp_path):
    table = tmp_path / "t"
    write_deltalake(str(table), pa.table({"x": np.arange(1000)}))
    (part,) = table.glob("*.parquet")
    part.write_bytes(part.read_bytes()[:200])
    for exc in (raised(lambda: pq.read_table(part)), raised(lambda: DeltaTable(str(table)).to_pyarrow_table())):
        failure = classify(exc, str(tmp_path))
        assert failure is not None and failure.what == "corrupt data file", repr(exc)
        assert failure.path.endswith(part.name) and "RESTORE TABLE" in failure.fix
    part.unlink()
    failure = classify(raised(lambda: DeltaTable(str(table)).to_pyarrow_table()), str(tmp_path))
    assert failure.what.startswith("missing data file") and failure.path == str(part)


def test_the_cause_chain_is_read_and_other_errors_are_not_storage_failures(small_disk):
    disk = small_disk("64k")
    try:
        try:
            pq.write_table(BIG, disk / "a.parquet")
        except OSError as exc:
            raise RuntimeError("the stage failed") from exc
    except RuntimeError as exc:
        assert classify(exc, str(disk)).what == "no space left on device"
    # A Parquet file missing under the warehouse is a data file the Delta log lists; elsewhere an input.
    absent = raised(lambda: pq.read_table(disk / "absent.parquet"))
    assert classify(absent, str(disk)).what.startswith("missing data file")
    assert classify(absent, str(disk / "warehouse")) is None
    assert classify(RuntimeError("injected"), str(disk)) is None
    assert classify(raised(lambda: np.zeros(3) @ np.zeros(4)), str(disk)) is None


def test_a_store_that_does_not_answer_is_named_with_its_endpoint():
    import socket

    import boto3
    import botocore.config

    with socket.socket() as free:  # a port nothing listens on: the connection is refused
        free.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{free.getsockname()[1]}"
    keys = {"aws_access_key_id": "x", "aws_secret_access_key": "y", "region_name": "us-east-1"}
    s3 = boto3.client("s3", endpoint_url=endpoint, config=botocore.config.Config(retries={"max_attempts": 1}), **keys)
    options = {"AWS_ENDPOINT_URL": endpoint, "AWS_ALLOW_HTTP": "true", "AWS_ACCESS_KEY_ID": "x",
               "AWS_SECRET_ACCESS_KEY": "y", "AWS_REGION": "us-east-1", "max_retries": "0", "retry_timeout": "1s"}
    for exc in (raised(s3.list_buckets),
                raised(lambda: write_deltalake("s3://bucket/t", pa.table({"x": [1]}), storage_options=options))):
        failure = classify(exc, "s3a://bucket/w")
        assert failure is not None and failure.what == "the store stopped answering", repr(exc)
        assert failure.path.startswith(endpoint) and "endpoint" in failure.fix
