"""MovieLens-100k with posters and TMDB plot overviews (``../shared/data/ml100k``).

Files under ``dataset.paths.root``: ``u.data`` (user, item, rating, ts; tab-separated),
``u.item`` (``|``-separated, latin-1), ``items_tmdb.csv`` (overview per movie_id) and
``posters/{item_id}.jpg``. The data's known defects, each handled and counted:
- items without a poster file: kept without an image (``items_without_image``);
- movie ids with several TMDB rows: the row whose title equals the ``u.item`` title wins, ties
  by the first row (``tmdb_duplicate_ids``);
- wrong TMDB matches: an overview or poster shared by items with *different* titles belongs to
  at most one of them and nothing in the files says which; with ``suspect_content: drop`` (the
  default) those items lose the overview and poster, with ``keep`` they keep them; either way
  ``attrs['content_suspect']`` lists the other ids (``tmdb_suspect_items``);
- shared posters between items with the *same* title (MovieLens lists some films twice) are
  legitimate and are described once by the caption cache (``shared_poster_items``).
"""
from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from ..config import ConfigError, DatasetConf
from .base import AdapterOutput, images_folder, options_from, parse_delimited, require_path

GENRES = ["unknown", "Action", "Adventure", "Animation", "Children", "Comedy", "Crime", "Documentary",
          "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
          "Thriller", "War", "Western"]


@dataclass
class MovieLensOptions:
    ratings_file: str = "u.data"
    items_file: str = "u.item"
    overviews_file: str = "items_tmdb.csv"
    posters_dir: str = "posters"
    suspect_content: str = "drop"  # drop | keep


def _norm_title(title: object) -> str:
    return " ".join(str(title).lower().split()) if isinstance(title, str) else ""


def images_root_of(dataset: DatasetConf) -> str:
    """Where ingest and caption keep this dataset's posters (``base.images_folder``)."""
    return images_folder(dataset, options_from(MovieLensOptions, dataset).posters_dir)


def read(spark: SparkSession, dataset: DatasetConf) -> AdapterOutput:
    opts = options_from(MovieLensOptions, dataset)
    if opts.suspect_content not in ("drop", "keep"):
        raise ConfigError(f"dataset.options.suspect_content must be 'drop' or 'keep', got {opts.suspect_content!r}")
    root = require_path(dataset, "root")
    ratings_path = require_path(dataset, "ratings", opts.ratings_file)
    items_path = require_path(dataset, "items", opts.items_file)
    counts: dict[str, int] = {}

    interactions, rejects = parse_delimited(
        spark, ratings_path, "\t", ["user_id", "item_id", "rating", "ts"],
        {"rating": "double", "ts": "long"}, fix="u.data lines are user_id<TAB>item_id<TAB>rating<TAB>timestamp")
    interactions = interactions.withColumn("label", F.lit(None).cast("string"))

    # u.item is 1,682 rows: read on the driver (latin-1, '|'-separated, no quoting).
    raw = pd.read_csv(items_path, sep="|", header=None, encoding="latin-1", dtype=str,
                      keep_default_na=False, quoting=3)
    if raw.shape[1] < 5:
        raise ConfigError(f"{items_path}: expected '|'-separated u.item rows (id|title|date|video|url|genres...), "
                          f"found {raw.shape[1]} columns")
    items = pd.DataFrame({"item_id": raw[0].str.strip(), "title": raw[1].str.strip(),
                          "release_date": raw[2].str.strip()})
    items["genres"] = ["|".join(g for g, flag in zip(GENRES, row) if flag == "1")
                       for row in raw.iloc[:, 5:5 + len(GENRES)].itertuples(index=False)]
    items = items.merge(_pick_overviews(root / opts.overviews_file, items, counts), on="item_id", how="left")

    poster_dir = root / opts.posters_dir
    items["image_uri"] = [str(poster_dir / f"{i}.jpg") if (poster_dir / f"{i}.jpg").exists() else None
                          for i in items["item_id"]]
    counts["items_without_poster"] = int(items["image_uri"].isna().sum())
    _flag_suspects(items, opts.suspect_content, counts)

    attrs = [{k: v for k, v in (("release_date", r.release_date), ("genres", r.genres),
                                ("content_suspect", r.content_suspect)) if v}
             for r in items.itertuples(index=False)]
    items_df = spark.createDataFrame(
        pd.DataFrame({"item_id": items["item_id"], "title": items["title"],
                      "text": items["overview"].where(items["overview"].notna(), None),
                      "image_uri": items["image_uri"], "attrs": attrs}),
        "item_id string, title string, text string, image_uri string, attrs map<string,string>")
    return AdapterOutput(items_df, interactions, rejects, counts, images_root=images_root_of(dataset))


def _pick_overviews(path, items: pd.DataFrame, counts: dict[str, int]) -> pd.DataFrame:
    if not path.exists():
        counts["items_without_overview"] = len(items)
        return pd.DataFrame({"item_id": [], "overview": []}, dtype=str)
    tmdb = pd.read_csv(path, dtype={"movie_id": str})
    tmdb["movie_id"] = tmdb["movie_id"].str.strip()
    counts["tmdb_duplicate_ids"] = int(tmdb["movie_id"].duplicated(keep=False).groupby(tmdb["movie_id"]).any().sum())
    titles = dict(zip(items["item_id"], items["title"].map(_norm_title)))
    tmdb["_match"] = [titles.get(i) == _norm_title(t) for i, t in zip(tmdb["movie_id"], tmdb["title"])]
    tmdb["_order"] = range(len(tmdb))
    best = (tmdb.sort_values(["movie_id", "_match", "_order"], ascending=[True, False, True])
            .drop_duplicates("movie_id"))
    out = best[["movie_id", "overview"]].rename(columns={"movie_id": "item_id"})
    out["overview"] = out["overview"].where(out["overview"].notna() & (out["overview"].astype(str).str.strip() != ""))
    counts["items_without_overview"] = int(len(items) - out["overview"].notna().sum())
    return out


def _flag_suspects(items: pd.DataFrame, policy: str, counts: dict[str, int]) -> None:
    """Mark items whose overview or poster is shared with a differently titled item."""
    from udfs.io.images import ImageError, read_image_file, sha256_bytes

    def poster_hash(uri) -> str | None:
        # The bounded reader: a FIFO or a huge file named like a poster must not hang or flood
        # the driver here, before ingest's own image checks (which reject it) have run.
        if not isinstance(uri, str):
            return None
        try:
            return sha256_bytes(read_image_file(uri))
        except ImageError:
            return None

    suspect: dict[str, set[str]] = {}
    shared_same_title = set()
    for content in (items["overview"], items["image_uri"].map(poster_hash)):
        shared = content.notna() & content.duplicated(keep=False)
        for _, group in items[shared].groupby(content[shared]):
            if group["title"].map(_norm_title).nunique() == 1:
                shared_same_title.update(group["item_id"])
            else:
                ids = set(group["item_id"])
                for i in ids:
                    suspect.setdefault(i, set()).update(ids - {i})
    items["content_suspect"] = items["item_id"].map(
        lambda i: "shared with " + ",".join(sorted(suspect[i], key=int)) if i in suspect else "")
    counts["tmdb_suspect_items"] = len(suspect)
    counts["shared_poster_items"] = len(shared_same_title)
    if policy == "drop" and suspect:
        items.loc[items["item_id"].isin(list(suspect)), ["overview", "image_uri"]] = None
