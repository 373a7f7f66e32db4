"""Ray for a job: started on this machine by default, a running cluster when ``ray.address`` is set.

- ``ray.address: ""`` (the embedded default): ``ray.init`` starts Ray here with
  ``ray.num_cpus`` CPUs (0: all cores) and an object store of ``ray.object_store_memory_mb``;
  the job shuts it down when it ends.
- ``ray.address: "auto"`` or ``"HOST:6379"``: connect to a running cluster (``ray start
  --head``, KubeRay). Every node needs this project and its packages installed, as Spark
  executors do; or submit the job with ``ray job submit --working-dir . -- python -m jobs.caption``
  so that Ray ships the code. The warehouse (and so the staging folder) must be on storage
  that every node sees.
- Ray already initialised in this process (a pipeline, the tests): used as it is, left running.

Ray Data's progress bars are switched on: captioning a catalog takes hours.
"""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

from .config import RayConf

log = logging.getLogger(__name__)

# Passed to the workers of a cluster that the driver's own environment does not reach.
FORWARDED_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "VLM4REC_JARS")


def init_kwargs(conf: RayConf) -> dict[str, Any]:
    """``ray.init`` arguments for ``conf``."""
    common: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING,
                              "configure_logging": False}
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    # Ray starts each worker with its runtime_env's variables (setup_worker execs the worker),
    # so glibc's malloc tunables take effect; os.environ set inside a running worker would not.
    env.update({k: str(v) for k, v in conf.worker_env.items() if v != ""})
    if env:
        common["runtime_env"] = {"env_vars": env}
    if conf.address:
        return {"address": conf.address, **common}
    if conf.num_cpus < 0:
        raise ValueError(f"ray.num_cpus must be >= 0 (0: all cores), got {conf.num_cpus}")
    if conf.object_store_memory_mb < 75:
        raise ValueError(f"ray.object_store_memory_mb must be at least 75 (Ray's minimum), "
                         f"got {conf.object_store_memory_mb}")
    return {"num_cpus": conf.num_cpus or None,
            "object_store_memory": int(conf.object_store_memory_mb) * 1024 * 1024, **common}


def configure_data_context() -> None:
    """Progress bars on; Ray Data's own logging kept to warnings on the console."""
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = True
    context.print_on_execution_start = False


@contextlib.contextmanager
def ray_session(conf: RayConf) -> Iterator[Any]:
    """``ray``, initialised for ``conf`` (or as it already is), shut down on exit if started here."""
    import ray

    if ray.is_initialized():
        configure_data_context()
        yield ray
        return
    kwargs = init_kwargs(conf)
    where = f"the cluster at {conf.address}" if conf.address else "this machine"
    try:
        ray.init(**kwargs)
    except ConnectionError as exc:
        raise ConnectionError(
            f"could not connect to Ray at ray.address={conf.address!r} ({exc}): start the cluster "
            "(`ray start --head`) or leave ray.address empty to run Ray on this machine") from exc
    log.info("Ray started on %s: %s", where, {k: v for k, v in ray.cluster_resources().items()
                                             if k in ("CPU", "GPU", "memory", "object_store_memory")})
    try:
        configure_data_context()
        yield ray
    finally:
        ray.shutdown()
