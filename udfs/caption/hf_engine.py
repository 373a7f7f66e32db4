"""The ``hf`` caption engine: any transformers image-text-to-text model, batched ``generate``.

Loads ``AutoProcessor`` + ``AutoModelForImageTextToText`` (``LlavaForConditionalGeneration``
for a checkpoint the auto class does not map) from a hub id or a local folder. With
``HF_HUB_OFFLINE=1`` (or ``options={"local_files_only": True}``) nothing is downloaded: a hub id
must already be in the local cache, or ``model`` must be a folder written by
``save_pretrained`` / ``huggingface-cli download --local-dir``.

Per batch: the prompt goes through the processor's chat template with one image slot, inputs
are left-padded (a decoder-only model continues from the last position, so padding must sit on
the left), ``generate`` runs greedy by default, and only the new tokens are decoded. Batches are
formed after sorting by prompt length and image aspect ratio (LLaVA-NeXT's image-token count
depends on the aspect ratio) so that little padding is computed, then results are put back in
input order. bf16 on a GPU, float32 on the CPU.

Options (``make_engine("hf", ..., options={...})``):
- ``device``: "auto" (cuda if available), "cpu", "cuda", "cuda:1", ...
- ``dtype``: "auto", "bfloat16", "float16", "float32";
- ``min_new_tokens``: force at least this many new tokens (benchmarks measure a fixed length);
- ``static_cache``: ``cache_implementation="static"`` (GPU: lets ``torch.compile`` reuse one graph);
- ``do_sample``, ``temperature``, ``top_p``: sampling instead of greedy (captions are cached by
  image, model and prompt, so sampled text is not reproducible);
- ``local_files_only``: overrides ``HF_HUB_OFFLINE``;
- ``attn_implementation``: e.g. "sdpa", "flash_attention_2";
- ``trust_remote_code``: for checkpoints with custom code.
"""
from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from PIL import Image

from udfs.caption.engine import Caption, CaptionEngine
from udfs.caption.kinds import KINDS
from udfs.caption.prompts import DEFAULT_PROMPT
from udfs.io.images import to_rgb

log = logging.getLogger(__name__)

KIND = KINDS["hf"]
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# LLaVA-1.5's conversation format, for a processor saved without a chat template.
FALLBACK_TEMPLATE = "USER: {image}\n{prompt} ASSISTANT:"


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` asks for no network access."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"caption engine 'hf': dtype must be 'auto' or one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


def _dtype_kwarg() -> str:
    """transformers renamed ``torch_dtype`` to ``dtype`` in 4.56."""
    import transformers

    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def load_model_and_processor(
    model: str,
    device: torch.device,
    dtype: torch.dtype,
    local_files_only: bool,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
) -> tuple[Any, Any]:
    """``(model, processor)`` from a hub id or a local folder; errors say how to get the files."""
    from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration

    common: dict[str, Any] = {"local_files_only": local_files_only, "trust_remote_code": trust_remote_code}
    try:
        processor = AutoProcessor.from_pretrained(model, **common)
    except OSError as e:
        where = "a local folder or the local Hugging Face cache" if local_files_only else "the hub"
        raise OSError(
            f"caption engine 'hf': model {model!r} could not be loaded from {where} ({e}). "
            "Download it where the hub is reachable (`huggingface-cli download "
            f"{model} --local-dir DIR`) and pass model=DIR, or unset HF_HUB_OFFLINE"
        ) from e
    model_kwargs: dict[str, Any] = {**common, _dtype_kwarg(): dtype}
    if attn_implementation:
        model_kwargs["attn_implementation"] = attn_implementation
    try:
        network = AutoModelForImageTextToText.from_pretrained(model, **model_kwargs)
    except ValueError as e:
        log.info("AutoModelForImageTextToText does not map %s (%s); loading it as LLaVA", model, e)
        network = LlavaForConditionalGeneration.from_pretrained(model, **model_kwargs)
    network.to(device).eval()
    return network, processor


