"""``caption``: item images -> the ``descriptions`` Delta table, on Ray Data with a caption engine.

For the configured dataset and ``experiment.caption`` (engine, model, prompt):

1. The plan reads ``items`` (item_id, image_uri, image_sha256): on the driver with delta-rs
   while the dataset's ``items`` and the engine's ``descriptions`` rows are small
   (``jobs.driver_inputs.read_on_driver``, ``spark.driver_compute_mb``; a fallback is counted
   ``driver_fallback_<reason>``) and ``udfs.caption.caption_udfs.caption_todo``, else in Spark, the same
   function per bounded bucket of image hash (``jobs.caption_plan.spark_plan``). The staged files
   are merged the same way (``jobs.caption_merge``, ``udfs.caption.caption_udfs.staged_winners``).
   Items without an image hash (no
   image, or one that ``ingest`` rejected) are counted ``skipped_no_image``. Items are grouped
   by hash: an image shared by several items is described once (``shared_image_items``).
2. The semantic cache: hashes that already have a row in ``descriptions`` under the same
   (engine, model, prompt_id) are ``cached`` and not described again, across items, datasets
   and reruns, when that row is ``ok`` or a permanent error (the bytes are empty, not an
   image, truncated, too large: the same hash fails the same way every time). Other errors (a
   file changed or missing since ingest, an engine exception) are retried (``retried``).
   ``--force`` (``experiment.caption.force``) describes every image again.
3. Ray Data (``udfs.caption.caption_udfs``): an actor pool of ``caption.num_workers`` engines reads,
   verifies (the bytes must still hash to ``image_sha256``) and decodes each image, shrinks it
   to what the engine needs and describes it (``describe_isolated``: a failing image fails
   alone), one engine batch at a time, and writes each block of at most ``rows_per_file`` rows
   to one Parquet file in ``{warehouse}/_staging/descriptions/{run_id}/``, under a temporary
   name renamed into place. An actor on a GPU (``hf``) has CPU loading tasks before it, so that
   decoding overlaps the model, and I/O tasks after it that write the staged files; on CPU
   those tasks would only take cores from the actor's torch threads. The ``openai`` engine's
   actors read the files the same way (the request carries the file's own bytes when the
   server can take them) and send HTTP requests to the servers of
   ``experiment.caption.openai``; the servers are checked before Ray starts: when none answers
   the job exits 4 (``EXIT_SERVER_DOWN``), naming the URLs (docs/CAPTION_SERVERS.md). The
   ``vllm`` engine runs Ray's own vLLM integration instead of the actor pool.
4. The staged files are merged into ``descriptions`` (``MERGE`` on the key; an error row
   never replaces an ok row, an older row never replaces a newer one), then removes the folder.

Kill safety: a staged file is complete once it has its final name; a killed run leaves its
folder, which the next run merges before planning (so no finished caption is computed twice)
and then removes. A folder is adopted only when its owner is gone (same host and its process
is dead, or older than a day for another host); the adopter claims it by an atomic rename, so
two runs never adopt the same folder. Two runs at once both succeed: each computes its own
plan, ``MERGE`` retries on Delta conflicts, and every key ends with one row.

Counts: ``items``, ``skipped_no_image``, ``images`` (distinct hashes), ``shared_image_items``,
``cached`` (= ``cached_ok`` + ``cached_errors``), ``retried``, ``to_describe``, ``described``,
``failed`` (and ``failed_<kind>``), ``adopted_rows`` (from killed runs), ``staged_files``;
with the ``openai`` engine also ``prompt_tokens``, ``completion_tokens`` (the servers' usage),
``described_after_retry``, ``retries`` and ``retries_<kind>``; stage times ``ms_adopt``,
``ms_plan``, ``ms_prepare_engine`` (the ``openai`` servers' check), ``ms_ray_start``, ``ms_describe``, ``ms_ray_stop``, ``ms_merge``,
``ms_text_figures``. The engine's texts for the dataset's images (``udfs.caption.description_stats``):
``descriptions_texts``, ``descriptions_distinct``, ``descriptions_vocabulary`` and, in thousandths,
``descriptions_distinct_ratio_x1000``, ``descriptions_top_text_share_x1000``,
``descriptions_words_mean_x1000`` and ``descriptions_words_p10/p50/p90_x1000``.
The job prints the representation name the ``embed`` job uses for these descriptions.

The job's settings in ``experiment.caption`` (``jobs.config.CaptionConf``): ``actor_num_cpus``
(CPUs reserved per engine actor; default: up to 1, leaving one core to a GPU actor's image
loading and to Ray's own processes),
``torch_threads`` (per actor; default: the cluster's cores divided by the actors, at most the
cores of the node the actor runs on), ``rows_per_file``
(rows per staged file at most, default 256: a killed run loses at most this many captions
per actor call in flight; an ``openai`` actor has two; an actor that reads its own files gets
smaller blocks when that gives each actor two), ``load_num_cpus`` (CPUs reserved per
image-loading task of a GPU actor, default 0: see below), ``accelerator_type`` (``vllm``). The engine gets its own section as its options:
``experiment.caption.tags``, ``.hf`` or ``.vllm`` (``tensor_parallel_size`` is there).

A GPU actor's image loading reserves no CPU by default, and at most as many loading tasks as
the cluster has CPUs run at once. Loading tasks that reserved CPUs could wait forever when
engine actors hold every CPU: two caption runs sharing a small cluster each got their actor and
neither could load an image (the concurrency test hung this way).
"""
from __future__ import annotations

