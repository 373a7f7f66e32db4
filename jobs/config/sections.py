"""The typed sections of the config, as pydantic dataclasses (``validation.section``): where the
jobs run (``spark``, ``ray``), what is read (``dataset``), what is computed (``experiment``, one
section per job), and the whole ``Config`` with its round trip through a plain dict.

A field's type and range are declared on it (``Annotated[StrictInt, Ge(1)]``, ``check``,
``one_of``); the few checks across fields raise ``FieldProblem`` naming the field.
"""
import json
import math
from dataclasses import asdict, field
from pathlib import Path
from typing import Annotated, Any

from annotated_types import Ge, Gt
from pydantic import StrictBool, StrictFloat, StrictInt, TypeAdapter, ValidationError, model_validator

from udfs.caption.kinds import KINDS, HfOptions, OpenaiOptions, TagsOptions, VllmOptions
from udfs.caption.prompts import PAPER_PROMPT
# The evaluation protocol's names live once, in udfs.evaluate.protocol; the typed config checks against them.
from udfs.evaluate.protocol import BASELINES, CANDIDATE_POLICIES, EXCLUDABLE_SPLITS
from udfs.evaluate.significance import TESTS as SIGNIFICANCE_TESTS
from udfs.io.storage import is_uri, local_path_of

from .validation import ConfigError, FieldProblem, check, explain, one_of, section

Count = Annotated[StrictInt, Ge(1)]  # a size or a number of things: 1 or more

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


@section
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
    shuffle_partitions: Count = 8
    # Partitions of Delta's log replay; 0: 1 on a local master, shuffle_partitions on a cluster.
    snapshot_partitions: Annotated[StrictInt, Ge(0)] = 0
    # profiles, topk, evaluate (and embed, on a local master) compute on the driver (delta-rs
    # reads, the same kernels as their Spark tasks, Spark writes) while each table they read
    # holds at most this many MiB of Parquet, and 5M rows, after skipping files by partition
    # values and statistics (jobs/driver_inputs.py); 0: always the distributed path. 1 GiB is
    # Spark's own default cap on what one action may bring to the driver (spark.driver.maxResultSize);
    # 64 kept ten times ml100k (158 MiB of files to ingest, 410 MB of vectors) on Spark paths that
    # ran 2-3x slower than the driver's (docs/BENCHMARKS.md, tenth session).
    driver_compute_mb: Annotated[StrictInt, Ge(0)] = 1024
    # Folder of resolved connector JARs (``vlm4rec setup``); empty means ~/.cache/vlm4rec/jars.
    jars_dir: str = ""
    # Any other Spark setting, passed through as-is (a cluster config sets executors here).
    extra: dict[str, str] = field(default_factory=dict)
    # Environment of the Python workers (spark.executorEnv.*); the defaults are MALLOC_WORKER_ENV.
    worker_env: dict[str, str] = field(default_factory=lambda: dict(MALLOC_WORKER_ENV))


@section
class RayConf:
    # empty: start Ray on this machine
    address: Annotated[str, check(
        lambda address: not address.strip().lower().startswith("ray://"),
        "is {value!r}, a Ray Client address, which Ray Data does not support: run the job on a node of the "
        "cluster with ray.address=auto (or HEAD:6379), or submit it with `ray job submit --address "
        "http://HEAD:8265 --working-dir . -- python -m jobs.caption ...`")] = ""
    num_cpus: StrictInt = 0  # 0: all local cores
    object_store_memory_mb: StrictInt = 512
    # Environment of the Ray workers (runtime_env env_vars); the defaults are MALLOC_WORKER_ENV.
    worker_env: dict[str, str] = field(default_factory=lambda: dict(MALLOC_WORKER_ENV))


