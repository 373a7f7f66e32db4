"""The ``tags`` engine on the real EfficientNet-Lite0 weights: labels, colours, sentences."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from udfs.caption import Caption, make_engine
from udfs.caption.tags_engine import (
    colour_palette,
    dominant_colours,
    imagenet_classes,
    render_sentence,
    srgb_to_lab,
)


@pytest.fixture(scope="module")
def tags():
    return make_engine("tags", batch_size=3)


def test_imagenet_classes_are_the_1000_in_index_order():
    names = imagenet_classes()
    assert len(names) == 1000 and len(set(names)) == 1000
    expected = {0: "tench", 1: "goldfish", 207: "golden retriever", 281: "tabby cat",
                409: "analog clock", 817: "sports car", 999: "toilet tissue"}
    assert {i: names[i] for i in expected} == expected


def test_palette_has_the_basic_names_and_lab_is_right():
    names, lab = colour_palette()
    assert 20 <= len(names) <= 30 and lab.shape == (len(names), 3)
    assert {"black", "white", "red", "blue", "green", "dark grey"} <= set(names)
    np.testing.assert_allclose(srgb_to_lab(np.array([255, 255, 255])), [100, 0, 0], atol=0.01)
    np.testing.assert_allclose(srgb_to_lab(np.array([255, 0, 0])), [53.24, 80.09, 67.20], atol=0.05)


@pytest.mark.parametrize(
    "rgb, name",
    [((255, 0, 0), "red"), ((0, 0, 255), "blue"), ((0, 0, 0), "black"), ((255, 255, 255), "white"),
     ((0, 140, 40), "green"), ((20, 25, 80), "navy"), ((250, 230, 30), "yellow")],
)
def test_a_flat_image_is_named_by_its_colour(rgb, name):
    assert dominant_colours(Image.new("RGB", (50, 40), rgb)) == [(name, 1.0)]


def test_shares_order_and_threshold():
    img = Image.new("RGB", (100, 100), (255, 255, 255))
    img.paste((20, 25, 80), (0, 0, 100, 60))  # 60% navy
    img.paste((205, 30, 35), (0, 60, 100, 70))  # 10% red, under the 15% threshold
    colours = dominant_colours(img)
    assert [name for name, _ in colours] == ["navy", "white"]
    assert colours[0][1] == pytest.approx(0.6, abs=0.03)
    assert [name for name, _ in dominant_colours(img, min_share=0.05)] == ["navy", "white", "red"]
    assert [name for name, _ in dominant_colours(img, max_colours=1)] == ["navy"]


def test_sentence_rendering():
    assert render_sentence(["cardigan", "sweatshirt"], ["dark grey", "white"]) == (
        "a cardigan (or sweatshirt) in dark grey and white"
    )
    assert render_sentence(["umbrella"], ["black", "red", "white"]) == "an umbrella in black, red and white"
    assert render_sentence(["comic book"], []) == "a comic book"


def test_red_square_gets_red(tags):
    (caption,) = tags.describe([Image.new("RGB", (64, 64), (255, 0, 0))])
    assert caption.text.endswith(" in red")
    assert caption.n_tokens == len(caption.text.split())


@pytest.mark.realdata
def test_real_posters_get_imagenet_labels_and_colours(tags, posters):
    captions = tags.describe(posters)
    assert len(captions) == len(posters) and all(isinstance(c, Caption) for c in captions)
    names = set(imagenet_classes())
    colours = set(colour_palette()[0])
    for caption in captions:
        label_part, _, colour_part = caption.text.partition(" in ")
        top1 = label_part.split(" (or ")[0].split(" ", 1)[1]
        assert top1 in names
        assert set(colour_part.replace(" and ", ", ").split(", ")) <= colours
    assert len({c.text for c in captions}) > 1
    # Batching does not change a caption.
    assert tags.describe([posters[3]]) == [captions[3]]


@pytest.mark.realdata
def test_options_shape_the_sentence(posters):
    top1_only = make_engine("tags", options={"top_k": 1, "colours": 0})
    (caption,) = top1_only.describe(posters[:1])
    assert " (or " not in caption.text and " in " not in caption.text
    assert caption.text.split(" ", 1)[1] in imagenet_classes()
