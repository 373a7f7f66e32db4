"""Typed job configuration: YAML files merged in order, then ``--set key=value`` overrides.

Every key is checked against the dataclasses below; an unknown or mistyped key is an error
that names the key, the file (or ``--set``) it came from and the closest valid key, and a key
of an older config says where it moved. Each job's settings are a typed section
(``experiment.caption``, ``.embed``, ``.profiles``, ``.topk``, ``.evaluate``); a section's
ranges and choices are its ``problems()``, checked once by the builder for every job. The
resolved config dumps to a plain dict (``to_dict``) and loads back (``from_dict``) unchanged,
which is what the ``runs`` table stores.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from udfs.caption.kinds import KINDS, HfOptions, OpenaiOptions, TagsOptions, VllmOptions
from udfs.caption.kinds import below as _below
from udfs.caption.prompts import PAPER_PROMPT
from udfs.significance import TESTS as SIGNIFICANCE_TESTS

CONF_ROOT = Path(__file__).resolve().parent.parent / "conf"


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the key, the source and the fix."""


# glibc malloc tunables for the processes that run torch (Spark's Python workers, Ray's workers).
# glibc's default hands every buffer above a dynamic threshold (at most 32 MiB) back to the OS on
# free and trims the heap top, so each batch of a CNN faults its buffers in again: on a 2-core VM
# the ml100k models spent a third of their time in page faults, and these two settings made the
# tags engine 2x and EfficientNet features 2.9x faster for 20% more peak memory
# (benchmarks/bench_malloc_env.py). glibc reads them when a process starts, so they must be in the
# environment the worker is spawned with; an empty value leaves the variable unset.
# MALLOC_ARENA_MAX=1: the first two govern the main arena only, and Ray Data calls an actor from
# threads of its own, whose arenas trimmed as before (8.3 M page faults for ml100k's posters):
# with one arena the caption stage's describe step fell from 26.9 to 18.6 s (docs/BENCHMARKS.md).
MALLOC_WORKER_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 30), "MALLOC_ARENA_MAX": "1"}


@dataclass
class SparkConf:
    # "": whatever launched the driver (spark-submit's --master, else local[*]). A master given
    # to spark-submit always wins over this one: the command line is the more specific choice.
    master: str = "local[*]"
    # The Python the executors run (PYSPARK_PYTHON), for every master; "": $PYSPARK_PYTHON, else
    # this driver's interpreter. On a cluster: a path that exists on every node, or
    # "./environment/bin/python" with spark.extra["spark.archives"] = "env.tar.gz#environment"
    # (a conda-pack / venv-pack archive that Spark unpacks in each executor's folder).
    python: str = ""
    app_name: str = "vlm4rec"
    driver_memory: str = "4g"
    shuffle_partitions: int = 8
    # Partitions of Delta's log replay; 0: 1 on a local master, shuffle_partitions on a cluster.
    snapshot_partitions: int = 0
    # profiles, topk, evaluate (and embed, on a local master) compute on the driver (delta-rs
    # reads, the same kernels as their Spark tasks, Spark writes) while each table they read
    # holds at most this many MiB of Parquet, and 5M rows, after skipping files by partition
    # values and statistics (jobs/driver_inputs.py); 0: always the distributed path. 1 GiB is
    # Spark's own default cap on what one action may bring to the driver (spark.driver.maxResultSize);
    # 64 kept ten times ml100k (158 MiB of files to ingest, 410 MB of vectors) on Spark paths that
    # ran 2-3x slower than the driver's (docs/BENCHMARKS.md, tenth session).
    driver_compute_mb: int = 1024
    # Folder of resolved connector JARs (``vlm4rec setup``); empty means ~/.cache/vlm4rec/jars.
    jars_dir: str = ""
    # Any other Spark setting, passed through as-is (a cluster config sets executors here).
    extra: dict[str, str] = field(default_factory=dict)
    # Environment of the Python workers (spark.executorEnv.*); the defaults are MALLOC_WORKER_ENV.
    worker_env: dict[str, str] = field(default_factory=lambda: dict(MALLOC_WORKER_ENV))

    def problems(self) -> dict[str, str | None]:
        return {name: f"must be >= {low}, got {value}" if value < low else None
                for name, value, low in (("shuffle_partitions", self.shuffle_partitions, 1),
                                         ("snapshot_partitions", self.snapshot_partitions, 0),
                                         ("driver_compute_mb", self.driver_compute_mb, 0))}


