"""What the ``caption`` job ships to Ray workers: image loading, the engine actor, the staging writer.

Up to three Ray Data stages over batches of unique images (pandas frames with ``image_sha256``,
``item_id``, ``image_uri``):

1. ``load_images`` (CPU tasks; only before an actor on a GPU): read the file's bytes, check
   that they still hash to the ``image_sha256`` that ``ingest`` recorded, decode with
   ``udfs.io.images.load_image`` and shrink to what the engine needs, so that the engine never
   waits on I/O or a JPEG decoder. Pixels travel as raw RGB bytes with their width and height
   (no tensor extension types).
2. ``CaptionActor`` (an actor pool): one engine per actor, built on the first batch that has an
   image to describe; ``udfs.caption.describe_isolated`` makes one bad image fail alone. An
   actor on CPU has no stage 1 and no stage 3: it takes a whole block (one staged file's rows),
   reads and decodes each engine batch with ``load_one`` just before describing it (a
   millisecond an image against tens for the model), and calls ``write_staging`` itself at the
   end; loading and writing tasks would only take its own cores from its torch threads. The
   ``openai`` engine's actor does the same with ``image_url_of`` (the request's ``data:`` URL,
   usually the file's own bytes) and streams the block's requests.
3. ``write_staging`` (I/O tasks; only after an actor on a GPU): each batch becomes one Parquet
   file in the run's staging folder, written under a temporary name and renamed into place, so
   a file that exists under its final name is complete. The job's Spark step merges those files
   into ``descriptions``.

Every input row leaves as one ``descriptions`` row with ``status`` ``ok`` or ``error``; an
error's text is ``"<kind>: <reason>"``, where kind is one of ``udfs.io.images.ImageError.kind``
(missing, empty, not_image, truncated, too_large, too_big, not_regular, timeout, unreadable),
``changed`` (the file's bytes no longer hash to the recorded ``image_sha256``: rerun
``ingest``), ``engine`` (the model raised) or, for the ``openai`` engine, the request's fault
(``connection``, ``timeout``, ``rate_limited``, ``server_error`` after its retries, ``rejected``
for a 4xx, ``bad_response``). Files are read by ``udfs.io.images.read_image_file``
within ``ReadLimits`` (``dataset.images``): a regular file only, at most ``max_bytes``, within
``read_timeout_s``.

Retry policy (``is_permanent_error``): an error that the image bytes alone decide (empty,
not_image, truncated, too_large) is final for that hash and counts as a cache hit; a changed
or missing file, an unreadable one, a read refused or timed out (too_big, not_regular,
timeout), an engine error and every request fault (a 4xx included: it is usually the server's
configuration, fixed before the next run) are retried by the next run.

Besides the ``descriptions`` rows, each staged batch reports what it cost: ``prompt_tokens`` and
``completion_tokens`` as the server counted them, ``described_after_retry`` (ok images whose
requests failed first) and ``retries`` (``{fault kind: n}``), which the job adds to its counts.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Mapping
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from udfs.caption.kinds import engine_kind

log = logging.getLogger(__name__)

OK, ERROR = "ok", "error"
CHANGED = "changed"
ENGINE = "engine"
REMOTE = "remote_uri"
# Kinds decided by the bytes alone: the same hash fails the same way on every run. Not here:
# too_big and not_regular, because ingest read and hashed these very bytes from a regular file
# within the limit, so at caption time they mean the file was replaced or the limit lowered
# (a state of the file system or the config, not of the hashed bytes); timeout is slow storage.
# All three may succeed on the next run and are retried.
PERMANENT_ERROR_KINDS = frozenset({"empty", "not_image", "truncated", "too_large"})

# The staging files' schema: the ``descriptions`` contract in Arrow types.
STAGING_SCHEMA = pa.schema([
    pa.field("image_sha256", pa.string(), nullable=False),
    pa.field("engine", pa.string(), nullable=False),
    pa.field("model", pa.string(), nullable=False),
    pa.field("prompt_id", pa.string(), nullable=False),
    pa.field("item_id", pa.string()),
    pa.field("prompt", pa.string()),
    pa.field("text", pa.string()),
    pa.field("n_tokens", pa.int32()),
    pa.field("latency_ms", pa.float64()),
    pa.field("status", pa.string()),
    pa.field("error", pa.string()),
    pa.field("created_at", pa.timestamp("us", tz="UTC")),
])
STAGED_FILE_PREFIX = "part-"


def error_text(kind: str, reason: str) -> str:
    """The ``error`` column: ``"<kind>: <reason>"``."""
    return f"{kind}: {reason}"


def error_kind(error: str | None) -> str | None:
    """The kind of an ``error`` column value (``None`` for no error)."""
    if not error:
        return None
    return str(error).split(":", 1)[0].strip()


def is_permanent_error(error: str | None) -> bool:
    """Whether an error row is final for its image hash (not retried by the next run)."""
    return error_kind(error) in PERMANENT_ERROR_KINDS


def is_final(status: str | None, error: str | None) -> bool:
    """Whether a ``descriptions`` row settles its image for good: ``ok``, or a permanent error.
    Anything else (no row, a transient error) is described by the next run."""
    return status == OK or (status == ERROR and is_permanent_error(error))


def caption_todo(items: pa.Table, cache: pa.Table | None, force: bool = False) -> tuple[pa.Table, dict[str, int]]:
    """The caption job's plan, without Spark: ``items`` (item_id, image_uri, image_sha256: one
    dataset's rows) and ``cache`` (image_sha256, status, error: the engine's ``descriptions``
    rows; None: no table yet) -> (the images to describe: image_sha256, item_id, image_uri
    sorted by hash; facts).

    One item per image: the smallest (item_id, image_uri), so reruns pick the same one. Facts:
    ``n`` items, ``with_image``, ``images`` (distinct hashes), ``ok``, ``final_errors`` (cached
    permanent errors), ``retry`` (cached rows described again). ``jobs.caption_plan.spark_plan``
    runs it per bucket of image hash, for catalogs too large to read on the driver."""
    frame = items.select(["item_id", "image_uri", "image_sha256"]).to_pandas()
    facts = {"n": len(frame), "with_image": int(frame["image_sha256"].notna().sum())}
    images = (frame[frame["image_sha256"].notna()]
              .sort_values(["image_sha256", "item_id", "image_uri"], na_position="first", kind="stable")
              .drop_duplicates("image_sha256", keep="first"))
    columns = ["image_sha256", "status", "error"]
    rows = (cache.select(columns).to_pandas() if cache is not None
            else pd.DataFrame({c: pd.Series([], dtype=object) for c in columns}))
    rows["_final"] = [is_final(s if isinstance(s, str) else None, e if isinstance(e, str) else None)
                      for s, e in zip(rows["status"], rows["error"])]
    # The table's MERGE keeps one row per key; should two ever meet, the settled one counts.
    rows = rows.sort_values("_final", ascending=False, kind="stable").drop_duplicates("image_sha256")
    marked = images.merge(rows, on="image_sha256", how="left")
    cached = marked["status"].notna()
    final = marked["_final"].eq(True)  # no cache row: not settled
    facts.update(images=len(marked), ok=int((marked["status"] == OK).sum()),
                 final_errors=int((final & cached & (marked["status"] != OK)).sum()),
                 retry=int((cached & ~final).sum()))
    todo = marked if force else marked[~final]
    table = pa.Table.from_pandas(todo[["image_sha256", "item_id", "image_uri"]], preserve_index=False)
    return table.cast(pa.schema([(c, pa.string()) for c in table.column_names])), facts


# ``caption_todo`` of one bucket of image hashes as one table (the Spark plan's rows): the to-do
# rows with ``facts`` null, then one row with null image columns whose ``facts`` is the bucket's
# facts as a JSON object.
TODO_ROWS_SCHEMA = pa.schema([(c, pa.string()) for c in ("image_sha256", "item_id", "image_uri", "facts")])
FACT_NAMES = ("n", "with_image", "images", "ok", "final_errors", "retry")


def caption_todo_rows(items: pa.Table, cache: pa.Table | None, force: bool = False) -> pa.Table:
    """``caption_todo`` as ``TODO_ROWS_SCHEMA`` rows, for a caller that gets one table back per
    call (Spark's ``applyInArrow`` over buckets of image hash; ``caption_todo_of_rows`` adds the
    buckets' rows up)."""
    table, facts = caption_todo(items, cache, force)
    fact_row = pa.table({"image_sha256": [None], "item_id": [None], "image_uri": [None], "facts": [json.dumps(facts)]},
                        schema=TODO_ROWS_SCHEMA)
    return pa.concat_tables([table.append_column("facts", pa.nulls(table.num_rows, pa.string())), fact_row])


def caption_todo_of_rows(rows: pa.Table) -> tuple[pa.Table, dict[str, int]]:
    """What ``caption_todo`` returns, from the ``caption_todo_rows`` of every bucket: the to-do
    rows sorted by hash, and the facts summed."""
    facts = Counter(dict.fromkeys(FACT_NAMES, 0))
    for text in rows.column("facts").drop_null().to_pylist():
        facts.update(json.loads(text))
    return rows.filter(rows.column("facts").is_null()).drop_columns(["facts"]).sort_by("image_sha256"), dict(facts)


def read_checked(uri: str, expected_sha256: str, limits: Any = None) -> tuple[bytes | None, str | None]:
    """``(bytes, None)`` of one item's image file, read within ``limits`` (a
    ``udfs.io.images.ReadLimits``) and still hashing to ``expected_sha256``, or ``(None, error text)``."""
    from udfs.io.images import ImageError, load_image, read_image_file, readable_source, sha256_bytes

    path = readable_source(str(uri))
    if path is None:
        return None, error_text(REMOTE, f"image '{uri}' is remote: the caption job reads local files and "
                                        "object stores (s3a://, gs://, abfss://, hdfs://); copy the images to one")
    try:
        data = read_image_file(path, limits, name=str(uri))
    except ImageError as exc:
        if exc.kind == "missing":
            return None, error_text("missing", f"image '{uri}' does not exist any more: restore it or rerun ingest")
        return None, error_text(exc.kind, exc.reason)
    actual = sha256_bytes(data)
    if actual != expected_sha256:
        try:
            load_image(data, name=str(uri), max_side=64)
            now = "it is still a readable image"
        except ImageError as exc:
            now = f"it is now {exc.kind}: {exc.reason}"
        return None, error_text(
            CHANGED, f"image '{uri}' changed since ingest (sha256 {actual[:12]}..., items has "
                     f"{expected_sha256[:12]}...; {now}): rerun ingest so that items records the new file")
    return data, None


def _read_as(uri: str, expected_sha256: str, limits: Any, convert: Any) -> tuple[Any, str | None]:
    """``(convert(bytes), None)`` or ``(None, error text)`` for one item's image file:
    ``read_checked``, then ``convert``; what ``convert`` raises is this image's error, and so is
    any exception that no reader rule expected (``unreadable``): one image never fails its batch."""
    from udfs.io.images import ImageError

    try:
        data, error = read_checked(uri, expected_sha256, limits)
        return (None, error) if data is None else (convert(data), None)
    except ImageError as exc:
        return None, error_text(exc.kind, exc.reason)
    except Exception as exc:  # noqa: BLE001 - one image never fails its batch
        return None, error_text("unreadable", f"image '{uri}' failed to load ({type(exc).__name__}: {exc})")


def load_one(uri: str, expected_sha256: str, max_side: int | None,
             limits: Any = None) -> tuple[Any, str | None]:
    """``(RGB image, None)`` or ``(None, error text)`` for one item's image file (``read_checked``,
    then decoded and shrunk to ``max_side``)."""
    from udfs.io.images import load_image

    return _read_as(uri, expected_sha256, limits, lambda data: load_image(data, name=str(uri), max_side=max_side))


def load_images(batch: pd.DataFrame, max_side: int | None, limits: Any = None) -> pd.DataFrame:
    """Ray stage 1: adds ``pixels`` (raw RGB bytes), ``width``, ``height`` and ``error``."""
    loaded = [load_one(uri, sha, max_side, limits) for uri, sha in zip(batch["image_uri"], batch["image_sha256"])]
    images = [img for img, _ in loaded]
    return batch.assign(pixels=[None if img is None else img.tobytes() for img in images],
                        width=[0 if img is None else img.width for img in images],
                        height=[0 if img is None else img.height for img in images],
                        error=[error for _, error in loaded])


def image_url_of(uri: str, sha: str, max_side: int | None, limits: Any = None) -> tuple[str | None, str | None]:
    """``(data: URL, None)`` or ``(None, error text)`` for one image of the ``openai`` engine:
    ``read_checked``, then ``udfs.caption.openai_engine.file_data_url`` (the file's own bytes
    when the server can take them as they are, else decoded, shrunk to ``max_side`` and
    re-encoded); a file that is not what ingest checked is an error naming it (``changed``,
    saying what it is now), never an exception. Bytes that still hash to ``image_sha256`` are
    the bytes ingest decoded in full, so they are not decoded again."""
    from udfs.caption.openai_engine import file_data_url

    return _read_as(uri, sha, limits, lambda data: file_data_url(data, str(uri), max_side, verified=True)[0])


class CaptionActor:
    """Ray stage 2: one caption engine per actor, described batch by batch.

    The engine is built on the first batch with an image to describe, so an actor whose
    batches all failed to load never loads a model. ``torch_threads`` caps torch's intra-op
    threads: several actors on one machine must share its cores.
    """

    def __init__(self, engine: str, model: str, prompt: str, batch_size: int, max_new_tokens: int,
                 options: Mapping[str, Any] | None = None, torch_threads: int = 0,
                 expected_prompt_id: str | None = None, max_torch_threads: int = 0,
                 load: Mapping[str, Any] | None = None, staging: Mapping[str, Any] | None = None):
        self.spec = dict(name=engine, model=model, prompt=prompt, batch_size=batch_size,
                         max_new_tokens=max_new_tokens, options=dict(options or {}))
        # Each image a request of its own, sent as its file is read (``EngineKind.streams_requests``).
        self.streams = engine_kind(engine).streams_requests
        # ``load_one``'s (``image_url_of``'s for openai) keyword arguments when this actor
        # reads its own files (an actor on CPU: a millisecond per image, not worth a stage, a
        # process hop and an object-store copy of its own).
        self.load = dict(load) if load is not None else None
        # ``write_staging``'s keyword arguments when this actor writes its own staged file per
        # block (an actor on CPU): no writer stage, so no task process competing for the cores
        # with the engine or with a server that may share the machine; the call returns the
        # summary row.
        self.staging = dict(staging) if staging is not None else None
        # Explicit, or this node's own cores up to the driver's share (``max_torch_threads``):
        # on a cluster the nodes differ, and the driver sees only the cluster's total.
        self.torch_threads = torch_threads or (min(max_torch_threads, node_cpus()) if max_torch_threads else 0)
        self.expected_prompt_id = expected_prompt_id
        self._engine = None
        # Ray may call an I/O-bound engine's actor from two threads (the openai engine overlaps
        # batches so that its server never waits for the next one): build the engine once.
        self._lock = threading.Lock()

    @property
    def engine(self):
        with self._lock:
            if self._engine is None:
                if self.torch_threads > 0:
                    import torch

                    torch.set_num_threads(self.torch_threads)
                from udfs.caption import make_engine

                engine = make_engine(**self.spec)
                if self.expected_prompt_id and engine.prompt_id != self.expected_prompt_id:
                    # The rows would be filed under a cache key that does not match their text.
                    raise RuntimeError(
                        f"caption engine {engine.name!r} on this worker has prompt_id {engine.prompt_id}, the "
                        f"driver planned {self.expected_prompt_id}: install the same vlm4rec version everywhere")
                self._engine = engine
            return self._engine

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        if self.load is not None and self.streams:
            started = time.perf_counter()
            results = self._send_as_read(batch)
            # The batch's requests overlap: each image is charged its share of the whole.
            ms = (time.perf_counter() - started) * 1000.0 / max(1, sum(not isinstance(r, str) for r in results))
            latency = [ms] * len(results)
        else:
            results, latency = self._describe_by_engine_batch(batch)
        captions = [None if isinstance(r, (str, Exception)) else r for r in results]
        errors = [_error_of(r) for r in results]
        out = batch.drop(columns=[c for c in ("pixels", "width", "height", "error") if c in batch])
        out = out.assign(text=[None if c is None else c.text for c in captions],
                         n_tokens=[None if c is None else c.n_tokens for c in captions],
                         latency_ms=[None if c is None else ms for c, ms in zip(captions, latency)],
                         error=errors, status=[OK if e is None else ERROR for e in errors],
                         prompt_tokens=pd.array([None if c is None else c.prompt_tokens for c in captions],
                                                dtype="Int64"),
                         # The fault kinds of the requests that failed before each result.
                         retries=[",".join(getattr(r, "retries", ())) for r in results])
        return out if self.staging is None else write_staging(out, **self.staging)

    def _image(self, batch: pd.DataFrame, i: int) -> tuple[Any, str | None]:
        """``(RGB image, None)`` or ``(None, error text)`` for row ``i``: read, checked and
        decoded here (``load_one``) when the actor reads its own files, else rebuilt from the
        loading stage's pixels."""
        if self.load is not None:
            return load_one(batch["image_uri"].iat[i], batch["image_sha256"].iat[i], **self.load)
        from PIL import Image

        error = _text_or_none(batch["error"].iat[i])
        if error is not None:
            return None, error
        return Image.frombytes("RGB", (int(batch["width"].iat[i]), int(batch["height"].iat[i])),
                               batch["pixels"].iat[i]), None

    def _describe_by_engine_batch(self, batch: pd.DataFrame) -> tuple[list[Any], list[float | None]]:
        """One engine batch at a time, each described as soon as its images are at hand
        (``_image``: an actor that reads its own files reads them just before). Returns each
        row's result (its ``Caption``, the exception it alone raised, or the error text of an
        image that never reached the engine) and each described row's milliseconds in the
        engine: reading is not counted, as it is not where a loading stage does it."""
        from udfs.caption import describe_isolated

        results: list[Any] = [None] * len(batch)
        latency: list[float | None] = [None] * len(batch)
        step = max(1, int(self.spec["batch_size"]))
        for start in range(0, len(batch), step):
            chunk, images = [], []
            for i in range(start, min(start + step, len(batch))):
                img, results[i] = self._image(batch, i)
                if img is not None:
                    chunk.append(i)
                    images.append(img)
            if chunk:
                started = time.perf_counter()
                described = describe_isolated(self.engine, images)
                ms = (time.perf_counter() - started) * 1000.0 / len(chunk)
                for i, result in zip(chunk, described):
                    results[i], latency[i] = result, ms
        return results, latency

    def _send_as_read(self, batch: pd.DataFrame) -> list[Any]:
        """The ``openai`` engine's streaming path: each image is read, checked and handed to
        the engine's event loop at once (``submit_url``), so requests leave while the rest of
        the batch is still being read, and the whole batch (a staged file's worth of rows) is
        in flight up to ``max_concurrency``: no batch waits for its slowest request before the
        next one starts. Returns each row's result, as ``_describe_by_engine_batch``."""
        from udfs.caption.openai_engine import outcome

        sent = []
        for uri, sha in zip(batch["image_uri"], batch["image_sha256"]):
            url, error = image_url_of(uri, sha, **self.load)
            sent.append(error if url is None else self.engine.submit_url(url))
        return [r if isinstance(r, str) else outcome(r) for r in sent]


def _error_of(result: Any) -> str | None:
    """The ``error`` column of one row's result: an image's error text as it is, an engine's
    exception as ``"<kind>: <reason>"`` (the request's fault kind when it has one), else None."""
    if not isinstance(result, Exception):
        return result if isinstance(result, str) else None
    kind = getattr(result, "kind", None)
    return error_text(kind, str(result)) if kind else error_text(ENGINE, f"{type(result).__name__}: {result}")


def node_cpus() -> int:
    """The cores this process may run on, on the node it runs on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _text_or_none(value: Any) -> str | None:
    # Arrow round trips turn a null string into None, NaN or pd.NA depending on the column's type.
    if value is None or (not isinstance(value, (str, bytes)) and pd.isna(value)):
        return None
    return str(value)


def description_table(batch: pd.DataFrame, engine: str, model: str, prompt_id: str, prompt: str,
                      created_at: dt.datetime | None = None) -> pa.Table:
    """Rows of the ``descriptions`` contract (``STAGING_SCHEMA``) for a described batch."""
    n = len(batch)
    return pa.Table.from_pydict({
        "image_sha256": list(batch["image_sha256"]),
        "engine": [engine] * n,
        "model": [model] * n,
        "prompt_id": [prompt_id] * n,
        "item_id": list(batch["item_id"]),
        "prompt": [prompt] * n,
        "text": [_text_or_none(v) for v in batch["text"]],
        "n_tokens": [None if pd.isna(v) else int(v) for v in batch["n_tokens"]],
        "latency_ms": [None if pd.isna(v) else float(v) for v in batch["latency_ms"]],
        "status": list(batch["status"]),
        "error": [_text_or_none(v) for v in batch["error"]],
        "created_at": [created_at or dt.datetime.now(dt.timezone.utc)] * n,
    }, schema=STAGING_SCHEMA)


def write_staging(batch: pd.DataFrame, staging_dir: str, engine: str, model: str, prompt_id: str,
                  prompt: str) -> pd.DataFrame:
    """Ray stage 3 (an actor on CPU, ``openai``'s included, calls it itself): the batch's
    ``descriptions`` rows -> one staged file; returns one summary row
    (file, ok, error, error_kinds as JSON ``{kind: n}``, and the cost: prompt_tokens,
    completion_tokens, described_after_retry, retries as JSON ``{fault kind: n}``) for the
    driver's counts."""
    from udfs.io import storage

    # One Parquet file, so that a ``part-*.parquet`` file is always complete: ``storage``
    # writes locally under a temporary name, then renames (a killed writer leaves only a
    # ``.tmp-`` file); on an object store one upload, which becomes visible only when complete.
    sink = pa.BufferOutputStream()
    pq.write_table(description_table(batch, engine, model, prompt_id, prompt), sink)
    path = storage.join(str(staging_dir), f"{STAGED_FILE_PREFIX}{uuid.uuid4().hex}.parquet")
    storage.write_bytes(path, sink.getvalue().to_pybytes())
    kinds = Counter(kind for kind in map(error_kind, map(_text_or_none, batch["error"])) if kind is not None)
    ok = batch["status"] == OK
    # Only engines that report usage carry these columns (the vllm branch and load failures do not).
    prompt_tokens = batch["prompt_tokens"] if "prompt_tokens" in batch else pd.Series([None] * len(batch))
    retry_lists = [str(r).split(",") if _text_or_none(r) else [] for r in batch.get("retries", [None] * len(batch))]
    reported = ok & prompt_tokens.notna().to_numpy()
    return pd.DataFrame({
        "file": [str(path)],
        "ok": [int(ok.sum())],
        "error": [int((batch["status"] == ERROR).sum())],
        "error_kinds": [json.dumps(dict(kinds), sort_keys=True)],
        "prompt_tokens": [int(pd.to_numeric(prompt_tokens[reported]).sum())],
        "completion_tokens": [int(pd.to_numeric(batch["n_tokens"][reported]).sum())],
        "described_after_retry": [int(sum(1 for r, o in zip(retry_lists, ok) if r and o))],
        "retries": [json.dumps(dict(Counter(k for r in retry_lists for k in r)), sort_keys=True)],
    })


# --- the vllm branch: bytes in, Ray's vLLM processor, rows back in the staging shape ---------

def load_image_bytes(batch: pd.DataFrame, limits: Any = None) -> pd.DataFrame:
    """Like ``load_images`` but keeps the file's bytes (``image_bytes``) for vLLM's data URLs:
    ``read_checked``, so the bytes sent are the bytes ingest decoded in full before it recorded
    their hash (a truncated file never reaches vLLM) and the file is read once."""
    read = [read_checked(uri, sha, limits) for uri, sha in zip(batch["image_uri"], batch["image_sha256"])]
    return batch.assign(image_bytes=[data for data, _ in read], error=[error for _, error in read])


def failed_rows(batch: pd.DataFrame) -> pd.DataFrame:
    """Rows that never reached the engine, in the shape ``write_staging`` expects."""
    n = len(batch)
    return pd.DataFrame({"image_sha256": batch["image_sha256"], "item_id": batch["item_id"],
                         "text": [None] * n, "n_tokens": [None] * n, "latency_ms": [None] * n,
                         "error": batch["error"], "status": [ERROR] * n})


def vllm_rows(batch: pd.DataFrame) -> pd.DataFrame:
    """``udfs.caption.vllm_engine.vllm_result_row`` output -> the shape ``write_staging`` expects."""
    errors = [error_text(ENGINE, str(e)) if _text_or_none(e) else None for e in batch["error"]]
    return pd.DataFrame({"image_sha256": batch["image_sha256"], "item_id": batch["item_id"],
                         "text": batch["text"], "n_tokens": batch["n_tokens"],
                         "latency_ms": [None] * len(batch), "error": errors,
                         "status": [OK if e is None else ERROR for e in errors]})


def staged_winners(staged: pa.Table, current: pa.Table | None, keys: list[str]) -> pa.Table:
    """The staged rows a merge writes (``jobs.caption_merge.merge_staged``: on the driver over
    every staged row, in Spark per bucket of image hash): one row a key, an ok row before an error row and then the newest; it is written when the
    table has no row of its key, or it is ok and the table's is not (or is older), or both are
    errors and it is newer. ``current`` holds the table's keys, ``status`` and ``created_at``."""
    frame = staged.select([*keys, "status", "created_at"]).to_pandas()
    frame["_row"] = range(len(frame))
    # Spark's ``(status == ok) DESC`` puts ok first, then error, then a null status (nulls last).
    frame["_rank"] = frame["status"].map({OK: 2, ERROR: 1}).fillna(0)
    best = frame.sort_values(["_rank", "created_at"], ascending=[False, False], kind="stable").drop_duplicates(keys)
    if current is None or current.num_rows == 0:
        return staged.take(pa.array(sorted(best["_row"].tolist()), pa.int64()))
    table = current.select([*keys, "status", "created_at"]).to_pandas().drop_duplicates(keys)
    best = best.merge(table.rename(columns={"status": "_t_status", "created_at": "_t_created"}), on=keys, how="left")
    newer = best["_t_created"].isna() | (best["created_at"] > best["_t_created"])
    wins = (best["_t_status"].isna()
            | ((best["status"] == OK) & ((best["_t_status"] != OK) | newer))
            | ((best["status"] == ERROR) & (best["_t_status"] == ERROR) & newer))
    return staged.take(pa.array(sorted(best.loc[wins, "_row"].tolist()), pa.int64()))
