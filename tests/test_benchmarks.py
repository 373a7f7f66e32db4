"""The parts of ``benchmarks/bench_pipeline_vs_script.py`` that restate a job's rule or read its
output: if they drift from the jobs, the benchmark compares different work."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytestmark = pytest.mark.spark

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_pipeline_vs_script",
                                                  REPO / "benchmarks" / "bench_pipeline_vs_script.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_scripts_split_is_the_ingest_jobs_temporal_ratio(spark, bench):
    from udfs.spark.splits import assign_split
    from udfs.evaluate.splits import SplitSpec

    rng = np.random.default_rng(7)
    n = 400
    # Few distinct timestamps: ties, broken by item id as strings ("10" before "9").
    frame = pd.DataFrame({"user_id": rng.integers(0, 30, n).astype(str), "item_id": rng.integers(0, 60, n).astype(str),
                          "rating": 4.0, "ts": rng.integers(0, 8, n).astype("int64")})
    frame = frame.drop_duplicates(["user_id", "item_id", "ts"])
    expected = (assign_split(spark.createDataFrame(frame), SplitSpec("temporal_ratio", (0.7, 0.1, 0.2)))
                .toPandas().sort_values(["user_id", "ts", "item_id"]).reset_index(drop=True))
    got = bench.temporal_ratio_split(frame, (0.7, 0.1, 0.2), 3).reset_index(drop=True)
    assert got[["user_id", "item_id", "ts", "split"]].equals(expected[["user_id", "item_id", "ts", "split"]])


def test_read_delta_gives_the_live_rows_of_a_rewritten_table(spark, bench, tmp_path):
    path = str(tmp_path / "metrics")
    spark.createDataFrame([("a", 1.0)], "representation string, value double").write.format("delta").save(path)
    spark.createDataFrame([("b", 2.0), ("c", 3.0)], "representation string, value double") \
        .write.format("delta").mode("overwrite").save(path)
    spark.createDataFrame([("d", 4.0)], "representation string, value double").write.format("delta").mode("append").save(path)
    rows = bench.read_delta(Path(path)).sort_values("representation")
    assert rows["representation"].tolist() == ["b", "c", "d"]
    assert rows["value"].tolist() == [2.0, 3.0, 4.0]


def test_compare_values_counts_equal_values_and_the_largest_difference(bench):
    pipeline = [{"representation": "a", "value": 0.5}, {"representation": "b", "value": 0.25},
                {"representation": "c", "value": 1.0}]
    script = [{"representation": "a", "value": 0.5 + 1e-12}, {"representation": "b", "value": 0.2}]
    out = bench.compare_values(pipeline, script, ["representation"], ["value"])
    assert (out["values"], out["equal_1e-9"], out["only_in_pipeline"], out["only_in_script"]) == (2, 1, 1, 0)
    assert out["max_abs_diff"] == pytest.approx(0.05)
    assert out["max_abs_diff_at"] == {"representation": "b", "column": "value"}


# benchmarks/bench_new_items.py: which items it holds out, the reduced catalog it writes, and the
# check of the rerun's counts (the pipeline runs themselves are the benchmark, not a test).

@pytest.fixture(scope="module")
def new_items_bench():
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))  # the scripts import benchmarks/machine.py as `machine`
    try:
        spec = importlib.util.spec_from_file_location("bench_new_items", REPO / "benchmarks" / "bench_new_items.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclass resolves annotations through sys.modules
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    return module


def small_csv_catalog(root: Path):
    from PIL import Image

    from jobs.config import load_config

    (root / "images").mkdir(parents=True)
    colours = {"a": "red", "b": "green", "c": "blue", "d": "blue", "e": "white", "f": "black"}
    for item, colour in colours.items():
        Image.new("RGB", (8, 8), colour).save(root / "images" / f"{item}.png")
    rows = [("a", "Red shirt", "images/a.png"), ("b", "Green shirt", "images/b.png"),
            ("c", "Blue shirt", "images/c.png"), ("d", "Blue shirt two", "images/d.png"),  # same image bytes
            ("e", "Shared title", "images/e.png"), ("f", "Shared title", "images/f.png"),
            ("g", "No picture", "")]
    with open(root / "items.csv", "w") as handle:
        handle.write("item_id,title,description,image_path,category,colour,pattern,material\n")
        handle.writelines(f'{i},{t},"Text of {i}, quoted",{p},c,x,y,z\n' for i, t, p in rows)
    with open(root / "interactions.csv", "w") as handle:
        handle.write("user_id,item_id,rating,timestamp\n")
        handle.writelines(f"u{u},{i},5,{100 * u + n}\n" for u in range(3) for n, (i, _, _) in enumerate(rows))
    return load_config(["experiments/synthetic.yaml"], [f"dataset.paths.root={root}"]).dataset


def test_new_items_are_drawn_among_items_with_an_image_that_share_nothing(new_items_bench, tmp_path):
    catalog = new_items_bench.read_catalog(small_csv_catalog(tmp_path / "data"))
    assert catalog.with_image == set("abcdef")
    drawn = {item for seed in range(20) for item in new_items_bench.choose_new_items(catalog, 0.2, seed)}
    assert drawn == {"a", "b"}  # c/d share image bytes, e/f a title, g has no image
    assert new_items_bench.choose_new_items(catalog, 0.2, 3) == new_items_bench.choose_new_items(catalog, 0.2, 3)
    with pytest.raises(SystemExit, match="lower --fraction"):
        new_items_bench.choose_new_items(catalog, 0.5, 0)


def test_the_reduced_catalog_lacks_the_new_items_and_their_interactions(new_items_bench, tmp_path):
    import csv

    dataset = small_csv_catalog(tmp_path / "data")
    catalog = new_items_bench.read_catalog(dataset)
    (tmp_path / "reduced").mkdir()
    overrides = catalog.write_without({"a"}, tmp_path / "reduced")
    with open(tmp_path / "reduced" / "items.csv", newline="") as handle:
        items = list(csv.DictReader(handle))
    with open(tmp_path / "reduced" / "interactions.csv", newline="") as handle:
        interactions = list(csv.DictReader(handle))
    assert [r["item_id"] for r in items] == list("bcdefg")
    assert items[0]["description"] == "Text of b, quoted" and items[0]["image_path"] == "images/b.png"
    assert len(interactions) == 18 and "a" not in {r["item_id"] for r in interactions}
    assert f"dataset.options.items={tmp_path / 'reduced' / 'items.csv'}" in overrides
    assert f"dataset.options.images_root={(tmp_path / 'data').resolve()}" in overrides


def test_the_rerun_check_names_every_piece_of_work_beyond_the_new_items(new_items_bench):
    lvlm = "lvlm:tags:cpu-tags:v1"

    def runs(described_rerun=2, reused_title=98, encoded_text=1):
        first = {"caption": {"counts": {"images": 98, "described": 98, "cached": 0}},
                 "embed": {"counts": {f"written_{lvlm}": 98, "written_title": 98, "written_text": 90,
                                      "written_naive": 98}}}
        rerun = {"caption": {"counts": {"images": 100, "to_describe": 2, "described": described_rerun,
                                        "cached": 98}},
                 "embed": {"counts": {f"written_{lvlm}": 100, f"reused_{lvlm}": 98, "written_title": 100,
                                      "reused_title": reused_title, "written_text": 90 + encoded_text,
                                      "reused_text": 90, "written_naive": 100}}}
        return first, rerun

    counts, problems = new_items_bench.check_rerun(*runs(), n_new=2)
    assert problems == []
    assert counts["encoded_rerun"] == {lvlm: 2, "text": 1, "title": 2}
    assert counts["encoded_first"]["title"] == 98 and counts["described_rerun"] == 2
    _, problems = new_items_bench.check_rerun(*runs(reused_title=97), n_new=2)
    assert problems == ["embed title: reused 97 vectors, expected the first run's 98",
                        "embed title: encoded 3 inputs in the rerun, expected the 2 new items"]
    _, problems = new_items_bench.check_rerun(*runs(described_rerun=1, encoded_text=3), n_new=2)
    assert problems == ["caption described = 1 in the rerun, expected the 2 new images",
                        "embed text: encoded 3 inputs in the rerun, more than the 2 new items"]


def test_the_new_items_script_explains_itself():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_new_items.py"), "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--fraction" in out.stdout and "--keep" in out.stdout


def test_the_new_items_table_puts_both_runs_side_by_side(new_items_bench, capsys):
    result = {"machine": {"cpu_model": "cpu", "cpus": 2, "load_average_before": [1.0], "load_average_after": [2.0]},
              "new_items": ["a", "b"], "items_first_run": 98, "new_item_ratio": 2 / 98,
              "first_run": {"wall_s": 100.0, "stage_s": {"embed": 40.0, "caption": 50.0}},
              "rerun": {"wall_s": 50.0, "stage_s": {"embed": 4.0, "caption": 10.0}},
              "job_stage_s": {"caption": {"first": {"describe": 40.0}, "rerun": {"describe": 1.0}},
                              "embed": {"first": {"encode": 30.0}, "rerun": {}}},
              "report": {"subprocess_wall_s": 20.0, "job_s": None, "stage_s": {"read": 1.5}},
              "counts": {"described_first": 98, "described_rerun": 2, "cached_rerun": 98,
                         "encoded_first": {"title": 98}, "encoded_rerun": {"title": 2}, "reused_rerun": {"title": 98}}}
    new_items_bench.print_table(result)
    lines = capsys.readouterr().out.splitlines()
    table = {line.split()[0]: line.split()[1:] for line in lines if line and line.split()[0] in
             ("caption", "embed", "caption.describe", "embed.encode")}
    assert list(table) == ["caption", "embed", "caption.describe", "embed.encode"]  # the pipeline's order
    assert table["caption"] == ["50.0", "10.0", "0.200"] and table["caption.describe"] == ["40.0", "1.0", "0.025"]
    assert table["embed.encode"] == ["30.0", "nan", "-"]
    assert "encoded title: first 98, rerun 2 (reused 98)" in lines
    assert any(line.startswith("pipeline (wall)") and line.endswith("0.500") for line in lines)


# --scale: the N-times ml100k both sides read (the benchmark's setup, not timed).

ML100K = REPO.parent / "shared" / "data" / "ml100k"


def test_scaled_ml100k_is_the_subset_three_times_with_its_own_titles_overviews_and_posters(bench, tmp_path):
    import hashlib

    from PIL import Image

    if not (ML100K / "u.item").exists():
        pytest.skip(f"needs MovieLens-100k at {ML100K}")
    small = bench.subset_data(ML100K, tmp_path / "small", n_users=3, n_items=5)
    scaled = bench.scale_data(small, tmp_path / "scaled", 3)

    item_lines = (scaled / "u.item").read_text(encoding="latin-1").splitlines()
    assert [line.split("|")[0] for line in item_lines] == [str(i) for i in range(1, 16)]
    originals = {line.split("|")[0]: line.split("|") for line in item_lines[:5]}
    for line in item_lines[5:]:
        fields = line.split("|")
        k, i = divmod(int(fields[0]) - 1, 5)
        assert fields[1] == f"{originals[str(i + 1)][1]} [copy {k}]"
        assert fields[2:] == originals[str(i + 1)][2:]  # date, url, genre flags as they were

    small_ratings = [line.split("\t") for line in (small / "u.data").read_text().splitlines()]
    max_user = max(int(u) for u, *_ in small_ratings)
    expected = [[str(int(u) + k * max_user), str(int(i) + k * 5), r, ts]
                for k in range(3) for u, i, r, ts in small_ratings]
    assert [line.split("\t") for line in (scaled / "u.data").read_text().splitlines()] == expected

    posters = sorted((scaled / "posters").iterdir(), key=lambda p: int(p.stem))
    assert [p.stem for p in posters] == [str(i) for i in range(1, 16)]  # the first five all have one
    assert not any(p.is_symlink() for p in posters)  # ingest confines images after resolving links
    assert len({hashlib.sha256(p.read_bytes()).hexdigest() for p in posters}) == 15
    for p in posters:
        source = small / "posters" / f"{(int(p.stem) - 1) % 5 + 1}.jpg"
        if int(p.stem) <= 5:
            assert p.read_bytes() == source.read_bytes()
            continue
        with Image.open(source) as original, Image.open(p) as image:
            copy = np.asarray(image.convert("RGB"), dtype=np.int16)
            first = np.asarray(original.convert("RGB"), dtype=np.int16)
        # A real picture: the original's pixels up to JPEG's loss, but not its bytes.
        assert copy.shape == first.shape and np.abs(copy - first).mean() < 3

    # The script side's reader (the adapter's rules): three times the items and interactions, no
    # suspect item beyond the original's three times, every copy with its own text and image hash.
    once, thrice = {}, {}
    items_once, ratings_once = bench.read_movielens(small, once)
    items, ratings = bench.read_movielens(scaled, thrice)
    assert (thrice["items"], thrice["interactions"]) == (3 * once["items"], 3 * once["interactions"])
    assert thrice["tmdb_suspect_items"] == 3 * once["tmdb_suspect_items"]
    assert len(ratings) == 3 * len(ratings_once) and len(items) == 15
    by_id = items.set_index("item_id")
    for i in range(1, 6):
        copies = by_id.loc[[str(i + k * 5) for k in range(3)]]
        assert copies["title"].nunique() == 3
        assert copies["image_sha256"].notna().all() and copies["image_sha256"].nunique() == 3
        if isinstance(by_id.loc[str(i), "text"], str):
            assert copies["text"].tolist() == [by_id.loc[str(i), "text"] + s for s in ("", " (copy 1)", " (copy 2)")]


@pytest.fixture(scope="module")
def scale():
    spec = importlib.util.spec_from_file_location("bench_scale", REPO / "benchmarks" / "bench_scale.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_skewed_series_keeps_the_counts_and_follows_a_zipf_law(scale, tmp_path):
    rng = np.random.default_rng(3)
    lines = [f"{u}\t{i}\t{rng.integers(1, 6)}\t{880000000 + n}\n"
             for n, (u, i) in enumerate((u, i) for u in range(1, 201) for i in rng.choice(np.arange(1, 1001), 40, replace=False))]
    (tmp_path / "u.data").write_text("".join(lines))
    scale.skew_ratings(tmp_path)
    rows = pd.read_csv(tmp_path / "u.data", sep="\t", names=["user", "item", "rating", "ts"])
    assert rows["user"].nunique() == 200 and abs(len(rows) - len(lines)) < 200  # floors of the shares
    assert not rows.duplicated(["user", "item"]).any() and rows["rating"].between(1, 5).all()
    per_item = rows["item"].value_counts()
    # Zipf: the top 1% of items hold far more than 1% of the ratings (a uniform draw: about 1%).
    assert per_item.head(10).sum() / len(rows) > 0.1
    per_user = rows["user"].value_counts()
    assert per_user.min() >= 20 and per_user.max() > 5 * per_user.median()


def test_the_scale_fit_recovers_a_line_and_skips_what_a_pass_did_not_run(scale):
    def label(n, seconds):
        return {"work": {"topk": n * 1e9}, "default": {"stages": {"topk": {"wall_s": seconds}}}}
    results = {"1x": label(1, 5.0 + 2.0), "3x": label(3, 5.0 + 6.0), "10x": label(10, 5.0 + 20.0)}
    fits = scale.fit(results)
    line = fits["scaled"]["default"]["topk"]
    assert line["a"] == pytest.approx(5.0) and line["b"] == pytest.approx(2e-9)
    assert line["per_unit"]["10x"] == pytest.approx(25.0 / 1e10)
    assert "distributed" not in fits["scaled"] and "zipf" not in fits


def test_the_event_log_gives_spill_and_shuffle_per_task(scale, tmp_path):
    import json

    events = [{"Event": "SparkListenerTaskEnd", "Task Info": {"Launch Time": 2000},
               "Task Metrics": {"Memory Bytes Spilled": 5, "Disk Bytes Spilled": 3,
                                "Shuffle Write Metrics": {"Shuffle Bytes Written": 7},
                                "Shuffle Read Metrics": {"Remote Bytes Read": 1, "Local Bytes Read": 2}}},
              {"Event": "SparkListenerJobStart", "Job ID": 0}]
    (tmp_path / "app-1").write_text("\n".join(json.dumps(e) for e in events) + "\n")
    assert scale.event_metrics(tmp_path) == [{"at": 2.0, "spilled_memory": 5, "spilled_disk": 3,
                                               "shuffle_written": 7, "shuffle_read": 3}]