@dataclass
class RayConf:
    address: str = ""  # empty: start Ray on this machine
    num_cpus: int = 0  # 0: all local cores
    object_store_memory_mb: int = 512
    # Environment of the Ray workers (runtime_env env_vars); the defaults are MALLOC_WORKER_ENV.
    worker_env: dict[str, str] = field(default_factory=lambda: dict(MALLOC_WORKER_ENV))

    def problems(self) -> dict[str, str | None]:
        client = self.address.strip().lower().startswith("ray://")
        return {"address": f"is {self.address!r}, a Ray Client address, which Ray Data does not support: run "
                           "the job on a node of the cluster with ray.address=auto (or HEAD:6379), or submit it "
                           "with `ray job submit --address http://HEAD:8265 --working-dir . -- python -m "
                           "jobs.caption ...`" if client else None}


@dataclass
class SplitConf:
    # label | leave_one_out | temporal_ratio | global_time | random_ratio
    protocol: str = "temporal_ratio"
    ratios: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])
    seed: int = 42
    # global_time: interactions at or after valid_cut go to valid, at or after test_cut to test.
    # Given as quantiles of the timestamp distribution when in (0, 1), else as unix seconds.
    valid_cut: float = 0.8
    test_cut: float = 0.9
    # leave_one_out / temporal_ratio: users with fewer train interactions than this keep all in train.
    min_user_interactions: int = 3


@dataclass
class ImagesConf:
    """``dataset.images``: how ingest and caption read item image files (``udfs.images.ReadLimits``)."""

    max_bytes: int = 64 * 1024 * 1024  # a larger file is rejected from its size, never read
    read_timeout_s: float = 30.0  # a slower read (a dead network mount) is an error; caption retries it
    # false: an image path must resolve (symbolic links and '..' followed) under the adapter's images root
    allow_outside_root: bool = False

    def problems(self) -> dict[str, str | None]:
        timeout = self.read_timeout_s
        return {"max_bytes": None if self.max_bytes >= 1
                else f"must be a positive number of bytes, got {self.max_bytes!r}",
                "read_timeout_s": None if 0 < timeout < float("inf")
                else f"must be a positive, finite number of seconds, got {timeout!r}"}


@dataclass
class DatasetConf:
    name: str = ""
    adapter: str = ""  # movielens | mmrec | amazon | hm | csv | synthetic
    paths: dict[str, str] = field(default_factory=dict)
    # Adapter-specific options; each adapter validates its own keys.
    options: dict[str, Any] = field(default_factory=dict)
    split: SplitConf = field(default_factory=SplitConf)
    kcore: int = 0  # 0: no k-core filtering
    min_rating: float | None = None  # keep interactions with rating >= this (implicit feedback)
    images: ImagesConf = field(default_factory=ImagesConf)


# Each engine owns its options (``udfs.caption.kinds``): the config types its section with them.
CAPTION_ENGINES = tuple(KINDS)
# The evaluation protocol's names live once, in udfs.protocol; the typed config checks against them.
from udfs.protocol import (  # noqa: E402,F401
    ALL, BASELINES, CANDIDATE_POLICIES, COMMON, EXCLUDABLE_SPLITS, POPULARITY, RANDOM)


@dataclass
class CaptionConf:
    engine: str = "tags"  # tags | hf | vllm | openai
    model: str = ""
    prompt: str = PAPER_PROMPT
    batch_size: int = 16
    max_new_tokens: int = 128
    num_workers: int = 1
    force: bool = False  # describe every image again, ignoring the cache (``--force``)
    # The job's Ray resources (see jobs/caption.py): None / 0 pick them from the cluster's CPUs.
    actor_num_cpus: float | None = None
    torch_threads: int = 0
    rows_per_file: int = 256
    load_num_cpus: float = 0.0  # per loading task; only a GPU actor has them
    accelerator_type: str | None = None  # vllm: pin the engine replicas to one GPU type ("H100")
    # Each engine's options; the configured engine receives its section as a plain dict.
    tags: TagsOptions = field(default_factory=TagsOptions)
    hf: HfOptions = field(default_factory=HfOptions)
    vllm: VllmOptions = field(default_factory=VllmOptions)
    openai: OpenaiOptions = field(default_factory=OpenaiOptions)

    def engine_options(self) -> dict[str, Any]:
        """The configured engine's section, as the engine's ``options`` mapping."""
        return dataclasses.asdict(getattr(self, self.engine))

    def problems(self) -> dict[str, str | None]:
        return {
            "engine": None if self.engine in CAPTION_ENGINES
            else f"must be one of {list(CAPTION_ENGINES)}, got {self.engine!r}",
            "batch_size": _below(self.batch_size, 1),
            "max_new_tokens": _below(self.max_new_tokens, 1),
            "num_workers": _below(self.num_workers, 1),
            "actor_num_cpus": None if self.actor_num_cpus is None or self.actor_num_cpus > 0
            else f"must be > 0 (or null to pick from the cluster's CPUs), got {self.actor_num_cpus!r}",
            "torch_threads": _below(self.torch_threads, 0),
            "rows_per_file": _below(self.rows_per_file, 1),
            "load_num_cpus": _below(self.load_num_cpus, 0),
        }


