"""Dataset adapters: one module per source format, each with ``read(spark, dataset)``."""
from __future__ import annotations

from importlib import import_module

from ..config import ConfigError, DatasetConf
from .base import AdapterOutput

ADAPTERS = {
    "movielens": "jobs.adapters.movielens",
    "mmrec": "jobs.adapters.mmrec",
    "amazon": "jobs.adapters.amazon",
    "hm": "jobs.adapters.hm",
    "csv": "jobs.adapters.csv_adapter",
}


def read_dataset(spark, dataset: DatasetConf) -> AdapterOutput:
    if dataset.adapter not in ADAPTERS:
        raise ConfigError(f"dataset.adapter '{dataset.adapter}' is not one of {', '.join(ADAPTERS)}")
    return import_module(ADAPTERS[dataset.adapter]).read(spark, dataset)
