"""The engine registry and failure isolation: the real ``tags`` engine fed a broken image, and small
failing engines defined here (test doubles of a model, not of our code)."""
from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch

from udfs.caption import (
    Caption,
    CaptionEngine,
    CaptionEngineError,
    describe_isolated,
    is_out_of_memory,
    make_engine,
    prompt_id,
)


class RecordingEngine(CaptionEngine):
    """Describes integers as 'item N'; subclasses decide when to fail. Records batch sizes."""

    name = "recording"

    def __init__(self):
        super().__init__(model="double", prompt="p", batch_size=64, max_new_tokens=8)
        self.batches: list[int] = []

    def fail(self, images: Sequence) -> None:
        pass

    def describe(self, images: Sequence) -> list[Caption]:
        self.batches.append(len(images))
        self.fail(images)
        return [Caption(text=f"item {x}", n_tokens=2) for x in images]


class PoisonEngine(RecordingEngine):
    def fail(self, images):
        if any(x < 0 for x in images):
            raise ValueError("cannot describe a negative item")


class FlakyEngine(RecordingEngine):
    def fail(self, images):
        if len(self.batches) == 1:
            raise ConnectionError("transient")


class OutOfMemoryEngine(RecordingEngine):
    def __init__(self, fits: int, error: Exception):
        super().__init__()
        self.fits, self.error = fits, error

    def fail(self, images):
        if len(images) > self.fits:
            raise self.error


class ShortEngine(RecordingEngine):
    def describe(self, images):
        return super().describe(images)[:-1]


def test_clean_batch_is_one_call_in_order():
    engine = PoisonEngine()
    results = describe_isolated(engine, [3, 1, 2])
    assert [r.text for r in results] == ["item 3", "item 1", "item 2"]
    assert engine.batches == [3]


def test_one_bad_item_fails_alone_after_one_retry_and_halving():
    engine = PoisonEngine()
    items = [0, 1, 2, -3, 4, 5, 6, 7]
    results = describe_isolated(engine, items)
    assert isinstance(results[3], ValueError)
    assert [r.text for i, r in enumerate(results) if i != 3] == [f"item {x}" for x in items if x >= 0]
    # 8 fails, 8 retried fails; [0..-3] fails -> [0, 1] ok, [2, -3] fails -> [2] ok, [-3] fails; [4..7] ok
    assert engine.batches == [8, 8, 4, 2, 2, 1, 1, 4]


def test_two_bad_items_are_both_isolated():
    results = describe_isolated(PoisonEngine(), [-1, 2, 3, -4, 5])
    assert [type(r).__name__ for r in results] == ["ValueError", "Caption", "Caption", "ValueError", "Caption"]


def test_transient_failure_is_retried_once():
    engine = FlakyEngine()
    results = describe_isolated(engine, [1, 2, 3, 4])
    assert all(isinstance(r, Caption) for r in results)
    assert engine.batches == [4, 4]


@pytest.mark.parametrize(
    "error",
    [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
     RuntimeError("CUDA error: out of memory"),
     MemoryError()],
)
def test_out_of_memory_halves_the_batch_without_retrying(error):
    engine = OutOfMemoryEngine(fits=2, error=error)
    results = describe_isolated(engine, list(range(8)))
    assert [r.text for r in results] == [f"item {i}" for i in range(8)]
    assert engine.batches == [8, 4, 2, 2, 4, 2, 2]


def test_out_of_memory_on_a_single_image_is_that_images_error():
    error = torch.OutOfMemoryError("CUDA out of memory")
    results = describe_isolated(OutOfMemoryEngine(fits=0, error=error), [1, 2])
    assert results == [error, error]


def test_wrong_caption_count_is_an_engine_error():
    results = describe_isolated(ShortEngine(), [1, 2])
    assert all(isinstance(r, CaptionEngineError) for r in results)
    assert "returned 0 captions for 1 images" in str(results[0])


def test_is_out_of_memory():
    assert is_out_of_memory(torch.OutOfMemoryError("x"))
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: not enough memory: you tried... out of memory"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(ValueError("out of memory"))


def test_empty_input_is_no_call():
    engine = PoisonEngine()
    assert describe_isolated(engine, []) == [] and engine.batches == []


# The real tags engine (what every engine must do: test_engine_contract.py) -----------------------


@pytest.fixture(scope="module")
def tags():
    return make_engine("tags", batch_size=4)


def test_registry_builds_the_tags_engine_with_its_key(tags):
    assert tags.name == "tags" and tags.model == "efficientnet-lite0"
    assert tags.prompt_id == prompt_id(tags.prompt)
    other = make_engine("tags", options={"top_k": 1})
    assert other.prompt_id != tags.prompt_id


def test_registry_errors_name_the_fix():
    with pytest.raises(ValueError, match=r"unknown caption engine 'llava'.*\['hf', 'openai', 'tags', 'vllm'\]"):
        make_engine("llava")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['topk'\]"):
        make_engine("tags", options={"topk": 2})
    with pytest.raises(ValueError, match="runs only 'efficientnet-lite0'"):
        make_engine("tags", model="resnet50")
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        make_engine("tags", batch_size=0)
