"""Nothing lost, nobody in: crafted names, failed ingests, killed and concurrent jobs.

Each case runs the real jobs on real Spark + Delta (killed ones as subprocesses, SIGKILL) and
reads the tables back, comparing by content, not by count.
"""
from __future__ import annotations

import datetime as dt
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pyspark.sql import functions as F

from jobs import embed, ingest, profiles, tables, topk
from jobs.abandoned_runs import Driver, is_gone, running_rows

pytestmark = [pytest.mark.spark, pytest.mark.faults]

REPO = Path(__file__).resolve().parents[2]
# Each one ended a naive quoted literal early, or broke it: Spark SQL reads \' as an escaped
# quote and 'a''b' as 'a' 'b' (concatenated).
CRAFTED = ["x\\' OR true --", "x' OR '1'='1", "O'Neill's catalog", "a\\", "%' OR dataset LIKE '%",
           "`; DROP TABLE items; --", "../../etc", "名前 😀 \"quoted\""]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    from udfs.synth import generate

    root = tmp_path_factory.mktemp("faults-synth")
    generate(root, seed=11, n_items=30, n_users=20)
    return root


def ingest_argv(wh, root, name, *extra):
    return ["--conf", "datasets/synthetic.yaml", "--set", f"warehouse={wh}",
            "--set", f"dataset.paths.root={root}", "--set", f"dataset.name={name}", *extra]


def rows(spark, wh, name, dataset=None, **where):
    # topk_id names the topk run that wrote a row: a rerun differs there by design.
    frame = tables.read(spark, wh, name).drop("topk_id")
    if dataset is not None:
        frame = frame.filter(F.col("dataset") == F.lit(dataset))
    for column, value in where.items():
        frame = frame.filter(F.col(column) == F.lit(value))
    # attrs is a map (not orderable): compared as sorted JSON.
    if "attrs" in frame.columns:
        frame = frame.withColumn("attrs", F.to_json(F.array_sort(F.map_entries("attrs"))))
    return sorted(tuple(r) for r in frame.collect())


# --- crafted names ----------------------------------------------------------------------------

def test_sql_literal_round_trips_any_value_through_replace_where(spark, warehouse):
    """Every crafted value, as a run id in a table with no partitions and as a dataset in a
    partitioned one, replaces exactly its own rows."""
    values = ["victim", *CRAFTED, "new\nline", "tab\there"]
    for name, column in (("user_profiles", "run_id"), ("items", "dataset")):
        def frame(value, marker):
            if name == "items":
                data = [(value, "i1", marker, None, None, None, {}, None)]
            else:
                data = [(value, "u1", "title", [1.0], marker)]
            return spark.createDataFrame(data, tables.SCHEMAS[name])

        for marker, value in enumerate(values):
            tables.replace_slice(spark, warehouse, name, frame(value, str(marker) if name == "items" else marker),
                                 {column: value})
        before = rows(spark, warehouse, name)
        assert sorted(r[0] for r in before) == sorted(values)  # one row per value, byte-exact
        for value in values:
            tables.replace_slice(spark, warehouse, name, frame(value, "x" if name == "items" else -1),
                                 {column: value})
            after = {r[0]: r for r in rows(spark, warehouse, name)}
            assert len(after) == len(values)
            others = {r[0]: r for r in before if r[0] != value}
            assert {k: v for k, v in after.items() if k != value} == others
            before = sorted(after.values())


def test_crafted_dataset_names_are_ingested_without_touching_other_datasets(spark, warehouse, synthetic, capsys):
    assert ingest.main(ingest_argv(warehouse, synthetic, "victim")) == 0
    victim = {t: rows(spark, warehouse, t, "victim") for t in ("items", "interactions")}
    assert len(victim["items"]) == 30 and len(victim["interactions"]) > 100
    for name in ("x\\' OR true --", "O'Neill's catalog", "名前 😀 \"quoted\""):
        capsys.readouterr()
        assert ingest.main(ingest_argv(warehouse, synthetic, name)) == 0, capsys.readouterr().err
        for t in ("items", "interactions"):
            assert rows(spark, warehouse, t, "victim") == victim[t], f"{name!r} changed victim's {t}"
        mine = rows(spark, warehouse, "items", name)
        assert len(mine) == 30 and {r[0] for r in mine} == {name}


# As typed after --set: YAML folds a bare newline, quotes keep it; padding quoted meets the name's
# check, bare the --set parser's (both say "white space").
@pytest.mark.parametrize("name, problem", [('"line\\nbreak"', "control character"), ("' padded'", "white space"),
                                           (" padded ", "white space"), ("x" * 129, "129 characters")])
