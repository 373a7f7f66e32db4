"""Image loading for captioning and image features: one place that turns bytes into RGB pixels.

Every image that reaches a model goes through ``load_image``: the full file is decoded (a
truncated download fails here, not inside a model batch), EXIF orientation is applied, and any
mode (palette, alpha, CMYK, 16-bit greyscale) becomes 8-bit RGB.

Size policy:
- above ``max_pixels`` (width x height, default 50 megapixels) the image is **rejected** as a
  decompression-bomb guard: the check reads the header only, before any pixel is decoded;
- above ``max_side`` (longest side, default 2048) it is **downscaled**, aspect ratio kept, each
  side at least one pixel. JPEGs are decoded at a reduced DCT scale first, which is several
  times faster than decoding at full size and then resizing. Caption and image models resize to
  a few hundred pixels anyway, so nothing they see is lost.

Truncation detection relies on Pillow's default ``ImageFile.LOAD_TRUNCATED_IMAGES = False``;
a process that flips it on accepts truncated files.

Read policy (``read_image_file``, the one reader of image files for ingest and caption): only a
regular file is read (a FIFO, a device such as ``/dev/zero``, a directory or a socket is refused
without reading), a file above ``ReadLimits.max_bytes`` is refused from its size alone and never
more than ``max_bytes + 1`` bytes are read, and a read that takes longer than
``ReadLimits.timeout_s`` (a dead network mount) returns a ``timeout`` error to the caller. An
object-store image (``s3a://...``, ``udfs.io.storage``) is read with the same limits, its size taken
from the object's metadata; it is not confined to a local images root (the job's credentials
decide what it may read). No
error message ever quotes the file's content: a data file must not be able to copy another file
into the ``rejects`` table.

``check_image`` is the ingest-time variant: it never raises for a bad file, it returns the
reason, so the ingest job can count and store rejects and keep going.
"""
from __future__ import annotations

import functools
import hashlib
import io
import logging
import os
import queue
import stat
import threading
import time
import warnings
from concurrent.futures import Future
from concurrent.futures import TimeoutError as WaitTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from udfs.io import storage

log = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 50_000_000
DEFAULT_MAX_SIDE = 2048
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_READ_TIMEOUT_S = 30.0
# A white background is the catalogue convention for product photos with transparency.
ALPHA_BACKGROUND = (255, 255, 255)
_READ_CHUNK = 1 << 20
# Reader threads per process: each read stuck in the kernel holds one until the kernel returns.
_READ_THREADS = 8

ImageSource = bytes | str | Path


class ImageError(Exception):
    """An image that cannot be used. ``kind`` is a short code for counting rejects (missing,
    empty, not_image, truncated, too_large (pixels), too_big (bytes), not_regular, timeout,
    unreadable, outside_root); ``reason`` the full message."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of an image's bytes (the ``descriptions`` cache key)."""
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class ReadLimits:
    """How much of one image file is read, and for how long (``dataset.images`` in the config)."""

    max_bytes: int = DEFAULT_MAX_BYTES
    timeout_s: float = DEFAULT_READ_TIMEOUT_S
    # Where from, when ``confine``: a local path must resolve under ``images_root`` (``resolve_under``).
    # The caption job's reads carry the dataset's images root here; ingest passes it per call.
    images_root: str | None = None
    confine: bool = False

    def __post_init__(self):
        if isinstance(self.max_bytes, bool) or not isinstance(self.max_bytes, int) or self.max_bytes < 1:
            raise ValueError(f"dataset.images.max_bytes must be a positive number of bytes, got {self.max_bytes!r}")
        if not 0 < self.timeout_s < float("inf"):
            raise ValueError(f"dataset.images.read_timeout_s must be a positive, finite number of seconds, "
                             f"got {self.timeout_s!r}")


