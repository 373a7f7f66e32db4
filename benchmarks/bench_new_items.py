"""New items: ``pipeline`` on a catalog without a few items, then with them back, on one warehouse.

Per-stage wall times of both runs side by side (caption and embed should do only the new items'
work on the rerun), and ``report`` timed on its own.

    python benchmarks/bench_new_items.py [--conf experiments/ml100k.yaml] [--fraction 0.01]
        [--seed 7] [--set key=value ...] [--keep]

A quick check on the synthetic demo (`vlm4rec synth --out /tmp/synth --items 60 --users 30` first):
``--conf experiments/synthetic.yaml --set dataset.paths.root=/tmp/synth --fraction 0.05``.
The work folder (warehouse, reduced files, one log per subprocess) is removed at the end unless
``--keep``, and kept when a run fails.

1. The held-out items: ``--fraction`` of the catalog (at least one), drawn with ``--seed`` among
   the items that have an image file and share no content with another item (image bytes,
   title, text; for MovieLens every TMDB overview of the id). Shared content is excluded
   because the caches key on it: a held-out item whose poster another item also has would be
   "new" without anything new to describe, and the MovieLens adapter's suspect rule (content
   shared by differently titled items) would change other items' content when it comes back.
2. The reduced catalog: the items file and the interactions file without those items (and
   without every interaction with them), written to a temporary folder; the dataset's other
   files (images, overviews) are read in place, through the adapter's options pointing at the
   two reduced files. The MovieLens (``u.item``/``u.data``) and CSV adapters are supported.
3. ``vlm4rec pipeline`` on it, in a fresh temporary warehouse (nothing cached), as a
   subprocess; then ``vlm4rec report`` on that run, as a subprocess (its wall time includes
   starting Spark, which the job needs to record its ``runs`` row; the job's own time is its
   ``runs`` row's finished - started, and its stage times).
4. ``vlm4rec pipeline`` again on the same warehouse with the full catalog (the config as it is:
   the held-out items are the new rows).

The per-stage times come from each job's one-line JSON summary (``ms_<stage>`` counts, the
same figures the ``runs`` table keeps). The baseline is the first run, measured in the same
invocation: the ratio of each stage's rerun time to its first-run time, against the ratio of
new items to the first run's items. The rerun is checked: the caption job described exactly
the new images (``to_describe`` = ``described`` = the new items), and the embed job reused
every stored vector (``reused_<rep>`` = the first run's ``written_<rep>``) and encoded only
the new items' inputs (``written - reused``: the new items, for ``title``, ``visual`` and the
LVLM descriptions; at most that for ``text``); a failed check exits 1.
Prints a table, writes ``benchmarks/results/new_items_<dataset>.json`` with the machine.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from machine import cpu_model  # benchmarks/machine.py (the scripts run from their folder)

REPO = Path(__file__).resolve().parent.parent
SUPPORTED_ADAPTERS = ("movielens", "csv")
# Representations every new item has an input for (an image file and a title): each must be
# encoded for exactly the new items. ``text`` may be missing for some (no overview).
ONE_PER_NEW_ITEM = ("lvlm", "visual", "title")


@dataclass
class Catalog:
    """What the benchmark needs of a dataset's files: each item's content keys (to find items
    that share nothing), which have an image, and how to write the catalog without some items."""

    item_ids: list[str]
    content: dict[str, set[str]]  # item -> hashes of its image bytes, title, texts
    with_image: set[str]
    write_without: object  # (held-out ids, folder) -> the --set overrides that read the reduced files
    files: list[str] = field(default_factory=list)


def sha(data: bytes | str) -> str:
    return hashlib.sha256(data.encode("utf-8") if isinstance(data, str) else data).hexdigest()


def norm(text: object) -> str:
    return " ".join(str(text).lower().split()) if isinstance(text, str) else ""


def image_key(path: Path) -> str | None:
    try:
        return "image:" + sha(path.read_bytes()) if path.is_file() else None
    except OSError:
        return None


def movielens_catalog(dataset) -> Catalog:
    import pandas as pd

    from jobs.adapters.base import options_from, require_path
    from jobs.adapters.movielens import MovieLensOptions

    opts = options_from(MovieLensOptions, dataset)
    root = require_path(dataset, "root")
    items_path = require_path(dataset, "items", opts.items_file)
    ratings_path = require_path(dataset, "ratings", opts.ratings_file)
    lines = items_path.read_bytes().decode("latin-1").splitlines(keepends=True)
    rows = [(line.split("|", 2)[0].strip(), line.split("|", 2)[1]) for line in lines if line.strip()]
    content = {item: {"title:" + norm(title)} for item, title in rows}
    overviews = root / opts.overviews_file
    if overviews.exists():
        tmdb = pd.read_csv(overviews, dtype={"movie_id": str})
        for item, overview in zip(tmdb["movie_id"].str.strip(), tmdb["overview"]):
            if item in content and norm(overview):
                content[item].add("text:" + norm(overview))
    with_image = set()
    for item in content:
        key = image_key(root / opts.posters_dir / f"{item}.jpg")
        if key:
            content[item].add(key)
            with_image.add(item)

    def write_without(held: set[str], folder: Path) -> list[str]:
        kept_items = [line for line in lines if line.split("|", 1)[0].strip() not in held]
        (folder / "u.item").write_bytes("".join(kept_items).encode("latin-1"))
        with open(ratings_path, encoding="utf-8") as src, open(folder / "u.data", "w", encoding="utf-8") as dst:
            # A malformed line stays: the ingest rejects it in both runs alike.
            dst.writelines(line for line in src if (line.split("\t", 2) + [""])[1].strip() not in held)
        return [f"dataset.options.items_file={folder / 'u.item'}", f"dataset.options.ratings_file={folder / 'u.data'}"]

    return Catalog([item for item, _ in rows], content, with_image, write_without, [str(items_path), str(ratings_path)])


def csv_catalog(dataset) -> Catalog:
    from jobs.adapters.base import options_from, require_path
    from jobs.adapters.csv_adapter import CsvOptions

    opts = options_from(CsvOptions, dataset)
    root = require_path(dataset, "root")
    items_path = require_path(dataset, "items", opts.items)
    inter_path = require_path(dataset, "interactions", opts.interactions)
    if (opts.format or items_path.suffix.lstrip(".")) != "csv" or opts.image_only_items:
        raise SystemExit(f"bench_new_items: {items_path}: only CSV catalogs without image_only_items are "
                         "supported; use a CSV dataset or add this format to the script")
    images_root = (root / opts.images_root).resolve() if opts.images_root else root
    with open(items_path, newline="", encoding=opts.encoding) as handle:
        reader = csv.DictReader(handle, delimiter=opts.sep)
        item_columns, item_rows = reader.fieldnames, list(reader)
    content, with_image = {}, set()
    for row in item_rows:
        item = row[opts.item_id].strip()
        keys = {"title:" + norm(row.get(opts.title))}
        if opts.text and norm(row.get(opts.text)):
            keys.add("text:" + norm(row.get(opts.text)))
        image = (row.get(opts.image) or "").strip() if opts.image else ""
        key = image_key(Path(image) if image.startswith("/") else images_root / image) if image else None
        if key:
            keys.add(key)
            with_image.add(item)
        content[item] = keys

    def write_without(held: set[str], folder: Path) -> list[str]:
        for source, column, header, rows in ((items_path, opts.item_id, item_columns, item_rows),
                                             (inter_path, opts.item_id, None, None)):
            if rows is None:
                with open(source, newline="", encoding=opts.encoding) as handle:
                    reader = csv.DictReader(handle, delimiter=opts.sep)
                    header, rows = reader.fieldnames, list(reader)
            with open(folder / source.name, "w", newline="", encoding=opts.encoding) as handle:
                writer = csv.DictWriter(handle, fieldnames=header, delimiter=opts.sep)
                writer.writeheader()
                writer.writerows(r for r in rows if r[column].strip() not in held)
        # Relative image paths stay relative to the dataset's own images root.
        return [f"dataset.options.items={folder / items_path.name}",
                f"dataset.options.interactions={folder / inter_path.name}",
                f"dataset.options.images_root={images_root}"]

    return Catalog(list(content), content, with_image, write_without, [str(items_path), str(inter_path)])


def read_catalog(dataset) -> Catalog:
    if dataset.adapter == "movielens":
        return movielens_catalog(dataset)
    if dataset.adapter == "csv":
        return csv_catalog(dataset)
    raise SystemExit(f"bench_new_items: dataset '{dataset.name}' uses adapter '{dataset.adapter}'; this script "
                     f"supports {', '.join(SUPPORTED_ADAPTERS)} (pass --conf experiments/ml100k.yaml)")


def choose_new_items(catalog: Catalog, fraction: float, seed: int) -> list[str]:
    """``fraction`` of the catalog (at least one item), drawn with ``seed`` among the items with an
    image that share no content key with another item."""
    owners: dict[str, int] = {}
    for keys in catalog.content.values():
        for key in keys:
            if not key.endswith(":"):  # an empty title or text is no shared content
                owners[key] = owners.get(key, 0) + 1
    eligible = sorted(item for item in catalog.with_image
                      if all(owners.get(key, 1) == 1 for key in catalog.content[item]))
    n = max(1, round(fraction * len(catalog.item_ids)))
    if n > len(eligible):
        raise SystemExit(f"bench_new_items: {n} new items wanted (--fraction {fraction}) but only "
                         f"{len(eligible)} items have an image and share no content: lower --fraction")
    return sorted(np.random.default_rng(seed).choice(eligible, n, replace=False).tolist())


def run_cli(argv: list[str], log: Path) -> tuple[float, dict[str, dict]]:
    """``vlm4rec ARGV`` as a subprocess (output to ``log``): (wall seconds, each job's JSON summary
    by job name)."""
    script = Path(sys.executable).with_name("vlm4rec")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "jobs.cli"]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    start = time.perf_counter()
    with open(log, "w") as out:
        code = subprocess.run(command + argv, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env).returncode
    seconds = time.perf_counter() - start
    text = log.read_text(errors="replace")
    if code != 0:
        raise SystemExit(f"vlm4rec {argv[0]} exited {code} (log {log}):\n{text[-4000:]}")
    summaries = {}
    for line in text.splitlines():
        if line.startswith("{") and '"job"' in line:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            summaries[record["job"]] = record
    return seconds, summaries


def stage_seconds(counts: dict) -> dict[str, float]:
    return {key[3:]: value / 1000 for key, value in counts.items() if key.startswith("ms_")}


def embed_reps(counts: dict) -> list[str]:
    """The base representations the embed job wrote (fusions are rebuilt from them every run)."""
    from udfs.representations import parse_representation

    names = [key[len("written_"):] for key in counts if key.startswith("written_")]
    return sorted(n for n in names if not parse_representation(n).parts)


def check_rerun(first: dict[str, dict], rerun: dict[str, dict], n_new: int) -> tuple[dict, list[str]]:
    """Described and encoded counts of both runs, and every way the rerun did more (or less) than
    the new items' work."""
    problems = []
    caption_first = first.get("caption", {}).get("counts", {})
    caption_rerun = rerun.get("caption", {}).get("counts", {})
    counts = {"described_first": caption_first.get("described"), "described_rerun": caption_rerun.get("described"),
              "to_describe_rerun": caption_rerun.get("to_describe"), "cached_rerun": caption_rerun.get("cached"),
              "encoded_first": {}, "encoded_rerun": {}, "reused_rerun": {}}
    if "caption" in rerun:
        for key in ("to_describe", "described"):
            if caption_rerun.get(key) != n_new:
                problems.append(f"caption {key} = {caption_rerun.get(key)} in the rerun, "
                                f"expected the {n_new} new images")
        if caption_rerun.get("cached") != caption_first.get("images"):
            problems.append(f"caption cached = {caption_rerun.get('cached')} in the rerun, expected every image "
                            f"of the first run ({caption_first.get('images')}) to come from the cache")
    embed_first, embed_rerun = first["embed"]["counts"], rerun["embed"]["counts"]
    for rep in embed_reps(embed_rerun):
        written_first, written = embed_first.get(f"written_{rep}", 0), embed_rerun.get(f"written_{rep}", 0)
        reused = embed_rerun.get(f"reused_{rep}", 0)
        encoded = written - reused
        counts["encoded_first"][rep] = written_first - embed_first.get(f"reused_{rep}", 0)
        counts["encoded_rerun"][rep], counts["reused_rerun"][rep] = encoded, reused
        if reused != written_first:
            problems.append(f"embed {rep}: reused {reused} vectors, expected the first run's {written_first}")
        kind = rep.split(":", 1)[0]
        if kind in ONE_PER_NEW_ITEM and encoded != n_new:
            problems.append(f"embed {rep}: encoded {encoded} inputs in the rerun, expected the {n_new} new items")
        elif encoded > n_new:
            problems.append(f"embed {rep}: encoded {encoded} inputs in the rerun, more than the {n_new} new items")
    return counts, problems


