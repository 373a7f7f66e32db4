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


def images_root(dataset: DatasetConf) -> str | None:
    """The folder ingest confines the dataset's local image paths to, and caption its reads
    again; ``None`` where the adapter gives none (amazon's images are URLs) or is not configured."""
    if dataset.adapter not in ADAPTERS:
        return None
    of = getattr(import_module(ADAPTERS[dataset.adapter]), "images_root_of", None)
    return None if of is None else of(dataset)


def read_dataset(spark, dataset: DatasetConf) -> AdapterOutput:
    if dataset.adapter not in ADAPTERS:
        raise ConfigError(f"dataset.adapter '{dataset.adapter}' is not one of {', '.join(ADAPTERS)}")
    return import_module(ADAPTERS[dataset.adapter]).read(spark, dataset)
