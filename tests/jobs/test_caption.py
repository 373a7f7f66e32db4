"""The caption job end to end: real Ray, real Spark + Delta, the real ``tags`` engine (and the tiny
random-weight LLaVA through the ``hf`` engine).

One synthetic catalog is ingested once for the module: 12 items plus one that shares an image
with another, then one image goes bad after ingest with its hash still in ``items`` (garbage
bytes: a file that changed) and one is truncated with ``items`` recording the truncated bytes'
hash (a file that was already bad when it was hashed). Each test writes its own cache slice
(engine, model, prompt_id), so tests do not see each other's descriptions.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from deltalake import DeltaTable
from pyspark.sql import functions as F

from jobs import caption, caption_merge, caption_plan, ingest, tables
from udfs.io.images import sha256_bytes

pytestmark = [pytest.mark.spark, pytest.mark.ray]

REPO = Path(__file__).resolve().parents[2]
CHANGED_ITEM, TRUNCATED_ITEM, SHARED_ITEM, SHARED_WITH = "i00003", "i00005", "z-shared", "i00001"
N_IMAGES = 12  # distinct hashes: the shared item adds an item, not an image


@pytest.fixture(scope="session")
def ray_address():
    """One local Ray for the whole test run (2-4 s to start); jobs in this process reuse it and
    subprocess jobs connect to it by address."""
    import ray

    context = ray.init(num_cpus=2, object_store_memory=200 * 1024 * 1024, include_dashboard=False,
                       configure_logging=False)
    yield context.address_info["gcs_address"]
    ray.shutdown()


@pytest.fixture(scope="module")
def catalog(spark, tmp_path_factory, ray_address):
    """(warehouse, data folder) with the synthetic catalog ingested and two images gone bad."""
    from udfs.synth import generate

    root = tmp_path_factory.mktemp("caption-data")
    wh = tmp_path_factory.mktemp("caption-wh")
    generate(root, seed=0, n_items=12, n_users=8)
    shutil.copy(root / "images" / f"{SHARED_WITH}.png", root / "images" / f"{SHARED_ITEM}.png")
    with open(root / "items.csv", "a") as f:
        f.write(f"{SHARED_ITEM},Shared image item,Same picture as {SHARED_WITH}.,images/{SHARED_ITEM}.png,"
                "hat,pink,dotted,denim\n")
    assert ingest.main(["--conf", "datasets/synthetic.yaml", "--set", f"warehouse={wh}",
                        "--set", f"dataset.paths.root={root}", "--set", "log_level=WARNING"]) == 0

    (root / "images" / f"{CHANGED_ITEM}.png").write_bytes(b"this file was overwritten after ingest" * 4)
    truncated = root / "images" / f"{TRUNCATED_ITEM}.png"
    data = truncated.read_bytes()[: truncated.stat().st_size // 2]
    truncated.write_bytes(data)
    items = tables.read(spark, wh, "items")
    fixed = items.withColumn("image_sha256", F.when(F.col("item_id") == TRUNCATED_ITEM, F.lit(sha256_bytes(data)))
                             .otherwise(F.col("image_sha256"))).localCheckpoint()
    tables.replace_slice(spark, wh, "items", fixed, {"dataset": "synthetic"})
    return wh, root


def argv(wh: Path, root: Path, *extra: str) -> list[str]:
    return ["--conf", "datasets/synthetic.yaml", "--set", f"warehouse={wh}", "--set", f"dataset.paths.root={root}",
            "--set", "log_level=WARNING", "--set", "experiment.caption.batch_size=4", *extra]


def run_caption(capsys, *args: str) -> dict:
    assert caption.main(list(args)) == 0
    out = capsys.readouterr().out
    assert "representation for the embed job: lvlm:" in out
    return json.loads(out.strip().splitlines()[-1])["counts"]


def descriptions(spark, wh: Path, **key: str):
    df = tables.read(spark, wh, "descriptions")
    for column, value in key.items():
        df = df.filter(F.col(column) == value)
    return {r.image_sha256: r for r in df.collect()}


def item_shas(spark, wh: Path) -> dict[str, str]:
    return {r.item_id: r.image_sha256 for r in tables.read(spark, wh, "items").collect()}


def test_one_description_per_image_errors_kept_and_reruns_hit_the_cache(spark, catalog, capsys):
    wh, root = catalog
    counts = run_caption(capsys, *argv(wh, root))
    assert counts["items"] == 13 and counts["images"] == N_IMAGES and counts["shared_image_items"] == 1
    assert counts["skipped_no_image"] == 0 and counts["to_describe"] == N_IMAGES
    assert counts["described"] == N_IMAGES - 2 and counts["failed"] == 2
    assert counts["failed_changed"] == 1 and counts["failed_truncated"] == 1
    # The texts' figures (udfs.caption.description_stats) are over the ok descriptions of the images.
    assert counts["descriptions_texts"] == N_IMAGES - 2 and 0 < counts["descriptions_distinct"] <= N_IMAGES - 2

    shas = item_shas(spark, wh)
    rows = descriptions(spark, wh, engine="tags")
    assert set(rows) == set(shas.values())  # one row per distinct image, the shared one included
    ok = {sha: r for sha, r in rows.items() if r.status == "ok"}
    assert len(ok) == N_IMAGES - 2
    assert all(r.text and r.n_tokens == len(r.text.split()) and r.error is None for r in ok.values())
    # Hats of the synthetic catalog are pink: the engine's colours come from the real pixels.
    assert "pink" in rows[shas[SHARED_WITH]].text and rows[shas[SHARED_WITH]].item_id == SHARED_WITH
    changed, truncated = rows[shas[CHANGED_ITEM]], rows[shas[TRUNCATED_ITEM]]
    assert changed.status == "error" and changed.text is None
    assert changed.error.startswith("changed: ") and "rerun ingest" in changed.error and "not_image" in changed.error
    assert truncated.status == "error" and truncated.error.startswith("truncated: ")
    assert f"{TRUNCATED_ITEM}.png" in truncated.error
    assert not list((Path(wh) / "_staging" / "descriptions").iterdir())

    # The file is restored: only it is retried; the truncated one is a permanent error (cached).
    assert _restore(root, CHANGED_ITEM, shas[CHANGED_ITEM])
    counts = run_caption(capsys, *argv(wh, root))
    assert counts["cached_ok"] == N_IMAGES - 2 and counts["cached_errors"] == 1 and counts["retried"] == 1
    assert counts["to_describe"] == 1 and counts["described"] == 1 and counts["failed"] == 0
    after = descriptions(spark, wh, engine="tags")
    assert after[shas[CHANGED_ITEM]].status == "ok" and after[shas[CHANGED_ITEM]].error is None
    assert all(after[sha].created_at == r.created_at and after[sha].text == r.text for sha, r in ok.items())

    # Everything cached: no image is read and no model runs.
    counts = run_caption(capsys, *argv(wh, root))
    assert counts["to_describe"] == 0 and counts["described"] == 0 and counts["cached"] == N_IMAGES
    assert "describe_ms" not in counts
    assert counts["descriptions_texts"] == N_IMAGES - 1  # cached descriptions count too
    assert descriptions(spark, wh, engine="tags") == after

    # --force describes every image again and replaces the ok rows with newer ones.
    counts = run_caption(capsys, *argv(wh, root), "--force")
    assert counts["to_describe"] == N_IMAGES and counts["described"] == N_IMAGES - 1 and counts["failed"] == 1
    forced = descriptions(spark, wh, engine="tags")
    assert len(forced) == N_IMAGES
    assert all(forced[sha].created_at > r.created_at for sha, r in after.items() if r.status == "ok")
    runs = tables.read(spark, wh, "runs").filter("job = 'caption'").collect()
    assert len(runs) == 4 and {r.status for r in runs} == {"succeeded"}
    assert any(r.counts["described"] == N_IMAGES - 2 for r in runs)


def _restore(root: Path, item: str, sha: str) -> bool:
    """Regenerate the synthetic catalog elsewhere (same seed: byte-identical files) and copy the
    item's original image back."""
    from udfs.synth import generate

    fresh = root.parent / f"{root.name}-fresh"
    if not fresh.exists():
        generate(fresh, seed=0, n_items=12, n_users=8)
    data = (fresh / "images" / f"{item}.png").read_bytes()
    (root / "images" / f"{item}.png").write_bytes(data)
    return sha256_bytes(data) == sha


