"""The ``vllm`` caption engine: production captioning with vLLM, through Ray's own integration.

Importable without vLLM: vLLM is imported inside the functions that need it, and a missing
install fails with one clear message (``pip install 'vlm4rec[gpu]'``). Ray and vLLM are pinned
together (``RAY_VERSION``, ``VLLM_VERSION``: the vLLM release ``ray[llm]==2.60.0`` itself
requires); the multimodal stage's configuration changed across Ray releases (a dict with
``chat_template_content_format`` since the typed stage configs), so another vLLM or Ray fails
at once with both versions and the install command, not deep inside a Ray worker.

Two entry points:
- ``build_vllm_processor(...)`` returns ``caption(ds) -> ds`` for a Ray Dataset. It is built on
  ``ray.data.llm.vLLMEngineProcessorConfig`` + ``build_processor`` (Ray 2.60): Ray Data runs
  the multimodal preparation, chat template and tokenizer on CPU actors and one vLLM engine
  per replica on the GPUs, with continuous batching inside each engine. Input rows carry the
  image file's bytes; output rows carry ``keep_columns`` plus ``text``, ``n_tokens`` and
  ``error`` (empty when the row succeeded: a failed row never fails the dataset).
- ``VLLMEngine``: the ``CaptionEngine`` interface over ``vllm.LLM`` in the current process,
  for one node without Ray Data (``make_engine("vllm", ...)``).

Running on a GPU cluster:
1. On every node, the same environment: ``pip install 'vlm4rec[gpu]'``, which brings
   ``ray[llm]`` and the vLLM release it supports (vLLM pins its own torch: install into a fresh
   environment).
2. Model weights: nodes usually cannot reach the hub, so download once where it is reachable,
   ``huggingface-cli download llava-hf/llava-v1.6-mistral-7b-hf --local-dir /shared/models/llava-next``,
   put the folder on storage every node mounts, pass that path as ``model`` and export
   ``HF_HUB_OFFLINE=1``.
3. Ray: ``ray start --head`` on the head node, ``ray start --address=HEAD:6379`` on each GPU
   node (or a KubeRay ``RayCluster``); check ``ray status`` lists the GPUs.
4. Submit the caption job from a machine that sees the cluster:
   ``ray job submit --address http://HEAD:8265 --working-dir . -- python -m jobs.caption --conf ...``
   with the caption engine set to ``vllm``. Sizing: ``tensor_parallel_size`` GPUs per model
   replica (1 for a 7B model on a 40 GB+ card), ``concurrency`` = number of replicas (GPUs / tp),
   ``batch_size`` rows per Ray block sent to an engine (32-128: larger keeps the engine's
   continuous batching full, smaller loses less work when a node dies),
   ``accelerator_type`` (e.g. "H100") to pin the engine actors to one card type.
"""
from __future__ import annotations

import base64
import importlib.util
import io
import logging
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

from PIL import Image

from udfs.caption.engine import Caption, CaptionEngine
from udfs.caption.kinds import KINDS
from udfs.caption.prompts import DEFAULT_PROMPT

log = logging.getLogger(__name__)

DEFAULT_MODEL = KINDS["vllm"].default_model
INSTALL_HINT = "pip install 'vlm4rec[gpu]'"
# ray[llm]==2.60.0 requires vllm[audio]==0.29.0; vlm4rec[gpu] pins both (setup.py).
RAY_VERSION, VLLM_VERSION = "2.60.0", "0.29.0"
KIND = KINDS["vllm"]
# A data URL keeps each request self-contained: no shared filesystem, no vLLM media-path allowlist.
_MIME = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "GIF": "image/gif", "BMP": "image/bmp"}


def require_vllm() -> None:
    """Raise a clear ImportError when vLLM is not installed, or not the release Ray's
    integration was built for."""
    if importlib.util.find_spec("vllm") is None:
        raise ImportError(f"caption engine 'vllm' needs vLLM, which is not installed: {INSTALL_HINT} on every GPU node")
    check_versions(installed_version("ray"), installed_version("vllm"))


