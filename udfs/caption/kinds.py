"""What the caption job knows of each engine without loading it: one ``EngineKind`` per engine.

A kind owns everything about its engine that the job, the plan and the config ask: its name and
default model, its options (a pydantic dataclass the config types ``experiment.caption.<name>``
with: an unknown key is a config error, a value out of range names its dotted key), the identity it
records in the ``descriptions`` cache (``identity``), the longest image side it needs, whether
its actors hold a GPU or read and write their own files, their Ray resources and pool, what it
needs installed, and what it does before and after describing (the ``openai`` engine checks its
servers first and reports their token usage). So no job asks "which engine is this?".

This module imports no engine, no torch and no model: the engines' classes are named by string
(``implementation``) and loaded by ``udfs.caption.engine.make_engine`` only when one is built,
and what a kind needs of its engine's module (the ``vllm`` install check, the ``openai`` server
check) is looked up the same way, so that the import graph stays a tree.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any

import pydantic.dataclasses
from annotated_types import Ge, Gt
from pydantic import ConfigDict, StrictBool, StrictFloat, StrictInt, field_validator

from udfs.caption.prompts import prompt_id

# The model the ``vllm``, ``hf`` and ``openai`` engines run by default: the paper's LLaVA-NeXT
# (``vllm serve llava-hf/llava-v1.6-mistral-7b-hf`` serves it under this name).
LLAVA_NEXT = "llava-hf/llava-v1.6-mistral-7b-hf"
# ``udfs.encode.image_encoder.EFFICIENTNET_LITE0``, named without importing torch.
EFFICIENTNET_LITE0 = "efficientnet-lite0"
N_IMAGENET_CLASSES = 1000


# The engines' options are config sections (``experiment.caption.<engine>``), declared as
# jobs.config declares its own (jobs.config.validation.SECTION_CONFIG; udfs cannot import jobs):
# pydantic dataclasses that refuse an unknown key and read a number given for a text as text.
options_dataclass = functools.partial(pydantic.dataclasses.dataclass,
                                      config=ConfigDict(extra="forbid", coerce_numbers_to_str=True))


@options_dataclass
class TagsOptions:
    """``experiment.caption.tags`` (``TagsKind.identity`` checks the ranges)."""

    top_k: StrictInt = 3
    min_prob: StrictFloat = 0.15
    colours: StrictInt = 3
    min_colour_share: StrictFloat = 0.15
    device: str = "cpu"


@options_dataclass
class HfOptions:
    """``experiment.caption.hf``."""

    device: str = "auto"
    dtype: str = "auto"
    min_new_tokens: StrictInt | None = None
    static_cache: StrictBool = False
    do_sample: StrictBool = False
    temperature: StrictFloat | None = None
    top_p: StrictFloat | None = None
    local_files_only: StrictBool | None = None
    attn_implementation: str | None = None
    trust_remote_code: StrictBool = False


@options_dataclass
class VllmOptions:
    """``experiment.caption.vllm``."""

    tensor_parallel_size: Annotated[StrictInt, Ge(1)] = 1  # GPUs per model replica
    max_model_len: StrictInt | None = None
    gpu_memory_utilization: StrictFloat | None = None
    min_new_tokens: StrictInt | None = None
    # vLLM's own engine arguments, passed as they are (its keys, not ours).
    engine_kwargs: dict[str, Any] | None = None


@options_dataclass
class OpenaiOptions:
    """``experiment.caption.openai``. The model is ``experiment.caption.model`` (the served name)
    and ``max_tokens`` is ``experiment.caption.max_new_tokens``; ``max_concurrency`` and ``qps``
    hold per engine actor (``experiment.caption.num_workers`` of them)."""

    base_url: str = "http://127.0.0.1:8000"  # an address (/v1 is added) or an API root with its path
    base_urls: list[str] = field(default_factory=list)  # several servers, balanced (replaces base_url)
    api_key_env: str | None = None  # the NAME of the environment variable holding the key
    temperature: Annotated[StrictFloat, Ge(0)] = 0.0  # 0: reproducible descriptions, as the cache assumes
    timeout_s: Annotated[StrictFloat, Gt(0)] = 120.0  # per request
    max_concurrency: Annotated[StrictInt, Ge(1)] = 8  # requests in flight per actor
    qps: Annotated[StrictFloat, Gt(0)] | None = None  # request starts per second per actor (None: no limit)
    max_retries: Annotated[StrictInt, Ge(0)] = 6  # per image, on connection errors, timeouts, 408, 429 and 5xx
    backoff_s: Annotated[StrictFloat, Ge(0)] = 0.5  # first backoff; doubles per retry, full jitter
    backoff_max_s: Annotated[StrictFloat, Ge(0)] = 30.0

    @field_validator("base_url", "base_urls")
    @classmethod
    def _http(cls, urls: str | list[str]) -> str | list[str]:
        bad = [u for u in ([urls] if isinstance(urls, str) else urls) if not u.startswith(("http://", "https://"))]
        if bad:
            raise ValueError(f"must start with http:// or https://, got {bad}")
        return urls


@dataclass(frozen=True)
class ActorResources:
    """What one engine actor reserves: CPUs, GPUs, and the torch threads it may use (0: none set)."""

    num_cpus: float
    num_gpus: float
    torch_threads: int


def imported(path: str) -> Any:
    """The object ``"module:name"`` names, its module imported now (engines load lazily)."""
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


class EngineKind:
    """An engine as the job sees it (see the module docstring). Subclasses override what differs."""

    name: str = ""
    default_model: str = LLAVA_NEXT
    options: type = HfOptions
    # "module:Class" of the engine, built by ``udfs.caption.engine.make_engine``.
    implementation: str = ""
    # The longest image side the engine needs; None keeps the full image. LLaVA-NeXT (the VLM
    # engines' default model) tiles at most 672 x 672 or 336 x 1344.
    max_side: int | None = 1344
    # The engine has a Ray Data pipeline of its own (``vllm``: Ray's vLLM processor) instead of
    # the job's actor pool.
    runs_own_pipeline: bool = False
    # Each image is a request of its own, sent as soon as its file is read (``openai``).
    streams_requests: bool = False
    # Its servers report token usage and the retries behind each answer (``openai``).
    reports_usage: bool = False

    def defaults(self) -> dict[str, Any]:
        """The options and their defaults, as the engine's ``options`` mapping."""
        return dataclasses.asdict(self.options())

    def checked_options(self, options: Mapping[str, Any] | None) -> dict[str, Any]:
        """The defaults updated with ``options``; an unknown key is an error naming it."""
        known = self.defaults()
        unknown = sorted(set(options or {}) - set(known))
        if unknown:
            raise ValueError(
                f"caption engine {self.name!r}: unknown option(s) {unknown}; known options are {sorted(known)}"
            )
        return {**known, **(options or {})}

    def identity(self, model: str, prompt: str, options: Mapping[str, Any] | None = None) -> tuple[str, str]:
        """``(prompt, prompt_id)`` the engine records for these settings, without building it: a
        VLM engine records the configured prompt. Options the engine would refuse raise
        ``ValueError`` naming them."""
        self.checked_options(options)
        return prompt, prompt_id(prompt)

    def uses_gpu(self, options: Mapping[str, Any], cluster_gpus: float) -> bool:
        return False

    def reads_own_files(self, options: Mapping[str, Any], cluster_gpus: float) -> bool:
        """Whether an actor reads, checks and decodes its own images and writes its own staged
        files. On CPU the loading and writing tasks would only take the actor's cores (a
        millisecond an image against tens for the model); a GPU actor keeps them apart, so that
        decoding overlaps the model."""
        return not self.runs_own_pipeline and not self.uses_gpu(options, cluster_gpus)

    def actor_resources(self, options: Mapping[str, Any], num_workers: int, actor_num_cpus: float | None,
                        torch_threads: int, cluster_cpus: float, cluster_gpus: float) -> ActorResources:
        """Per actor: ``actor_num_cpus`` when set, else up to one core, leaving one to a GPU
        actor's image loading and to Ray's own processes; one GPU when the engine uses one; torch
        threads as set, else the cluster's cores divided by the actors (the actor caps them by its
        own node's cores)."""
        if actor_num_cpus is not None:
            cpus = actor_num_cpus
        else:
            cpus = max(0.25, min(1.0, (cluster_cpus - 1) / num_workers)) if cluster_cpus > 1 else 0.5
        return ActorResources(cpus, 1.0 if self.uses_gpu(options, cluster_gpus) else 0.0,
                              torch_threads or max(1, int(cluster_cpus // num_workers)))

    def actor_pool(self, ray: Any, size: int) -> Any:
        return ray.data.ActorPoolStrategy(size=size)

    def missing_install(self) -> str | None:
        """What to install when the engine cannot run here (None: it can)."""
        return None

    def prepared_options(self, options: Mapping[str, Any], model: str) -> dict[str, Any]:
        """The options to describe with, once the job knows it has images to describe."""
        return dict(options)


class TagsKind(EngineKind):
    name = "tags"
    default_model = EFFICIENTNET_LITE0
    options = TagsOptions
    implementation = "udfs.caption.tags_engine:TagsEngine"
    # It sees 224 px (and a 64 px colour thumbnail).
    max_side = 448

    def identity(self, model: str, prompt: str, options: Mapping[str, Any] | None = None) -> tuple[str, str]:
        """The VLM prompt means nothing to it: what it records is its recipe, rendered from its
        options, so that ``prompt_id`` changes exactly when the output would. ``TagsEngine``
        takes its prompt from here, so the two cannot disagree."""
        if model != EFFICIENTNET_LITE0:
            raise ValueError(f"caption engine 'tags' runs only {EFFICIENTNET_LITE0!r}, got model={model!r}")
        o = self.checked_options(options)
        if not 1 <= int(o["top_k"]) <= N_IMAGENET_CLASSES:
            raise ValueError(f"caption engine 'tags': top_k must be in 1..{N_IMAGENET_CLASSES}, got {o['top_k']}")
        if int(o["colours"]) < 0:
            raise ValueError(f"caption engine 'tags': colours must be >= 0, got {o['colours']}")
        recipe = (
            f"tags v1: imagenet top_k={o['top_k']} min_prob={o['min_prob']}; "
            f"colours max={o['colours']} min_share={o['min_colour_share']}"
        )
        return recipe, prompt_id(recipe)


class HfKind(EngineKind):
    name = "hf"
    options = HfOptions
    implementation = "udfs.caption.hf_engine:HFEngine"

    def uses_gpu(self, options: Mapping[str, Any], cluster_gpus: float) -> bool:
        return cluster_gpus >= 1 and str(options.get("device", "auto")) != "cpu"


class VllmKind(EngineKind):
    name = "vllm"
    options = VllmOptions
    implementation = "udfs.caption.vllm_engine:VLLMEngine"
    max_side = None
    runs_own_pipeline = True

    def missing_install(self) -> str | None:
        return imported("udfs.caption.vllm_engine:missing_install")()


class OpenaiKind(EngineKind):
    name = "openai"
    options = OpenaiOptions
    implementation = "udfs.caption.openai_engine:OpenAIEngine"
    streams_requests = True
    reports_usage = True

    def actor_resources(self, options: Mapping[str, Any], num_workers: int, actor_num_cpus: float | None,
                        torch_threads: int, cluster_cpus: float, cluster_gpus: float) -> ActorResources:
        # Waiting on HTTP: a quarter core per actor (JPEG encoding), no torch at all.
        return ActorResources(actor_num_cpus or 0.25, 0.0, 0)

    def actor_pool(self, ray: Any, size: int) -> Any:
        # An actor takes a second block while the first one's last requests are in flight (two
        # calls on two threads sharing the engine's event loop and its ``max_concurrency``), so
        # that its servers never wait for Ray to hand over the next block.
        return ray.data.ActorPoolStrategy(size=size, max_concurrent_calls_per_actor=2,
                                          enable_true_multi_threading=True)

    def missing_install(self) -> str | None:
        if importlib.util.find_spec("aiohttp") is None:
            return ("caption engine 'openai' needs aiohttp, which is not installed: "
                    "pip install aiohttp (a dependency of vlm4rec: reinstall it)")
        return None

    def prepared_options(self, options: Mapping[str, Any], model: str) -> dict[str, Any]:
        """The servers that answer now (``ServerUnavailable``, the job's exit 4, when none
        does): a server that is down fails the job before any image is sent."""
        return {**options, "base_urls": imported("udfs.caption.openai_engine:check_servers")(options, model)}


KINDS: dict[str, EngineKind] = {k.name: k for k in (TagsKind(), HfKind(), VllmKind(), OpenaiKind())}


def engine_kind(name: str) -> EngineKind:
    if name not in KINDS:
        raise ValueError(f"unknown caption engine {name!r}: choose one of {sorted(KINDS)}")
    return KINDS[name]
