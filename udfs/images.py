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

``check_image`` is the ingest-time variant: it never raises for a bad file, it returns the
reason, so the ingest job can count and store rejects and keep going.
"""
from __future__ import annotations

import hashlib
import io
import logging
import warnings
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

log = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 50_000_000
DEFAULT_MAX_SIDE = 2048
# A white background is the catalogue convention for product photos with transparency.
ALPHA_BACKGROUND = (255, 255, 255)
_HASH_CHUNK = 1 << 20

ImageSource = bytes | str | Path


class ImageError(Exception):
    """An image that cannot be used. ``kind`` is a short code for counting rejects
    (missing, empty, not_image, truncated, too_large, unreadable); ``reason`` the full message."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks (the ``descriptions`` cache key)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of in-memory image bytes; equals ``sha256_file`` of the same file."""
    return hashlib.sha256(data).hexdigest()


def _read_source(source: ImageSource, name: str | None = None) -> tuple[bytes, str]:
    """The bytes of an image and a name to put in error messages."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        name = name or f"<{len(data)} bytes>"
    else:
        name = name or str(source)
        path = Path(source)
        if not path.exists():
            raise ImageError("missing", f"image '{name}' does not exist: check the path or the images root")
        if path.is_dir():
            raise ImageError("not_image", f"image '{name}' is a directory, not an image file")
        try:
            data = path.read_bytes()
        except OSError as e:
            raise ImageError("unreadable", f"image '{name}' cannot be read ({e}): check its permissions") from e
    if not data:
        raise ImageError("empty", f"image '{name}' is empty (0 bytes): re-download it or drop it from the catalog")
    return data, name


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
        head = data[:16]
        raise ImageError(
            "not_image",
            f"image '{name}' is not an image format Pillow can read (starts with {head!r}): "
            "replace it with a JPEG/PNG/WebP file or drop it from the catalog",
        ) from e
    except OSError as e:
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


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB from any Pillow mode; transparency is composited on white."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        # 16-bit scans keep their tonal range; a plain convert("L") would clip everything above 255.
        top = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        arr = np.clip(arr / top * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")
    has_alpha = img.mode in ("RGBA", "LA", "La", "RGBa", "PA") or (
        img.mode == "P" and "transparency" in img.info
    )
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(
    source: ImageSource,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_side: int | None = DEFAULT_MAX_SIDE,
    name: str | None = None,
) -> Image.Image:
    """Decode an image (bytes or a path) into an RGB ``PIL.Image`` with EXIF orientation applied.

    Raises ``ImageError`` (with ``kind`` and a message naming the input and the fix) for a
    missing, empty, non-image, truncated or too-large file; ``name`` (e.g. the item's
    ``image_uri`` when ``source`` is bytes) is what the message calls the image. See the module
    docstring for the size policy; ``max_side=None`` keeps the full resolution.
    """
    data, name = _read_source(source, name)
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
    if max_side is not None and max(img.size) > max_side:
        img = downscale(img, max_side)
    return img


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
) -> tuple[str | None, str | None]:
    """Ingest check: ``(sha256, None)`` for a usable image, ``(None, reason)`` otherwise.

    Reads the file once, hashes it, verifies the header and decodes every pixel (JPEGs at a
    reduced DCT scale, which still reads the whole entropy-coded stream, so truncation is
    caught). Never raises for a bad file.
    """
    try:
        data, name = _read_source(path)
        img = _open_checked(data, name, max_pixels)
        if img.format == "JPEG":
            img.draft("RGB", (max(1, img.size[0] // 8), max(1, img.size[1] // 8)))
        _decode_fully(img, name)
    except ImageError as e:
        return None, e.reason
    except Exception as e:  # noqa: BLE001 - ingest must keep going; the reason is stored
        return None, f"image '{path}' could not be checked ({type(e).__name__}: {e})"
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