def missing_install() -> str | None:
    """What to install when the engine cannot run here (``udfs.caption.kinds.VllmKind``)."""
    try:
        require_vllm()
        ray_data_llm()
    except ImportError as exc:
        return str(exc)
    return None


def installed_version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def check_versions(ray_version: str | None, vllm_version: str | None) -> None:
    """Raise ImportError naming both versions unless they are the pinned pair."""
    if (ray_version, vllm_version) != (RAY_VERSION, VLLM_VERSION):
        raise ImportError(
            f"caption engine 'vllm' runs Ray {RAY_VERSION} with vLLM {VLLM_VERSION} (the release "
            f"ray.data.llm {RAY_VERSION} is built for), found Ray {ray_version} and vLLM {vllm_version}: "
            f"{INSTALL_HINT} into a fresh environment on every node")


def ray_data_llm() -> Any:
    """``ray.data.llm``, which needs Ray's ``llm`` extra (aiohttp and friends, and vLLM)."""
    try:
        import ray.data.llm as ray_llm
    except ImportError as e:
        raise ImportError(
            f"caption engine 'vllm' needs Ray's LLM integration, which failed to import ({e}): {INSTALL_HINT} "
            "(it installs ray[llm] with the vLLM version that Ray release supports)"
        ) from e
    return ray_llm


def image_data_url(image: bytes | Image.Image) -> str:
    """A ``data:`` URL for an image: file bytes keep their format, a PIL image becomes a JPEG."""
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="JPEG", quality=95)
        data, mime = buffer.getvalue(), "image/jpeg"
    else:
        data = bytes(image)
        with Image.open(io.BytesIO(data)) as probe:
            mime = _MIME.get(probe.format or "", "image/jpeg")
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def chat_messages(image: bytes | Image.Image, prompt: str) -> list[dict[str, Any]]:
    """OpenAI-format chat messages: one user turn with the image, then the prompt."""
    return [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": image_data_url(image)}},
                {"type": "text", "text": prompt},
            ],
        }
    ]


def sampling_params(max_new_tokens: int, min_new_tokens: int | None = None) -> dict[str, Any]:
    """Greedy decoding (captions are cached per image, model and prompt, so they must be reproducible)."""
    params: dict[str, Any] = {"temperature": 0.0, "max_tokens": int(max_new_tokens)}
    if min_new_tokens:
        params["min_tokens"] = int(min_new_tokens)
    return params


def vllm_request_row(
    row: Mapping[str, Any], prompt: str, image_column: str, max_new_tokens: int, min_new_tokens: int | None
) -> dict[str, Any]:
    """Ray preprocess: a row with image bytes -> chat messages + sampling params."""
    return {
        "messages": chat_messages(row[image_column], prompt),
        "sampling_params": sampling_params(max_new_tokens, min_new_tokens),
        # The bytes now live in the data URL; carrying them through every stage doubles the memory.
        image_column: None,
    }


def vllm_result_row(row: Mapping[str, Any], keep_columns: Sequence[str]) -> dict[str, Any]:
    """Ray postprocess (and error-row normaliser): ``keep_columns`` + text, n_tokens, error."""
    out = {column: row.get(column) for column in keep_columns}
    error = row.get("__inference_error__") or ""
    if error:
        out.update(text=None, n_tokens=None, error=str(error))
    else:
        out.update(
            text=str(row.get("generated_text", "")).strip(),
            n_tokens=int(row.get("num_generated_tokens", 0)),
            error="",
        )
    return out


def engine_args(options: Mapping[str, Any]) -> dict[str, Any]:
    """vLLM's engine arguments for the engine's options (``udfs.caption.kinds.VllmOptions``,
    checked): ours, then ``engine_kwargs`` as they are (theirs win)."""
    args: dict[str, Any] = {"tensor_parallel_size": int(options["tensor_parallel_size"]),
                            "limit_mm_per_prompt": {"image": 1}}
    args.update({key: options[key] for key in ("max_model_len", "gpu_memory_utilization") if options[key] is not None})
    return {**args, **(options["engine_kwargs"] or {})}


