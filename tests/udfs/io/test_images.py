"""Image loading: real posters, PIL-made images in every mode, and the broken files a catalog has."""
from __future__ import annotations

import hashlib
import io
import os
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from udfs.io import images, storage
from udfs.io.images import (
    ImageError,
    ReadLimits,
    check_image,
    downscale,
    load_image,
    read_image_file,
    resize_for,
    resolve_under,
    sha256_bytes,
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
    assert sha256_bytes(data) == hashlib.sha256(data).hexdigest()


@pytest.mark.realdata
def test_check_image_accepts_a_real_poster_and_returns_its_hash(poster):
    assert check_image(poster) == (hashlib.sha256(poster.read_bytes()).hexdigest(), None)


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


def _float64_to_8bit(arr: np.ndarray, top: float) -> np.ndarray:
    """The conversion ``to_rgb`` used before it dropped its float64 copy: the reference."""
    return np.clip(arr.astype(np.float64) / top * 255.0, 0, 255).astype(np.uint8)


def test_sixteen_bit_png_gives_the_float_conversions_pixels_within_one(tmp_path):
    rng = np.random.default_rng(7)
    arr = rng.integers(0, 65536, size=(23, 17), dtype=np.uint16)
    arr[0, :4] = [0, 255, 65280, 65535]  # both ends and the byte boundaries
    path = _save(Image.fromarray(arr), tmp_path / "g16.png")
    with Image.open(path) as raw:
        assert raw.mode == "I;16"  # the mode the integer path is for
    got = np.asarray(load_image(path))
    assert got.shape == (23, 17, 3) and (got[..., 0] == got[..., 1]).all() and (got[..., 0] == got[..., 2]).all()
    diff = np.abs(got[..., 0].astype(int) - _float64_to_8bit(arr, 65535.0).astype(int))
    assert diff.max() <= 1
    assert got[0, 0, 0] == 0 and got[0, 3, 0] == 255


def test_big_endian_16_bit_and_32_bit_images_keep_the_float_conversions_pixels(tmp_path):
    rng = np.random.default_rng(8)
    arr = rng.integers(0, 65536, size=(9, 11), dtype=np.uint16)
    big_endian = Image.frombytes("I;16B", (11, 9), arr.astype(">u2").tobytes())
    diff = np.abs(np.asarray(to_rgb(big_endian))[..., 0].astype(int) - _float64_to_8bit(arr, 65535.0))
    assert diff.max() <= 1
    # 32-bit integers scale by the image's own maximum, in blocks of rows; one block here.
    wide = rng.integers(0, 3_000_000, size=(9, 11)).astype(np.int32)
    got = np.asarray(to_rgb(Image.fromarray(wide, "I")))[..., 0].astype(int)
    assert np.abs(got - _float64_to_8bit(wide, float(wide.max()))).max() <= 1


def test_32_bit_image_is_scaled_in_blocks_of_rows_like_in_one(monkeypatch):
    arr = np.random.default_rng(9).random((40, 7)).astype(np.float32) * 1000.0
    whole = np.asarray(to_rgb(Image.fromarray(arr, "F")))
    monkeypatch.setattr(images, "_SCALE_BLOCK_PIXELS", 7 * 3)  # 3 rows per block, the last one short
    assert np.array_equal(np.asarray(to_rgb(Image.fromarray(arr, "F"))), whole)


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


# --- bounded, confined reads --------------------------------------------------------------

def _png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (6, 4), (10, 20, 30)).save(buffer, "PNG")
    return buffer.getvalue()


def test_read_limits_name_the_setting_to_fix():
    with pytest.raises(ValueError, match="dataset.images.max_bytes"):
        ReadLimits(max_bytes=0)
    with pytest.raises(ValueError, match="dataset.images.read_timeout_s"):
        ReadLimits(timeout_s=0)
    with pytest.raises(ValueError, match="dataset.images.read_timeout_s"):
        ReadLimits(timeout_s=float("inf"))


def test_a_file_above_max_bytes_is_refused_from_its_size(tmp_path):
    big = tmp_path / "huge.jpg"
    big.write_bytes(_png_bytes())
    os.truncate(big, 1 << 30)  # a sparse gigabyte: costs nothing unless someone reads it
    with pytest.raises(ImageError) as info:
        read_image_file(big, ReadLimits(max_bytes=1 << 20))
    assert info.value.kind == "too_big"
    assert "1,073,741,824 bytes" in info.value.reason and "dataset.images.max_bytes=1,048,576" in info.value.reason
    sha, reason = check_image(big, limits=ReadLimits(max_bytes=1 << 20))
    assert sha is None and reason == info.value.reason
    small = tmp_path / "small.png"
    small.write_bytes(_png_bytes())
    exact = ReadLimits(max_bytes=small.stat().st_size)  # a file of exactly max_bytes is read
    assert read_image_file(small, exact) == small.read_bytes()


def test_a_file_that_reports_no_size_is_read_only_up_to_max_bytes():
    # procfs files report st_size 0 and have content: the reader must count what it reads.
    with pytest.raises(ImageError) as info:
        read_image_file("/proc/self/status", ReadLimits(max_bytes=16))
    assert info.value.kind == "too_big" and "more than 16 bytes" in info.value.reason


