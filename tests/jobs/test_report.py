"""``report`` over the session's shared pipeline run: the page is self-contained, shows every
representation, and its figures are real PNGs; ``--reference`` picks the forest plot's reference;
the run's tables read from an object store (moto's S3 server) equal the local ones, and the page,
its figures and its thumbnails are written and read there."""
from __future__ import annotations

import shutil
from html.parser import HTMLParser

import pandas as pd
import pytest
from PIL import Image
from pyarrow import fs as pafs

from jobs import report
from tests.moto_s3 import BUCKET, moto_s3
from udfs.report import report_html
from udfs.io import storage

pytestmark = [pytest.mark.spark, pytest.mark.slow]
FIGURES = ("metrics.png", "forest.png", "by_history.png", "beyond_accuracy.png")


class Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.links, self.scripts, self.cells = [], [], [], []
        self._cell = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        elif tag in ("link", "a") and attrs.get("href"):
            self.links.append(attrs["href"])
        elif tag == "script":
            self.scripts.append(attrs.get("src"))
        elif tag == "td":
            self._cell = ""

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self.cells.append(self._cell.strip())
            self._cell = None


def read_page(path) -> tuple[str, Page]:
    text = path.read_text(encoding="utf-8")
    page = Page()
    page.feed(text)
    return text, page


def test_pipeline_report_is_self_contained_with_real_figures(synthetic_run):
    folder = synthetic_run.warehouse / "reports" / synthetic_run.run_id
    for name in FIGURES:
        with Image.open(folder / name) as image:
            assert image.format == "PNG" and image.width > 300 and image.height > 150
    text, page = read_page(folder / "report.html")
    # Nothing to fetch: every image inline, no script or stylesheet from elsewhere.
    assert page.images and all(src.startswith("data:image/") for src in page.images)
    assert page.links == [] and all(src is None for src in page.scripts)
    # 4 figures, 8 gallery cards, and thumbnails of users' histories and lists.
    assert len(page.images) > 4 + 8
    assert synthetic_run.run_id in text and "Against the reference: lvlm" in text
    for label in ("lvlm", "title", "visual", "naive:lvlm+visual", "popularity", "random"):
        assert f"<td>{label}</td>" in text, label
    for stage in ("ingest", "caption", "embed", "profiles", "topk", "evaluate"):
        assert f"<th>{stage}</th>" in text, stage
    # The descriptions' figures beside the gallery; the synthetic catalog's carry signal: no warning.
    for row in ("distinct texts", "co-consumption lift", "mean cosine of two random items"):
        assert row in text, row
    assert 'class="warning"' not in text and "(!) see the warning below" not in text


def test_popularity_lists_have_the_highest_popularity_percentile(synthetic_run):
    _, page = read_page(synthetic_run.warehouse / "reports" / synthetic_run.run_id / "report.html")
    cells = page.cells
    # The beyond-accuracy table: label, coverage, popularity percentile, Gini (the last table
    # whose rows start with a representation and hold three numbers).
    rows = {}
    for i, cell in enumerate(cells[:-3]):
        values = cells[i + 1:i + 4]
        if cell in ("lvlm", "title", "visual", "popularity", "random") and all(
                v.replace(".", "", 1).isdigit() for v in values):
            rows[cell] = [float(v) for v in values]
    assert set(rows) == {"lvlm", "title", "visual", "popularity", "random"}
    assert rows["popularity"][1] == max(r[1] for r in rows.values())
    assert rows["random"][2] < rows["popularity"][2]  # random spreads exposure more evenly


def test_report_job_with_another_reference(spark, synthetic_run, tmp_path, capsys):
    warehouse = tmp_path / "warehouse"
    shutil.copytree(synthetic_run.warehouse, warehouse)
    argv = ["--conf", "experiments/synthetic.yaml", "--set", f"warehouse={warehouse}",
            "--run-id", synthetic_run.run_id]
    assert report.main(argv + ["--reference", "title"]) == 0
    out = capsys.readouterr().out
    html = warehouse / "reports" / synthetic_run.run_id / "report.html"
    assert str(html) in out
    text, _ = read_page(html)
    assert "Against the reference: title" in text
    assert report.main(argv + ["--reference", "nope"]) == 2
    assert "--reference 'nope' is not a representation" in capsys.readouterr().err