@dataclass
class AlsConf:
    """``experiment.profiles.als``: the collaborative-filtering reference ``als`` (Spark ML's
    implicit ALS on the train interactions; ``udfs.spark.als``). Spark's own defaults except
    ``rank`` (10 is far below the content vectors' dimensions); none is tuned on any split."""

    rank: int = 64
    reg_param: float = 0.1
    alpha: float = 1.0  # confidence = 1 + alpha * (train interactions of the pair)
    max_iter: int = 10
    seed: int = 42

    def problems(self) -> dict[str, str | None]:
        return {"rank": _below(self.rank, 1), "reg_param": _below(self.reg_param, 0),
                "alpha": _below(self.alpha, 0), "max_iter": _below(self.max_iter, 1)}


@dataclass
class EmbedConf:
    text_batch_size: int = 64
    image_batch_size: int = 32
    # Rows of one Spark task (at least one task per core).
    rows_per_task: int = 20_000
    # false encodes every input again (e.g. after an encoder upgrade that kept its name).
    reuse_vectors: bool = True
    # Part representation -> weight in ``concat`` fusions (default 1 each); also for profiles.
    concat_weights: dict[str, float] = field(default_factory=dict)

    def problems(self) -> dict[str, str | None]:
        return {"text_batch_size": _below(self.text_batch_size, 1),
                "image_batch_size": _below(self.image_batch_size, 1),
                "rows_per_task": _below(self.rows_per_task, 1)}


FUSE_OBJECTIVES = ("bpr", "sampled_softmax", "item_contrastive")