def test_vllm_without_vllm_installed_fails_before_touching_a_table(tmp_path, capsys):
    wh = tmp_path / "wh"
    code = caption.main(["--conf", "datasets/synthetic.yaml", "--set", f"warehouse={wh}",
                         "--set", "experiment.caption.engine=vllm"])
    assert code == 3
    assert "needs vLLM, which is not installed" in capsys.readouterr().err
    assert not wh.exists()


def test_bad_caption_settings_are_config_errors(catalog, capsys):
    wh, root = catalog
    assert caption.main(argv(wh, root, "--set", "experiment.caption.tags.top_kk=2")) == 2
    assert "experiment.caption.tags.top_kk" in capsys.readouterr().err
    # A range the tags engine checks itself: named by the engine's section.
    assert caption.main(argv(wh, root, "--set", "experiment.caption.tags.top_k=0")) == 2
    assert "experiment.caption.tags: caption engine 'tags': top_k must be in 1..1000" in capsys.readouterr().err


def expected_errors(spark, wh: Path, root: Path) -> int:
    """The truncated image, plus the changed one unless an earlier test restored it."""
    changed = sha256_bytes((root / "images" / f"{CHANGED_ITEM}.png").read_bytes())
    return 1 + (changed != item_shas(spark, wh)[CHANGED_ITEM])


