"""Caption fixtures: the tiny LLaVA folder (built once per session) and real posters."""
from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from tests.udfs.caption.tiny_llava import build_tiny_llava
from udfs.io.images import load_image


@pytest.fixture(scope="package", autouse=True)
def one_torch_thread():
    """Tiny models on a shared 2-core machine: thread hand-offs cost more than the arithmetic
    (measured 10x slower with 2 threads under load). The caller owns the setting, so restore it."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory) -> Path:
    return build_tiny_llava(tmp_path_factory.mktemp("tiny-llava"))


@pytest.fixture(scope="session")
def posters(ml100k) -> list[Image.Image]:
    return [load_image(ml100k / "posters" / f"{i}.jpg") for i in (1, 2, 50, 98, 181)]