if not __package__:  # run as a file (`spark-submit jobs/<job>.py`): see jobs/_as_package.py
    from _as_package import PACKAGE as __package__

import argparse
import contextlib
import dataclasses
import json
import logging
import sys
import time
from collections import Counter
from typing import Any

from udfs.io import storage
from udfs.caption.kinds import engine_kind
from udfs.caption.openai_engine import ServerUnavailable
from udfs.io.images import ReadLimits
from udfs.representations import parse_representation

from . import adapters, description_figures
from .caption_merge import adopt_dead_runs, merge_staged, salvage, staged_files, staging_root, write_owner
from .caption_plan import CaptionSpec, caption_spec, plan
from .caption_ray import describe_with_ray
from .config import ConfigError, load_config
from .job_run import EXIT_INSTALL, Job, JobParser, JobRun, NothingUsable, base_parser, run_id_argument
from .plan import check_caption_agrees, run_plan
from .ray_session import ray_session

log = logging.getLogger(__name__)

# The ``openai`` engine's server does not answer (the job's other exit codes: jobs.job_run).
EXIT_SERVER_DOWN = 4


class EngineUnavailable(ImportError):
    """The configured engine's packages are not installed."""


def caption(run: JobRun, args: argparse.Namespace | None = None) -> None:
    """The job body (also called by ``pipeline``)."""
    config = run.config
    if not config.dataset.name:
        raise ConfigError("no dataset configured: pass --conf datasets/NAME.yaml (or --set dataset.name=...)")
    spec = caption_spec(config.experiment.caption)
    if getattr(args, "run_id", None):
        # Only for a run (the pipeline's): a bare caption job, a cache fill, reads no plan
        # and never stores one.
        planned = run_plan(run, args.run_id)
        if planned is not None:
            check_caption_agrees(planned, config.dataset.name, spec.representation, args.run_id)
    missing = spec.kind.missing_install()
    if missing:
        raise EngineUnavailable(missing)
    log.info("caption %s with %s (prompt %s) for dataset %s%s", spec.engine, spec.model, spec.prompt_id,
             config.dataset.name, " (forced)" if spec.conf.force else "")
    # Stage times (ms_<stage> in the counts) say where a run's fixed seconds go; a fully cached
    # rerun stops after the plan and never starts Ray.
    with run.stage("adopt"):
        adopt_dead_runs(run)
    with run.stage("plan"):
        todo = plan(run, spec)
    if todo.num_rows:
        with run.stage("prepare_engine"):
            spec = prepared(spec)
        describe(run, spec, todo)
    else:
        run.counts.update({"described": 0, "failed": 0})
    with run.stage("text_figures"):
        # Over every description of the dataset's images, cached ones included: how distinct
        # and how rich the texts are (udfs.caption.description_stats; evaluate judges their signal).
        description_figures.count_figures(run, config.dataset.name, [parse_representation(spec.representation).name],
                                          vectors=False)
    usable = run.counts["cached_ok"] + run.counts["described"]
    print(f"caption: representation for the embed job: {spec.representation} "
          f"({usable} images with a description)")
    if usable == 0:
        raise NothingUsable(f"dataset '{config.dataset.name}': no image could be described; the errors "
                            f"are in the descriptions table (status = 'error')")


