"""The synthetic generator: determinism, the output contract, and the known answer it encodes."""
from __future__ import annotations

import csv
import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jobs import synth as synth_job
from udfs.synth import (
    CATEGORIES,
    COLOURS,
    MATERIALS,
    PATTERN_WORDS,
    PATTERNS,
    generate,
    make_interactions,
    make_items,
)

N_ITEMS = 120
N_USERS = 60
IMAGE_SIZE = 96
# The contract with the csv adapter, spelled out here rather than imported so that a change
# to the generator's columns fails this test.
ITEM_COLUMNS = [
    "item_id", "title", "description", "image_path", "category", "colour", "pattern", "material",
]
INTERACTION_COLUMNS = ["user_id", "item_id", "rating", "timestamp"]


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def file_hashes(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    out = tmp_path_factory.mktemp("synth") / "data"
    counts = generate(out, seed=7, n_items=N_ITEMS, n_users=N_USERS, image_size=IMAGE_SIZE)
    return out, counts


@pytest.fixture(scope="module")
def items(dataset: tuple[Path, dict[str, int]]) -> list[dict[str, str]]:
    columns, rows = read_csv(dataset[0] / "items.csv")
    assert columns == ITEM_COLUMNS
    return rows


@pytest.fixture(scope="module")
def interactions(dataset: tuple[Path, dict[str, int]]) -> list[dict[str, str]]:
    columns, rows = read_csv(dataset[0] / "interactions.csv")
    assert columns == INTERACTION_COLUMNS
    return rows


def test_same_seed_gives_byte_identical_files_and_another_seed_differs(tmp_path: Path) -> None:
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        generate(tmp_path / name, seed=seed, n_items=40, n_users=20, image_size=64)
    first, second, other = (file_hashes(tmp_path / name) for name in "abc")
    assert len(first) == 40 + 4  # images, two CSVs, README.md, manifest.json
    assert first == second
    for name in ("items.csv", "interactions.csv"):
        assert first[name] != other[name]
    images = [name for name in first if name.startswith("images/")]
    assert sum(first[name] != other[name] for name in images) > 0.9 * len(images)


def test_rerun_in_place_is_identical_and_drops_images_of_a_larger_run(tmp_path: Path) -> None:
    generate(tmp_path, seed=5, n_items=30, n_users=10, image_size=64)
    before = file_hashes(tmp_path)
    generate(tmp_path, seed=5, n_items=50, n_users=10, image_size=64)
    generate(tmp_path, seed=5, n_items=30, n_users=10, image_size=64)
    assert file_hashes(tmp_path) == before


def test_counts_manifest_and_readme_match_the_request(
    dataset: tuple[Path, dict[str, int]], items: list[dict[str, str]], interactions: list[dict[str, str]]
) -> None:
    out, counts = dataset
    assert counts == {
        "items": N_ITEMS,
        "images": N_ITEMS,
        "users": N_USERS,
        "interactions": len(interactions),
    }
    assert len(items) == N_ITEMS
    assert len({row["user_id"] for row in interactions}) == N_USERS
    assert len(list((out / "images").glob("*.png"))) == N_ITEMS
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == counts
    assert manifest["parameters"]["seed"] == 7
    assert manifest["parameters"]["n_items"] == N_ITEMS
    readme = (out / "README.md").read_text()
    assert "synthetic" in readme.lower()
    assert "seed: 7" in readme


def test_ids_are_unique_strings_and_interactions_reference_known_items(
    items: list[dict[str, str]], interactions: list[dict[str, str]]
) -> None:
    item_ids = [row["item_id"] for row in items]
    assert len(set(item_ids)) == len(item_ids)
    assert all(re.fullmatch(r"i\d{5}", item_id) for item_id in item_ids)
    assert all(re.fullmatch(r"u\d{4}", row["user_id"]) for row in interactions)
    assert {row["item_id"] for row in interactions} <= set(item_ids)


def test_every_image_path_is_relative_exists_and_opens(
    dataset: tuple[Path, dict[str, int]], items: list[dict[str, str]]
) -> None:
    out, _ = dataset
    for row in items:
        assert row["image_path"] == f"images/{row['item_id']}.png"
        with Image.open(out / row["image_path"]) as image:
            image.load()
            assert image.format == "PNG"
            assert image.mode == "RGB"
            assert image.size == (IMAGE_SIZE, IMAGE_SIZE)


def test_attributes_come_from_the_declared_vocabularies(items: list[dict[str, str]]) -> None:
    assert {row["category"] for row in items} <= set(CATEGORIES)
    assert {row["colour"] for row in items} <= set(COLOURS)
    assert {row["pattern"] for row in items} <= set(PATTERNS)
    assert {row["material"] for row in items} <= set(MATERIALS)
    # 120 items are enough to see every value of each attribute.
    assert len({row["category"] for row in items}) == len(CATEGORIES)
    assert len({row["colour"] for row in items}) == len(COLOURS)


def test_title_shows_category_and_material_never_colour_or_pattern(items: list[dict[str, str]]) -> None:
    for row in items:
        words = set(re.findall(r"[a-z]+", row["title"].lower()))
        assert row["category"] in words and row["material"] in words, row["title"]
        assert not words & set(COLOURS), row["title"]
        assert not any(word.startswith(PATTERN_WORDS) for word in words), row["title"]


def test_description_shows_category_and_pattern_never_colour_or_material(
    items: list[dict[str, str]],
) -> None:
    for row in items:
        words = set(re.findall(r"[a-z]+", row["description"].lower()))
        assert row["category"] in words and row["pattern"] in words, row["description"]
        assert not words & set(COLOURS), row["description"]
        assert not words & set(MATERIALS), row["description"]
    assert len({row["title"] for row in items} & {row["description"] for row in items}) == 0


def test_image_colour_is_the_dominant_non_white_colour(
    dataset: tuple[Path, dict[str, int]], items: list[dict[str, str]]
) -> None:
    out, _ = dataset
    names = list(COLOURS)
    palette = np.array([COLOURS[name] for name in names], dtype=np.float32)
    named_right = 0
    for row in items:
        pixels = np.asarray(Image.open(out / row["image_path"]), dtype=np.float32).reshape(-1, 3)
        pixels = pixels[(pixels < 235).any(axis=1)]
        nearest = np.argmin(((pixels[:, None, :] - palette[None, :, :]) ** 2).sum(axis=2), axis=1)
        named_right += names[np.bincount(nearest, minlength=len(names)).argmax()] == row["colour"]
    assert named_right >= 0.95 * len(items)


def test_image_shows_a_print_exactly_when_the_pattern_is_not_solid(
    dataset: tuple[Path, dict[str, int]], items: list[dict[str, str]]
) -> None:
    out, _ = dataset
    for row in items:
        pixels = np.asarray(Image.open(out / row["image_path"]), dtype=np.float32).reshape(-1, 3)
        outline = (pixels == 50).all(axis=1)
        fill = pixels[(pixels < 235).any(axis=1) & ~outline]
        distance = np.abs(fill - np.median(fill, axis=0)).max(axis=1)
        printed_share = float((distance > 40).mean())
        if row["pattern"] == "solid":
            assert printed_share < 0.08, (row["item_id"], row["material"], printed_share)
        else:
            assert printed_share > 0.12, (row["item_id"], row["pattern"], printed_share)


def test_histories_are_ordered_distinct_and_within_bounds(interactions: list[dict[str, str]]) -> None:
    by_user: dict[str, list[dict[str, str]]] = {}
    for row in interactions:
        by_user.setdefault(row["user_id"], []).append(row)
    for user_id, rows in by_user.items():
        timestamps = [int(row["timestamp"]) for row in rows]
        assert all(a < b for a, b in zip(timestamps, timestamps[1:])), user_id
        assert len({row["item_id"] for row in rows}) == len(rows), user_id
        assert 5 <= len(rows) <= 40, user_id
        assert all(row["rating"] in {"1", "2", "3", "4", "5"} for row in rows)
    keys = [(row["user_id"], row["item_id"], row["timestamp"]) for row in interactions]
    assert len(set(keys)) == len(keys)
    lengths = [len(rows) for rows in by_user.values()]
    assert len(set(lengths)) >= 5  # lengths vary; not one fixed size


def test_users_concentrate_on_their_favourite_category_or_colour(
    items: list[dict[str, str]], interactions: list[dict[str, str]]
) -> None:
    attributes = {row["item_id"]: row for row in items}

    def mean_top_share(pairs: list[tuple[str, str]]) -> float:
        by_user: dict[str, list[str]] = {}
        for user_id, item_id in pairs:
            by_user.setdefault(user_id, []).append(item_id)
        shares = []
        for item_ids in by_user.values():
            best = max(
                Counter(attributes[item_id][name] for item_id in item_ids).most_common(1)[0][1]
                for name in ("category", "colour")
            )
            shares.append(best / len(item_ids))
        return float(np.mean(shares))

    pairs = [(row["user_id"], row["item_id"]) for row in interactions]
    shuffled_items = np.random.default_rng(0).permutation([item_id for _, item_id in pairs])
    shuffled = [(user_id, str(item_id)) for (user_id, _), item_id in zip(pairs, shuffled_items)]
    observed, chance = mean_top_share(pairs), mean_top_share(shuffled)
    assert observed > 0.5
    assert observed > chance + 0.2


def leave_last_out_recall(
    items: list, interactions: list[tuple[str, str, int, int]], attributes: tuple[str, ...], k: int = 10
) -> float:
    """Recall@k of the last item per user, ranking by cosine to the mean of one-hot attributes."""
    index = {item.item_id: row for row, item in enumerate(items)}
    columns = []
    for name in attributes:
        values = sorted({getattr(item, name) for item in items})
        columns.append(np.array([[getattr(item, name) == value for value in values] for item in items]))
    vectors = np.hstack(columns).astype(np.float64)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    tie_break = np.random.default_rng(1).random(len(items)) * 1e-9
    histories: dict[str, list[int]] = {}
    for user_id, item_id, _, _ in interactions:  # already in time order per user
        histories.setdefault(user_id, []).append(index[item_id])
    hits = []
    for history in histories.values():
        train, test = history[:-1], history[-1]
        scores = vectors @ vectors[train].mean(axis=0) + tie_break
        scores[train] = -np.inf
        hits.append(test in np.argpartition(scores, -k)[-k:])
    return float(np.mean(hits))


def test_what_the_image_shows_predicts_users_better_than_the_texts() -> None:
    items = make_items(seed=11, n_items=400)
    interactions = make_interactions(seed=11, items=items, n_users=1500)
    title = leave_last_out_recall(items, interactions, ("category", "material"))
    description = leave_last_out_recall(items, interactions, ("category", "pattern"))
    image = leave_last_out_recall(items, interactions, ("category", "colour", "pattern", "material"))
    assert image > description + 0.03
    assert description > title + 0.01


@pytest.mark.parametrize(
    ("arguments", "flag"),
    [
        ({"n_items": 0, "n_users": 5}, "--items"),
        ({"n_items": 5, "n_users": 0}, "--users"),
        ({"n_items": 5, "n_users": 5, "seed": -1}, "--seed"),
        ({"n_items": 5, "n_users": 5, "image_size": 8}, "image_size"),
        ({"n_items": 5, "n_users": 5, "min_history": 10, "max_history": 4}, "max_history"),
    ],
)
def test_bad_arguments_are_errors_that_name_the_fix(tmp_path: Path, arguments: dict, flag: str) -> None:
    arguments = {"seed": 1, **arguments}
    with pytest.raises(ValueError, match=re.escape(flag)):
        generate(tmp_path, **arguments)


def test_output_path_that_is_a_file_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "taken"
    target.write_text("not a folder")
    with pytest.raises(NotADirectoryError, match="taken"):
        generate(target, seed=1, n_items=5, n_users=2)


def test_tiny_catalog_caps_histories_at_the_number_of_items(tmp_path: Path) -> None:
    counts = generate(tmp_path, seed=2, n_items=3, n_users=4, image_size=32)
    _, rows = read_csv(tmp_path / "interactions.csv")
    assert counts["interactions"] == len(rows) == 4 * 3


def test_cli_writes_the_dataset_and_prints_one_summary_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cli"
    code = synth_job.main(
        ["--seed", "9", "--items", "12", "--users", "6", "--out", str(out), "--image-size", "48"]
    )
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("synth: wrote 12 items, 12 images, 6 users")
    assert json.loads((out / "manifest.json").read_text())["parameters"]["seed"] == 9
    assert synth_job.main(["--items", "0", "--out", str(tmp_path / "bad")]) == 2
    assert "--items" in capsys.readouterr().err