def runs_row_seconds(warehouse: Path, run_id: str) -> float | None:
    """finished_at - started_at of a run's ``runs`` row."""
    from udfs.io.warehouse_reader import read_frame

    row = read_frame(warehouse, "runs", equal={"run_id": run_id})
    if len(row) != 1 or row["finished_at"].isna().iloc[0]:
        return None
    return (row["finished_at"].iloc[0] - row["started_at"].iloc[0]).total_seconds()


def print_table(result: dict) -> None:
    """The stages of both runs side by side, the counts, and the report's own time."""
    from jobs.pipeline import STAGES

    machine, counts, report = result["machine"], result["counts"], result["report"]
    first, rerun = result["first_run"], result["rerun"]
    print(f"\nmachine: {machine['cpu_model']}, {machine['cpus']} cores, load {machine['load_average_before'][0]:.1f}"
          f" -> {machine['load_average_after'][0]:.1f}")
    print(f"new items: {len(result['new_items'])} added to {result['items_first_run']} "
          f"(ratio {result['new_item_ratio']:.4f})")
    print(f"{'stage':<20}{'first run s':>12}{'+new rerun s':>14}{'ratio':>8}")
    order = [stage for stage in STAGES if stage in first["stage_s"] or stage in rerun["stage_s"]]
    rows = [(stage, first["stage_s"].get(stage), rerun["stage_s"].get(stage)) for stage in order]
    rows += [(f"{job}.{stage}", times["first"].get(stage), times["rerun"].get(stage))
             for job, times in result["job_stage_s"].items()
             for stage in dict.fromkeys([*times["first"], *times["rerun"]])]
    rows.append(("pipeline (wall)", first["wall_s"], rerun["wall_s"]))
    for name, a, b in rows:
        ratio = f"{b / a:8.3f}" if a and b is not None else f"{'-':>8}"
        a, b = (float("nan") if x is None else x for x in (a, b))
        print(f"{name:<20}{a:>12.1f}{b:>14.1f}{ratio}")
    print(f"described: first {counts['described_first']}, rerun {counts['described_rerun']} "
          f"(cached {counts['cached_rerun']})")
    for rep in counts["encoded_rerun"]:
        print(f"encoded {rep}: first {counts['encoded_first'][rep]}, rerun {counts['encoded_rerun'][rep]} "
              f"(reused {counts['reused_rerun'][rep]})")
    job_s = f"{report['job_s']:.1f} s" if report["job_s"] is not None else "unknown"
    print(f"report alone: {report['subprocess_wall_s']:.1f} s wall (Spark start included), job {job_s}, stages "
          + ", ".join(f"{k} {v:.1f} s" for k, v in report["stage_s"].items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conf", default="experiments/ml100k.yaml", help="the experiment (conf/ relative)")
    parser.add_argument("--fraction", type=float, default=0.01, help="share of the catalog held out, then added")
    parser.add_argument("--seed", type=int, default=7, help="seed of the draw of the held-out items")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every job (repeatable), e.g. dataset.paths.root=DIR")
    parser.add_argument("--keep", action="store_true", help="keep the temporary warehouse, reduced files and logs")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON output (default benchmarks/results/new_items_<dataset>.json)")
    args = parser.parse_args()
    if not 0 < args.fraction < 1:
        parser.error(f"--fraction must be between 0 and 1 (exclusive), got {args.fraction}")
    os.chdir(REPO)  # relative dataset roots in the configs are read from the repository root

    from jobs.config import ConfigError, load_config

    try:
        config = load_config([args.conf], args.overrides)
        catalog = read_catalog(config.dataset)
    except ConfigError as exc:
        raise SystemExit(f"bench_new_items: {exc}")
    new_items = choose_new_items(catalog, args.fraction, args.seed)
    n_first = len(catalog.item_ids) - len(new_items)

    root = Path(tempfile.mkdtemp(prefix="bench-new-items-"))
    warehouse, reduced = root / "warehouse", root / "reduced"
    reduced.mkdir()
    common = ["--conf", args.conf] + [a for o in [*args.overrides, f"warehouse={warehouse}"] for a in ("--set", o)]
    load_before = os.getloadavg()
    finished = False
    try:
        reduced_sets = catalog.write_without(set(new_items), reduced)
        print(f"{config.dataset.name}: {len(catalog.item_ids)} items, {len(new_items)} held out (seed {args.seed}); "
              f"work folder {root}", flush=True)
        first_s, first = run_cli(["pipeline", *common, *[a for o in reduced_sets for a in ("--set", o)]],
                                 root / "first.log")
        print(f"first run (without the new items): {first_s:.1f} s", flush=True)
        run_id = first["pipeline"]["run_id"]
        report_s, report = run_cli(["report", *common, *[a for o in reduced_sets for a in ("--set", o)],
                                    "--run-id", run_id], root / "report.log")
        report_job_s = runs_row_seconds(warehouse, report["report"]["run_id"])
        print(f"report on its own: {report_s:.1f} s", flush=True)
        rerun_s, rerun = run_cli(["pipeline", *common], root / "rerun.log")
        print(f"rerun with the new items: {rerun_s:.1f} s", flush=True)
        finished = True
    finally:
        if finished and not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"kept {root} (warehouse, reduced files, logs)", flush=True)

    counts, problems = check_rerun(first, rerun, len(new_items))
    stages_first, stages_rerun = stage_seconds(first["pipeline"]["counts"]), stage_seconds(rerun["pipeline"]["counts"])
    inner = {job: {"first": stage_seconds(first.get(job, {}).get("counts", {})),
                   "rerun": stage_seconds(rerun.get(job, {}).get("counts", {}))} for job in ("caption", "embed")}
    item_ratio = len(new_items) / n_first
    result = {
        "benchmark": "new_items",
        "machine": {"cpu_model": cpu_model(), "platform": platform.platform(), "cpus": os.cpu_count(),
                    "load_average_before": load_before, "load_average_after": os.getloadavg()},
        "conf": args.conf, "overrides": args.overrides, "dataset": config.dataset.name,
        "fraction": args.fraction, "seed": args.seed, "items_full": len(catalog.item_ids),
        "items_first_run": n_first, "new_items": new_items, "new_item_ratio": item_ratio,
        "first_run": {"run_id": run_id, "wall_s": first_s, "stage_s": stages_first},
        "rerun": {"run_id": rerun["pipeline"]["run_id"], "wall_s": rerun_s, "stage_s": stages_rerun},
        "job_stage_s": inner,
        "report": {"run_id": run_id, "subprocess_wall_s": report_s, "job_s": report_job_s,
                   "stage_s": stage_seconds(report["report"]["counts"]),
                   "in_pipeline_s": stages_first.get("report")},
        "counts": counts, "problems": problems, "passed": not problems,
    }

    print_table(result)
    out = args.out or REPO / "benchmarks" / "results" / f"new_items_{config.dataset.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    if problems:
        print("FAILED: the rerun did not do exactly the new items' work:\n  " + "\n  ".join(problems))
        raise SystemExit(1)
    print(f"checked: the rerun described exactly the {len(new_items)} new images and encoded only the new items")


if __name__ == "__main__":
    main()