@section
class SplitConf:
    # label | leave_one_out | temporal_ratio | global_time | random_ratio
    protocol: str = "temporal_ratio"
    ratios: list[StrictFloat] = field(default_factory=lambda: [0.8, 0.1, 0.1])
    seed: StrictInt = 42
    # global_time: interactions at or after valid_cut go to valid, at or after test_cut to test.
    # Given as quantiles of the timestamp distribution when in (0, 1), else as unix seconds.
    valid_cut: StrictFloat = 0.8
    test_cut: StrictFloat = 0.9
    # leave_one_out / temporal_ratio: users with fewer train interactions than this keep all in train.
    min_user_interactions: StrictInt = 3


@section
class ImagesConf:
    """``dataset.images``: how ingest and caption read item image files (``udfs.io.images.ReadLimits``)."""

    # a larger file is rejected from its size, never read
    max_bytes: Annotated[StrictInt, check(lambda size: size >= 1,
                                          "must be a positive number of bytes, got {value!r}")] = 64 * 1024 * 1024
    # a slower read (a dead network mount) is an error; caption retries it
    read_timeout_s: Annotated[StrictFloat, check(
        lambda seconds: 0 < seconds < math.inf, "must be a positive, finite number of seconds, got {value!r}")] = 30.0
    # false: an image path must resolve (symbolic links and '..' followed) under the adapter's images root
    allow_outside_root: StrictBool = False


MAX_DATASET_NAME = 128


@section
class DatasetConf:
    # What people call their catalogs ("O'Neill's catalog"): any printable text, since every place
    # that puts one into SQL or a path escapes it.
    name: Annotated[str,
                    check(lambda name: len(name) <= MAX_DATASET_NAME, lambda name: f"is {len(name)} characters "
                          f"long ({name[:40]!r}...); the limit is {MAX_DATASET_NAME}"),
                    check(str.isprintable, "holds a control character (a newline, tab, ...) in {value!r}: use "
                                           "printable characters only"),
                    check(lambda name: name == name.strip(), "starts or ends with white space in {value!r}: remove it")
                    ] = ""
    adapter: str = ""  # movielens | mmrec | amazon | hm | csv | synthetic
    paths: dict[str, str] = field(default_factory=dict)
    # Adapter-specific options; each adapter validates its own keys.
    options: dict[str, Any] = field(default_factory=dict)
    split: SplitConf = field(default_factory=SplitConf)
    kcore: StrictInt = 0  # 0: no k-core filtering
    min_rating: StrictFloat | None = None  # keep interactions with rating >= this (implicit feedback)
    images: ImagesConf = field(default_factory=ImagesConf)


# udfs.fusion.fusion_training.OBJECTIVES, which imports torch (tests/jobs/test_config.py checks they agree).
FUSE_OBJECTIVES = ("bpr", "sampled_softmax", "item_contrastive")


@section
class CaptionConf:
    # Each engine owns its options (``udfs.caption.kinds``): the config types its section with them.
    engine: Annotated[str, one_of(KINDS)] = "tags"
    model: str = ""
    prompt: str = PAPER_PROMPT
    batch_size: Count = 16
    max_new_tokens: Count = 128
    num_workers: Count = 1
    force: StrictBool = False  # describe every image again, ignoring the cache (``--force``)
    # The job's Ray resources (see jobs/caption.py): None / 0 pick them from the cluster's CPUs.
    actor_num_cpus: Annotated[StrictFloat | None, check(
        lambda cpus: cpus is None or cpus > 0,
        "must be > 0 (or null to pick from the cluster's CPUs), got {value!r}")] = None
    torch_threads: Annotated[StrictInt, Ge(0)] = 0
    rows_per_file: Count = 256
    load_num_cpus: Annotated[StrictFloat, Ge(0)] = 0.0  # per loading task; only a GPU actor has them
    accelerator_type: str | None = None  # vllm: pin the engine replicas to one GPU type ("H100")
    # Each engine's options; the configured engine receives its section as a plain dict.
    tags: TagsOptions = field(default_factory=TagsOptions)
    hf: HfOptions = field(default_factory=HfOptions)
    vllm: VllmOptions = field(default_factory=VllmOptions)
    openai: OpenaiOptions = field(default_factory=OpenaiOptions)

    def engine_options(self) -> dict[str, Any]:
        """The configured engine's section, as the engine's ``options`` mapping."""
        return asdict(getattr(self, self.engine))


