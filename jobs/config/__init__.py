"""Typed job configuration: YAML files merged in order, then ``--set key=value`` overrides.

Every key is checked against the sections, pydantic dataclasses that forbid unknown keys; an
unknown or mistyped key is an error that names the key, the file (or ``--set``) it came from and
the closest valid key, and a key of an older config says where it moved (``validation``). Each
job's settings are a typed section (``experiment.caption``, ``.embed``, ``.profiles``, ``.topk``,
``.evaluate``), whose ranges and choices are declared on its fields, checked once for every job.
The resolved config dumps to a plain dict (``to_dict``) and loads back (``from_dict``)
unchanged, which is what the ``runs`` table and the plan store.

The package by concern: ``sections`` (what the settings are), ``validation`` (how a value is
checked and a failed check told), ``loading`` (where the values come from: YAML files and overrides).
"""
from udfs.evaluate.protocol import ALL, BASELINES, CANDIDATE_POLICIES, COMMON, EXCLUDABLE_SPLITS, POPULARITY, RANDOM

from .loading import CONF_ROOT, load_config, parse_override, resolve_conf_path
from .sections import (FUSE_OBJECTIVES, MALLOC_WORKER_ENV, MAX_DATASET_NAME, AlsConf, CaptionConf,
                       Config, DatasetConf, EmbedConf, EvaluateConf, ExperimentConf, FuseConf, ImagesConf, ProfilesConf,
                       RayConf, SparkConf, SplitConf, TopkConf)
from .validation import MOVED_KEYS, MOVED_MAPS, ConfigError

__all__ = [
    "ALL", "BASELINES", "CANDIDATE_POLICIES", "COMMON", "EXCLUDABLE_SPLITS", "POPULARITY", "RANDOM",
    "CONF_ROOT", "load_config", "parse_override", "resolve_conf_path",
    "FUSE_OBJECTIVES", "MALLOC_WORKER_ENV", "MAX_DATASET_NAME", "AlsConf", "CaptionConf", "Config",
    "DatasetConf", "EmbedConf", "EvaluateConf", "ExperimentConf", "FuseConf", "ImagesConf", "ProfilesConf", "RayConf",
    "SparkConf", "SplitConf", "TopkConf",
    "MOVED_KEYS", "MOVED_MAPS", "ConfigError",
]
