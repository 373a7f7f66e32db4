"""The storage failures a job can name, told in one line instead of a traceback (exit 5).

A full disk, a permission error, a corrupt or missing data file and an object store that stops
answering reach us through four libraries (Python's ``OSError``, pyarrow, delta-rs, Spark through
Py4J), each with its own exception class and wording; the rules below read the errno where
there is one and the text otherwise, along the whole ``__cause__``/``__context__`` chain (delta-rs
and pyspark re-raise). Anything else is no storage failure: its traceback stays.
"""
from __future__ import annotations

import errno
import re
from dataclasses import dataclass

RESTORE = ("RESTORE the table to an earlier version (Spark SQL: RESTORE TABLE delta.`<table>` TO VERSION AS OF n) "
           "or rerun the stage that wrote it")

# (what failed, the fix, the errnos that say so, the texts that say so where no errno survives:
# delta-rs and the JVM hand over a message only; ``{warehouse}`` stands for its path: a Parquet file
# missing elsewhere is an input's problem). Checked in order: a full disk while writing Parquet
# also reads "parquet".
RULES = (
    ("no space left on device", "free space there, or point `warehouse` elsewhere (--set warehouse=DIR), and rerun",
     {errno.ENOSPC}, r"No space left on device|os error 28"),
    ("permission denied", "fix the folder's permissions for this user (or point `warehouse` elsewhere) and rerun",
     {errno.EACCES, errno.EPERM, errno.EROFS},
     r"Permission denied|Read-only file system|AccessDeniedException|os error 13|os error 30"),
    ("missing data file (listed in the Delta log, absent from the disk)", RESTORE, set(),
     r"Object at location \S+ not found|FileNotFoundException|FAILED_READ_FILE\.FILE_NOT_EXIST|"
     r"FileNotFoundError: {warehouse}/\S+\.parquet$"),
    ("corrupt data file", RESTORE, set(),
     r"Parquet magic bytes not found|Couldn't deserialize thrift|FAILED_READ_FILE|CANNOT_READ_FILE_FOOTER"),
    ("the store stopped answering", "check the store's endpoint (AWS_ENDPOINT_URL_S3, the network) and rerun",
     set(), r"EndpointConnectionError|error sending request|AWS Error NETWORK_CONNECTION|"
            r"Unable to execute HTTP request|AWSClientIOException"),
)
# Where a message names the path: quoted ('/w/t/part-0.parquet', 'part-0.parquet'), alone (pyarrow's
# FileNotFoundError), after "location", "file", "path", "url" or an HTTP verb (delta-rs, Spark,
# reqwest), or as the endpoint botocore names.
_PATH = re.compile(r"'((?:\w[\w+.-]*:)?/[^'\n]+|[^'\s]+\.parquet)'|^\w+: (\S+\.parquet)$"
                   r"|(?:location|file|[Pp]ath|url|URL:?|GET|PUT|HEAD|POST) \(?\"?"
                   r"((?:\w[\w+.-]*:)?/[^\s\"')]+?)[\"').,]*(?:\s|$)")


@dataclass(frozen=True)
class StorageFailure:
    what: str
    path: str
    fix: str

    def line(self) -> str:
        return f"storage: {self.what} at {self.path}: {self.fix}"


def _chain(exc: BaseException | None):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _table_of(path: str, warehouse: str) -> str:
    """The table folder a data file of the warehouse lies in (``<table>`` when it lies elsewhere)."""
    root = warehouse.rstrip("/") + "/"
    inside = path.split(root, 1)[1] if root in path else None
    return root + inside.split("/")[0] if inside else "<table>"


def classify(exc: BaseException, warehouse: str) -> StorageFailure | None:
    """The storage failure ``exc`` (or an exception it came from) is, naming the path the message
    names (else ``warehouse``), or None for any other error."""
    for what, fix, errnos, pattern in RULES:
        for link in _chain(exc):
            # Py4J's str() is the Java exception's toString and stack: the JVM's wording; botocore's
            # EndpointConnectionError says its kind in its class name only.
            text = f"{type(link).__name__}: {link}"
            if getattr(link, "errno", None) in errnos or re.search(
                    pattern.replace("{warehouse}", re.escape(warehouse.rstrip("/"))), text):
                found = _PATH.search(text)
                named = getattr(link, "filename", None) or (next(g for g in found.groups() if g) if found else None)
                path = str(named or warehouse)
                return StorageFailure(what, path, fix.replace("<table>", _table_of(path, warehouse)))
    return None