def test_unusable_dataset_names_are_config_errors(spark, warehouse, synthetic, capsys, name, problem):
    assert ingest.main(ingest_argv(warehouse, synthetic, name)) == 2
    err = capsys.readouterr().err
    assert "dataset.name" in err and problem in err and "--set" in err
    assert not tables.exists(spark, warehouse, "items")


def test_a_padded_value_is_an_error_in_a_file_and_after_set(tmp_path):
    """issue 26.5: YAML trims a bare value after --set. Trimmed, a padded name would pass where the
    same name quoted in a file fails; kept, a padded path would be a relative one. Both are errors
    that name the value; quoted after --set, the name meets the file's check word for word."""
    from jobs.config import ConfigError, load_config

    conf = tmp_path / "padded.yaml"
    conf.write_text('dataset:\n  name: " padded "\n')
    errors = []
    for files, overrides in (([str(conf)], []), ([], ['dataset.name=" padded "'])):
        with pytest.raises(ConfigError) as info:
            load_config(["datasets/synthetic.yaml", *files], overrides)
        errors.append(str(info.value))
    assert errors[0].replace(str(conf.resolve()), """--set dataset.name=" padded \"""") == errors[1]
    assert "starts or ends with white space in ' padded '" in errors[1]
    for override in ("dataset.name= padded ", "warehouse= /tmp/x"):
        with pytest.raises(ConfigError, match="starts or ends with white space; remove it, or quote the value"):
            load_config(["datasets/synthetic.yaml"], [override])