@dataclass
class FuseConf:
    """``experiment.fuse``: the trained fusions (``attention``, ``gating``, ``crossmodal``,
    ``smore``) of the ``fuse`` job; see ``udfs.fusion_training`` for the objectives."""

    # bpr | sampled_softmax (a user signal) | item_contrastive (the paper's: no user signal)
    objective: str = "bpr"
    epochs: int = 15
    batch_size: int = 256
    lr: float = 1e-3
    negatives: int = 4
    temperature: float = 0.07
    patience: int = 3  # epochs without a better valid recall before stopping
    eval_k: int = 20  # early stopping on valid Recall@eval_k
    hidden: int = 512  # each part's projection
    out_dim: int = 512
    heads: int = 4  # crossmodal
    tokens: int = 8  # crossmodal: tokens each projected vector is split into
    smore_product_term: bool = True
    # smore's item-item kNN graphs: part representation (or its kind: lvlm, title...) -> k;
    # empty: no graph propagation. Every part of a smore fusion then needs a k.
    smore_knn_k: dict[str, int] = field(default_factory=dict)
    seed: int = 42
    threads: int = 2  # torch threads on the driver (fixed: results are byte-identical per count)
    rows_per_task: int = 50_000  # items per Spark task when applying a model
    reuse_models: bool = True  # false: retrain even when a stored model matches inputs and settings

    def problems(self) -> dict[str, str | None]:
        bad_k = {p: k for p, k in self.smore_knn_k.items() if k < 1}
        return {
            "objective": None if self.objective in FUSE_OBJECTIVES
            else f"must be one of {list(FUSE_OBJECTIVES)}, got {self.objective!r}",
            "epochs": _below(self.epochs, 1), "batch_size": _below(self.batch_size, 1),
            "lr": None if self.lr > 0 and math.isfinite(self.lr) else f"must be > 0, got {self.lr!r}",
            "negatives": _below(self.negatives, 1),
            "temperature": None if self.temperature > 0 else f"must be > 0, got {self.temperature!r}",
            "patience": _below(self.patience, 1), "eval_k": _below(self.eval_k, 1),
            "hidden": _below(self.hidden, 2), "out_dim": _below(self.out_dim, 1), "heads": _below(self.heads, 1),
            "tokens": _below(self.tokens, 1) or (None if self.hidden % self.tokens == 0
                                                 and (self.hidden // self.tokens) % self.heads == 0 else
                                                 f"must divide hidden ({self.hidden}) into tokens whose size is a "
                                                 f"multiple of heads ({self.heads}), got {self.tokens}"),
            "smore_knn_k": None if not bad_k else f"k must be >= 1, got {bad_k}",
            "threads": _below(self.threads, 1), "rows_per_task": _below(self.rows_per_task, 1),
        }


@dataclass
class ProfilesConf:
    # Weight each history item by recency (a half-life in days before the user's latest train
    # interaction); null: the plain mean.
    half_life_days: float | None = None
    als: AlsConf = field(default_factory=AlsConf)  # read only when ``als`` is a representation

    def problems(self) -> dict[str, str | None]:
        value = self.half_life_days
        bad = value is not None and not (math.isfinite(value) and value > 0)
        return {"half_life_days": f"must be a positive number of days (or null for the plain mean), "
                                  f"got {value!r}" if bad else None}


@dataclass
class TopkConf:
    k: int | None = None  # list length; null: max(experiment.evaluate.ks)
    # common: the items with a vector in every representation (the same for all of them);
    # all: each representation its own items (and the baselines the whole catalog).
    candidates: str = "common"
    exclude: list[str] = field(default_factory=lambda: ["train", "valid"])  # splits seen at ranking
    baselines: list[str] = field(default_factory=lambda: list(BASELINES))
    user_block: int = 16384
    item_block: int = 32768
    score_rows: int = 1024
    seed: int = 42  # the random baseline's order

    def problems(self) -> dict[str, str | None]:
        bad_exclude = [s for s in self.exclude if s not in EXCLUDABLE_SPLITS]
        bad_baselines = [b for b in self.baselines if b not in BASELINES]
        return {
            "k": _below(self.k, 1),
            "candidates": None if self.candidates in CANDIDATE_POLICIES
            else f"must be one of {list(CANDIDATE_POLICIES)}, got {self.candidates!r}",
            "exclude": None if not bad_exclude else
            f"must name splits among {list(EXCLUDABLE_SPLITS)}, got {self.exclude!r} (excluding 'test' "
            "would hide the very items being evaluated)",
            "baselines": None if not bad_baselines else
            f"has unknown baselines {bad_baselines}: choose from {list(BASELINES)}",
            "user_block": _below(self.user_block, 1),
            "item_block": _below(self.item_block, 1),
            "score_rows": _below(self.score_rows, 1),
        }


@dataclass
class EvaluateConf:
    ks: list[int] = field(default_factory=lambda: [5, 10, 20])
    bootstrap_samples: int = 1000
    seed: int = 42  # the bootstrap's resamples and the randomisation test's sign flips
    # The paired test of each comparison (udfs.significance.TESTS): the t-test holds its 5% rate
    # on this project's per-user differences, where Wilcoxon's does not (docs/BENCHMARKS.md).
    test: str = "t"

    def problems(self) -> dict[str, str | None]:
        return {
            "ks": None if self.ks and all(k >= 1 for k in self.ks)
            else f"must be a non-empty list of integers >= 1, got {self.ks!r}",
            "bootstrap_samples": _below(self.bootstrap_samples, 1),
            "test": None if self.test in SIGNIFICANCE_TESTS
            else f"must be one of {list(SIGNIFICANCE_TESTS)}, got {self.test!r}",
        }


@dataclass
class ExperimentConf:
    name: str = ""
    representations: list[str] = field(default_factory=lambda: ["title"])
    text_encoder: str = "all-MiniLM-L6-v2"
    image_encoder: str = "efficientnet-lite0"
    caption: CaptionConf = field(default_factory=CaptionConf)
    embed: EmbedConf = field(default_factory=EmbedConf)
    fuse: FuseConf = field(default_factory=FuseConf)
    profiles: ProfilesConf = field(default_factory=ProfilesConf)
    topk: TopkConf = field(default_factory=TopkConf)
    evaluate: EvaluateConf = field(default_factory=EvaluateConf)

    def problems(self) -> dict[str, str | None]:
        k, ks = self.topk.k, self.evaluate.ks
        short = k is not None and bool(ks) and k < max(ks)
        return {"topk.k": f"is {k}, below max(experiment.evaluate.ks) = {max(ks)}: the evaluation needs "
                          "lists that long" if short else None}


@dataclass
class Config:
    warehouse: str = "warehouse"
    log_level: str = "INFO"
    # How often a running job refreshes its ``runs`` row; a row whose driver runs on another host
    # and has missed three beats is marked abandoned by the next job (jobs/abandoned_runs.py).
    heartbeat_s: float = 300.0
    spark: SparkConf = field(default_factory=SparkConf)
    ray: RayConf = field(default_factory=RayConf)
    dataset: DatasetConf = field(default_factory=DatasetConf)
    experiment: ExperimentConf = field(default_factory=ExperimentConf)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any], sources: dict[str, str] | None = None) -> "Config":
        config = _build(cls, data, "", sources or {})
        if config.dataset.name:
            try:
                check_dataset_name(config.dataset.name)
            except ConfigError as exc:
                raise ConfigError(f"dataset.name in {_source(sources or {}, 'dataset.name')}: {exc}") from None
        return config

    def warehouse_uri(self) -> str:
        """The warehouse as Spark and pyarrow name it: a URI (``s3a://b/w``, ``file:///w``,
        ``abfss://...``) is kept as written, never passed through ``pathlib`` (which would turn
        ``s3a://b`` into ``<cwd>/s3a:/b``); a plain path is made absolute, as before."""
        from udfs.storage import is_uri

        if is_uri(self.warehouse):
            return self.warehouse.rstrip("/")
        return str(Path(self.warehouse).expanduser().resolve())

    def warehouse_path(self) -> Path:
        """The local warehouse folder; a ``ConfigError`` for an object-store warehouse."""
        from udfs.storage import local_path_of

        local = local_path_of(self.warehouse_uri())
        if local is None:
            raise ConfigError(f"warehouse '{self.warehouse}' is not a local folder: use warehouse_uri()")
        return Path(local)