class _ReadThreads:
    """A few daemon threads that run file reads, so that a caller can stop waiting for one.

    ``concurrent.futures.ThreadPoolExecutor`` joins its threads at interpreter exit, so one read
    stuck in the kernel would keep a Spark or Ray worker process from ever exiting; these threads
    are daemons. A thread whose read is stuck stays blocked until the kernel returns (on a hard NFS
    mount that may be never) and then closes its file; up to ``size`` threads are started, and
    once every one is stuck, further reads wait in the queue and get their own timeout error, so
    a job over a dead mount records timeouts instead of hanging.
    """

    def __init__(self, size: int):
        self._size = size
        self._reset()

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = 0
        self._idle = 0

    def submit(self, fn, *args) -> Future:
        future: Future = Future()
        with self._lock:
            if self._idle:
                self._idle -= 1  # that waiting thread takes this task
            elif self._threads < self._size:
                self._threads += 1
                threading.Thread(target=self._work, name=f"vlm4rec-image-read-{self._threads}",
                                 daemon=True).start()
        self._tasks.put((future, fn, args))
        return future

    def _work(self) -> None:
        tasks = self._tasks  # a forked child gets new queues; this thread never runs there
        while True:
            future, fn, args = tasks.get()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args))
                except BaseException as exc:  # noqa: BLE001 - handed to the waiting caller
                    future.set_exception(exc)
            del future, fn, args  # the bytes of a read nobody waits for any more are freed now
            with self._lock:
                self._idle += 1


_READERS = _ReadThreads(_READ_THREADS)
# A forked process (Spark's Python daemon forks its workers) has none of its parent's threads.
os.register_at_fork(after_in_child=_READERS._reset)

_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
               (stat.S_ISSOCK, "a socket"))


def _file_kind(mode: int) -> str:
    return next((what for test, what in _FILE_KINDS if test(mode)), "not a regular file")


def _too_big(name: str, size: str, max_bytes: int) -> ImageError:
    return ImageError("too_big", f"image '{name}' is {size} bytes, above dataset.images.max_bytes={max_bytes:,}: "
                                 "shrink the file offline or raise dataset.images.max_bytes")


def _timed_out(name: str, timeout_s: float) -> ImageError:
    return ImageError("timeout", f"image '{name}': read timed out after {timeout_s:g} s (a hung network mount or "
                                 "an overloaded disk?): check the storage, or raise dataset.images.read_timeout_s")


def _read_bounded(path: str, name: str, limits: ReadLimits, deadline: float, images_root: str | None,
                  confine: bool) -> bytes:
    """The reader thread's work: confine the path, open it without blocking, check the open file,
    read within limits. Resolving the path stats every folder on it, which a dead mount hangs
    as surely as a read: it runs here, under the same timeout."""
    if storage.is_object_store(path):
        return _read_object(path, name, limits, deadline)
    if confine:
        path = resolve_under(path, images_root, name=name)
    try:
        # O_NONBLOCK: opening a FIFO with no writer returns at once instead of waiting for one.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError) as e:
        raise ImageError("missing", f"image '{name}' does not exist: check the path or the images root") from e
    except PermissionError as e:
        raise ImageError("unreadable",
                         f"image '{name}' cannot be read (permission denied): check its permissions") from e
    except OSError as e:
        try:  # a socket cannot be opened at all (ENXIO): name what it is
            what = _file_kind(os.stat(path).st_mode)
        except OSError:
            what = None
        if what and what != "not a regular file":
            raise ImageError("not_regular", f"image '{name}' is {what}: only regular files are read as images; "
                                            "point image_uri at the image file itself") from e
        raise ImageError("unreadable", f"image '{name}' cannot be opened ({e.strerror}): check the file") from e
    try:
        # The descriptor, not the path: what is checked is what is read.
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ImageError("not_regular", f"image '{name}' is {_file_kind(info.st_mode)}: only regular files "
                                            "are read as images; point image_uri at the image file itself")
        return _read_within(lambda n: os.read(fd, n), info.st_size, name, limits, deadline)
    except OSError as e:
        raise ImageError("unreadable", f"image '{name}' cannot be read ({e.strerror}): check the file") from e
    finally:
        os.close(fd)