def test_item_and_user_ids_stay_arbitrary_strings(spark, warehouse, synthetic, tmp_path):
    """Names are validated; ids are data: every crafted string round-trips byte-exact."""
    import csv

    root = tmp_path / "ids"
    shutil.copytree(synthetic / "images", root / "images")
    image = sorted((root / "images").iterdir())[0].name
    ids = [*CRAFTED, "a,b", "tab\tid"]
    with open(root / "items.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["item_id", "title", "description", "image_path", "category", "colour", "pattern",
                         "material"])
        writer.writerows([i, f"title {n}", "d", f"images/{image}", "c", "r", "p", "m"] for n, i in enumerate(ids))
    with open(root / "interactions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["user_id", "item_id", "rating", "timestamp"])
        writer.writerows([u, i, 5, 1000 + n] for u in ids for n, i in enumerate(ids))
    assert ingest.main(ingest_argv(warehouse, root, "ids")) == 0
    items = {r.item_id for r in tables.read(spark, warehouse, "items").collect()}
    pairs = {(r.user_id, r.item_id) for r in tables.read(spark, warehouse, "interactions").collect()}
    assert items == set(ids)
    assert pairs == {(u, i) for u in ids for i in ids}


@pytest.mark.parametrize("job", [profiles, topk])
def test_crafted_run_ids_are_refused_before_anything_runs(spark, warehouse, capsys, job):
    with pytest.raises(SystemExit) as exit_:
        job.main(["--conf", "datasets/synthetic.yaml", "--set", f"warehouse={warehouse}",
                  "--run-id", "x\\' OR true --"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "run id" in err and "letters, digits" in err
    assert not tables.exists(spark, warehouse, "runs")


# --- a failed ingest keeps the last good snapshot ----------------------------------------------

def _variant(synthetic: Path, tmp_path: Path, interactions: str) -> Path:
    root = tmp_path / "variant"
    root.mkdir()
    (root / "items.csv").write_bytes((synthetic / "items.csv").read_bytes())
    shutil.copytree(synthetic / "images", root / "images")
    (root / "interactions.csv").write_text(interactions)
    return root


def _snapshot(spark, wh, name):
    return {t: rows(spark, wh, t, name) for t in ("items", "interactions")}


@pytest.mark.parametrize("case", ["header_only", "all_rejected", "wrong_mapping"])
def test_a_failed_ingest_leaves_the_previous_snapshot_identical(spark, warehouse, synthetic, tmp_path, capsys, case):
    assert ingest.main(ingest_argv(warehouse, synthetic, "shop")) == 0
    before = _snapshot(spark, warehouse, "shop")
    header = (synthetic / "interactions.csv").read_text().splitlines()[0]
    if case == "header_only":
        root, extra, code = _variant(synthetic, tmp_path, header + "\n"), [], 1
    elif case == "all_rejected":  # every row names an item that is not in the catalog
        root, extra, code = _variant(synthetic, tmp_path, header + "\nu1,nosuch,5,100\nu2,nosuch2,4,200\n"), [], 1
    else:
        root, extra, code = synthetic, ["--set", "dataset.options.user_id=customer"], 2
    capsys.readouterr()
    assert ingest.main(ingest_argv(warehouse, root, "shop", *extra)) == code
    captured = capsys.readouterr()
    assert _snapshot(spark, warehouse, "shop") == before
    if code == 1:
        assert "previous snapshot" in captured.err
        assert {r.reason.split(" ")[0] for r in tables.read(spark, warehouse, "rejects").collect()} <= {"item_id"}
    runs = tables.read(spark, warehouse, "runs").filter("job = 'ingest'").orderBy("started_at").collect()
    assert [r.status for r in runs] == ["succeeded", "failed"]


def test_profiles_refuses_items_and_interactions_of_two_ingests(spark, warehouse, synthetic, capsys):
    """What an ingest killed between its two commits leaves: caught where the two meet."""
    assert ingest.main(ingest_argv(warehouse, synthetic, "shop")) == 0
    first = tables.read(spark, warehouse, "items").first().ingest_id
    interactions = tables.read(spark, warehouse, "interactions").filter(F.col("dataset") == "shop")
    tables.replace_slice(spark, warehouse, "interactions",
                         interactions.withColumn("ingest_id", F.lit("ingest-later-000000")), {"dataset": "shop"})
    capsys.readouterr()
    code = profiles.main(ingest_argv(warehouse, synthetic, "shop",
                                     "--set", "experiment.representations=[title]"))
    err = capsys.readouterr().err
    assert code == 1
    assert first in err and "ingest-later-000000" in err and "rerun `vlm4rec ingest`" in err


# --- killed runs ------------------------------------------------------------------------------

def _spawn(job: str, argv: list[str], log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", f"jobs.{job}", *argv, "--set", "spark.master=local[1]",
               "--set", "spark.driver_memory=1g"]
    return subprocess.Popen(command, cwd=REPO, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})


def _kill_when_running(spark, wh, proc, job: str, log: Path, after_s: float, must_be_alive: bool = True) -> bool:
    """SIGKILL ``proc`` ``after_s`` seconds after it logs its first stage, which it does once its
    ``running`` row is committed (watched in its log, not through Spark: a query from this
    process could take longer than a small job on a loaded machine). Whether it was still
    running; unless ``must_be_alive`` is False, a job that ended first fails the test."""
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if f"vlm4rec: {job}: " in log.read_text(errors="replace"):
            break
        time.sleep(0.1)
    time.sleep(after_s)
    alive = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert alive or not must_be_alive, f"{job} ended before it was killed:\n{log.read_text()[-3000:]}"
    return alive


def test_a_killed_job_is_marked_abandoned_by_the_next_one(spark, warehouse, synthetic, tmp_path, capsys):
    log = tmp_path / "killed.log"
    proc = _spawn("ingest", ingest_argv(warehouse, synthetic, "shop"), log)
    _kill_when_running(spark, warehouse, proc, "ingest", log, after_s=0.5)
    capsys.readouterr()
    assert ingest.main(ingest_argv(warehouse, synthetic, "shop")) == 0
    out = capsys.readouterr().out
    runs = {r.run_id: r for r in tables.read(spark, warehouse, "runs").collect()}
    killed = [r for r in runs.values() if r.pid == proc.pid]
    assert len(killed) == 1 and killed[0].status == "abandoned"
    assert f"pid {proc.pid} " in killed[0].error and "no longer runs" in killed[0].error
    assert f"marked abandoned: {killed[0].run_id}" in out
    assert [r.status for r in runs.values() if r.pid != proc.pid] == ["succeeded"]


def test_running_rows_read_without_spark_equal_spark_s(spark, tmp_path):
    # The abandoned-runs check reads the running rows with delta-rs: the same rows, and the
    # same naive UTC datetimes, as Spark reads.
    wh = str(tmp_path / "wh")
    here = Driver.current()
    at = dt.datetime(2026, 11, 30, 12, 0, 0, 123000)
    rows = [(f"job-{i}", "job", "{}", "v", at, None, status, {}, None, here.host, 4000 + i, "t", at)
            for i, status in enumerate(["running", "succeeded", "running"])]
    tables.append(spark, wh, "runs", spark.createDataFrame(rows, tables.SCHEMAS["runs"]))
    fast = sorted(running_rows(spark, wh), key=lambda r: r["run_id"])
    slow = [r.asDict() for r in tables.read(spark, wh, "runs").filter(F.col("status") == "running")
            .select(*fast[0]).orderBy("run_id").collect()]
    assert fast == slow and [r["run_id"] for r in fast] == ["job-0", "job-2"]
    assert fast[0]["started_at"] == at and fast[0]["heartbeat_at"].tzinfo is None
    assert running_rows(spark, str(tmp_path / "empty")) == []


def test_liveness_rules():
    here = Driver.current()
    now = dt.datetime(2026, 11, 30, 12, 0, 0)
    row = {"host": here.host, "pid": here.pid, "driver_token": here.token, "heartbeat_at": now, "started_at": now}
    assert is_gone(row, here, now, 60) is None  # this very process
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert "no longer runs" in is_gone({**row, "pid": child.pid, "driver_token": "x"}, here, now, 60)
    assert "another process" in is_gone({**row, "driver_token": "some-other-boot:1"}, here, now, 60)
    elsewhere = {**row, "host": "node-7"}
    assert is_gone(elsewhere, here, now + dt.timedelta(seconds=170), 60) is None
    assert "no heartbeat" in is_gone(elsewhere, here, now + dt.timedelta(seconds=181), 60)
    assert is_gone({**row, "host": None}, here, now + dt.timedelta(days=9), 60) is None


@pytest.fixture(scope="module")
def embedded(spark, synthetic, tmp_path_factory):
    """A warehouse with the synthetic catalog ingested and embedded (title, visual, naive)."""
    wh = tmp_path_factory.mktemp("faults-wh")
    base = ingest_argv(wh, synthetic, "shop", "--set", "experiment.representations=[title,visual,naive]")
    assert ingest.main(base) == 0
    assert embed.main(base) == 0
    return wh, base


def test_embed_killed_at_any_point_then_rerun_equals_one_clean_run(spark, embedded, tmp_path):
    wh, base = embedded
    clean = rows(spark, wh, "item_embeddings", "shop")
    # Without reuse every vector is encoded again: seconds of work after the first stage, in
    # which the kills land (a later kill may find the job done: its tables are checked alike).
    again = base + ["--set", "experiment.embed.reuse_vectors=false"]
    for after_s in (0.0, 1.0, 3.0):
        log = tmp_path / f"embed-{after_s}.log"
        _kill_when_running(spark, wh, _spawn("embed", again, log), "embed", log, after_s, must_be_alive=after_s == 0)
        assert rows(spark, wh, "item_embeddings", "shop") == clean  # the old slice or the new one
        assert embed.main(base) == 0
        assert rows(spark, wh, "item_embeddings", "shop") == clean


def test_topk_killed_then_rerun_equals_one_clean_run(spark, embedded, tmp_path):
    wh, base = embedded
    run = base + ["--run-id", "faults-topk"]
    assert profiles.main(run) == 0
    assert topk.main(run) == 0
    clean = rows(spark, wh, "recommendations", run_id="faults-topk")
    assert clean
    for after_s in (0.0, 0.5, 1.5):
        log = tmp_path / f"topk-{after_s}.log"
        _kill_when_running(spark, wh, _spawn("topk", run, log), "topk", log, after_s, must_be_alive=after_s == 0)
        assert rows(spark, wh, "recommendations", run_id="faults-topk") == clean
        assert topk.main(run) == 0
        assert rows(spark, wh, "recommendations", run_id="faults-topk") == clean


def test_two_ingests_at_once_lose_nothing(spark, synthetic, tmp_path):
    alone, together = tmp_path / "alone", tmp_path / "together"
    for name in ("a", "b"):
        assert ingest.main(ingest_argv(alone, synthetic, name)) == 0
    logs = [tmp_path / f"ingest-{name}.log" for name in ("a", "b")]
    procs = [_spawn("ingest", ingest_argv(together, synthetic, name), log) for name, log in zip("ab", logs)]
    codes = [p.wait(timeout=600) for p in procs]
    assert codes == [0, 0], "\n".join(log.read_text()[-3000:] for log in logs)
    for t in ("items", "interactions"):
        for name in ("a", "b"):
            # ingest_id is the run id: the only column that differs between the two warehouses.
            strip = [tuple(v for i, v in enumerate(r) if i != len(r) - 1) for r in rows(spark, alone, t, name)]
            got = [tuple(v for i, v in enumerate(r) if i != len(r) - 1) for r in rows(spark, together, t, name)]
            assert got == strip and got
    statuses = [r.status for r in tables.read(spark, together, "runs").collect()]
    assert statuses == ["succeeded", "succeeded"]


# --- storage failures: one line naming the path and the fix, exit 5 ------------------------------

def _last_run(wh, job: str) -> dict:
    from deltalake import DeltaTable

    return max((r for r in DeltaTable(str(wh / "runs")).to_pyarrow_table().to_pylist() if r["job"] == job),
               key=lambda r: r["started_at"])


def test_a_full_disk_fails_ingest_with_one_line_naming_the_warehouse(small_disk, tmp_path):
    """A subprocess, so that stderr is all the job prints (JVM and delta-rs included). 24 KiB hold
    the `running` row and not much more (64 KiB hold the whole small ingest)."""
    from udfs.synth import generate

    root = tmp_path / "catalog"
    generate(root, seed=11, n_items=20, n_users=30)
    wh = small_disk("24k") / "warehouse"
    # Four beats a second fill the disk within a second or two of the `running` row, long before
    # the first data commit: the beats meet the full disk too, and say so in one line each.
    argv = [*ingest_argv(wh, root, "shop"), "--set", "heartbeat_s=0.25", "--set", "spark.master=local[1]",
            "--set", "spark.driver_memory=1g"]
    done = subprocess.run([sys.executable, "-m", "jobs.ingest", *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 5, done.stderr[-4000:]
    line = f"storage: no space left on device at {wh}: free space there, or point `warehouse` elsewhere"
    assert lines[-1].startswith(f"vlm4rec ingest: {line}") and "Traceback" not in done.stderr
    assert f"heartbeat not recorded: {line}" in done.stderr
    row = _last_run(wh, "ingest")
    if "its runs row could not say `failed`" in lines[-2]:  # the full disk took the failed row too
        assert "No space left on device" in lines[-2] and row["status"] == "running"
    else:
        assert row["status"] == "failed" and row["error"] == lines[-1].removeprefix("vlm4rec ingest: ")


def test_a_read_only_warehouse_fails_with_one_line_naming_it(spark, synthetic, small_disk, capsys):
    wh = small_disk("1m", read_only=True) / "warehouse"
    assert ingest.main(ingest_argv(wh, synthetic, "shop")) == 5
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"vlm4rec ingest: storage: permission denied at {wh}")
    assert "fix the folder's permissions" in last


def test_a_truncated_data_file_stops_topk_and_recommend_with_one_line_naming_it(spark, embedded, tmp_path, capsys):
    from jobs import recommend

    source, base = embedded
    wh = tmp_path / "wh"
    shutil.copytree(source, wh)
    argv = [a.replace(str(source), str(wh)) for a in base] + ["--run-id", "faults-storage"]
    assert profiles.main(argv) == 0 and topk.main(argv) == 0
    user = tables.read(spark, wh, "user_profiles").filter(F.col("run_id") == "faults-storage").first().user_id
    for part in (wh / "item_embeddings").rglob("*.parquet"):
        part.write_bytes(part.read_bytes()[:len(part.read_bytes()) // 2])
    capsys.readouterr()
    serve = ["--conf", "datasets/synthetic.yaml", "--set", f"warehouse={wh}", "--run-id", "faults-storage",
             "--representation", "title", "--user", user]
    assert recommend.main(serve) == 5
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"vlm4rec recommend: storage: corrupt data file at {wh}/item_embeddings/")
    assert f"RESTORE TABLE delta.`{wh}/item_embeddings`" in line and ".parquet:" in line
    assert topk.main(argv) == 5
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("vlm4rec topk: storage: corrupt data file at ") and f"{wh}/item_embeddings/" in last
    assert f"RESTORE TABLE delta.`{wh}/item_embeddings`" in last and ".parquet:" in last
    assert _last_run(wh, "topk")["error"] == last.removeprefix("vlm4rec topk: ")
    # Files the Delta log lists and the disk lacks: the same line, saying so.
    for part in (wh / "item_embeddings").rglob("*.parquet"):
        part.unlink()
    for job, run in ((recommend, serve), (topk, argv)):
        assert job.main(run) == 5
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert "storage: missing data file" in last and f"{wh}/item_embeddings/" in last, last


def test_an_injected_error_keeps_its_traceback_and_its_failed_row(spark, warehouse, synthetic, monkeypatch):
    def injected(*args, **kwargs):
        raise RuntimeError("injected into assign_split")

    monkeypatch.setattr(ingest, "assign_split", injected)
    # Raised out of main, as today: the console script prints its traceback and exits 1.
    with pytest.raises(RuntimeError, match="injected into assign_split"):
        ingest.main(ingest_argv(warehouse, synthetic, "shop"))
    row = _last_run(warehouse, "ingest")
    assert row["status"] == "failed" and row["error"] == "RuntimeError: injected into assign_split"
