"""The machine a benchmark ran on, as every script writes it into its JSON and table (the CPU
model matters: machines of the same kind here differ by 2x)."""
from __future__ import annotations

import platform
import subprocess


def cpu_model() -> str:
    """``lscpu``'s model name, else what ``platform`` knows."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration, subprocess.SubprocessError):
        return platform.processor() or "unknown"