def _read_within(read, size: int | None, name: str, limits: ReadLimits, deadline: float) -> bytes:
    """``read(n)``'s bytes up to EOF: refused from ``size`` (what fstat or the store reports;
    None: unknown) above ``max_bytes``, never more than ``max_bytes + 1`` bytes read, the
    deadline checked between reads."""
    if size is not None and size > limits.max_bytes:
        raise _too_big(name, f"{size:,}", limits.max_bytes)
    chunks: list[bytes] = []
    total, limit = 0, limits.max_bytes + 1
    while total < limit:
        if time.monotonic() > deadline:
            raise _timed_out(name, limits.timeout_s)
        remaining = None if size is None else size - total
        # Ask for the size fstat gave plus one byte (one read, no oversized buffer), then probe
        # for EOF with one byte; a file that reports no size (procfs) or grew goes by chunks.
        want = _READ_CHUNK if remaining is None else (
            remaining + 1 if remaining > 0 else (1 if remaining == 0 and total else _READ_CHUNK))
        chunk = read(min(want, _READ_CHUNK, limit - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    if total > limits.max_bytes:  # grew after the size was taken, or reported no size
        raise _too_big(name, f"more than {limits.max_bytes:,}", limits.max_bytes)
    return b"".join(chunks)


def _read_object(uri: str, name: str, limits: ReadLimits, deadline: float) -> bytes:
    """An object-store image (``s3://``, ``s3a://``, ``gs://``, ``abfss://``, ``hdfs://``) read
    within the same limits as a file: its size checked from its metadata first, never more than
    ``max_bytes + 1`` bytes read, the deadline checked between chunks."""
    from pyarrow import fs as pafs

    try:
        store, key = storage.filesystem(uri)
        info = store.get_file_info(key)
        if info.type == pafs.FileType.NotFound:
            raise ImageError("missing", f"image '{name}' does not exist: check the URI or upload the object")
        if info.type != pafs.FileType.File:
            raise ImageError("not_regular", f"image '{name}' is a folder (a prefix), not an object: point "
                                            "image_uri at the image object itself")
        with store.open_input_stream(key) as stream:
            return _read_within(stream.read, info.size, name, limits, deadline)
    except ImageError:
        raise
    except Exception as e:  # noqa: BLE001 - a store error becomes a reason that names the fix
        raise ImageError("unreadable", f"image {storage.describe_failure(name, e)}") from e


def read_image_file(path: str | Path, limits: ReadLimits | None = None, name: str | None = None, *,
                    images_root: str | None = None, confine: bool = False) -> bytes:
    """The bytes of an image file, read within ``limits``; raises ``ImageError`` (missing,
    unreadable, not_regular, too_big, timeout, empty). See the module docstring's read policy.

    ``confine``: the path must resolve under ``images_root`` (``resolve_under``; an
    ``outside_root`` error otherwise, and the file is not opened)."""
    limits = limits or ReadLimits()
    name = name or str(path)
    future = _READERS.submit(_read_bounded, os.fspath(path), name, limits, time.monotonic() + limits.timeout_s,
                             images_root or limits.images_root, confine or limits.confine)
    try:
        return _not_empty(future.result(timeout=limits.timeout_s), name)
    except WaitTimeout:  # the builtin TimeoutError only from Python 3.11 on
        future.cancel()  # still queued behind stuck reads: never started
        raise _timed_out(name, limits.timeout_s) from None


def _not_empty(data: bytes, name: str) -> bytes:
    if not data:
        raise ImageError("empty", f"image '{name}' is empty (0 bytes): re-download it or drop it from the catalog")
    return data


# A root is resolved once per process, not once per image (a folder's lstat per level): a root
# re-pointed while a worker lives is not seen, and the job's roots do not move under it.
_real_root = functools.lru_cache(maxsize=16)(os.path.realpath)


def readable_source(uri: str) -> str | None:
    """What ``read_image_file`` reads for an ``image_uri``, the one rule ingest, caption and embed
    share: the local path (``storage.local_path_of``: ``file://`` or no scheme), the object-store
    URI itself (``s3://``, ``s3a://``, ``gs://``, ``abfss://``, ``hdfs://``), or ``None`` for a
    reference no reader here fetches (``http://``, ``ftp://``)."""
    path = storage.local_path_of(uri)
    if path is not None:
        return path
    return uri if storage.is_object_store(uri) else None


def resolve_under(path: str, root: str | None, allow_outside_root: bool = False, name: str | None = None) -> str:
    """``path`` with symbolic links and ``..`` resolved, checked to lie under ``root`` (resolved
    the same way); raises ``ImageError("outside_root")`` naming the rule and the setting.

    Image paths come from data files: a row must not make the job read a file elsewhere."""
    name = name or path
    resolved = os.path.realpath(path)
    if allow_outside_root:
        return resolved
    if root is None:
        raise ImageError("outside_root", f"image '{name}' is a local path, but the dataset's adapter names no "
                                         "images root to keep image paths under: set "
                                         "dataset.images.allow_outside_root=true to read it")
    base = _real_root(root)
    if resolved != base and not resolved.startswith(base.rstrip(os.sep) + os.sep):
        raise ImageError("outside_root", f"image '{name}' resolves to '{resolved}', outside the dataset's images "
                                         f"root '{base}' (through '..' or a symbolic link): only files under "
                                         "the images root are read; move the file under it, or set "
                                         "dataset.images.allow_outside_root=true")
    return resolved


def _read_source(source: ImageSource, name: str | None = None, limits: ReadLimits | None = None,
                 images_root: str | None = None, confine: bool = False) -> tuple[bytes, str]:
    """The bytes of an image and a name to put in error messages."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        name = name or f"<{len(source)} bytes>"
        return _not_empty(bytes(source), name), name
    name = name or str(source)
    return read_image_file(source, limits, name, images_root=images_root, confine=confine), name


# What the first bytes say a file is meant to be, when Pillow cannot identify it.
_MAGIC = (
    (b"\xff\xd8\xff", "JPEG", "JPEG header found but its tables are unreadable"),
    (b"\x89PNG\r\n\x1a\n", "PNG", "PNG signature found but its header chunk is unreadable"),
    (b"GIF87a", "GIF", "GIF signature found but its header is unreadable"),
    (b"GIF89a", "GIF", "GIF signature found but its header is unreadable"),
)


def _damaged_format(data: bytes) -> tuple[str, str] | None:
    for magic, fmt, detail in _MAGIC:
        if data.startswith(magic):
            return fmt, detail
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP", "WebP header found but its image chunk is unreadable"
    return None


def _open_checked(data: bytes, name: str, max_pixels: int) -> Image.Image:
    """Open (header only) and refuse sizes above ``max_pixels`` before decoding anything."""
    try:
        with warnings.catch_warnings():
            # Our own max_pixels check below replaces Pillow's warning tier.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ImageError("too_large", f"image '{name}' is too large to decode safely ({e}): downscale it offline") from e
    except UnidentifiedImageError as e:
        # Never quote the bytes: the file may be anything a path in a data file pointed at.
        damaged = _damaged_format(data)
        if damaged:
            raise ImageError("not_image", f"image '{name}' is a damaged {damaged[0]} ({damaged[1]}): "
                                          "re-download it or drop it from the catalog") from e
        raise ImageError(
            "not_image",
            f"image '{name}' is not an image format Pillow can read: "
            "replace it with a JPEG/PNG/WebP file or drop it from the catalog",
        ) from e
    except OSError as e:
        damaged = _damaged_format(data)
        if damaged:  # decided by the bytes, like an unidentified file
            raise ImageError("not_image", f"image '{name}' is a damaged {damaged[0]} ({damaged[1]}: {e}): "
                                          "re-download it or drop it from the catalog") from e
        raise ImageError("unreadable", f"image '{name}' has an unreadable header ({e}): re-download it") from e
    width, height = img.size
    if width <= 0 or height <= 0:
        raise ImageError("not_image", f"image '{name}' has an empty size {width}x{height}")
    if width * height > max_pixels:
        raise ImageError(
            "too_large",
            f"image '{name}' is {width}x{height} = {width * height:,} pixels, above max_pixels={max_pixels:,} "
            "(a decompression-bomb guard): downscale it offline or raise max_pixels",
        )
    return img


def _decode_fully(img: Image.Image, name: str) -> None:
    """Force the full decode so that a truncated or corrupt stream fails here."""
    try:
        img.load()
    except Image.DecompressionBombError as e:
        raise ImageError("too_large", f"image '{name}' is too large to decode safely ({e}): downscale it offline") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(
            "truncated",
            f"image '{name}' is truncated or corrupt ({e}): re-download it or drop it from the catalog",
        ) from e


# Rows of a 32-bit ("I", "F") image scaled per step: the float temporaries stay this small.
_SCALE_BLOCK_PIXELS = 1 << 20


def _to_8bit(img: Image.Image) -> Image.Image:
    """Mode "L" from a 16-bit, 32-bit integer or float image, keeping its tonal range (a plain
    ``convert("L")`` clips everything above 255)."""
    if img.mode.startswith("I;16"):
        # The high byte of each sample: integer work on one uint16 copy, where the float64 path
        # cost 1.38 GB for a 49-megapixel scan. Within 1 of x * 255 / 65535.
        arr = np.array(img)
        arr >>= 8
        return Image.fromarray(arr.astype(np.uint8), "L")
    arr = np.asarray(img)
    top = max(float(arr.max()), 1.0)
    out = np.empty(arr.shape, dtype=np.uint8)
    rows = max(1, _SCALE_BLOCK_PIXELS // max(1, arr.shape[1]))
    for start in range(0, arr.shape[0], rows):
        block = arr[start:start + rows].astype(np.float32)
        block *= 255.0 / top
        np.clip(block, 0, 255, out=block)
        out[start:start + rows] = block
    return Image.fromarray(out, "L")


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB from any Pillow mode; transparency is composited on white."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return _to_8bit(img).convert("RGB")
    if img.mode in ("RGBA", "LA", "La", "RGBa", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,)), rgba).convert("RGB")
    return img.convert("RGB")


def load_image(
    source: ImageSource,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_side: int | None = DEFAULT_MAX_SIDE,
    name: str | None = None,
    limits: ReadLimits | None = None,
) -> Image.Image:
    """Decode an image (bytes or a path) into an RGB ``PIL.Image`` with EXIF orientation applied.

    Raises ``ImageError`` (with ``kind`` and a message naming the input and the fix) for a
    missing, empty, non-image, truncated or too-large file; ``name`` (e.g. the item's
    ``image_uri`` when ``source`` is bytes) is what the message calls the image. See the module
    docstring for the size and read policies (``limits`` applies to a path); ``max_side=None``
    keeps the full resolution.
    """
    data, name = _read_source(source, name, limits)
    img = _open_checked(data, name, max_pixels)
    if max_side is not None and img.format == "JPEG" and max(img.size) > max_side:
        # DCT-domain downscaling: decodes at 1/2, 1/4 or 1/8 scale, never below the request.
        img.draft("RGB", (max_side, max_side))
    _decode_fully(img, name)
    try:
        img = ImageOps.exif_transpose(img)
    except Exception as e:  # noqa: BLE001 - a broken EXIF block should not cost the image
        log.warning("image %s: ignoring unreadable EXIF orientation (%s)", name, e)
    img = to_rgb(img)
    return img if max_side is None else downscale(img, max_side)


def downscale(img: Image.Image, max_side: int) -> Image.Image:
    """Shrink so that the longest side is ``max_side`` (aspect kept, each side >= 1 px)."""
    width, height = img.size
    scale = max_side / max(width, height)
    if scale >= 1:
        return img
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return img.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def check_image(
    path: str | Path,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    limits: ReadLimits | None = None,
    name: str | None = None,
    *,
    images_root: str | None = None,
    confine: bool = False,
) -> tuple[str | None, str | None]:
    """Ingest check: ``(sha256, None)`` for a usable image, ``(None, reason)`` otherwise.

    Reads the file once within ``limits`` (confined to ``images_root`` when ``confine``: see
    ``read_image_file``), hashes it, verifies the header and decodes every pixel (JPEGs at a
    reduced DCT scale, which still reads the whole entropy-coded stream, so truncation is
    caught). ``name`` is what a reason calls the file (default: ``path``). Never raises for a
    bad file.
    """
    try:
        data, name = _read_source(path, name, limits, images_root, confine)
        img = _open_checked(data, name, max_pixels)
        if img.format == "JPEG":
            img.draft("RGB", (max(1, img.size[0] // 8), max(1, img.size[1] // 8)))
        _decode_fully(img, name)
    except ImageError as e:
        return None, e.reason
    except Exception as e:  # noqa: BLE001 - ingest must keep going; the reason is stored
        return None, f"image '{name or path}' could not be checked ({type(e).__name__}: {e})"
    return sha256_bytes(data), None


def resize_for(
    img: Image.Image,
    size: int | tuple[int, int],
    fit: Literal["crop", "pad", "stretch"] = "crop",
) -> Image.Image:
    """An RGB image of exactly ``size`` (``(width, height)`` or a square side) for a model input.

    ``crop``: scale the short side to fit, then centre-crop (the ImageNet evaluation convention;
    the edges of a tall poster are lost). ``pad``: scale the long side to fit and pad with white
    (nothing lost, smaller object). ``stretch``: resize ignoring the aspect ratio.
    """
    target_w, target_h = (size, size) if isinstance(size, int) else size
    img = to_rgb(img)
    if fit == "stretch":
        return img.resize((target_w, target_h), Image.Resampling.BICUBIC)
    if fit == "crop":
        return ImageOps.fit(img, (target_w, target_h), Image.Resampling.BICUBIC)
    if fit == "pad":
        return ImageOps.pad(img, (target_w, target_h), Image.Resampling.BICUBIC, color=ALPHA_BACKGROUND)
    raise ValueError(f"resize_for: fit={fit!r} is not one of 'crop', 'pad', 'stretch'")