@section
class AlsConf:
    """``experiment.profiles.als``: the collaborative-filtering reference ``als`` (Spark ML's
    implicit ALS on the train interactions; ``udfs.spark.als``). Spark's own defaults except
    ``rank`` (10 is far below the content vectors' dimensions); none is tuned on any split."""

    rank: Count = 64
    reg_param: Annotated[StrictFloat, Ge(0)] = 0.1
    alpha: Annotated[StrictFloat, Ge(0)] = 1.0  # confidence = 1 + alpha * (train interactions of the pair)
    max_iter: Count = 10
    seed: StrictInt = 42


@section
class EmbedConf:
    text_batch_size: Count = 64
    image_batch_size: Count = 32
    # Rows of one Spark task (at least one task per core).
    rows_per_task: Count = 20_000
    # false encodes every input again (e.g. after an encoder upgrade that kept its name).
    reuse_vectors: StrictBool = True
    # Part representation -> weight in ``concat`` fusions (default 1 each); also for profiles.
    concat_weights: dict[str, StrictFloat] = field(default_factory=dict)


@section
class FuseConf:
    """``experiment.fuse``: the trained fusions (``attention``, ``gating``, ``crossmodal``,
    ``smore``) of the ``fuse`` job; see ``udfs.fusion.fusion_training`` for the objectives."""

    # bpr | sampled_softmax (a user signal) | item_contrastive (the paper's: no user signal)
    objective: Annotated[str, one_of(FUSE_OBJECTIVES)] = "bpr"
    epochs: Count = 15
    batch_size: Count = 256
    lr: Annotated[StrictFloat, check(lambda lr: lr > 0 and math.isfinite(lr), "must be > 0, got {value!r}")] = 1e-3
    negatives: Count = 4
    temperature: Annotated[StrictFloat, Gt(0)] = 0.07
    patience: Count = 3  # epochs without a better valid recall before stopping
    eval_k: Count = 20  # early stopping on valid Recall@eval_k
    hidden: Annotated[StrictInt, Ge(2)] = 512  # each part's projection
    out_dim: Count = 512
    heads: Count = 4  # crossmodal
    tokens: Count = 8  # crossmodal: tokens each projected vector is split into
    smore_product_term: StrictBool = True
    # smore's item-item kNN graphs: part representation (or its kind: lvlm, title...) -> k;
    # empty: no graph propagation. Every part of a smore fusion then needs a k.
    smore_knn_k: dict[str, Count] = field(default_factory=dict)
    seed: StrictInt = 42
    threads: Count = 2  # torch threads on the driver (fixed: results are byte-identical per count)
    rows_per_task: Count = 50_000  # items per Spark task when applying a model
    reuse_models: StrictBool = True  # false: retrain even when a stored model matches inputs and settings

    @model_validator(mode="after")
    def _tokens_fit_heads(self) -> "FuseConf":
        if self.hidden % self.tokens or (self.hidden // self.tokens) % self.heads:
            raise FieldProblem("tokens", f"must divide hidden ({self.hidden}) into tokens whose size is a "
                                         f"multiple of heads ({self.heads}), got {self.tokens}")
        return self


@section
class ProfilesConf:
    # Weight each history item by recency (a half-life in days before the user's latest train
    # interaction); null: the plain mean.
    half_life_days: Annotated[StrictFloat | None, check(
        lambda days: days is None or (math.isfinite(days) and days > 0),
        "must be a positive number of days (or null for the plain mean), got {value!r}")] = None
    als: AlsConf = field(default_factory=AlsConf)  # read only when ``als`` is a representation


@section
class TopkConf:
    k: Count | None = None  # list length; null: max(experiment.evaluate.ks)
    # common: the items with a vector in every representation (the same for all of them);
    # all: each representation its own items (and the baselines the whole catalog).
    candidates: Annotated[str, one_of(CANDIDATE_POLICIES)] = "common"
    # splits seen at ranking
    exclude: Annotated[list[str], check(lambda splits: set(splits) <= set(EXCLUDABLE_SPLITS), (
        f"must name splits among {list(EXCLUDABLE_SPLITS)}, got {{value!r}} (excluding 'test' would hide the very "
        "items being evaluated)"))] = field(default_factory=lambda: ["train", "valid"])
    baselines: Annotated[list[str], check(lambda names: set(names) <= set(BASELINES), lambda names: (
        f"has unknown baselines {[b for b in names if b not in BASELINES]}: choose from {list(BASELINES)}"))] = field(
        default_factory=lambda: list(BASELINES))
    user_block: Count = 16384
    item_block: Count = 32768
    score_rows: Count = 1024
    seed: StrictInt = 42  # the random baseline's order


@section
class EvaluateConf:
    ks: Annotated[list[StrictInt], check(lambda ks: ks and all(k >= 1 for k in ks),
                                         "must be a non-empty list of integers >= 1, got {value!r}")] = field(
        default_factory=lambda: [5, 10, 20])
    bootstrap_samples: Count = 1000
    seed: StrictInt = 42  # the bootstrap's resamples and the randomisation test's sign flips
    # The paired test of each comparison (udfs.evaluate.significance.TESTS): the t-test holds its 5% rate
    # on this project's per-user differences, where Wilcoxon's does not (docs/BENCHMARKS.md).
    test: Annotated[str, one_of(SIGNIFICANCE_TESTS)] = "t"


@section
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

    @model_validator(mode="after")
    def _lists_long_enough(self) -> "ExperimentConf":
        k, longest = self.topk.k, max(self.evaluate.ks)
        if k is not None and k < longest:
            raise FieldProblem("topk.k", f"is {k}, below max(experiment.evaluate.ks) = {longest}: the evaluation "
                                         "needs lists that long")
        return self


@section
class Config:
    warehouse: str = "warehouse"
    log_level: str = "INFO"
    # How often a running job refreshes its ``runs`` row; a row whose driver runs on another host
    # and has missed three beats is marked abandoned by the next job (jobs/abandoned_runs.py).
    heartbeat_s: StrictFloat = 300.0
    spark: SparkConf = field(default_factory=SparkConf)
    ray: RayConf = field(default_factory=RayConf)
    dataset: DatasetConf = field(default_factory=DatasetConf)
    experiment: ExperimentConf = field(default_factory=ExperimentConf)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any], sources: dict[str, str] | None = None) -> "Config":
        """The typed config of ``data``; ``sources`` (dotted key -> the file or ``--set`` that set
        it) is what an error names."""
        try:
            return TypeAdapter(cls).validate_python(data)
        except ValidationError as error:
            raise ConfigError(explain(error, cls, sources or {})) from None

    def warehouse_uri(self) -> str:
        """The warehouse as Spark and pyarrow name it: a URI (``s3a://b/w``, ``file:///w``,
        ``abfss://...``) is kept as written, never passed through ``pathlib`` (which would turn
        ``s3a://b`` into ``<cwd>/s3a:/b``); a plain path is made absolute, as before."""
        if is_uri(self.warehouse):
            return self.warehouse.rstrip("/")
        return str(Path(self.warehouse).expanduser().resolve())

    def warehouse_path(self) -> Path:
        """The local warehouse folder; a ``ConfigError`` for an object-store warehouse."""
        local = local_path_of(self.warehouse_uri())
        if local is None:
            raise ConfigError(f"warehouse '{self.warehouse}' is not a local folder: use warehouse_uri()")
        return Path(local)
