"""Synthetic catalog with a known answer: the zero-download demo data and the fast test data.

Every item has four latent attributes (category, colour, pattern, material). They are split
across the modalities on purpose, so that the representations the project compares see
different things:

=========  =======  ===========  =====================================
attribute  title    description  image
=========  =======  ===========  =====================================
category   yes      yes          silhouette
material   yes      no           texture (twill, grain, sheen, noise)
pattern    no       yes          stripes, dots, checks or none
colour     no       no           fill colour (the dominant non-white)
=========  =======  ===========  =====================================

Users prefer one category, one colour and one pattern (colour as strongly as category), so a
representation grounded in the image should beat the description, which should beat the title.
Same seed and parameters give byte-identical files.

Output layout under ``out_dir`` (the contract with the ``csv`` dataset adapter):
``items.csv`` (item_id, title, description, image_path, category, colour, pattern, material),
``interactions.csv`` (user_id, item_id, rating, timestamp), ``images/<item_id>.png``,
``README.md`` and ``manifest.json``. Backgrounds are pure white (255, 255, 255), as in
catalog photos: a dominant-colour namer should skip near-white pixels.
"""
from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1
ITEM_COLUMNS: tuple[str, ...] = (
    "item_id", "title", "description", "image_path", "category", "colour", "pattern", "material",
)
INTERACTION_COLUMNS: tuple[str, ...] = ("user_id", "item_id", "rating", "timestamp")

CATEGORIES: tuple[str, ...] = ("shirt", "dress", "trousers", "skirt", "shoe", "bag", "hat", "scarf")
# Fill colours sit near the centre of each colour name so that a nearest-name lookup agrees.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (200, 30, 35),
    "orange": (240, 130, 20),
    "yellow": (240, 210, 40),
    "green": (40, 150, 60),
    "blue": (35, 80, 200),
    "purple": (120, 50, 160),
    "pink": (240, 130, 180),
    "brown": (120, 70, 30),
    "black": (25, 25, 25),
    "grey": (130, 130, 130),
}
PATTERNS: tuple[str, ...] = ("solid", "striped", "dotted", "checked")
MATERIALS: tuple[str, ...] = ("cotton", "denim", "leather", "wool", "silk")

# Words that would leak a hidden attribute into a title; tests check titles against these.
PATTERN_WORDS: tuple[str, ...] = PATTERNS + ("stripe", "dot", "check", "plaid", "polka", "plain")

TITLE_STYLES: tuple[str, ...] = (
    "Classic", "Everyday", "Essential", "Modern", "Relaxed", "Tailored", "Vintage", "Urban",
)
PATTERN_PHRASES: dict[str, str] = {
    "solid": "a clean solid finish",
    "striped": "an even striped print",
    "dotted": "a playful dotted print",
    "checked": "a classic checked print",
}
OCCASIONS: tuple[str, ...] = (
    "weekend outings", "the office", "evenings out", "travel", "casual days", "special occasions",
)

# Latent preference weights (log-odds of choosing an item that matches the user's favourite).
CATEGORY_WEIGHT = 3.0
COLOUR_WEIGHT = 3.0
PATTERN_WEIGHT = 1.5

_BACKGROUND = 255
_OUTLINE = (50, 50, 50)
_BASE_TIMESTAMP = 1_609_459_200  # 2021-01-01T00:00:00Z
_YEAR_S = 365 * 24 * 3600
_MEAN_GAP_S = 2 * 24 * 3600

# Silhouettes as polygons on the unit square (x right, y down).
_POLYGONS: dict[str, list[tuple[float, float]]] = {
    "shirt": [
        (0.22, 0.20), (0.38, 0.14), (0.50, 0.24), (0.62, 0.14), (0.78, 0.20), (0.95, 0.42),
        (0.82, 0.50), (0.76, 0.40), (0.76, 0.90), (0.24, 0.90), (0.24, 0.40), (0.18, 0.50),
        (0.05, 0.42),
    ],
    "dress": [
        (0.36, 0.08), (0.42, 0.08), (0.50, 0.18), (0.58, 0.08), (0.64, 0.08), (0.66, 0.35),
        (0.60, 0.45), (0.86, 0.93), (0.14, 0.93), (0.40, 0.45), (0.34, 0.35),
    ],
    "trousers": [
        (0.28, 0.08), (0.72, 0.08), (0.82, 0.93), (0.57, 0.93), (0.50, 0.36), (0.43, 0.93),
        (0.18, 0.93),
    ],
    "skirt": [(0.32, 0.15), (0.68, 0.15), (0.90, 0.85), (0.10, 0.85)],
    "shoe": [(0.08, 0.36), (0.30, 0.36), (0.42, 0.52), (0.72, 0.55), (0.72, 0.82), (0.08, 0.82)],
    "bag": [(0.14, 0.38), (0.86, 0.38), (0.90, 0.90), (0.10, 0.90)],
    "hat": [(0.30, 0.62), (0.32, 0.24), (0.50, 0.18), (0.68, 0.24), (0.70, 0.62)],
    "scarf": [(0.08, 0.30), (0.30, 0.08), (0.92, 0.70), (0.70, 0.92)],
}


