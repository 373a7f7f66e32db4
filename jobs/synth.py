"""Write the synthetic demo dataset: ``vlm4rec synth`` / ``python -m jobs.synth``.

It only writes files (``items.csv``, ``interactions.csv``, ``images/``, ``README.md``,
``manifest.json``) for the ``csv`` adapter (``conf/datasets/synthetic.yaml``) to ingest, so it
needs neither Spark nor the runs table. Rerunning with the same arguments rewrites identical bytes.
"""
from __future__ import annotations

if not __package__:  # run as a file (`spark-submit jobs/<job>.py`): see jobs/_as_package.py
    from _as_package import PACKAGE as __package__

import argparse
import logging
import sys
import time
from collections.abc import Sequence

from udfs.synth import generate

DEFAULT_OUT = "synthetic-data"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="vlm4rec synth",
        description="Generate a synthetic catalog (PIL-rendered product images) and users.",
    )
    for flag, default, meaning in (
        ("--seed", 42, "random seed"),
        ("--items", 500, "number of items"),
        ("--users", 200, "number of users"),
        ("--image-size", 128, "square image side in pixels"),
        ("--min-history", 5, "shortest user history"),
        ("--max-history", 40, "longest user history"),
    ):
        parser.add_argument(flag, type=int, default=default, help=f"{meaning} (default {default})")
    parser.add_argument(
        "--out", default=DEFAULT_OUT, help=f"output folder, created if missing (default {DEFAULT_OUT})"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()
    try:
        counts = generate(
            args.out,
            seed=args.seed,
            n_items=args.items,
            n_users=args.users,
            image_size=args.image_size,
            min_history=args.min_history,
            max_history=args.max_history,
        )
    except (ValueError, OSError) as error:
        print(f"synth: failed: {error}", file=sys.stderr)
        return 2
    print(
        f"synth: wrote {counts['items']} items, {counts['images']} images, {counts['users']} users, "
        f"{counts['interactions']} interactions to {args.out} "
        f"(seed {args.seed}, {time.perf_counter() - started:.1f}s)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
