"""Image loading: real posters, PIL-made images in every mode, and the broken files a catalog has."""
from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from udfs.images import (
    ImageError,
    check_image,
    downscale,
    load_image,
    resize_for,
    sha256_bytes,
    sha256_file,
    to_rgb,
)


@pytest.fixture(scope="module")
def poster(ml100k) -> Path:
    return ml100k / "posters" / "1.jpg"


def _save(img: Image.Image, path: Path, **kwargs) -> Path:
    img.save(path, **kwargs)
    return path


@pytest.mark.realdata
def test_real_poster_loads_as_rgb_with_its_size(poster):
    img = load_image(poster)
    assert img.mode == "RGB"
    with Image.open(poster) as raw:
        assert img.size == raw.size


@pytest.mark.realdata
def test_bytes_and_path_give_the_same_pixels_and_hash(poster):
    data = poster.read_bytes()
    assert np.array_equal(np.asarray(load_image(data)), np.asarray(load_image(poster)))
    assert sha256_file(poster) == sha256_bytes(data) == hashlib.sha256(data).hexdigest()


@pytest.mark.realdata
def test_check_image_accepts_a_real_poster_and_returns_its_hash(poster):
    assert check_image(poster) == (sha256_file(poster), None)


@pytest.mark.realdata
@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_truncated_jpeg_is_rejected(poster, tmp_path, keep):
    data = poster.read_bytes()
    cut = _write(tmp_path / "cut.jpg", data[: int(len(data) * keep)])
    with pytest.raises(ImageError) as info:
        load_image(cut)
    assert info.value.kind == "truncated"
    assert "cut.jpg" in str(info.value) and "re-download" in str(info.value)
    sha, reason = check_image(cut)
    assert sha is None and "truncated" in reason


def test_truncated_large_jpeg_is_rejected_even_when_decoded_at_reduced_scale(tmp_path):
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray((rng.random((600, 900, 3)) * 255).astype(np.uint8)).save(buffer, "JPEG", quality=85)
    data = buffer.getvalue()
    cut = _write(tmp_path / "big.jpg", data[: len(data) - 64])
    assert check_image(cut)[0] is None
    with pytest.raises(ImageError, match="truncated"):
        load_image(cut, max_side=100)
    assert load_image(data, max_side=100).size == (100, 67)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_errors_on_bytes_use_the_given_name():
    with pytest.raises(ImageError, match="image 'posters/9.jpg' is not an image"):
        load_image(b"<html>404</html>", name="posters/9.jpg")
    with pytest.raises(ImageError, match=r"image '<3 bytes>'"):
        load_image(b"abc")


def test_zero_byte_file_is_empty(tmp_path):
    empty = _write(tmp_path / "empty.jpg", b"")
    with pytest.raises(ImageError) as info:
        load_image(empty)
    assert info.value.kind == "empty" and "0 bytes" in info.value.reason
    assert check_image(empty) == (None, info.value.reason)


def test_text_file_named_jpg_is_not_an_image(tmp_path):
    fake = _write(tmp_path / "notes.jpg", b"this is a text file, not a picture\n")
    with pytest.raises(ImageError) as info:
        load_image(fake)
    assert info.value.kind == "not_image"
    assert "notes.jpg" in info.value.reason
    sha, reason = check_image(fake)
    assert sha is None and "not an image" in reason


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nope.png"
    with pytest.raises(ImageError) as info:
        load_image(missing)
    assert info.value.kind == "missing" and "nope.png" in info.value.reason
    assert check_image(missing)[0] is None


def test_very_wide_png_is_downscaled_to_max_side_or_rejected_above_max_pixels(tmp_path):
    wide = _save(Image.new("RGB", (20000, 10), (0, 128, 255)), tmp_path / "wide.png")
    img = load_image(wide, max_side=2048)
    assert img.size == (2048, 1)
    assert img.getpixel((1000, 0)) == (0, 128, 255)
    assert load_image(wide, max_side=None).size == (20000, 10)
    with pytest.raises(ImageError) as info:
        load_image(wide, max_pixels=100_000)
    assert info.value.kind == "too_large" and "20000x10" in info.value.reason
    assert check_image(wide, max_pixels=100_000)[0] is None
    assert check_image(wide)[1] is None


@pytest.mark.parametrize(
    "mode, colour, expected",
    [
        ("L", 200, (200, 200, 200)),
        ("CMYK", (0, 255, 255, 0), (255, 0, 0)),
        ("RGBA", (255, 0, 0, 255), (255, 0, 0)),
        ("RGBA", (255, 0, 0, 0), (255, 255, 255)),  # fully transparent: the white background
        ("LA", (0, 0), (255, 255, 255)),
        ("1", 1, (255, 255, 255)),
    ],
)
def test_every_mode_becomes_rgb(tmp_path, mode, colour, expected):
    suffix = ".tiff" if mode == "CMYK" else ".png"
    path = _save(Image.new(mode, (8, 6), colour), tmp_path / f"img{suffix}")
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (8, 6)
    assert img.getpixel((3, 3)) == expected


def test_palette_with_transparency_is_composited_on_white(tmp_path):
    img = Image.new("P", (4, 4), 0)
    img.putpalette([10, 20, 30, 200, 0, 0] + [0] * 762)
    img.putpixel((0, 0), 1)
    path = _save(img, tmp_path / "pal.png", transparency=0)
    out = load_image(path)
    assert out.getpixel((0, 0)) == (200, 0, 0)
    assert out.getpixel((2, 2)) == (255, 255, 255)


def test_sixteen_bit_greyscale_keeps_its_tonal_range(tmp_path):
    arr = np.full((4, 4), 32768, dtype=np.uint16)
    path = _save(Image.fromarray(arr), tmp_path / "g16.png")
    r, g, b = load_image(path).getpixel((1, 1))
    assert r == g == b and 120 <= r <= 135


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 20, 20))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = _save(img, tmp_path / "rot.jpg", exif=exif, quality=95)
    out = load_image(path)
    assert out.size == (20, 40)
    top = out.getpixel((10, 5))
    assert top[0] > 200 and top[2] < 60  # the red half is now on top


def test_resize_for_gives_exact_sizes_in_every_fit():
    img = Image.new("RGB", (92, 138), (10, 200, 30))
    for fit in ("crop", "pad", "stretch"):
        assert resize_for(img, 224, fit=fit).size == (224, 224)
    assert resize_for(img, (30, 20)).size == (30, 20)
    padded = resize_for(img, 100, fit="pad")
    assert padded.getpixel((2, 50)) == (255, 255, 255)
    with pytest.raises(ValueError, match="fit"):
        resize_for(img, 10, fit="zoom")


def test_downscale_keeps_aspect_and_never_upscales():
    img = Image.new("RGB", (400, 100))
    assert downscale(img, 200).size == (200, 50)
    assert downscale(img, 1000).size == (400, 100)


def test_to_rgb_returns_rgb_unchanged():
    img = Image.new("RGB", (3, 3), (1, 2, 3))
    assert to_rgb(img) is img