def vllm_processor_config(
    model: str = DEFAULT_MODEL,
    batch_size: int = 64,
    concurrency: int | tuple[int, int] = 1,
    accelerator_type: str | None = None,
    options: Mapping[str, Any] | None = None,
) -> Any:
    """The ``ray.data.llm.vLLMEngineProcessorConfig`` for captioning (building it needs no vLLM);
    ``options``: the engine's (``experiment.caption.vllm``)."""
    return ray_data_llm().vLLMEngineProcessorConfig(
        model_source=model,
        engine_kwargs=engine_args(KIND.checked_options(options)),
        batch_size=batch_size,
        concurrency=concurrency,
        accelerator_type=accelerator_type,
        # LLaVA chat templates iterate over typed content parts: keep the OpenAI structure.
        prepare_multimodal_stage={"enabled": True, "chat_template_content_format": "openai"},
        should_continue_on_error=True,
    )


def build_vllm_processor(
    model: str = DEFAULT_MODEL,
    prompt: str = DEFAULT_PROMPT,
    batch_size: int = 64,
    max_new_tokens: int = 128,
    concurrency: int | tuple[int, int] = 1,
    image_column: str = "image_bytes",
    keep_columns: Sequence[str] = ("image_sha256", "item_id"),
    accelerator_type: str | None = None,
    options: Mapping[str, Any] | None = None,
) -> Callable[[Any], Any]:
    """``caption(ds)``: a Ray Dataset of rows with ``image_column`` (file bytes) and
    ``keep_columns`` -> rows of ``keep_columns`` + ``text``, ``n_tokens``, ``error``.

    ``concurrency`` is the number of vLLM replicas (an int, or ``(min, max)`` to autoscale);
    each replica uses the options' ``tensor_parallel_size`` GPUs (``engine_args``: their
    ``engine_kwargs`` go to vLLM as they are). Building it connects to (or starts) Ray and reads
    the model's tokenizer files.
    """
    require_vllm()
    keep = tuple(keep_columns)
    processor = ray_data_llm().build_processor(
        vllm_processor_config(model, batch_size, concurrency, accelerator_type, options),
        preprocess=partial(
            vllm_request_row, prompt=prompt, image_column=image_column,
            max_new_tokens=max_new_tokens, min_new_tokens=KIND.checked_options(options)["min_new_tokens"],
        ),
        postprocess=partial(vllm_result_row, keep_columns=keep),
    )

    def caption(dataset: Any) -> Any:
        # Failed rows bypass postprocess with all their columns: one more map gives every row one schema.
        return processor(dataset).map(partial(vllm_result_row, keep_columns=keep))

    return caption


class VLLMEngine(CaptionEngine):
    """``vllm.LLM`` in this process behind the ``CaptionEngine`` interface (one node, no Ray Data)."""

    name = "vllm"

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        prompt: str = DEFAULT_PROMPT,
        batch_size: int = 64,
        max_new_tokens: int = 128,
        options: Mapping[str, Any] | None = None,
    ):
        super().__init__(model=model, prompt=prompt, batch_size=batch_size, max_new_tokens=max_new_tokens)
        self.options = KIND.checked_options(options)
        require_vllm()
        from vllm import LLM, SamplingParams

        self._llm = LLM(model=model, **engine_args(self.options))
        self._sampling = SamplingParams(**sampling_params(max_new_tokens, self.options["min_new_tokens"]))

    def describe(self, images: Sequence[Image.Image]) -> list[Caption]:
        outputs = self._llm.chat([chat_messages(img, self.prompt) for img in images], self._sampling, use_tqdm=False)
        return [
            Caption(text=out.outputs[0].text.strip(), n_tokens=len(out.outputs[0].token_ids)) for out in outputs
        ]