class HFEngine(CaptionEngine):
    """Batched transformers ``generate`` over one image-text-to-text model."""

    name = "hf"

    def __init__(
        self,
        model: str,
        prompt: str = DEFAULT_PROMPT,
        batch_size: int = 8,
        max_new_tokens: int = 128,
        options: Mapping[str, Any] | None = None,
    ):
        super().__init__(model=model, prompt=prompt, batch_size=batch_size, max_new_tokens=max_new_tokens)
        self._configure(options)
        o = self.options
        local_only = hub_offline() if o["local_files_only"] is None else bool(o["local_files_only"])
        network, processor = load_model_and_processor(
            model, self.device, self.dtype, local_only, o["attn_implementation"], bool(o["trust_remote_code"])
        )
        self._attach(network, processor)

    @classmethod
    def from_model(
        cls,
        network: Any,
        processor: Any,
        model: str,
        prompt: str = DEFAULT_PROMPT,
        batch_size: int = 8,
        max_new_tokens: int = 128,
        options: Mapping[str, Any] | None = None,
    ) -> "HFEngine":
        """An engine over a model and processor already in memory (benchmarks with random
        weights built from a config, notebooks); ``model`` is the name recorded in
        ``descriptions``. The network is moved to the options' device and dtype."""
        engine = cls.__new__(cls)
        CaptionEngine.__init__(engine, model=model, prompt=prompt, batch_size=batch_size, max_new_tokens=max_new_tokens)
        engine._configure(options)
        engine._attach(network.to(engine.device, engine.dtype).eval(), processor)
        return engine

    def _configure(self, options: Mapping[str, Any] | None) -> None:
        o = self.options = KIND.checked_options(options)
        if o["min_new_tokens"] is not None and not 0 <= int(o["min_new_tokens"]) <= self.max_new_tokens:
            raise ValueError(
                f"caption engine 'hf': min_new_tokens={o['min_new_tokens']} must be in "
                f"0..max_new_tokens={self.max_new_tokens}"
            )
        self.device = _resolve_device(str(o["device"]))
        self.dtype = _resolve_dtype(str(o["dtype"]), self.device)

    def _attach(self, network: Any, processor: Any) -> None:
        self.network, self.processor = network, processor
        self.tokenizer = self.processor.tokenizer
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        eos = self.network.generation_config.eos_token_id
        eos = self.tokenizer.eos_token_id if eos is None else eos
        self._eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}

    def render_prompt(self, prompt: str) -> str:
        """The model's chat format for one image followed by ``prompt``, ready for generation."""
        if getattr(self.processor, "chat_template", None):
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
            return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return FALLBACK_TEMPLATE.format(image=getattr(self.processor, "image_token", "<image>"), prompt=prompt)

    def describe(self, images: Sequence[Image.Image]) -> list[Caption]:
        return self.describe_with_prompts(images, [self.prompt] * len(images))

    def describe_with_prompts(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[Caption]:
        """One caption per (image, prompt) pair, in input order; prompts may differ in length."""
        if len(images) != len(prompts):
            raise ValueError(f"describe_with_prompts: {len(images)} images but {len(prompts)} prompts")
        rgb = [to_rgb(img) for img in images]
        texts = [self.render_prompt(p) for p in prompts]
        lengths = [len(self.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
        order = sorted(range(len(rgb)), key=lambda i: (lengths[i], round(rgb[i].width / rgb[i].height, 2)))
        captions: list[Caption | None] = [None] * len(rgb)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            for i, caption in zip(chunk, self._generate([rgb[i] for i in chunk], [texts[i] for i in chunk])):
                captions[i] = caption
        return captions  # type: ignore[return-value]

    def _generate_kwargs(self) -> dict[str, Any]:
        o = self.options
        kwargs: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": bool(o["do_sample"]),
            "pad_token_id": self.tokenizer.pad_token_id,
        }
        if o["min_new_tokens"] is not None:
            kwargs["min_new_tokens"] = int(o["min_new_tokens"])
        if o["static_cache"]:
            kwargs["cache_implementation"] = "static"
        if o["do_sample"]:
            kwargs.update({key: float(o[key]) for key in ("temperature", "top_p") if o[key] is not None})
        return kwargs

    def _generate(self, images: list[Image.Image], texts: list[str]) -> list[Caption]:
        inputs = self.processor(images=images, text=texts, return_tensors="pt", padding=True)
        inputs = {
            k: (v.to(self.device, self.dtype) if torch.is_floating_point(v) else v.to(self.device))
            for k, v in inputs.items()
            if isinstance(v, torch.Tensor)
        }
        with torch.inference_mode():
            output = self.network.generate(**inputs, **self._generate_kwargs())
        # Only the new tokens: the prompt's come first in every row.
        return [self._caption(row) for row in output[:, inputs["input_ids"].shape[1] :].tolist()]

    def _caption(self, token_ids: list[int]) -> Caption:
        """Tokens up to the first end-of-sequence (padding after it is not generated text)."""
        kept = list(itertools.takewhile(lambda token: token not in self._eos_ids, token_ids))
        return Caption(text=self.tokenizer.decode(kept, skip_special_tokens=True).strip(), n_tokens=len(kept))
