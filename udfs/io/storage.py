"""Where tables, staging files and images live: a local path or a URI, through one file-system layer.

The warehouse, checkpoints and image references are URIs (``file:///w``, ``s3a://bucket/w``,
``abfss://container@account.dfs.core.windows.net/w``, ``gs://bucket/w``, ``hdfs://nn/w``) or
plain local paths. A URI is never passed through ``pathlib``, which would turn ``s3a://b/w``
into ``<cwd>/s3a:/b/w``; plain paths behave as they always did.

Spark reaches these stores through Hadoop's connectors (``s3a://`` needs the ``hadoop-aws`` JARs
of ``vlm4rec setup --with s3``); Python code on the driver, on Spark executors and on Ray
workers reaches them through ``pyarrow.fs`` (``filesystem``): ``s3a://`` and ``s3n://`` are read
as ``s3://``. S3 settings come from the standard AWS environment: credentials from
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (or ``~/.aws``, or the instance role), the region
from ``AWS_REGION`` / ``AWS_DEFAULT_REGION``, and a non-AWS endpoint (MinIO, a local server)
from ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` (path-style addressing).
"""
from __future__ import annotations

import functools
import os
import re
import uuid
from collections.abc import Mapping
from typing import Any

from pyarrow import fs as pafs

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# Hadoop's names for S3, read by pyarrow as s3://.
_S3_SCHEMES = {"s3", "s3a", "s3n"}
OBJECT_STORE_SCHEMES = frozenset(_S3_SCHEMES | {"gs", "gcs", "abfs", "abfss", "az", "hdfs", "viewfs"})


class StorageError(OSError):
    """A store cannot be reached or used; the message names the URI and the fix."""


def scheme(uri: str) -> str | None:
    """The lower-case scheme of a URI (``s3a``), or ``None`` for a plain path."""
    match = _SCHEME.match(str(uri))
    return match.group(1).lower() if match else None


def is_uri(text: str) -> bool:
    return scheme(text) is not None


def is_object_store(uri: str) -> bool:
    """Whether ``uri`` names an object store or a distributed file system Python can read."""
    return scheme(uri) in OBJECT_STORE_SCHEMES


def local_path_of(uri: str) -> str | None:
    """The local path behind ``uri`` (``file:///x`` or a plain path), or ``None`` for a remote one."""
    uri = str(uri)
    if uri.startswith("file://"):
        return uri[len("file://"):] or "/"
    if uri.startswith("file:"):  # Hadoop's file:/x
        return uri[len("file:"):]
    return None if is_uri(uri) else uri


def join(base: str, *parts: str) -> str:
    """``base`` and ``parts`` joined with ``/``, keeping a URI's scheme and authority intact."""
    out = str(base)
    for part in parts:
        out = out.rstrip("/") + "/" + str(part).lstrip("/")
    return out


def s3_endpoint_and_region(environ: Mapping[str, str] = os.environ) -> tuple[str | None, str | None]:
    """The S3 endpoint (``AWS_ENDPOINT_URL_S3``, else ``AWS_ENDPOINT_URL``) and region
    (``AWS_REGION``, else ``AWS_DEFAULT_REGION``) the AWS environment names, None where unset:
    one rule for pyarrow, delta-rs and Spark's S3A connector."""
    return (environ.get("AWS_ENDPOINT_URL_S3") or environ.get("AWS_ENDPOINT_URL"),
            environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION"))


def _s3_options() -> dict[str, Any]:
    # A store that answers slowly is an error the caller reports, not a hang.
    options: dict[str, Any] = {"connect_timeout": 10, "request_timeout": 60}
    endpoint, region = s3_endpoint_and_region()
    if endpoint:
        found = _SCHEME.match(endpoint)
        options["endpoint_override"] = endpoint[found.end():] if found else endpoint
        options["scheme"] = found.group(1) if found else "https"
    if region:
        options["region"] = region
    return options


def delta_location(uri: str) -> tuple[str, dict[str, str]]:
    """``(URI, storage_options)`` for delta-rs (``deltalake``) to open the table at ``uri``:
    S3 under Hadoop's names is ``s3://`` there, with the endpoint, region and credentials of the
    same AWS environment ``filesystem`` reads (an unset credential is left to delta-rs's own
    chain: ``~/.aws``, the instance role). Other URIs and plain paths are passed as they are."""
    kind = scheme(uri)
    if kind not in _S3_SCHEMES:
        return str(uri), {}
    options: dict[str, str] = {}
    endpoint, region = s3_endpoint_and_region()
    if endpoint:
        options["AWS_ENDPOINT_URL"] = endpoint
        if endpoint.lower().startswith("http://"):
            options["AWS_ALLOW_HTTP"] = "true"
    if region:
        options["AWS_REGION"] = region
    options.update({name: os.environ[name] for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                                        "AWS_SESSION_TOKEN") if os.environ.get(name)})
    return "s3://" + str(uri)[len(kind) + 3:], options


@functools.lru_cache(maxsize=8)
def _s3_filesystem(options_key: tuple) -> Any:
    return pafs.S3FileSystem(**dict(options_key))


