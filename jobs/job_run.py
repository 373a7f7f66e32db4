"""What every job shares: ``--conf``/``--set`` parsing, logging, the Spark session, the record
of the run in the ``runs`` table, the final summary line and the exit code.

Exit codes: 0 done (bad rows are counted, not fatal), 1 nothing usable remained,
2 the config or the command line is wrong, 3 the installation is incomplete, (``caption``) 4 no
caption server answers, 5 a storage failure ``jobs.storage_errors`` names (a full disk, a permission
error, a corrupt or missing data file, a store that stopped answering): one line naming the path
and the fix, not a traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import json
import logging
import re
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .config import ALL, COMMON, Config, ConfigError, load_config
from .plan import expand_lvlm
from .storage_errors import classify

log = logging.getLogger("vlm4rec")

EXIT_OK, EXIT_NOTHING_USABLE, EXIT_CONFIG, EXIT_INSTALL = 0, 1, 2, 3
EXIT_STORAGE = 5


class NothingUsable(RuntimeError):
    """No usable row remained after rejecting the bad ones."""


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """The code's git commit (``-dirty`` with uncommitted changes), else the package version;
    asked once per process (two git calls per runs row added up across a pipeline's stages)."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
                             capture_output=True, text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        if sha:
            return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    from importlib.metadata import PackageNotFoundError, version

    try:
        return "vlm4rec-" + version("vlm4rec")
    except PackageNotFoundError:
        return "unknown"


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


# Job runs open in this process: a pipeline's stages run inside its own run, and only the
# outermost one looks for abandoned runs (its stages would find the same rows).
_OPEN_RUNS: list[str] = []


@dataclass
class JobRun:
    """One job's run: its id, its counts, and its row in ``runs`` (written at start, at each
    heartbeat and at the end; a pipeline's stage skips the start row)."""

    job: str
    config: Config
    spark: object
    run_id: str = ""
    counts: Counter = field(default_factory=Counter)
    started_at: dt.datetime = field(default_factory=now)
    driver: Any = None
    abandoned: list[str] = field(default_factory=list)
    # Whether this run's row is in ``runs`` yet: the final row then replaces it, else appends.
    row_written: bool = False
    # (run id, plan) a pipeline resolved and stored before its stages: a stage of that run id
    # reads it from here (``jobs.plan.plan_for_run``), not from the table, and resolves nothing.
    pinned_plan: tuple[str, Any] | None = None
    # Why the final row could not be written after a storage failure (the disk that failed the
    # job may refuse the row too): said on stderr next to the failure's own line.
    unrecorded: str | None = None

    def __post_init__(self):
        if not self.run_id:
            self.run_id = f"{self.job}-{self.started_at:%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"

    @property
    def warehouse(self) -> str:
        return self.config.warehouse_uri()

    def count(self, key: str, n: int = 1) -> None:
        self.counts[key] += int(n)

    @contextlib.contextmanager
    def stage(self, name: str):
        """Time one stage: logged, and kept as ``ms_<name>`` in the run's counts."""
        start = time.perf_counter()
        log.info("%s: %s ...", self.job, name)
        try:
            yield
        finally:
            ms = int((time.perf_counter() - start) * 1000)
            self.counts[f"ms_{name}"] += ms
            log.info("%s: %s took %.1f s", self.job, name, ms / 1000)

    def _record(self, status: str, error: str | None = None, finished: bool = False) -> None:
        from . import tables

        import pyarrow as pa

        # Arrow rows: on a local master delta-rs commits them (``tables``), in ms, not seconds.
        row = {"run_id": self.run_id, "job": self.job, "config": self.config.to_json(), "code_version": code_version(),
               "started_at": self.started_at, "finished_at": now() if finished else None, "status": status,
               "counts": [(k, int(v)) for k, v in list(self.counts.items())], "error": error,
               "host": self.driver.host, "pid": self.driver.pid, "driver_token": self.driver.token,
               "heartbeat_at": now()}
        frame = pa.Table.from_pylist([row], schema=tables.arrow_schema("runs"))
        if self.row_written:
            # One commit swaps the row for the new one: cheaper than a MERGE, which joins the
            # whole runs table first.
            tables.replace_slice(self.spark, self.warehouse, "runs", frame, {"run_id": self.run_id})
        else:
            # A fresh run id: a blind append (a third of a replace's cost), and appends from
            # concurrent jobs never conflict.
            tables.append(self.spark, self.warehouse, "runs", frame)
        self.row_written = True

    def record_progress(self) -> None:
        """Write the run's row now, with the counts and stage times so far (a heartbeat)."""
        with self._row_lock:
            if not self._stop.is_set():
                self._record("running")

    def _beat(self) -> None:
        while not self._stop.wait(self.config.heartbeat_s):
            try:
                self.record_progress()
            except Exception as exc:  # noqa: BLE001 - a missed beat must not kill the job
                # A full disk says so in one line at each beat, not a traceback each time.
                failure = classify(exc, self.warehouse)
                log.warning("run %s: heartbeat not recorded%s", self.run_id, f": {failure.line()}" if failure else "",
                            exc_info=failure is None)

    def __enter__(self) -> "JobRun":
        from .abandoned_runs import Driver, mark_abandoned

        self.driver = Driver.current()
        if not _OPEN_RUNS:
            self.abandoned = mark_abandoned(self.spark, self.warehouse, self.driver, now(),
                                            self.config.heartbeat_s, self.count)
            if self.abandoned:
                self.counts["abandoned_runs_marked"] = len(self.abandoned)
            # The row that says this run is alive, for the next job's abandoned-runs check. A
            # pipeline's stage writes its row when it ends (or at its first heartbeat): the
            # pipeline's own row already says the process runs, and a stage killed with it is
            # told by that row; two commits per stage were a tenth of a small pipeline's time.
            self._record("running")
        self._stop = threading.Event()
        self._row_lock = threading.Lock()
        threading.Thread(target=self._beat, name=f"{self.run_id}-heartbeat", daemon=True).start()
        _OPEN_RUNS.append(self.run_id)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        _OPEN_RUNS.remove(self.run_id)
        self._stop.set()
        status = "succeeded" if exc is None else "failed"
        failure = None if exc is None else classify(exc, self.warehouse)
        error = failure.line() if failure else None if exc is None else f"{exc_type.__name__}: {exc}"
        try:
            with self._row_lock:  # a beat in flight lands first, then the final row replaces it
                self._record(status, error, finished=True)
        except Exception as unrecorded:  # noqa: BLE001 - never mask the job's own error with a bookkeeping one
            if failure is None:
                log.exception("could not record run %s in the runs table", self.run_id)
            self.unrecorded = f"{type(unrecorded).__name__}: {unrecorded}".splitlines()[0]
        return False

    def summary(self) -> str:
        counts = " ".join(f"{k}={v}" for k, v in sorted(self.counts.items()))
        abandoned = f" (marked abandoned: {', '.join(self.abandoned)})" if self.abandoned else ""
        return f"{self.job} {self.run_id}: {counts}{abandoned}"


# Run ids name folders (caption staging, reports) and are typed on command lines: a closed alphabet.
RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


def run_id_argument(text: str) -> str:
    """argparse type of ``--run-id``: a bad id exits 2 with the rule, before Spark starts."""
    if not RUN_ID.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"run id {text!r} is not valid: a run id is 1-128 characters among letters, digits, '.', '_', ':' "
            "and '-', starting with a letter or digit (the ids the jobs print look like "
            "profiles-20261130T120000-1a2b3c)")
    return text


