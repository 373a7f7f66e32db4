"""Typed job configuration: YAML files merged in order, then ``--set key=value`` overrides.

Every key is checked against the dataclasses below; an unknown or mistyped key is an error
that names the key and the file (or ``--set``) it came from. The resolved config dumps to a
plain dict (``to_dict``) and loads back (``from_dict``) unchanged, which is what the ``runs``
table stores.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CONF_ROOT = Path(__file__).resolve().parent.parent / "conf"


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the key, the source and the fix."""


@dataclass
class SparkConf:
    master: str = "local[*]"
    app_name: str = "vlm4rec"
    driver_memory: str = "4g"
    shuffle_partitions: int = 8
    # Folder of resolved connector JARs (``vlm4rec setup``); empty means ~/.cache/vlm4rec/jars.
    jars_dir: str = ""
    # Any other Spark setting, passed through as-is (a cluster config sets executors here).
    extra: dict[str, str] = field(default_factory=dict)


@dataclass
class RayConf:
    address: str = ""  # empty: start Ray on this machine
    num_cpus: int = 0  # 0: all local cores
    object_store_memory_mb: int = 512


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


@dataclass
class CaptionConf:
    engine: str = "tags"  # tags | hf | vllm
    model: str = ""
    prompt: str = (
        "Describe this product image in detail, focusing on visual attributes like color, "
        "style, material, and what occasion it might be suitable for."
    )
    batch_size: int = 16
    max_new_tokens: int = 128
    num_workers: int = 1
    force: bool = False
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class ExperimentConf:
    name: str = ""
    representations: list[str] = field(default_factory=lambda: ["title"])
    text_encoder: str = "all-MiniLM-L6-v2"
    image_encoder: str = "efficientnet-lite0"
    ks: list[int] = field(default_factory=lambda: [5, 10, 20])
    caption: CaptionConf = field(default_factory=CaptionConf)
    bootstrap_samples: int = 1000
    seed: int = 42
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Config:
    warehouse: str = "warehouse"
    log_level: str = "INFO"
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
        return _build(cls, data, "", sources or {})

    def warehouse_path(self) -> Path:
        return Path(self.warehouse).expanduser().resolve()


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
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f"; known keys: {', '.join(sorted(names))}"
            raise ConfigError(f"unknown config key '{dotted}' in {_source(sources, dotted)}{hint}")
        kwargs[key] = _coerce(hints[key], value, dotted, sources)
    return cls(**kwargs)


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


def load_config(conf_files: list[str] | None = None, overrides: list[str] | None = None) -> Config:
    """``base.yaml``, then each ``--conf`` file in order, then each ``--set`` override."""
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
        sources[key] = f"--set {text}"
    return Config.from_dict(data, sources)