def filesystem(uri: str) -> tuple[Any, str]:
    """``(pyarrow FileSystem, path within it)`` for a URI or a plain path."""
    local = local_path_of(uri)
    if local is not None:
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(local))
    kind = scheme(uri)
    if kind in _S3_SCHEMES:
        rest = str(uri)[len(kind) + 3:]
        return _s3_filesystem(tuple(sorted(_s3_options().items()))), rest.rstrip("/") or rest
    try:
        return pafs.FileSystem.from_uri(str(uri))
    except Exception as exc:  # noqa: BLE001 - pyarrow raises ArrowInvalid/OSError per scheme
        raise StorageError(f"'{uri}': pyarrow cannot open a file system for this URI ({exc}): use "
                           "file://, s3a://, gs://, abfss:// or hdfs://, with that store's client installed "
                           "and configured on every node") from exc


def s3_credentials_configured() -> bool:
    """Whether the AWS environment names credentials (variables, profile files, web identity or
    container credentials). An instance role cannot be seen without asking the metadata service,
    so this only sharpens an error message, never refuses a store on its own."""
    if any(os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE",
                                        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                                        "AWS_CONTAINER_CREDENTIALS_FULL_URI")):
        return True
    files = (os.environ.get("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials"),
             os.environ.get("AWS_CONFIG_FILE", "~/.aws/config"))
    return any(os.path.isfile(os.path.expanduser(f)) for f in files)


def describe_failure(uri: str, exc: BaseException) -> str:
    """What went wrong reaching ``uri`` and how to fix it, for an error message."""
    text = f"{type(exc).__name__}: {exc}"
    kind = scheme(uri)
    if kind in _S3_SCHEMES and not s3_credentials_configured():
        return (f"'{uri}' cannot be reached ({text}) and no AWS credentials were found in this "
                "environment: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE with "
                "~/.aws/credentials, or give the node an instance role)")
    if kind in _S3_SCHEMES:
        return (f"'{uri}' cannot be reached ({text}): check the bucket exists, the credentials "
                "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, ~/.aws or an instance role) and, for a "
                "non-AWS store, AWS_ENDPOINT_URL")
    return f"'{uri}' cannot be reached ({text}): check the URI and this store's credentials"


def check_reachable(uri: str) -> None:
    """Raise ``StorageError`` naming ``uri`` and the fix unless its store answers and its
    bucket (container) exists. Cheap: one or two metadata requests, nothing written."""
    if local_path_of(uri) is not None:
        return
    store, path = filesystem(uri)
    bucket = path.split("/", 1)[0]
    try:
        info = store.get_file_info(bucket)
    except Exception as exc:  # noqa: BLE001 - any failure is reported with its cause
        raise StorageError(describe_failure(uri, exc)) from exc
    if info.type == pafs.FileType.NotFound:
        raise StorageError(f"'{uri}': the bucket '{bucket}' does not exist (or these credentials cannot see "
                           "it): create it, or fix the warehouse URI")


def read_bytes(uri: str, max_bytes: int | None = None) -> bytes:
    """The object's bytes (at most ``max_bytes + 1`` read when given)."""
    store, path = filesystem(uri)
    with store.open_input_stream(path) as stream:
        return stream.read() if max_bytes is None else stream.read(max_bytes + 1)


def write_bytes(uri: str, data: bytes) -> None:
    """Write ``data`` to ``uri``. Complete once it has its name: on a local file system through a
    temporary name renamed into place; on an object store an upload becomes visible only when
    complete, so it is written directly."""
    store, path = filesystem(uri)
    if local_path_of(uri) is None:
        with store.open_output_stream(path) as sink:
            sink.write(data)
        return
    parent = path.rsplit("/", 1)[0]
    store.create_dir(parent, recursive=True)
    temporary = f"{parent}/.tmp-{uuid.uuid4().hex}"
    with open(temporary, "wb") as sink:
        sink.write(data)
        sink.flush()
        os.fsync(sink.fileno())
    os.replace(temporary, path)


def list_entries(uri: str) -> list[tuple[str, bool, float]]:
    """``(name, is_dir, mtime seconds)`` of the entries directly under ``uri``; [] when it is absent."""
    store, path = filesystem(uri)
    try:
        infos = store.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except FileNotFoundError:
        return []
    return [(info.base_name, info.type == pafs.FileType.Directory,
             info.mtime.timestamp() if info.mtime is not None else 0.0) for info in infos]


def exists(uri: str) -> bool:
    store, path = filesystem(uri)
    return store.get_file_info(path).type != pafs.FileType.NotFound


def move(source: str, target: str) -> None:
    """Rename a folder or file: atomic on a local or HDFS file system; on an object store a copy
    then a delete (so a concurrent claim of the same folder may see it twice: callers must be
    idempotent there)."""
    store, src = filesystem(source)
    _, dst = filesystem(target)
    if local_path_of(source) is not None:
        os.rename(src, dst)  # refuses to replace a non-empty folder: two claimants, one winner
        return
    # S3 has no folders to rename: each object is copied, then the source prefix is deleted.
    if store.get_file_info(src).type == pafs.FileType.File:
        store.move(src, dst)
        return
    for info in store.get_file_info(pafs.FileSelector(src, recursive=True)):
        if info.type == pafs.FileType.File:
            store.copy_file(info.path, dst + info.path[len(src):])
    store.delete_dir(src)


def delete_dir(uri: str) -> None:
    """Remove a folder and everything in it; an absent folder is fine."""
    store, path = filesystem(uri)
    try:
        store.delete_dir(path)
    except FileNotFoundError:
        pass