@dataclass(frozen=True)
class SynthItem:
    """One catalog item: its latent attributes and the texts that reveal part of them."""

    item_id: str
    category: str
    colour: str
    pattern: str
    material: str
    title: str
    description: str

    @property
    def image_path(self) -> str:
        return f"images/{self.item_id}.png"


def generate(
    out_dir: str | Path,
    seed: int,
    n_items: int,
    n_users: int,
    image_size: int = 128,
    min_history: int = 5,
    max_history: int = 40,
) -> dict[str, int]:
    """Write a synthetic catalog and interaction log under ``out_dir``; return the counts.

    History lengths are ``min_history`` plus a geometric draw (about 7 more on average), capped at
    ``max_history`` and at ``n_items`` (a user never sees an item twice).
    """
    for name, value, least, fix in (
        ("seed", seed, 0, "pass --seed a non-negative integer"),
        ("n_items", n_items, 1, "pass --items a positive count"),
        ("n_users", n_users, 1, "pass --users a positive count"),
        ("image_size", image_size, 32, "96 or 128 is typical"),
    ):
        if value < least:
            raise ValueError(f"{name} must be >= {least}{' pixels' if name == 'image_size' else ''} "
                             f"(got {value}): {fix}")
    if not 1 <= min_history <= max_history:
        raise ValueError(
            f"history lengths need 1 <= min_history <= max_history "
            f"(got {min_history} and {max_history})"
        )
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(
            f"synthetic output '{out}' is a file: pass --out a folder path (it is created if missing)"
        )
    images_dir = out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)

    items = make_items(seed, n_items)
    interactions = make_interactions(seed, items, n_users, min_history, max_history)

    for index, item in enumerate(items):
        render_item_image(item, image_size, _stream(seed, 3, index)).save(
            out / item.image_path, format="PNG", compress_level=6)
    # Item images left by an earlier, larger run go, so a rerun leaves exactly one run's files.
    keep = {Path(item.image_path).name for item in items}
    stale = [path for path in sorted(images_dir.glob("i*.png")) if path.name not in keep]
    for path in stale:
        path.unlink()

    _write_csv(out / "items.csv", ITEM_COLUMNS, ([getattr(item, c) for c in ITEM_COLUMNS] for item in items))
    _write_csv(out / "interactions.csv", INTERACTION_COLUMNS, interactions)
    counts = {
        "items": len(items),
        "images": len(items),
        "users": n_users,
        "interactions": len(interactions),
    }
    parameters = {
        "seed": seed,
        "n_items": n_items,
        "n_users": n_users,
        "image_size": image_size,
        "min_history": min_history,
        "max_history": max_history,
    }
    _write_manifest(out / "manifest.json", parameters, counts)
    _write_readme(out / "README.md", parameters, counts)
    log.info(
        "synthetic data in %s: %d items, %d users, %d interactions (seed %d); %d stale images removed",
        out, counts["items"], n_users, counts["interactions"], seed, len(stale),
    )
    return counts


def make_items(seed: int, n_items: int) -> list[SynthItem]:
    """Draw the latent attributes of ``n_items`` items and write their titles and descriptions."""
    rng = _stream(seed, 0)
    width = max(5, len(str(n_items)))
    items = []
    for index in range(n_items):
        # One draw per attribute, in this order (the order fixes every item of a seed).
        category, colour, pattern, material, style, occasion = (
            options[rng.integers(len(options))]
            for options in (CATEGORIES, tuple(COLOURS), PATTERNS, MATERIALS, TITLE_STYLES, OCCASIONS)
        )
        items.append(
            SynthItem(
                item_id=f"i{index + 1:0{width}d}",
                category=category,
                colour=colour,
                pattern=pattern,
                material=material,
                title=f"{style} {material} {category}",
                description=(
                    f"A {category} in {PATTERN_PHRASES[pattern]}, cut for comfort and made "
                    f"for {occasion}."
                ),
            )
        )
    return items