# Run ids name folders (caption staging, reports) and are typed on command lines: a closed
# alphabet. Dataset names are what people call their catalogs ("O'Neill's catalog"): any
# printable text, since every place that puts one into SQL or a path escapes it.
RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
MAX_DATASET_NAME = 128


def check_run_id(run_id: str) -> str:
    """``run_id`` unchanged, or a ConfigError saying which characters a run id may hold."""
    if not RUN_ID.fullmatch(run_id):
        raise ConfigError(f"run id {run_id!r} is not valid: a run id is 1-128 characters among letters, "
                          "digits, '.', '_', ':' and '-', starting with a letter or digit (the ids the jobs "
                          "print look like profiles-20261130T120000-1a2b3c)")
    return run_id


def check_dataset_name(name: str) -> str:
    """``name`` unchanged, or a ConfigError naming what is wrong with it."""
    if len(name) > MAX_DATASET_NAME:
        raise ConfigError(f"dataset name {name[:40]!r}... is {len(name)} characters long; "
                          f"the limit is {MAX_DATASET_NAME}")
    if not name.isprintable():
        raise ConfigError(f"dataset name {name!r} holds a control character (a newline, tab, ...): "
                          "use printable characters only")
    if name != name.strip():
        raise ConfigError(f"dataset name {name!r} starts or ends with white space: remove it")
    return name


def _source(sources: dict[str, str], key: str) -> str:
    # The source of this key, of a key below it (a --set of a deeper key), or of its nearest parent.
    if key not in sources:
        for known, where in sources.items():
            if known.startswith(key + "."):
                return where
    probe = key
    while probe:
        if probe in sources:
            return sources[probe]
        probe = probe.rpartition(".")[0]
    return "the config"


def _build(cls: type, data: Any, prefix: str, sources: dict[str, str]) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(
            f"{prefix or 'config'} in {_source(sources, prefix)} must be a mapping, got {data!r}"
        )
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            moved = _moved(dotted, value)
            if moved:
                raise ConfigError(f"config key '{dotted}' in {_source(sources, dotted)} is no longer read: {moved}")
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f"; known keys: {', '.join(sorted(names))}"
            raise ConfigError(f"unknown config key '{dotted}' in {_source(sources, dotted)}{hint}")
        kwargs[key] = _coerce(hints[key], value, dotted, sources)
    built = cls(**kwargs)
    # Ranges and choices live in each section's ``problems`` (field -> what is wrong, or None),
    # checked here once for every job.
    for name, problem in (built.problems() if hasattr(built, "problems") else {}).items():
        if problem:
            dotted = f"{prefix}.{name}" if prefix else name
            raise ConfigError(f"config key '{dotted}' in {_source(sources, dotted)} {problem}")
    return built


