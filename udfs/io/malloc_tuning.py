"""glibc's malloc tunables set inside a running process (``mallopt``).

The Spark and Ray workers that run torch are spawned with ``MALLOC_MMAP_MAX_``,
``MALLOC_TRIM_THRESHOLD_`` and ``MALLOC_ARENA_MAX`` in their environment
(``jobs.config.MALLOC_WORKER_ENV``): without them glibc hands torch's large buffers back to the
OS after every batch and takes them again, millions of page faults a catalog. A process that is
already running (the driver, when a job encodes on its driver path) cannot be given an
environment; ``mallopt`` sets the same parameters in it. Arenas already created keep their own
limits; that is why the workers' environment stays the primary place. The settings last for the
rest of the process (glibc has no way back to its dynamic thresholds): a pipeline's later
stages run with them too, which costs memory kept, not speed.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
from collections.abc import Mapping

log = logging.getLogger(__name__)

# glibc's mallopt parameter numbers (malloc.h) of the environment variables that name them.
PARAMETERS = {
    "MALLOC_TRIM_THRESHOLD_": -1,  # M_TRIM_THRESHOLD
    "MALLOC_TOP_PAD_": -2,  # M_TOP_PAD
    "MALLOC_MMAP_THRESHOLD_": -3,  # M_MMAP_THRESHOLD
    "MALLOC_MMAP_MAX_": -4,  # M_MMAP_MAX
    "MALLOC_ARENA_TEST": -7,  # M_ARENA_TEST
    "MALLOC_ARENA_MAX": -8,  # M_ARENA_MAX
}


def _mallopt():
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to set
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt


def apply(env: Mapping[str, str]) -> dict[str, int]:
    """Set in this process the tunables ``env`` gives (a worker environment: other variables and
    empty values are ignored, as glibc ignores them); the ones glibc accepted."""
    mallopt = _mallopt()
    applied: dict[str, int] = {}
    if mallopt is None:
        return applied
    for name, value in env.items():
        if name not in PARAMETERS or value is None or not str(value).strip():
            continue
        try:
            number = int(str(value).strip())
        except ValueError:
            log.warning("%s=%r is not a number: left unset in this process", name, value)
            continue
        if not -2**31 <= number < 2**31:
            # glibc reads a larger value from a new process's environment; mallopt takes a C int.
            log.warning("%s=%d does not fit mallopt's int: left unset in this process", name, number)
            continue
        if mallopt(PARAMETERS[name], number) == 1:
            applied[name] = number
    return applied