def _staged_parts(wh: Path) -> list[Path]:
    return list((Path(wh) / "_staging" / "descriptions").glob("*/part-*.parquet"))


@pytest.mark.faults
def test_killed_run_is_completed_by_the_next_one(spark, catalog, ray_address, capsys, tmp_path):
    """SIGKILL a subprocess job once it has staged files; the rerun adopts them and finishes."""
    wh, root = catalog
    recipe = ["--set", "experiment.caption.tags.top_k=2", "--set", "experiment.caption.rows_per_file=1",
              "--set", "experiment.caption.batch_size=1"]
    command = [sys.executable, "-m", "jobs.caption", *argv(wh, root), *recipe, "--set", f"ray.address={ray_address}",
               "--set", "spark.master=local[1]", "--set", "spark.driver_memory=1g"]
    log_file = tmp_path / "killed.log"
    with open(log_file, "wb") as log:
        proc = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"})
        try:
            deadline = time.monotonic() + 300
            while not _staged_parts(wh) and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            still_running = proc.poll() is None
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.wait()
    assert still_running, f"the job ended before it was killed:\n{log_file.read_text()[-3000:]}"
    staged_before = len(_staged_parts(wh))
    assert 1 <= staged_before < N_IMAGES

    counts = run_caption(capsys, *argv(wh, root), *recipe)
    assert counts["adopted_files"] >= staged_before and counts["adopted_rows"] >= 1
    assert counts["adopted_rows"] + counts["described"] + counts["failed"] == N_IMAGES
    slice_ = tables.read(spark, wh, "descriptions").filter(F.col("prompt").contains("top_k=2 "))
    assert slice_.count() == N_IMAGES == slice_.select("image_sha256").distinct().count()
    assert slice_.filter("status = 'ok'").count() == N_IMAGES - expected_errors(spark, wh, root)
    assert all(r.text for r in slice_.filter("status = 'ok'").collect())
    assert not list((Path(wh) / "_staging" / "descriptions").iterdir())
    # The rerun found the killed run's driver gone and said so in its record.
    runs = tables.read(spark, wh, "runs").filter("job = 'caption'")
    assert runs.filter("status = 'running'").count() == 0
    abandoned = runs.filter("status = 'abandoned'").collect()
    assert len(abandoned) == 1 and f"pid {proc.pid} " in abandoned[0].error