def _in_thread(fn, *args):
    """``fn(*args)`` in a thread joined with a timeout: a hang guard, so that a regression fails
    this test instead of hanging the whole run."""
    result = {}

    def target():
        try:
            result["value"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            result["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive(), f"{fn.__name__}{args} hung"
    if "error" in result:
        raise result["error"]
    return result["value"]


def test_devices_fifos_and_directories_are_refused_without_reading(tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    for path, what in (("/dev/zero", "a character device"), (fifo, "a FIFO"), (tmp_path, "a directory")):
        with pytest.raises(ImageError) as info:
            _in_thread(read_image_file, path)
        assert info.value.kind == "not_regular", path
        assert f"is {what}" in info.value.reason and "only regular files" in info.value.reason
        sha, reason = _in_thread(check_image, path)
        assert sha is None and reason == info.value.reason


def test_a_read_that_hangs_returns_a_timeout_and_the_reader_recovers(tmp_path):
    good = tmp_path / "good.png"
    good.write_bytes(_png_bytes())
    release = threading.Event()
    # Occupy every reader thread the way reads stuck in the kernel (a dead NFS mount) would.
    stuck = [images._READERS.submit(release.wait, 60) for _ in range(images._READ_THREADS)]
    try:
        with pytest.raises(ImageError) as info:
            read_image_file(good, ReadLimits(timeout_s=0.2))
        assert info.value.kind == "timeout"
        assert "read timed out after 0.2 s" in info.value.reason
        assert "dataset.images.read_timeout_s" in info.value.reason
        assert check_image(good, limits=ReadLimits(timeout_s=0.2))[1] == info.value.reason
    finally:
        release.set()
    assert all(future.result(timeout=60) for future in stuck)
    assert read_image_file(good) == good.read_bytes()


def test_paths_out_of_the_root_are_refused_by_symlink_or_dotdot(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "img").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret.jpg").write_text("not for you")
    (root / "img" / "a.png").write_bytes(_png_bytes())
    (root / "img" / "link.jpg").symlink_to(outside / "secret.jpg")
    (root / "img" / "inner.png").symlink_to(root / "img" / "a.png")
    (tmp_path / "root2").mkdir()  # a sibling whose name starts like the root's
    for path in (root / "img" / "link.jpg", root / "img" / ".." / ".." / "outside" / "secret.jpg",
                 tmp_path / "root2" / "x.png", "/etc/hostname"):
        with pytest.raises(ImageError) as info:
            resolve_under(str(path), str(root))
        assert info.value.kind == "outside_root"
        assert "outside the dataset's images root" in info.value.reason
        assert "dataset.images.allow_outside_root" in info.value.reason
        assert resolve_under(str(path), str(root), allow_outside_root=True) == os.path.realpath(path)
    assert resolve_under(str(root / "img" / "inner.png"), str(root)) == str((root / "img" / "a.png").resolve())
    assert resolve_under(str(root / "img" / ".." / "img" / "a.png"), str(root)) == str(root / "img" / "a.png")
    with pytest.raises(ImageError, match="names no images root"):
        resolve_under(str(root / "img" / "a.png"), None)


@pytest.mark.parametrize("data, expected", [
    (b"\xff\xd8\xff\xe0" + b"\x01" * 60, "a damaged JPEG (JPEG header found but its tables are unreadable"),
    (b"\x89PNG\r\n\x1a\n" + b"\x01" * 60, "a damaged PNG (PNG signature found"),
    (b"GIF89a" + b"\x01" * 3, "a damaged GIF (GIF signature found"),
    (b"RIFF\x10\x00\x00\x00WEBPVP8 " + b"\x01" * 8, "a damaged WebP (WebP header found"),
    (b"root:x:0:0:root:/root:/bin/bash\n", "not an image format Pillow can read"),
], ids=["jpeg", "png", "gif", "webp", "text"])
def test_an_unreadable_file_is_named_by_its_format_and_never_quoted(tmp_path, data, expected):
    path = _write(tmp_path / "x.jpg", data)
    sha, reason = check_image(path)
    assert sha is None and expected in reason and "x.jpg" in reason
    assert "root:x" not in reason and "\\x01" not in reason and "\\xff" not in reason


def test_a_confined_check_refuses_an_outside_path_without_opening_it(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    os.mkfifo(outside / "pipe.jpg")  # opened, it would be refused as a FIFO instead
    (root / "pipe.jpg").symlink_to(outside / "pipe.jpg")
    (root / "a.png").write_bytes(_png_bytes())
    sha, reason = _in_thread(check_image, root / "pipe.jpg")
    assert sha is None and "FIFO" in reason  # unconfined: opened and refused as what it is
    sha, reason = check_image(root / "pipe.jpg", name="img/pipe.jpg", images_root=str(root), confine=True)
    assert sha is None and "image 'img/pipe.jpg' resolves to" in reason and "FIFO" not in reason
    assert "dataset.images.allow_outside_root" in reason
    assert check_image(root / "a.png", images_root=str(root), confine=True) == (sha256_bytes((root / "a.png").read_bytes()), None)


@pytest.mark.parametrize("uri, expected", [
    ("posters/1.jpg", "posters/1.jpg"),
    ("/data/posters/1.jpg", "/data/posters/1.jpg"),
    ("file:///data/posters/1.jpg", "/data/posters/1.jpg"),
    ("http://example.org/1.jpg", None),
    ("s3a://bucket/1.jpg", None),
    ("ftp://host/1.jpg", None),  # any scheme but file:// is remote, not a missing local file
    ("posters/a://b.jpg", "posters/a://b.jpg"),  # "://" past a path separator is no scheme
])
def test_local_path_is_one_rule_for_every_stage(uri, expected):
    assert storage.local_path_of(uri) == expected
