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


def _module(dataset: DatasetConf, fix: str = ""):
    if dataset.adapter not in ADAPTERS:
        raise ConfigError(f"dataset.adapter '{dataset.adapter}' is not one of {', '.join(ADAPTERS)}{fix}")
    return import_module(ADAPTERS[dataset.adapter])


def images_root(dataset: DatasetConf) -> str | None:
    """The folder ingest confines the dataset's local image paths to, and caption its reads
    again; ``None`` where the adapter gives none (amazon's images are URLs)."""
    # Without the adapter every local image would be refused as outside a root that is not known.
    module = _module(dataset, ": caption reads local images only under the adapter's images folder, as ingest "
                              "did; set dataset.adapter as ingest had it (or dataset.images.allow_outside_root=true)")
    of = getattr(module, "images_root_of", None)
    return None if of is None else of(dataset)


def read_dataset(spark, dataset: DatasetConf) -> AdapterOutput:
    return _module(dataset).read(spark, dataset)