@pytest.mark.slow
@pytest.mark.faults
def test_two_runs_at_once_both_succeed_and_lose_nothing(spark, catalog, ray_address, tmp_path):
    wh, root = catalog
    command = [sys.executable, "-m", "jobs.caption", *argv(wh, root),
               "--set", "experiment.caption.tags.top_k=4", "--set", f"ray.address={ray_address}",
               "--set", "spark.master=local[1]", "--set", "spark.driver_memory=1g"]
    logs = [tmp_path / f"run{i}.log" for i in range(2)]
    procs = [subprocess.Popen(command, cwd=REPO, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"}) for log in logs]
    codes = [p.wait(timeout=600) for p in procs]
    assert codes == [0, 0], "\n".join(log.read_text()[-3000:] for log in logs)
    rows = tables.read(spark, wh, "descriptions").filter(F.col("prompt").contains("top_k=4 "))
    assert rows.count() == N_IMAGES == rows.select("image_sha256").distinct().count()


def test_hf_engine_with_a_tiny_llava_through_the_whole_job(spark, catalog, capsys, tmp_path_factory):
    from tests.udfs.caption.tiny_llava import build_tiny_llava

    wh, root = catalog
    model = build_tiny_llava(tmp_path_factory.mktemp("tiny-llava"))
    counts = run_caption(capsys, *argv(wh, root, "--set", "experiment.caption.engine=hf",
                                       "--set", f"experiment.caption.model={model}",
                                       "--set", "experiment.caption.max_new_tokens=6",
                                       "--set", "experiment.caption.hf={min_new_tokens: 3, device: cpu}"))
    assert counts["to_describe"] == N_IMAGES and counts["failed"] == expected_errors(spark, wh, root)
    rows = descriptions(spark, wh, engine="hf")
    ok = [r for r in rows.values() if r.status == "ok"]
    assert len(rows) == N_IMAGES and len(ok) == counts["described"] == N_IMAGES - counts["failed"]
    assert all(r.model == str(model) and 3 <= r.n_tokens <= 6 and r.latency_ms > 0 for r in ok)


# --- the pieces, without Spark or Ray (milliseconds) -----------------------------------------

def test_image_loading_names_the_reason_and_checks_the_hash(tmp_path):
    from PIL import Image

    from udfs.caption import caption_udfs as cu

    path = tmp_path / "a.png"
    Image.new("RGB", (900, 300), (200, 30, 35)).save(path)
    data = path.read_bytes()
    img, error = cu.load_one(str(path), sha256_bytes(data), max_side=448)
    assert error is None and img.size == (448, 149)
    _, error = cu.load_one(str(path), "0" * 64, max_side=448)
    assert cu.error_kind(error) == "changed" and "rerun ingest" in error and not cu.is_permanent_error(error)
    path.write_bytes(data[: len(data) // 2])
    _, error = cu.load_one(f"file://{path}", sha256_bytes(path.read_bytes()), max_side=448)
    assert cu.error_kind(error) == "truncated" and cu.is_permanent_error(error) and "a.png" in error
    _, error = cu.load_one(str(tmp_path / "gone.png"), "0" * 64, max_side=448)
    assert cu.error_kind(error) == "missing" and not cu.is_permanent_error(error)
    _, error = cu.load_one("https://example.com/x.jpg", "0" * 64, max_side=448)
    assert cu.error_kind(error) == "remote_uri"
    assert cu.is_permanent_error("empty: image 'x' is empty") and not cu.is_permanent_error("engine: boom")
    assert cu.error_kind(None) is None and not cu.is_permanent_error(None)


def test_staged_files_appear_complete_or_not_at_all(tmp_path):
    import pandas as pd
    import pyarrow.parquet as pq

    from udfs.caption import caption_udfs as cu

    batch = pd.DataFrame({"image_sha256": ["a", "b"], "item_id": ["1", "2"], "text": ["a red hat", pd.NA],
                          "n_tokens": [3, None], "latency_ms": [5.0, None], "status": ["ok", "error"],
                          "error": [None, "engine: RuntimeError: boom"]})
    summary = cu.write_staging(batch, str(tmp_path / "run"), "tags", "m", "p1", "recipe")
    assert summary["ok"].tolist() == [1] and json.loads(summary["error_kinds"][0]) == {"engine": 1}
    files = list((tmp_path / "run").iterdir())
    assert [f.name.startswith(cu.STAGED_FILE_PREFIX) for f in files] == [True]
    table = pq.read_table(files[0])
    assert table.schema.equals(cu.STAGING_SCHEMA, check_metadata=False)
    assert table.column("text").to_pylist() == ["a red hat", None]
    assert table.column("error").to_pylist() == [None, "engine: RuntimeError: boom"]


def test_only_folders_of_dead_runs_are_claimed_and_each_by_one_run(tmp_path):
    root = tmp_path / "staging"
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(finished.stdout)
    caption_merge.write_owner(root / "dead-run", "dead-run")
    owner = json.loads((root / "dead-run" / caption_merge.OWNER_FILE).read_text())
    (root / "dead-run" / caption_merge.OWNER_FILE).write_text(json.dumps({**owner, "pid": dead_pid}))
    caption_merge.write_owner(root / "live-run", "live-run")  # this process: alive
    claimed = caption_merge.claim_dead_folders(root, "me")
    assert [Path(p).name for p in claimed] == ["dead-run.adopted-by-me"]
    assert caption_merge.claim_dead_folders(root, "other") == []  # the claimer (this process) is alive
    assert sorted(p.name for p in root.iterdir()) == ["dead-run.adopted-by-me", "live-run"]


def test_the_driver_plan_is_the_spark_plan(spark, catalog):
    """The plan read on the driver (delta-rs, small tables) and the one Spark job (large ones)
    give the same images to describe and the same counts, over a cache slice with every kind of
    row: ok, a permanent error, a transient error, and images never described."""
    import dataclasses
    import datetime as dt

    from jobs.config import CaptionConf, load_config
    from jobs.job_run import JobRun

    wh, _ = catalog
    spec = dataclasses.replace(caption_plan.caption_spec(CaptionConf()), model="plan-equivalence")
    shas = sorted(set(item_shas(spark, wh).values()))
    now = dt.datetime(2026, 1, 1)
    rows = [(shas[0], spec.engine, spec.model, spec.prompt_id, None, spec.prompt, "a hat", 2, 1.0, "ok", None, now),
            (shas[1], spec.engine, spec.model, spec.prompt_id, None, spec.prompt, None, None, None, "error",
             "truncated: cut short", now),
            (shas[2], spec.engine, spec.model, spec.prompt_id, None, spec.prompt, None, None, None, "error",
             "changed: the file changed since ingest", now)]
    tables.merge(spark, wh, "descriptions", spark.createDataFrame(rows, tables.SCHEMAS["descriptions"]))

    def job_run(driver_compute_mb: int) -> JobRun:
        return JobRun("caption", load_config([], [f"warehouse={wh}", "dataset.name=synthetic",
                                                  f"spark.driver_compute_mb={driver_compute_mb}"]), spark)

    for force in (False, True):
        forced = dataclasses.replace(spec, conf=dataclasses.replace(spec.conf, force=force))
        on_driver = caption_plan.driver_plan(job_run(64), forced)
        assert on_driver is not None
        table, facts = caption_plan.spark_plan(spark, str(wh), "synthetic", forced)
        assert on_driver[0].to_pylist() == table.to_pylist()
        assert on_driver[0].schema.names == table.schema.names
        assert [str(t) for t in on_driver[0].schema.types] == ["string"] * 3
        assert on_driver[1] == facts
        assert facts["ok"] == 1 and facts["final_errors"] == 1 and facts["retry"] == 1
        assert table.num_rows == (N_IMAGES if force else N_IMAGES - 2)
    # With the driver path off the driver declines, says why, and the job plans with Spark.
    run = job_run(0)
    assert caption_plan.driver_plan(run, spec) is None
    assert run.counts["driver_fallback_disabled"] == 1


def test_the_driver_merge_is_the_spark_merge(spark, tmp_path):
    """Staged rows merged on the driver (delta-rs) and by Spark leave the same table, over every
    case of the rule: a new key, ok over an older error, an error that loses to ok, an older ok
    that loses to a newer one, a newer error over an older one, and two staged rows of one key."""
    import datetime as dt

    import pyarrow as pa
    import pyarrow.parquet as pq

    from jobs.config import load_config
    from jobs.job_run import JobRun
    from udfs.caption.caption_udfs import STAGING_SCHEMA

    def row(sha, status, day, text=None):
        return {"image_sha256": sha, "engine": "tags", "model": "m", "prompt_id": "p", "item_id": f"i-{sha}",
                "prompt": "describe", "text": text, "n_tokens": 2 if text else None,
                "latency_ms": 1.5 if text else None, "status": status,
                "error": None if status == "ok" else f"failed on day {day}",
                "created_at": dt.datetime(2026, 1, day, tzinfo=dt.timezone.utc)}

    table = [row("b", "error", 1), row("c", "ok", 1, "kept"), row("d", "ok", 5, "newer kept"), row("e", "error", 1),
             row("g", "ok", 1, "untouched")]
    staged = [[row("a", "ok", 2, "new"), row("b", "ok", 2, "fixed"), row("c", "error", 3)],
              [row("d", "ok", 2, "older"), row("e", "error", 2), row("f", "error", 4), row("f", "ok", 3, "ok wins")]]
    results = {}
    for name, mb in (("driver", 64), ("spark", 0)):
        wh = tmp_path / name
        config = load_config([], [f"warehouse={wh}", f"spark.driver_compute_mb={mb}"])
        tables.merge(spark, wh, "descriptions", spark.createDataFrame(
            pa.Table.from_pylist(table, schema=STAGING_SCHEMA), schema=tables.SCHEMAS["descriptions"]))
        files = []
        for n, rows in enumerate(staged):
            files.append(str(tmp_path / f"{name}-{n}.parquet"))
            pq.write_table(pa.Table.from_pylist(rows, schema=STAGING_SCHEMA), files[-1])
        assert caption_merge.merge_staged(JobRun("caption", config, spark), files) == 4  # a, b, e, f
        results[name] = sorted((r.image_sha256, r.status, r.text, r.created_at.day)
                               for r in tables.read(spark, wh, "descriptions").collect())
        engine = DeltaTable(str(wh / "descriptions")).history(1)[0]["engineInfo"]
        assert engine.startswith("delta-rs") == (name == "driver")
    assert results["driver"] == results["spark"] == [
        ("a", "ok", "new", 2), ("b", "ok", "fixed", 2), ("c", "ok", "kept", 1), ("d", "ok", "newer kept", 5),
        ("e", "error", None, 2), ("f", "ok", "ok wins", 3), ("g", "ok", "untouched", 1)]


@pytest.mark.faults
def test_an_image_outside_the_images_root_is_refused_alone(spark, ray_address, tmp_path, capsys):
    """issue 26.5: caption confines its reads as ingest does. Ingest was allowed outside the root
    (dataset.images.allow_outside_root=true) and hashed a '..' path and an absolute one; one file
    under the root became a link out of it since (same bytes: its hash still matches). Caption,
    confined by default, writes an error row for each of the three and describes the rest."""
    from udfs.synth import generate

    root, outside, wh = tmp_path / "data", tmp_path / "outside", tmp_path / "wh"
    generate(root, seed=2, n_items=6, n_users=4)
    outside.mkdir()
    for item in ("i00001", "i00002", "i00003"):
        shutil.copy(root / "images" / f"{item}.png", outside / f"{item}.png")
    items_csv = root / "items.csv"
    items_csv.write_text(items_csv.read_text().replace("images/i00001.png", "../outside/i00001.png")
                         .replace("images/i00002.png", str(outside / "i00002.png")))
    assert ingest.main([*argv(wh, root, "--set", "dataset.images.allow_outside_root=true")]) == 0
    hashed = item_shas(spark, wh)
    assert all(hashed.values()) and len(hashed) == 6
    (root / "images" / "i00003.png").unlink()
    (root / "images" / "i00003.png").symlink_to(outside / "i00003.png")

    counts = run_caption(capsys, *argv(wh, root))
    assert counts["failed"] == counts["failed_outside_root"] == 3 and counts["described"] == 3
    rows = descriptions(spark, wh, engine="tags")
    refused = {item for item, sha in hashed.items() if rows[sha].status == "error"}
    assert refused == {"i00001", "i00002", "i00003"}
    for item in refused:
        error = rows[hashed[item]].error
        assert error.startswith("outside_root: ") and "outside the dataset's images root" in error
        assert "dataset.images.allow_outside_root=true" in error
