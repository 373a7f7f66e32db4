"""Finding an item's image by a naming pattern: the pure path logic, no Spark session."""
from __future__ import annotations

import os

import pytest

from udfs.io.image_files import image_paths, pattern_problem


@pytest.mark.parametrize("pattern", ["{item_id}.jpg", "img/{item_id}.png", "{item_id[0]}/{item_id}.jpg"])
def test_valid_patterns(pattern):
    assert pattern_problem(pattern) is None


@pytest.mark.parametrize("pattern, problem", [
    ("x.jpg", "no {item_id} placeholder"),
    ("{id}.jpg", "it uses {id}"),
    ("{}.jpg", "it uses {}"),
    ("/data/{item_id}.jpg", "absolute path"),
    ("{item_id.jpg", "not a valid pattern"),
])
def test_invalid_patterns_say_why(pattern, problem):
    assert problem in pattern_problem(pattern)


def test_image_paths_finds_existing_files_only_inside_the_root(tmp_path):
    root = tmp_path / "images"
    (root / "a").mkdir(parents=True)
    (root / "x.jpg").write_bytes(b"x")
    (root / "a" / "ab.jpg").write_bytes(b"ab")
    (root / "dir.jpg").mkdir()  # a folder named like an image is not one
    (tmp_path / "secret.jpg").write_bytes(b"s")
    got = image_paths(["x", "y", "../secret", "dir", "", None], str(root), "{item_id}.jpg")
    assert got == [os.path.join(str(root), "x.jpg"), None, None, None, None, None]
    nested = image_paths(["ab", "b"], str(root), "{item_id[0]}/{item_id}.jpg")
    assert nested == [os.path.join(str(root), "a", "ab.jpg"), None]
    # An index past a short id's end names no file instead of failing the batch.
    assert image_paths(["ab"], str(root), "{item_id[5]}/{item_id}.jpg") == [None]