def make_interactions(
    seed: int,
    items: list[SynthItem],
    n_users: int,
    min_history: int = 5,
    max_history: int = 40,
) -> list[tuple[str, str, int, int]]:
    """Rows ``(user_id, item_id, rating, timestamp)``: each user picks distinct items with
    probability proportional to popularity times exp(weighted matches with their favourites)."""
    popularity = _stream(seed, 1).lognormal(0.0, 0.5, size=len(items))
    rng = _stream(seed, 2)
    # Per attribute users have a favourite of: each item's value (an index) and how many values there are.
    attributes = [(np.array([options.index(getattr(item, name)) for item in items]), len(options))
                  for name, options in (("category", CATEGORIES), ("colour", list(COLOURS)), ("pattern", PATTERNS))]
    width = max(4, len(str(n_users)))
    rows: list[tuple[str, str, int, int]] = []
    for user in range(n_users):
        category_match, colour_match, pattern_match = (of == rng.integers(n) for of, n in attributes)
        affinity = CATEGORY_WEIGHT * category_match + COLOUR_WEIGHT * colour_match + PATTERN_WEIGHT * pattern_match
        weights = popularity * np.exp(affinity)
        length = min(len(items), max_history, min_history + int(rng.geometric(1 / 8)) - 1)
        chosen = rng.choice(len(items), size=length, replace=False, p=weights / weights.sum())
        gaps = 1 + np.floor(rng.exponential(_MEAN_GAP_S, size=length)).astype(np.int64)
        timestamps = _BASE_TIMESTAMP + int(rng.integers(_YEAR_S)) + np.cumsum(gaps)
        noise = rng.normal(0.0, 0.7, size=length)
        ratings = np.clip(
            np.rint(2.5 + category_match[chosen] + colour_match[chosen] + noise), 1, 5
        ).astype(int)
        rows.extend((f"u{user + 1:0{width}d}", items[i].item_id, int(rating), int(timestamp))
                    for i, rating, timestamp in zip(chosen, ratings, timestamps))
    return rows


def render_item_image(item: SynthItem, size: int, rng: np.random.Generator) -> Image.Image:
    """Draw the item's silhouette filled with its colour, pattern and material texture."""
    mask = _silhouette_mask(item.category, size, rng)
    base = np.array(COLOURS[item.colour], dtype=np.float32)
    jitter = rng.integers(-8, 9, size=3).astype(np.float32)
    fill = np.broadcast_to(base + jitter, (size, size, 3)).copy()
    fill = _apply_pattern(fill, item.pattern, base, rng)
    fill += _material_texture(item.material, size, rng)[:, :, None]
    pixels = np.full((size, size, 3), _BACKGROUND, dtype=np.uint8)
    inside = np.asarray(mask) > 0
    pixels[inside] = np.clip(np.rint(fill[inside]), 0, 255).astype(np.uint8)
    edges = np.asarray(mask.filter(ImageFilter.FIND_EDGES)) > 0
    pixels[edges & inside] = _OUTLINE
    return Image.fromarray(pixels, mode="RGB")


def _silhouette_mask(category: str, size: int, rng: np.random.Generator) -> Image.Image:
    scale = rng.uniform(0.85, 1.0)
    shift = rng.uniform(-0.04, 0.04, size=2)

    def place(x: float, y: float) -> tuple[float, float]:
        return (
            ((x - 0.5) * scale + 0.5 + shift[0]) * (size - 1),
            ((y - 0.5) * scale + 0.5 + shift[1]) * (size - 1),
        )

    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    draw.polygon([place(x, y) for x, y in _POLYGONS[category]], fill=255)
    if category == "hat":
        draw.ellipse([place(0.05, 0.56), place(0.95, 0.80)], fill=255)
    elif category == "bag":
        handle = max(2, round(0.06 * size * scale))
        draw.arc([place(0.30, 0.12), place(0.70, 0.64)], 180, 360, fill=255, width=handle)
    elif category == "shoe":
        draw.ellipse([place(0.52, 0.52), place(0.95, 0.82)], fill=255)
    elif category == "scarf":
        # Fringes on both short ends, drawn outward along the scarf's long axis.
        stroke = max(1, round(0.015 * size))
        for k in range(6):
            t = (k + 0.5) / 6
            for x, y, out in ((0.08 + 0.22 * t, 0.30 - 0.22 * t, -0.06), (0.70 + 0.22 * t, 0.92 - 0.22 * t, 0.06)):
                draw.line([place(x, y), place(x + out, y + out)], fill=255, width=stroke)
    elif category == "skirt":
        draw.rectangle([place(0.30, 0.10), place(0.70, 0.17)], fill=255)
    return mask