def comma_list(text: str) -> list[str]:
    """argparse type of a list flag: ``train,valid`` -> ['train', 'valid']; '' -> []."""
    return [v.strip() for v in text.split(",") if v.strip()]


class JobParser(argparse.ArgumentParser):
    """A job's command line. A setting's flag (``--k 20``) is an alias of ``--set`` on its config
    key: ``Job.main`` turns it into that override before the config is loaded, so the typed config
    is the one place a setting is read from, and the ``runs`` table records it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.setting_flags: list[tuple[str, str, str]] = []  # (dest, config key, flag)

    def add_setting(self, flag: str, key: str, help: str, type: Callable = str, **kwargs) -> None:
        """``flag VALUE`` means ``--set key=VALUE`` (``type=bool``: a switch meaning ``key=true``)."""
        given_as = {"action": "store_const", "const": True} if type is bool else {"type": type}
        action = self.add_argument(flag, default=None, help=f"{help} (an alias of --set {key}=...)", **given_as,
                                   **kwargs)
        self.setting_flags.append((action.dest, key, flag))

    def setting_overrides(self, args: argparse.Namespace) -> dict[str, str]:
        """``key=value`` override -> the flag it came from, for every setting flag given."""
        values = {(key, flag): getattr(args, dest) for dest, key, flag in self.setting_flags}
        # JSON is YAML: the override parses back to exactly this value.
        return {f"{key}={json.dumps(value)}": f"{flag} (--set {key})"
                for (key, flag), value in values.items() if value is not None}


def add_plan_arguments(parser: JobParser) -> None:
    """``--run-id`` and the plan's flags shared by ``topk`` and ``evaluate`` (aliases of ``--set``;
    a value that differs from the run's stored plan is refused, ``jobs.plan``)."""
    parser.add_argument("--run-id", default=None, type=run_id_argument,
                        help="the run id that user_profiles (and recommendations) are keyed by")
    parser.add_setting("--representations", "experiment.representations", type=comma_list,
                       help="comma-separated representations")
    parser.add_setting("--baselines", "experiment.topk.baselines", type=comma_list,
                       help="comma-separated baselines among popularity,random; '' for none (default: both)")
    parser.add_setting("--candidates", "experiment.topk.candidates", choices=[COMMON, ALL],
                       help="common: items with a vector in every representation (default); "
                            "all: each representation's own items")
    parser.add_setting("--exclude", "experiment.topk.exclude", type=comma_list,
                       help="comma-separated splits whose items are removed from a user's ranking "
                            "(default: train,valid)")


