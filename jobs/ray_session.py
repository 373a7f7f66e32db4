"""Ray for a job: started on this machine by default, a running cluster when ``ray.address`` is set.

- ``ray.address: ""`` (the embedded default): ``ray.init`` starts Ray here with
  ``ray.num_cpus`` CPUs (0: all cores) and an object store of ``ray.object_store_memory_mb``;
  the job shuts it down when it ends.
- ``ray.address: "auto"`` or ``"HOST:6379"``: connect to a running cluster (``ray start
  --head``, ``ray up``, KubeRay) from a driver that runs on one of its nodes. Every node needs
  this project and its packages installed, as Spark executors do; or submit the job with
  ``ray job submit --address http://HEAD:8265 --working-dir . -- python -m jobs.caption ...``
  (``pip install -e ".[cluster]"`` for the CLI), which runs the driver on the head and ships the
  code. The warehouse (and so the staging folder) must be on storage that every node sees: a
  shared file system or an object store (``s3a://...``).
- ``ray://`` (Ray Client) is refused by the config: Ray Data does not run over Ray Client
  (2.60: ``AttributeError: 'Worker' object has no attribute 'core_worker'``).
- Ray already initialised in this process (a pipeline, the tests): used as it is, left running.

Token authentication (Ray 2.60's default for clusters started with ``ray start``): the driver
needs ``RAY_AUTH_MODE=token`` and the cluster's token, in ``RAY_AUTH_TOKEN`` or in the file
``RAY_AUTH_TOKEN_PATH`` (default ``~/.ray/auth_token``; ``ray get-auth-token`` on the head
prints it). A refused token is reported as such, with that fix, not as "cluster not running".

Ray Data's progress bars are switched on: captioning a catalog takes hours.
"""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

from .config import RayConf
from .spark_session import FORWARDED_ENV

log = logging.getLogger(__name__)


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


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


def connection_failure(address: str, exc: BaseException) -> str:
    """Why connecting to the Ray cluster at ``address`` failed, and the fix: the deepest cause
    that says something (a refused token hides under a generic ConnectionError)."""
    chain = _chain(exc)
    auth = next((e for e in chain if type(e).__name__ == "AuthenticationError"
                 or "InvalidAuthToken" in str(getattr(e, "message", "")) or "InvalidAuthToken" in repr(e)), None)
    if auth is not None:
        return (f"the Ray cluster at ray.address={address!r} refused this driver's authentication "
                f"({getattr(auth, 'message', None) or type(auth).__name__}; "
                f"RAY_AUTH_MODE is {os.environ.get('RAY_AUTH_MODE', 'unset')}): the cluster uses "
                "token authentication (Ray 2.60's default), so set RAY_AUTH_MODE=token and give "
                "the cluster's token in RAY_AUTH_TOKEN or in the file RAY_AUTH_TOKEN_PATH (default "
                "~/.ray/auth_token; `ray get-auth-token` on the head node prints it)")
    causes = "; ".join(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}" for e in chain)
    return (f"could not connect to Ray at ray.address={address!r} ({causes}): check that the cluster runs "
            "(`ray status` on a node), that this driver runs on one of its nodes (use `ray job submit` from "
            "outside), and the address (HOST:6379 of the head, or auto); or leave ray.address empty to run "
            "Ray on this machine")


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
    try:
        ray.init(**init_kwargs(conf))
    # What ray.init raises for a cluster it cannot join: ConnectionError (an OSError) or a
    # RuntimeError from the GCS client, ValueError for an address or a token it refuses. Each is
    # re-raised with the address and the fix; anything else keeps its own traceback.
    except (OSError, RuntimeError, ValueError) as exc:
        if not conf.address:
            raise
        raise ConnectionError(connection_failure(conf.address, exc)) from exc
    where = f"the cluster at {conf.address}" if conf.address else "this machine"
    log.info("Ray started on %s: %s", where, {k: v for k, v in ray.cluster_resources().items()
                                             if k in ("CPU", "GPU", "memory", "object_store_memory")})
    try:
        configure_data_context()
        yield ray
    finally:
        ray.shutdown()