def test_report_on_an_object_store_warehouse(synthetic_run):
    """The tables delta-spark wrote, copied into a bucket as they are, read back frame for frame;
    the report written under the bucket's reports/<run_id>/ with nothing else left there."""
    local, run_id = str(synthetic_run.warehouse), synthetic_run.run_id
    remote = f"s3a://{BUCKET}/warehouse"
    with moto_s3():
        store, root = storage.filesystem(remote)
        for table in ("plans", "metrics", "comparisons", "user_metrics", "recommendations", "candidates",
                      "interactions", "items", "rejects", "runs", "descriptions"):
            if (synthetic_run.warehouse / table).is_dir():
                pafs.copy_files(f"{local}/{table}", f"{root}/{table}", source_filesystem=pafs.LocalFileSystem(),
                                destination_filesystem=store)
        here, there = report.read_run(local, run_id), report.read_run(remote, run_id)
        assert there.keys() == here.keys() and there["plan"] == here["plan"]
        for key, frame in here.items():
            if isinstance(frame, pd.DataFrame):
                assert len(frame) or key in ("rejects",), key
                pd.testing.assert_frame_equal(there[key], frame, obj=key)

        folder = synthetic_run.warehouse / "reports" / run_id
        page = (folder / "report.html").read_text(encoding="utf-8")
        figures = {name: (folder / name).read_bytes() for name in FIGURES}
        html = report.write_report(remote, run_id, page, figures)
        assert html == f"{remote}/reports/{run_id}/report.html"
        assert storage.read_bytes(html).decode("utf-8") == page
        assert all(storage.read_bytes(f"{remote}/reports/{run_id}/{n}") == figures[n] for n in FIGURES)
        assert sorted(e[0] for e in storage.list_entries(f"{remote}/reports/{run_id}")) == sorted(
            ["report.html", *FIGURES])

        # An item image in the bucket is shown as the local file is.
        image = next(u for u in here["items"]["image_uri"] if isinstance(u, str) and u)
        with open(storage.local_path_of(image), "rb") as f:
            storage.write_bytes(f"s3a://{BUCKET}/images/one", f.read())
        assert report_html.thumbnail(f"s3a://{BUCKET}/images/one") == report_html.thumbnail(image) is not None


def test_forest_plot_draws_the_runs_comparisons_in_the_tables_sign(synthetic_run):
    """The values the forest plot draws, read back from its artists, are the run's
    ``comparisons`` rows as ``representation - lvlm``: the printed table's sign, in its title."""
    from udfs.report import report_figures
    from udfs.report.results_table import paper_order

    data = report.read_run(str(synthetic_run.warehouse), synthetic_run.run_id)
    comparisons = data["comparisons"]
    order = paper_order(data["plan"].ranked)
    reference = next(r for r in order if r.startswith("lvlm:"))
    figure = report_figures.forest_plot(comparisons, reference, report.FOREST_METRICS, 10, order)
    seen = 0
    for ax in figure.axes:
        metric = "recall" if "Recall@10" in ax.get_title() else "ndcg"
        assert ax.get_title().startswith("representation - lvlm")
        for line in ax.get_lines():
            kind, _, other = (line.get_gid() or "").partition(":")
            if kind != "mean":
                continue
            stored = comparisons[(comparisons.metric == metric) & (comparisons.k == 10)
                                 & (comparisons.representation_a.isin([reference, other]))
                                 & (comparisons.representation_b.isin([reference, other]))].iloc[0]
            sign = 1 if stored.representation_b == reference else -1
            assert line.get_xdata()[0] == pytest.approx(sign * stored.mean_diff, abs=1e-15), other
            assert (line.get_color() == "#9e9e9e") == (stored.p_holm >= report_figures.SIGNIFICANCE), other
            seen += 1
    assert seen == 2 * (len(order) - 1)
    assert set(comparisons.test) == {"t"}
