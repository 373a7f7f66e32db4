"""What every text and image encoder must do, one suite run against each (in the manner of
LensKit's shared component tests): vectors of the declared dimension, float32 and unit norm,
one row per input in input order whatever the batching, and an empty input gives an empty
(0, dim) array. An encoder added later joins by adding one ``Encoder`` below."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from collections.abc import Callable, Sequence  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from udfs.encode import image_encoder, text_encoder# noqa: E402
from udfs.encode.image_encoder import EFFICIENTNET_LITE0, LITE0_FEATURE_DIM, encode_images  # noqa: E402
from udfs.encode.text_encoder import DEFAULT_TEXT_ENCODER, embedding_dim, encode_texts, load_text_encoder  # noqa: E402


@dataclass
class Encoder:
    name: str
    declared_dim: Callable[[], int]
    encode: Callable[[Sequence[Any], int], np.ndarray]  # (inputs, batch_size) -> (n, dim)
    inputs: Callable[[], list[Any]]  # distinct inputs of varied shape or length


def _texts() -> list[str]:
    return ["shoe", "a long flowing evening gown in deep crimson silk with lace sleeves and a low back",
            "steel claw hammer with a rubber grip", "blue denim jacket", "wool scarf",
            "a compact cordless drill with two batteries and a carrying case"]


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(7)
    sizes = [(40, 60), (90, 30), (64, 64), (120, 80), (33, 47)]
    noise = [Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)) for w, h in sizes]
    return noise + [Image.new("RGB", (50, 50), (220, 20, 20))]


def _encode_texts(texts: Sequence[str], batch_size: int) -> np.ndarray:
    vectors, valid = encode_texts(texts, DEFAULT_TEXT_ENCODER, batch_size=batch_size, device="cpu")
    assert valid.all()
    return vectors


ENCODERS = {
    DEFAULT_TEXT_ENCODER: Encoder(
        DEFAULT_TEXT_ENCODER, lambda: embedding_dim(load_text_encoder(DEFAULT_TEXT_ENCODER, "cpu")),
        _encode_texts, _texts),
    EFFICIENTNET_LITE0: Encoder(
        EFFICIENTNET_LITE0, lambda: LITE0_FEATURE_DIM,
        lambda images, batch_size: encode_images(images, batch_size, EFFICIENTNET_LITE0), _images),
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(params=sorted(ENCODERS), scope="module")
def encoder(request) -> Encoder:
    return ENCODERS[request.param]


def test_vectors_have_the_declared_dimension_are_float32_and_unit_norm(encoder):
    vectors = encoder.encode(encoder.inputs(), 4)
    assert vectors.shape == (len(encoder.inputs()), encoder.declared_dim())
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_batches_keep_input_order_and_equal_one_at_a_time(encoder):
    inputs = encoder.inputs()
    order = np.random.default_rng(3).permutation(len(inputs))
    shuffled = [inputs[i] for i in order]
    batched = encoder.encode(shuffled, 4)  # batches of 4 and 2: a boundary inside the input
    alone = np.stack([encoder.encode([x], 1)[0] for x in shuffled])
    np.testing.assert_allclose(batched, alone, atol=1e-4)
    # Rows are not interchangeable, so a misplaced row would fail the comparison above.
    assert np.abs(batched @ batched.T - np.eye(len(inputs))).max() > 0.05


def test_empty_input_is_an_empty_array_of_the_declared_dimension(encoder):
    vectors = encoder.encode([], 4)
    assert vectors.shape == (0, encoder.declared_dim())


# The module of each encoder, whose ``encoder_record`` the embed job stores beside the vectors.
RECORDS = {DEFAULT_TEXT_ENCODER: ("text_encoder", text_encoder.encoder_record),
           EFFICIENTNET_LITE0: ("image_encoder", image_encoder.encoder_record)}


def test_the_record_names_the_encoder_its_libraries_and_its_declared_dimension(encoder):
    kind, record_of = RECORDS[encoder.name]
    dim, record = record_of(encoder.name)
    assert dim == encoder.declared_dim()
    assert record.split(",")[0] == f"{kind}:{encoder.name}" and "torch:" in record


def test_an_unknown_image_encoder_is_refused_naming_the_known_ones():
    with pytest.raises(ValueError, match=r"'clip'.*efficientnet-lite0"):
        image_encoder.encoder_record("clip")