def _apply_pattern(
    fill: np.ndarray, pattern: str, base: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    if pattern == "solid":
        return fill
    size = fill.shape[0]
    # The print is a lighter or darker tone of the same hue and covers about a third of the
    # area, so that the fill colour stays the dominant one.
    luminance = float(base @ np.array([0.299, 0.587, 0.114], dtype=np.float32))
    target = 0.0 if luminance > 140 else 255.0
    ink = base + 0.45 * (target - base)
    period = max(6, size // 8)
    offset = rng.integers(period, size=2)
    yy, xx = np.mgrid[0:size, 0:size]
    ys = (yy + offset[0]) % period
    xs = (xx + offset[1]) % period
    if pattern == "striped":
        marked = ys < max(2, round(period * 0.33))
    elif pattern == "dotted":
        centre = (period - 1) / 2
        radius = period * 0.26
        marked = (ys - centre) ** 2 + (xs - centre) ** 2 <= radius**2
    elif pattern == "checked":
        line = max(1, round(period * 0.18))
        marked = (ys < line) | (xs < line)
    else:
        raise ValueError(f"unknown pattern '{pattern}': use one of {', '.join(PATTERNS)}")
    fill[marked] = ink
    return fill


def _material_texture(material: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A grey-level offset per pixel that hints at the material."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    if material == "cotton":
        return rng.normal(0.0, 5.0, size=(size, size)).astype(np.float32)
    if material == "denim":
        twill = np.where((xx + yy) % 4 < 1, -22.0, 0.0).astype(np.float32)
        return twill + rng.normal(0.0, 4.0, size=(size, size)).astype(np.float32)
    if material == "leather":
        gradient = 18.0 * (1.0 - yy / size)
        grain = np.where(rng.random((size, size)) < 0.06, -14.0, 0.0)
        return (gradient + grain).astype(np.float32)
    if material == "wool":
        cells = max(2, size // 8)
        coarse = rng.normal(0.0, 14.0, size=(cells, cells)).astype(np.float32)
        blotches = np.asarray(
            Image.fromarray(coarse, mode="F").resize((size, size), Image.Resampling.BILINEAR)
        )
        return blotches + rng.normal(0.0, 6.0, size=(size, size)).astype(np.float32)
    if material == "silk":
        centre = rng.uniform(-0.2, 0.2) * size
        band = (xx - yy - centre) / (0.15 * size)
        return (35.0 * np.exp(-(band**2))).astype(np.float32)
    raise ValueError(f"unknown material '{material}': use one of {', '.join(MATERIALS)}")


def _stream(seed: int, stream: int, index: int = 0) -> np.random.Generator:
    """An independent random stream per purpose (and per image), so that changing one part of
    the generator, or the order images are drawn in, does not shift the others."""
    return np.random.default_rng(np.random.SeedSequence([seed, stream, index]))


def _write_csv(path: Path, columns: tuple[str, ...], rows) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows(rows)


def _write_manifest(path: Path, parameters: dict[str, int], counts: dict[str, int]) -> None:
    manifest = {
        "generator": "vlm4rec.udfs.synth",
        "generator_version": GENERATOR_VERSION,
        "parameters": parameters,
        "counts": counts,
        "attributes": {
            "category": list(CATEGORIES),
            "colour": list(COLOURS),
            "pattern": list(PATTERNS),
            "material": list(MATERIALS),
        },
        "visible_in": {
            "title": ["category", "material"],
            "description": ["category", "pattern"],
            "image": ["category", "colour", "pattern", "material"],
        },
        "preference_weights": {
            "category": CATEGORY_WEIGHT,
            "colour": COLOUR_WEIGHT,
            "pattern": PATTERN_WEIGHT,
        },
    }
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _write_readme(path: Path, parameters: dict[str, int], counts: dict[str, int]) -> None:
    lines = [
        "# Synthetic vlm4rec dataset",
        "",
        "Generated by `vlm4rec synth` (`udfs/synth.py`). Every item, image and user is synthetic:",
        "no real products or people are described.",
        "",
        "## Parameters",
        "",
        *(f"- {key}: {value}" for key, value in parameters.items()),
        "",
        "## Counts",
        "",
        *(f"- {key}: {value}" for key, value in counts.items()),
        "",
        "## What each modality reveals",
        "",
        "- title: category and material (never colour or pattern)",
        "- description: category and pattern (never colour or material)",
        "- image: all four; colour is the fill, pattern the print, material a texture",
        "",
        "Users prefer one category, one colour and one pattern, so a representation that sees",
        "the image should beat the description, and the description should beat the title.",
        "The same seed and parameters give byte-identical files.",
        "",
    ]
    path.write_text("\n".join(lines), encoding="utf-8")
