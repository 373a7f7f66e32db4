"""``udfs.io.malloc_tuning`` sets the workers' malloc tunables inside a running process: after it, a
64 MiB allocation comes from the heap instead of its own mmap (glibc's ``mallinfo2``), as in a
process started with ``MALLOC_MMAP_MAX_=0``. Each case runs in a fresh interpreter, so the test
process keeps glibc's defaults."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]

PROBE = """
import ctypes, json, sys
sys.path.insert(0, sys.argv[1])
from udfs.io import malloc_tuning

class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
applied = malloc_tuning.apply(json.loads(sys.argv[2]))
before = libc.mallinfo2().hblkhd
block = libc.malloc(64 << 20)
print(json.dumps({"applied": applied, "mmapped": libc.mallinfo2().hblkhd - before}))
"""


def probe(env: str) -> dict:
    import json

    done = subprocess.run([sys.executable, "-c", PROBE, str(ROOT), env], capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallinfo2 and mallopt are glibc's")
def test_the_workers_tunables_take_effect_in_a_running_process():
    from jobs.config import MALLOC_WORKER_ENV

    plain = probe("{}")
    assert plain["applied"] == {} and plain["mmapped"] >= 64 << 20  # glibc's default: its own mmap
    import json

    tuned = probe(json.dumps(MALLOC_WORKER_ENV))
    assert tuned["applied"] == {k: int(v) for k, v in MALLOC_WORKER_ENV.items()}
    assert tuned["mmapped"] == 0  # from the heap, kept there


def test_other_variables_empty_and_malformed_values_are_left_alone(caplog):
    from udfs.io import malloc_tuning

    applied = malloc_tuning.apply({"PATH": "/bin", "MALLOC_ARENA_MAX": "", "MALLOC_TOP_PAD_": "lots",
                                   "MALLOC_TRIM_THRESHOLD_": str(1 << 32)})
    assert applied == {}
    assert "MALLOC_TOP_PAD_='lots' is not a number" in caplog.text
    assert "MALLOC_TRIM_THRESHOLD_=4294967296 does not fit" in caplog.text
