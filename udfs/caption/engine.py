"""The caption engine interface, the engine registry, and batch failure isolation.

An engine turns a list of RGB images into one ``Caption`` per image, in order. Four engines:

- ``tags``: EfficientNet-Lite0 ImageNet labels + dominant colour names (CPU, offline, CI);
- ``hf``: any transformers image-text-to-text model (LLaVA and friends), one GPU or the CPU;
- ``vllm``: vLLM, for production throughput (see ``vllm_engine`` for the Ray Data path);
- ``openai``: any OpenAI-compatible vision server over HTTP (``openai_engine``).

``make_engine`` imports an engine's module only when it is asked for, so that a CPU-only
install never imports vLLM and ``tags`` never imports transformers.

``describe_isolated`` wraps ``engine.describe`` so that one bad image never costs its batch:
a failed batch is retried once (transient errors), then split in halves recursively until the
failing items stand alone; an out-of-memory error halves the batch straight away. An engine
whose requests are per image already (``isolates_failures``, the ``openai`` engine) returns one
result per image from ``describe_each`` instead: nothing is sent twice.
"""
from __future__ import annotations

import abc
import gc
import logging
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

from udfs.caption.kinds import engine_kind, imported
from udfs.caption.prompts import DEFAULT_PROMPT, prompt_id

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Caption:
    """One image description; ``n_tokens`` is the engine's own length unit (generated tokens
    for the VLM engines, words for ``tags``; ``None`` when a server reports no usage).
    ``prompt_tokens`` (servers that report it) and ``retries`` (the fault kinds of the requests
    that failed before this one succeeded) feed the job's cost and fault counts."""

    text: str
    n_tokens: int | None
    prompt_tokens: int | None = None
    retries: tuple[str, ...] = ()


class CaptionEngineError(RuntimeError):
    """An engine broke its contract (e.g. returned a different number of captions)."""


class CaptionEngine(abc.ABC):
    """Base of all engines. ``name``/``model``/``prompt_id`` form the ``descriptions`` key
    together with the image hash, so they must change whenever the output would."""

    name: str = ""
    # True when ``describe_each`` already isolates failures per image (see the module docstring).
    isolates_failures: bool = False

    def __init__(
        self,
        model: str,
        prompt: str = DEFAULT_PROMPT,
        batch_size: int = 8,
        max_new_tokens: int = 128,
    ):
        if batch_size < 1:
            raise ValueError(f"caption engine {self.name!r}: batch_size must be >= 1, got {batch_size}")
        if max_new_tokens < 1:
            raise ValueError(f"caption engine {self.name!r}: max_new_tokens must be >= 1, got {max_new_tokens}")
        self.model = model
        self.prompt = prompt
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens

    @property
    def prompt_id(self) -> str:
        return prompt_id(self.prompt)

    @abc.abstractmethod
    def describe(self, images: Sequence[Image.Image]) -> list[Caption]:
        """One caption per image, in input order; may raise for the whole batch."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model={self.model!r}, prompt_id={self.prompt_id!r}, batch_size={self.batch_size})"


def engine_identity(name: str, model: str | None, prompt: str,
                    options: Mapping[str, Any] | None = None) -> tuple[str, str]:
    """``(prompt, prompt_id)`` that engine ``name`` records for these settings, without building
    it (``udfs.caption.kinds``: ``tags`` renders its recipe from its options; the VLM engines
    record the configured prompt). Options the engine would refuse raise ``ValueError``."""
    kind = engine_kind(name)
    return kind.identity(model or kind.default_model, prompt, options)


def make_engine(
    name: str,
    model: str | None = None,
    prompt: str = DEFAULT_PROMPT,
    batch_size: int = 8,
    max_new_tokens: int = 128,
    options: Mapping[str, Any] | None = None,
) -> CaptionEngine:
    """Build the engine registered as ``name`` ("tags", "hf", "vllm", "openai"); ``model=None`` takes the
    engine's default model; ``options`` are engine-specific (each kind's ``options`` dataclass)."""
    kind = engine_kind(name)
    return imported(kind.implementation)(
        model=model or kind.default_model,
        prompt=prompt,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        options=options,
    )


def is_out_of_memory(error: BaseException) -> bool:
    """True for CUDA/CPU out-of-memory errors (``torch.OutOfMemoryError``, ``MemoryError``, or a
    ``RuntimeError`` whose message says 'out of memory'), which a smaller batch may avoid."""
    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def _release_memory() -> None:
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _one_each(engine: CaptionEngine, results: Sequence[Any], images: Sequence[Image.Image], what: str) -> list:
    """``results`` as a list, checked to hold one entry per image."""
    if len(results) != len(images):
        raise CaptionEngineError(
            f"caption engine {engine.name!r} returned {len(results)} {what} for {len(images)} images")
    return list(results)


def describe_isolated(
    engine: CaptionEngine, images: Sequence[Image.Image]
) -> list[Caption | Exception]:
    """``engine.describe`` with failures isolated per image: the result has one entry per image,
    in order, either its ``Caption`` or the exception that the image alone raised.

    On an error the batch is retried once, then split in halves recursively; an out-of-memory
    error halves the batch without a retry. A batch of n images with one bad image costs about
    2 + 2*log2(n) engine calls.
    """
    if engine.isolates_failures:
        return _one_each(engine, list(engine.describe_each(images)), images, "results")  # type: ignore[attr-defined]
    results: list[Caption | Exception | None] = [None] * len(images)
    _describe_span(engine, list(images), list(range(len(images))), results, retry=True)
    return results  # type: ignore[return-value]


def _describe_span(
    engine: CaptionEngine,
    images: list[Image.Image],
    span: list[int],
    results: list[Caption | Exception | None],
    retry: bool,
) -> None:
    if not span:
        return
    try:
        batch = [images[i] for i in span]
        captions = _one_each(engine, engine.describe(batch), batch, "captions")
    except Exception as error:  # noqa: BLE001 - isolated per image, returned to the caller
        out_of_memory = is_out_of_memory(error)
        if out_of_memory:
            _release_memory()
        # A smaller batch may avoid running out of memory: no retry of the same one.
        if retry and not out_of_memory:
            log.warning("caption engine %s: batch of %d failed (%s), retrying once", engine.name, len(span), error)
            _describe_span(engine, images, span, results, retry=False)
        elif len(span) == 1:
            if out_of_memory:
                log.warning("caption engine %s: out of memory on a single image: %s", engine.name, error)
            else:
                log.warning("caption engine %s: image %d failed: %r", engine.name, span[0], error)
            results[span[0]] = error
        else:
            if out_of_memory:
                log.warning("caption engine %s: out of memory on %d images, halving the batch", engine.name, len(span))
            half = len(span) // 2
            _describe_span(engine, images, span[:half], results, retry=False)
            _describe_span(engine, images, span[half:], results, retry=False)
        return
    for i, caption in zip(span, captions):
        results[i] = caption