# Keys of older configs, and where each setting lives now.
MOVED_KEYS = {
    "experiment.ks": "experiment.evaluate.ks",
    "experiment.bootstrap_samples": "experiment.evaluate.bootstrap_samples",
    "experiment.seed": "experiment.evaluate.seed (the bootstrap) and experiment.topk.seed (the random baseline)",
}
# Free option maps of older configs: each of their keys is now a field of one of these sections.
MOVED_MAPS = {
    "experiment.options": ("experiment.embed", "experiment.profiles", "experiment.topk"),
    "experiment.caption.options": ("experiment.caption", "experiment.caption.tags", "experiment.caption.hf",
                                   "experiment.caption.vllm", "experiment.caption.openai"),
}


def section_type(dotted: str) -> type:
    """The dataclass of a dotted section of ``Config`` (``experiment.caption.tags``)."""
    cls: type = Config
    for part in dotted.split("."):
        cls = typing.get_type_hints(cls)[part]
    return cls


def _moved(dotted: str, value: Any) -> str | None:
    """Where a key of an older config moved (None when it is simply unknown)."""
    if dotted in MOVED_KEYS:
        return f"it moved to {MOVED_KEYS[dotted]}"
    if dotted not in MOVED_MAPS:
        return None
    sections = MOVED_MAPS[dotted]
    lines = []
    for key in value if isinstance(value, dict) else []:
        homes = [s for s in sections if key in {f.name for f in dataclasses.fields(section_type(s))}]
        where = " or ".join(f"{s}.{key}" for s in homes) or f"nowhere (not a setting of {', '.join(sections)})"
        lines.append(f"{dotted}.{key} moved to {where}")
    return "; ".join(lines) or f"its settings are typed fields of {', '.join(sections)} now"


def _coerce(hint: Any, value: Any, key: str, sources: dict[str, str]) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    where = _source(sources, key)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key, sources)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key, sources)
    if hint is Any:
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' in {where} must be a list, got {value!r}")
        return [_coerce(args[0], v, key, sources) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' in {where} must be a mapping, got {value!r}")
        return {str(k): _coerce(args[1], v, key, sources) for k, v in value.items()}
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' in {where} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' in {where} must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"config key '{key}' in {where} must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config key '{key}' in {where} must be a string, got {value!r}")
    return value


def _merge(into: dict, new: dict, source: str, sources: dict[str, str], prefix: str = "") -> None:
    for key, value in new.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        # options/paths/extra are free-form maps; everything else merges key by key.
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value, source, sources, dotted)
        else:
            into[key] = value
            sources[dotted] = source


def resolve_conf_path(name: str) -> Path:
    """A path as given, else relative to the packaged ``conf/`` folder (``datasets/ml100k.yaml``)."""
    path = Path(name).expanduser()
    if path.exists():
        return path
    for candidate in (CONF_ROOT / name, CONF_ROOT / f"{name}.yaml"):
        if candidate.exists():
            return candidate
    raise ConfigError(
        f"config file '{name}' not found (looked in the current folder and in {CONF_ROOT}); "
        "pass an existing YAML path to --conf"
    )


def _load_file(path: Path, data: dict, sources: dict[str, str], seen: tuple[Path, ...]) -> None:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"config file {path} extends itself through {[str(p) for p in seen]}")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    # ``extends`` names files (relative to this one, or to conf/) merged before this one.
    parents = loaded.pop("extends", []) or []
    for parent in [parents] if isinstance(parents, str) else parents:
        local = path.parent / parent
        _load_file(local if local.exists() else resolve_conf_path(parent), data, sources, seen + (path,))
    _merge(data, loaded, str(path), sources)


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"--set '{text}' must look like key=value, e.g. --set spark.master=local[2]")
    key, _, raw = text.partition("=")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_config(conf_files: list[str] | None = None, overrides: list[str] | None = None,
                origins: dict[str, str] | None = None) -> Config:
    """``base.yaml``, then each ``--conf`` file in order, then each ``--set`` override.
    ``origins`` names how an override was given when it was not a ``--set`` (a job's flag)."""
    data: dict[str, Any] = {}
    sources: dict[str, str] = {}
    _load_file(CONF_ROOT / "base.yaml", data, sources, ())
    for name in conf_files or []:
        _load_file(resolve_conf_path(name), data, sources, ())
    for text in overrides or []:
        key, value = parse_override(text)
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: '{part}' is not a section")
        node[parts[-1]] = value
        sources[key] = (origins or {}).get(text, f"--set {text}")
    return Config.from_dict(data, sources)