def base_parser(job: str, description: str) -> JobParser:
    parser = JobParser(prog=f"vlm4rec {job}", description=description)
    parser.add_argument("--conf", action="append", default=[], metavar="FILE",
                        help="YAML config merged over conf/base.yaml (repeatable; later wins)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="override one config key, e.g. --set spark.master=local[2]")
    return parser


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("py4j", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@dataclass(frozen=True)
class Job:
    """A job as the command line, ``spark-submit`` and the pipeline run it: the body (the work,
    given a recorded run and the job's arguments), the job's own arguments, and the exceptions it
    reports as one line with an exit code of its own (``caption``'s missing engine, exit 3)."""

    name: str
    description: str
    body: Callable[[JobRun, argparse.Namespace], None]
    add_arguments: Callable[[JobParser], None] | None = None
    exit_codes: tuple[tuple[type, int], ...] = ()

    def parser(self) -> JobParser:
        parser = base_parser(self.name, self.description)
        if self.add_arguments:
            self.add_arguments(parser)
        return parser

    def refuse(self, problem: str, code: int) -> int:
        """Say on one line of stderr why the job stops; its exit code."""
        print(f"vlm4rec {self.name}: {problem}", file=sys.stderr)
        return code

    def main(self, argv: list[str] | None = None, spark=None) -> int:
        """Parse the command line, start Spark, run ``body`` inside a recorded run, print a summary."""
        parser = self.parser()
        args = parser.parse_args(argv)
        flags = parser.setting_overrides(args)
        # After the --set overrides: a flag is the more specific of the two.
        args.overrides = [*args.overrides, *flags]
        from udfs.io.storage import StorageError, check_reachable

        from .spark_session import ConnectorMissing, build_spark

        try:
            config = load_config(args.conf, args.overrides, flags)
            # Every job takes its representations from the run's plan (jobs.plan), which spells
            # them out itself; this early expansion makes a caption section that cannot name its
            # representation fail before Spark starts, and the runs table record the full names.
            config.experiment.representations = expand_lvlm(config.experiment.representations,
                                                            config.experiment.caption)
            setup_logging(config.log_level)
            # Before Spark starts: a bucket that does not exist or refused credentials would
            # otherwise surface as a JVM stack trace from the first table read.
            check_reachable(config.warehouse_uri())
            spark = spark or build_spark(config, app_name=f"vlm4rec-{self.name}")
        except ConfigError as exc:
            return self.refuse(f"config error: {exc}", EXIT_CONFIG)
        except StorageError as exc:
            return self.refuse(f"warehouse {exc}", EXIT_CONFIG)
        except ConnectorMissing as exc:
            return self.refuse(str(exc), EXIT_INSTALL)
        return execute(self, config, spark, args)

    def stage(self, config: Config, spark, run_id: str, plan: Any) -> int:
        """Run as a stage of a pipeline: its config (parsed once) and its resolved plan, under its
        run id; the job's other arguments keep their defaults (its flags are ``--set`` aliases,
        already in the config)."""
        parser = self.parser()
        takes_run_id = "run_id" in vars(parser.parse_args([]))
        args = parser.parse_args(["--run-id", run_id] if takes_run_id and run_id else [])
        return execute(self, config, spark, args, pinned_plan=(run_id, plan))


def execute(job: Job, config: Config, spark, args: argparse.Namespace,
            pinned_plan: tuple[str, Any] | None = None) -> int:
    run = JobRun(job.name, config, spark, pinned_plan=pinned_plan)
    try:
        with run:
            job.body(run, args)
    except ConfigError as exc:
        return job.refuse(f"config error: {exc}", EXIT_CONFIG)
    except NothingUsable as exc:
        code = job.refuse(f"nothing usable: {exc}", EXIT_NOTHING_USABLE)
        print(run.summary())
        return code
    except tuple(kind for kind, _ in job.exit_codes) as exc:
        return job.refuse(str(exc), next(code for kind, code in job.exit_codes if isinstance(exc, kind)))
    except Exception as exc:  # noqa: BLE001 - re-raised, traceback and all, unless it is a named storage failure
        if (failure := classify(exc, config.warehouse_uri())) is None:
            raise
        # Before the failure's own line, which stays the last line of stderr.
        if run.unrecorded:
            job.refuse(f"run {run.run_id}: its runs row could not say `failed` ({run.unrecorded})", EXIT_STORAGE)
        return job.refuse(failure.line(), EXIT_STORAGE)
    print(run.summary())
    print(json.dumps({"run_id": run.run_id, "job": job.name, "counts": dict(run.counts)}, sort_keys=True))
    return EXIT_OK
