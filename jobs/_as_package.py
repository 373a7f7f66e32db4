"""Lets a job run as a file (``spark-submit jobs/<job>.py``) import its siblings as the ``jobs``
package. Run that way, Python puts ``jobs/`` first on ``sys.path`` and gives the module no
package, so ``from . import tables`` fails. Each job module starts with::

    if not __package__:  # run as a file: see jobs/_as_package.py
        from _as_package import PACKAGE as __package__

Importing this module (found because ``jobs/`` is on ``sys.path``) puts the repository root
there instead, and the job takes ``PACKAGE`` as its ``__package__``.
"""
import sys
from pathlib import Path

PACKAGE = "jobs"
sys.path[0] = str(Path(__file__).resolve().parent.parent)