def describe(run: JobRun, spec: CaptionSpec, todo: Any) -> None:
    """Describe the planned images on Ray into the run's staging folder, merge what was staged
    (also when Ray failed: what it finished is kept), and count."""
    config = run.config
    images = config.dataset.images
    # Read where ingest read them: a file swapped for a link out of the root since is refused.
    limits = ReadLimits(images.max_bytes, images.read_timeout_s,
                        None if images.allow_outside_root else adapters.images_root(config.dataset),
                        confine=not images.allow_outside_root)
    folder = storage.join(staging_root(run.warehouse), run.run_id)
    write_owner(folder, run.run_id)
    started = time.perf_counter()
    described = False
    try:
        with contextlib.ExitStack() as stack:
            with run.stage("ray_start"):
                ray = stack.enter_context(ray_session(config.ray))
            with run.stage("describe"):
                summaries = describe_with_ray(ray, todo, spec, folder, limits)
            session = stack.pop_all()
        with run.stage("ray_stop"):
            session.close()
        described = True
    finally:
        if not described:  # whatever stopped Ray (an interrupt too): keep what it finished
            salvage(run, folder)
    seconds = time.perf_counter() - started
    with run.stage("merge"):
        files = staged_files(folder)
        merge_staged(run, files)
        storage.delete_dir(folder)
    run.counts.update({"staged_files": len(files), "described": sum(s["ok"] for s in summaries),
                       "failed": sum(s["error"] for s in summaries), "describe_ms": int(seconds * 1000)})
    for summary in summaries:
        run.counts.update({f"failed_{kind}": n for kind, n in json.loads(summary["error_kinds"]).items()})
    if spec.kind.reports_usage:
        count_requests(run, summaries)
    log.info("described %d images in %.1f s (%.2f images/s)", todo.num_rows, seconds,
             todo.num_rows / max(seconds, 1e-9))


def prepared(spec: CaptionSpec) -> CaptionSpec:
    """The spec with the options the engine describes with once there are images to describe
    (``EngineKind.prepared_options``: the ``openai`` servers that answer now, or
    ``ServerUnavailable``, exit 4, when none does, before any image is sent)."""
    try:
        return dataclasses.replace(spec, engine_options=spec.kind.prepared_options(spec.engine_options, spec.model))
    except ValueError as exc:
        raise ConfigError(f"experiment.caption.{spec.engine}: {exc}") from exc


def count_requests(run: JobRun, summaries: list[dict[str, Any]]) -> None:
    """The cost and fault counts of an engine whose servers report them (``openai``): tokens as the server reported them, images
    described after a retry, and retries per fault kind (``retries_rate_limited``, ...)."""
    run.counts.update({key: sum(int(s.get(key) or 0) for s in summaries)
                       for key in ("prompt_tokens", "completion_tokens", "described_after_retry")})
    retries = sum((Counter(json.loads(s.get("retries") or "{}")) for s in summaries), Counter())
    run.counts["retries"] += sum(retries.values())
    run.counts.update({f"retries_{kind}": n for kind, n in sorted(retries.items())})


def add_arguments(parser: JobParser) -> None:
    parser.add_setting("--force", "experiment.caption.force", type=bool,
                       help="describe every image again, ignoring cached descriptions")
    parser.add_argument("--run-id", default=None, type=run_id_argument,
                        help="check the caption settings against the plan stored under this run id (the "
                             "pipeline's); default: read no plan")


def unavailable_engine(argv: list[str] | None) -> str | None:
    """The install hint when the configured engine cannot run here, checked before any table is
    touched; ``None`` when it can (or the config is wrong, which ``Job.main`` reports)."""
    parser = base_parser("caption", "")
    add_arguments(parser)
    try:
        args, _ = parser.parse_known_args(argv)
        return engine_kind(load_config(args.conf, args.overrides).experiment.caption.engine).missing_install()
    except (ConfigError, SystemExit):
        return None


JOB = Job("caption", __doc__.splitlines()[0], caption, add_arguments,
          exit_codes=((EngineUnavailable, EXIT_INSTALL), (ServerUnavailable, EXIT_SERVER_DOWN)))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    missing = unavailable_engine(argv)
    if missing:
        print(f"vlm4rec caption: {missing}", file=sys.stderr)
        return EXIT_INSTALL
    return JOB.main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
