"""``pipeline``: run an experiment config end to end (ingest, caption, embed, fuse, profiles,
topk, evaluate, report) on one Spark session, then print what each table holds and the results table.

The config is parsed once and the experiment plan (``jobs.plan``) resolved once and stored in
``plans`` under the pipeline's run id before the first stage. Every stage is the job itself
(``jobs.<stage>.JOB``), run in this process with that config and plan (``Job.stage``), so each
records its own row in ``runs``; every stage after ``ingest`` gets the pipeline's run id
(``--run-id``), which keys the stored plan, so all of them read one plan: ``caption`` checks its engine against it, ``embed`` builds
the plan's representations, and the run id keys ``fusion_models`` (``fuse`` runs only when the
plan has a trained fusion), ``user_profiles``, ``recommendations``, ``candidates`` and the
metric tables. The pipeline stops at the first stage that fails and exits with its code.
``caption`` runs only when a representation needs descriptions (``lvlm`` ...). Stage wall times are logged
and kept in the pipeline's ``runs`` row as ``ms_<stage>``. ``report`` runs last, with the run
id, and writes ``<warehouse>/reports/<run_id>/report.html`` (printed at the end).
"""
from __future__ import annotations

if not __package__:  # run as a file (`spark-submit jobs/<job>.py`): see jobs/_as_package.py
    from _as_package import PACKAGE as __package__

import argparse
import logging
from importlib import import_module

from pyspark.sql import functions as F

from . import driver_inputs, tables
from .facts import collect_facts
from .job_run import Job, JobRun
from .plan import ExperimentPlan, store_plan

log = logging.getLogger(__name__)

STAGES = ("ingest", "caption", "embed", "fuse", "profiles", "topk", "evaluate", "report")


class StageFailed(RuntimeError):
    def __init__(self, stage: str, code: int):
        super().__init__(f"stage '{stage}' exited with code {code}; see its message above and the runs table")
        self.code = code


def _slice_of(run: JobRun, name: str) -> dict[str, str]:
    """This run's rows of table ``name`` (column -> value): its run id, else its dataset; {}: all rows."""
    columns = tables.SCHEMAS[name].fieldNames()
    if "run_id" in columns and name != "runs":
        return {"run_id": run.run_id}
    if "dataset" in columns:
        return {"dataset": run.config.dataset.name}
    return {}


def table_rows(run: JobRun) -> list[tuple[str, int]]:
    """(table, rows of this run) for every table that exists, in contract order: read with
    delta-rs, one column each (well under a second; through Spark a log replay per table and a
    job, seconds), else, for a named reason (``udfs.io.warehouse_reader.FALLBACK_REASONS``:
    delta-rs cannot open the store, or a slice has more rows than the driver should hold,
    ``driver_inputs.MAX_ROWS``), with one Spark job."""
    from udfs.io.warehouse_reader import FALLBACK_REASONS, TableMissing, read_table

    slices = {name: _slice_of(run, name) for name in tables.SCHEMAS}
    try:
        found = []
        for name, where in slices.items():
            try:
                found.append((name, read_table(run.warehouse, name, equal=where,
                                               columns=list(where) or tables.SCHEMAS[name].fieldNames()[:1],
                                               max_rows=driver_inputs.MAX_ROWS).num_rows))
            except TableMissing:
                continue
        return found
    except tuple(FALLBACK_REASONS) as exc:
        driver_inputs.fallback(run, driver_inputs.fallback_reason(exc), f"counting the tables: {exc}")
    counts = []
    for name, where in slices.items():
        if not tables.exists(run.spark, run.warehouse, name):
            continue
        frame = tables.read(run.spark, run.warehouse, name).filter(tables.slice_filter(where))
        counts.append((name, frame.agg(F.count(F.lit(1)).alias("n")), {"n": F.col("n")}))
    return [(row["kind"], int(row["n"])) for row in collect_facts({"n": "long"}, counts)]


def pipeline(run: JobRun, args: argparse.Namespace) -> None:
    skip = set(args.skip or [])
    # Resolved once, before any stage: every later stage reads it under this run id.
    plan = ExperimentPlan.resolve(run.config)
    store_plan(run.spark, run.warehouse, run.run_id, plan)
    run.count("plan_stored")
    for stage in STAGES:
        if stage in skip or (stage == "caption" and not plan.captioned) \
                or (stage == "fuse" and not plan.trained):
            run.count(f"skipped_stage_{stage}")
            continue
        if stage == "report":
            # The report shows this run's stage times: its row gets them now, as a heartbeat would.
            run.record_progress()
        with run.stage(stage):
            # The job itself, in this process, with this config and plan: parsed and resolved once;
            # every stage that takes a --run-id (all but ingest) gets the pipeline's.
            code = import_module(f"jobs.{stage}").JOB.stage(run.config, run.spark, run.run_id, plan)
        if code != 0:
            raise StageFailed(stage, code)
    print(f"\npipeline {run.run_id}: tables in {run.warehouse}")
    for name, n in table_rows(run):
        run.count(f"rows_{name}", n)
        print(f"  {name:<16} {n:>10,} rows")
    timed = [(stage, run.counts[f"ms_{stage}"] / 1000) for stage in STAGES if f"ms_{stage}" in run.counts]
    if "ms_report" in run.counts:
        print(f"report: {run.warehouse}/reports/{run.run_id}/report.html")
    print("stage wall times: " + ", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in timed)
          + f" (total {sum(s for _, s in timed):.1f} s)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--skip", action="append", choices=STAGES,
                        help="skip a stage whose tables are already up to date (repeatable)")


JOB = Job("pipeline", __doc__.splitlines()[0], pipeline, add_arguments)


def main(argv: list[str] | None = None) -> int:
    try:
        return JOB.main(argv)
    except StageFailed as exc:
        print(f"vlm4rec pipeline: {exc}")
        return exc.code


if __name__ == "__main__":
    raise SystemExit(main())
