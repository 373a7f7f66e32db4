"""Which item ids have an image file under a root, by a naming pattern such as ``{item_id}.jpg``.

Used for items known only from the interactions (no metadata row): their image is found by the
dataset's naming rule. The check runs on the executors, one ``stat`` per id, so a catalog of
100k+ such ids is spread over the cluster instead of being stat-ed one by one on the driver.
"""
from __future__ import annotations

import functools
import os
import re
import string
from typing import Iterable, Iterator

import pandas as pd


def pattern_problem(pattern: str) -> str | None:
    """Why ``pattern`` cannot name an item's image file, or None when it can."""
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(pattern) if name is not None}
    except ValueError as exc:
        return f"it is not a valid pattern ({exc}); write braces only around item_id"
    # "{item_id[0]}/{item_id}.jpg" (a folder per first character) is a field of item_id too.
    bases = {re.split(r"[.\[]", name, maxsplit=1)[0] for name in fields}
    if bases != {"item_id"}:
        extra = sorted(f for f in fields if re.split(r"[.\[]", f, maxsplit=1)[0] != "item_id")
        return (f"it uses {', '.join('{' + f + '}' for f in extra)}: only {{item_id}} is known"
                if extra else "it has no {item_id} placeholder")
    if os.path.isabs(pattern):
        return "it is an absolute path: write it relative to images_root"
    return None


def image_paths(item_ids: Iterable[str], root: str, pattern: str) -> list[str | None]:
    """The absolute path of each id's image file, or None when there is no such file.

    ``root`` must be absolute. An id that would name a path outside ``root`` (``../x``) gets
    None: ids come from data files, and a data file must not make the job read elsewhere. The
    check is lexical, so symbolic links inside ``root`` are followed as the user laid them out."""
    root = os.path.normpath(root)
    return [_image_path(item_id, root, pattern) for item_id in item_ids]


def _image_path(item_id: str | None, root: str, pattern: str) -> str | None:
    if item_id is None or item_id == "":
        return None
    try:
        name = pattern.format(item_id=item_id)
    except (IndexError, AttributeError):  # "{item_id[3]}" on a shorter id: no file by the rule
        return None
    path = os.path.normpath(os.path.join(root, name))
    inside = path.startswith(root.rstrip(os.sep) + os.sep)
    return path if inside and os.path.isfile(path) else None


def _found_batches(batches: Iterator[pd.DataFrame], root: str, pattern: str) -> Iterator[pd.DataFrame]:
    for batch in batches:
        found = batch.assign(image_uri=image_paths(batch["item_id"], root, pattern))
        yield found[found["image_uri"].notna()][["item_id", "image_uri"]]


def with_image_files(ids, root: str, pattern: str):
    """``ids`` (a Spark frame with ``item_id``) -> (item_id, image_uri) for the ids whose file exists."""
    return ids.select("item_id").mapInPandas(functools.partial(_found_batches, root=root, pattern=pattern),
                                              "item_id string, image_uri string")
