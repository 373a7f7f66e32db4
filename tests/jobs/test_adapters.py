"""Every dataset adapter through the real ``ingest`` job: real Spark, real Delta, a temporary
warehouse, and small fixture files written here (never the real data).

Each good-path test checks the three tables' contents; the bad-input cases check that the job
keeps the good rows, that each bad row is in ``rejects`` with a reason naming the problem, and
the exit code. Several bad cases share one fixture dataset to keep the number of runs low.
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import pandas as pd
import pytest
import yaml
from PIL import Image

from jobs import ingest
from jobs.adapters.hm import padded_article_id

pytestmark = pytest.mark.spark

DAY = 86400


# ----------------------------------------------------------------------------- fixture writers

def write_jpeg(path: Path, colour: tuple[int, int, int], size: int = 24) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path, "JPEG")
    return path


def write_truncated_jpeg(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Noise, so that the entropy-coded stream is long and cutting it loses pixel data.
    Image.effect_noise((96, 96), 64).convert("RGB").save(path, "JPEG", quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def write_not_image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("<html>404 not found</html>")
    return path


def write_lines(path: Path, lines: list[str | dict | bytes]) -> Path:
    """JSON lines (dicts), raw text lines or raw bytes; gzipped when the name ends in .gz."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = b"".join((line if isinstance(line, bytes)
                     else (json.dumps(line) if isinstance(line, dict) else line).encode()) + b"\n"
                    for line in lines)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def run(tmp_path: Path, warehouse: Path, dataset: dict, capsys) -> tuple[int, str, dict]:
    """Run ``ingest`` on a dataset config; returns (exit code, stdout+stderr, counts)."""
    conf = tmp_path / f"{dataset['name']}.yaml"
    conf.write_text(yaml.safe_dump({"dataset": dataset}))
    capsys.readouterr()
    rc = ingest.main(["--conf", str(conf), "--set", f"warehouse={warehouse}", "--set", "log_level=WARNING",
                      "--set", "spark.shuffle_partitions=2"])
    out = capsys.readouterr()
    counts = {}
    for line in out.out.splitlines():
        if line.startswith("{"):
            counts = json.loads(line)["counts"]
    return rc, out.out + out.err, counts


def table(spark, warehouse: Path, name: str, dataset: str) -> list[dict]:
    rows = spark.read.format("delta").load(f"{warehouse}/{name}").filter(f"dataset = '{dataset}'").collect()
    return [r.asDict(recursive=True) for r in rows]


def by(rows: list[dict], key: str) -> dict:
    return {r[key]: r for r in rows}


def reject_with(rejects: list[dict], text: str) -> list[dict]:
    return [r for r in rejects if text in r["reason"]]


# ----------------------------------------------------------------------------- movielens

def write_movielens(root: Path, ratings_sep: str = "\t") -> None:
    root.mkdir(parents=True, exist_ok=True)
    ratings = [("1", "1", "5", "881250949"), ("1", "2", "3", "881250950"), ("1", "3", "4", "881250951"),
               ("2", "1", "4", "891717742"), ("2", "3", "2", "891717743")]
    (root / "u.data").write_text("".join(ratings_sep.join(r) + "\n" for r in ratings))
    genres = ["0"] * 19
    action, comedy = list(genres), list(genres)
    action[1], comedy[5] = "1", "1"
    rows = [["1", "Toy Story (1995)", "01-Jan-1995", "", "http://x", *comedy],
            ["2", "Café Society (1995)", "01-Jan-1995", "", "http://x", *action],
            ["3", "Heat (1995)", "15-Dec-1995", "", "http://x", *action]]
    (root / "u.item").write_bytes("".join("|".join(r) + "\n" for r in rows).encode("latin-1"))
    pd.DataFrame({"movie_id": ["1", "2", "3"], "title": ["Toy Story", "Café Society", "Heat"],
                  "overview": ["Toys come alive.", "A café in Paris.", "A heist in LA."]}
                 ).to_csv(root / "items_tmdb.csv", index=False)
    write_jpeg(root / "posters" / "1.jpg", (200, 30, 30))
    write_jpeg(root / "posters" / "3.jpg", (30, 30, 200))


def test_movielens_fixture_copy(spark, warehouse, tmp_path, capsys):
    root = tmp_path / "ml"
    write_movielens(root)
    rc, out, counts = run(tmp_path, warehouse, {"name": "mlmini", "adapter": "movielens", "paths": {"root": str(root)},
                                                "split": {"protocol": "leave_one_out"}}, capsys)
    assert rc == 0, out
    items = by(table(spark, warehouse, "items", "mlmini"), "item_id")
    assert set(items) == {"1", "2", "3"}
    assert items["2"]["title"] == "Café Society (1995)"  # u.item is latin-1
    assert items["1"]["text"] == "Toys come alive."
    assert items["1"]["attrs"]["genres"] == "Comedy" and items["3"]["attrs"]["genres"] == "Action"
    assert items["1"]["image_sha256"] and items["3"]["image_sha256"]
    assert items["2"]["image_uri"] is None and items["2"]["image_sha256"] is None
    inter = table(spark, warehouse, "interactions", "mlmini")
    assert len(inter) == 5
    assert {(r["user_id"], r["item_id"], r["ts"], r["rating"]) for r in inter} >= {("1", "1", 881250949, 5.0)}
    # leave_one_out: user 1's last interaction (item 3) is test.
    assert by([r for r in inter if r["user_id"] == "1"], "item_id")["3"]["split"] == "test"
    assert table(spark, warehouse, "rejects", "mlmini") == []
    assert counts["items_without_poster"] == 1


def test_wrong_separator_rejects_every_row_and_exits_1(spark, warehouse, tmp_path, capsys):
    root = tmp_path / "ml"
    write_movielens(root, ratings_sep=",")
    rc, out, _ = run(tmp_path, warehouse, {"name": "mlcomma", "adapter": "movielens", "paths": {"root": str(root)}},
                     capsys)
    assert rc == 1, out
    assert "no interaction row survived" in out
    rejects = table(spark, warehouse, "rejects", "mlcomma")
    assert len(rejects) == 5
    assert all("expected 4 '\\t'-separated fields" in r["reason"] and "found 1" in r["reason"] for r in rejects)
    assert sorted(r["row"] for r in rejects) == [f"line {i}" for i in range(1, 6)]
    # Nothing usable: ingest replaces no slice, so this fresh warehouse gets no interactions table.
    assert not (warehouse / "interactions").exists()


# ----------------------------------------------------------------------------- mmrec

def test_mmrec_labels_metadata_and_images(spark, warehouse, tmp_path, capsys):
    root = tmp_path / "baby"
    root.mkdir()
    rows = [("u1", "10", "5", "100", "0"), ("u1", "11", "4", "200", "0"), ("u1", "12", "3", "300", "2"),
            ("u2", "10", "4", "150", "0"), ("u2", "12", "2", "250", "1"), ("u2", "13", "1", "350", "2"),
            ("u2", "11", "3", "400", "7")]
    (root / "baby.inter").write_text("userID\titemID\trating\ttimestamp\tx_label\n"
                                     + "".join("\t".join(r) + "\n" for r in rows))
    write_jpeg(root / "img" / "10.jpg", (10, 200, 10))
    write_jpeg(root / "img" / "11.jpg", (10, 10, 200))
    pd.DataFrame({"itemID": ["10", "11", "12"], "title": ["Bottle", "Blanket", "Rattle"],
                  "description": ["A bottle, 250 ml", "Soft\nand warm", ""],
                  "image_path": ["img/10.jpg", "img/11.jpg", ""], "brand": ["A", "B", ""]}
                 ).to_csv(root / "baby_items.csv", index=False)
    rc, out, counts = run(tmp_path, warehouse, {
        "name": "baby", "adapter": "mmrec", "paths": {"root": str(root)},
        "options": {"items_file": "baby_items.csv", "attrs": ["brand"]}, "split": {"protocol": "label"}}, capsys)
    assert rc == 0, out
    items = by(table(spark, warehouse, "items", "baby"), "item_id")
    assert set(items) == {"10", "11", "12", "13"}
    assert items["11"]["text"] == "Soft\nand warm"  # a quoted newline stays inside its record
    assert items["10"]["attrs"] == {"brand": "A"} and items["12"]["attrs"] == {}
    assert items["10"]["image_sha256"] and items["12"]["image_uri"] is None
    assert items["13"]["title"] is None  # interacted, no metadata row: kept and counted
    assert counts["items_without_metadata"] == 1
    splits = {(r["user_id"], r["item_id"]): r["split"] for r in table(spark, warehouse, "interactions", "baby")}
    assert splits == {("u1", "10"): "train", ("u1", "11"): "train", ("u1", "12"): "test",
                      ("u2", "10"): "train", ("u2", "12"): "valid", ("u2", "13"): "test"}
    # A label outside 0/1/2 is not guessed: the row goes to rejects with the label it had.
    rejects = table(spark, warehouse, "rejects", "baby")
    assert [(r["row"], r["reason"]) for r in rejects] == [
        ("user_id=u2 item_id=11 ts=400", "label '7' is not train/valid/test or 0/1/2")]
    assert counts["rejected_bad_label"] == 1


# ----------------------------------------------------------------------------- amazon

def test_amazon_2018(spark, warehouse, tmp_path, capsys):
    root = tmp_path / "amz18"
    write_lines(root / "Clothing.json.gz", [
        {"overall": 5.0, "verified": True, "reviewerID": "R1", "asin": "B001", "unixReviewTime": 1500000000,
         "reviewText": "great"},
        {"overall": 3.0, "reviewerID": "R1", "asin": "B002", "unixReviewTime": 1500000100},
        '{"overall": 4.0, "reviewerID": "R2", "asin": "B001", "unixRevi',  # cut mid-line
        {"overall": 4.0, "reviewerID": "R2", "asin": "B001", "unixReviewTime": 1500000200},
        {"overall": 2.0, "reviewerID": "R2", "asin": "B999", "unixReviewTime": 1500000300},
        {"overall": "five", "reviewerID": "R3", "asin": "B002", "unixReviewTime": 1500000400},
        "",
        {"overall": 5.0, "reviewerID": "R3", "asin": "B002", "unixReviewTime": 1500000500},
    ])
    write_lines(root / "meta_Clothing.json", [
        {"asin": "B001", "title": "Red Dress", "description": ["Cotton.", "Machine wash."], "brand": "Acme",
         "category": ["Clothing, Shoes & Jewelry", "Women", "Dresses"], "main_cat": "Fashion",
         "imageURL": ["https://img/B001._SS40_.jpg"], "imageURLHighRes": ["https://img/B001.jpg", "https://img/x.jpg"]},
        {"asin": "B002", "title": "Blue Hat", "description": "Wool hat.", "imageURL": ["https://img/B002._SS40_.jpg"],
         "imageURLHighRes": [], "category": [], "price": "$12.99"},
        {"asin": "B001", "title": "Red Dress (repeat)"},
        {"title": "no id"},
    ])
    rc, out, counts = run(tmp_path, warehouse, {
        "name": "amz18", "adapter": "amazon", "paths": {"root": str(root)},
        "options": {"reviews": "Clothing.json.gz", "meta": "meta_Clothing.json"},
        "split": {"protocol": "temporal_ratio"}}, capsys)
    assert rc == 0, out
    items = by(table(spark, warehouse, "items", "amz18"), "item_id")
    assert set(items) == {"B001", "B002"}
    b1, b2 = items["B001"], items["B002"]
    assert (b1["title"], b1["text"]) == ("Red Dress", "Cotton.\nMachine wash.")
    assert b1["image_uri"] == "https://img/B001.jpg"  # the first high-resolution URL, not a thumbnail
    assert b1["attrs"] == {"brand": "Acme", "main_category": "Fashion",
                           "category": "Clothing, Shoes & Jewelry > Women > Dresses"}
    assert b2["text"] == "Wool hat." and b2["image_uri"] == "https://img/B002._SS40_.jpg"
    assert b2["attrs"] == {"price": "$12.99"}
    assert b1["image_sha256"] is None  # a URL: left for the caption job, not fetched here
    inter = {(r["user_id"], r["item_id"], r["ts"], r["rating"])
             for r in table(spark, warehouse, "interactions", "amz18")}
    assert inter == {("R1", "B001", 1500000000, 5.0), ("R1", "B002", 1500000100, 3.0),
                     ("R2", "B001", 1500000200, 4.0), ("R3", "B002", 1500000500, 5.0)}
    rejects = table(spark, warehouse, "rejects", "amz18")
    malformed = reject_with(rejects, "malformed JSON line")
    assert [(r["row"], r["source"].endswith("Clothing.json.gz")) for r in malformed] == [("line 3", True)]
    assert malformed[0]["content"].startswith('{"overall": 4.0, "reviewerID": "R2"')
    assert [r["row"] for r in reject_with(rejects, "overall 'five' is not a number")] == ["line 6"]
    assert len(reject_with(rejects, "item_id 'B999' is not among the ingested items")) == 1
    assert [r["row"] for r in reject_with(rejects, "asin is missing")] == ["line 4"]
    assert [r["row"] for r in reject_with(rejects, "duplicate item_id")] == ["item_id=B001"]
    assert len(rejects) == 5


def test_amazon_2023(spark, warehouse, tmp_path, capsys):
    root = tmp_path / "amz23"
    t0 = 1_600_000_000_000
    write_lines(root / "All_Beauty.jsonl", [
        {"rating": 5.0, "title": "ok", "text": "nice", "images": [], "asin": "C1a", "parent_asin": "C1",
         "user_id": "U1", "timestamp": t0, "helpful_vote": 0, "verified_purchase": True},
        {"rating": 4.0, "asin": "C2", "user_id": "U1", "timestamp": t0 + 61_999},  # no parent_asin: asin
        {"rating": 2.0, "parent_asin": "C1", "user_id": "U2", "timestamp": "yesterday"},
        {"rating": 3.0, "parent_asin": "C2", "user_id": "U2", "timestamp": t0 + 5_000},
        {"rating": 3.0, "parent_asin": "C2", "user_id": "U2", "timestamp": t0 + 5_000},  # a repeated review
    ])
    write_lines(root / "meta_All_Beauty.jsonl.gz", [
        {"main_category": "All Beauty", "title": "Lip Balm", "average_rating": 4.5,
         "features": ["SPF 15", "Vegan"], "description": [], "price": None, "store": "Glow",
         "categories": ["Beauty", "Lips"], "details": {"Brand": "Glow", "Size": "4 g"}, "parent_asin": "C1",
         "images": [{"thumb": "https://i/t1.jpg", "large": "https://i/l1.jpg", "variant": "PT01",
                     "hi_res": None},
                    {"thumb": "https://i/t0.jpg", "large": "https://i/l0.jpg", "variant": "MAIN",
                     "hi_res": "https://i/h0.jpg"}]},
        {"main_category": "All Beauty", "title": "Soap", "description": ["Olive oil soap."],
         "images": [{"thumb": "https://i/t2.jpg", "large": "https://i/l2.jpg", "variant": "MAIN", "hi_res": None}],
         "parent_asin": "C2", "details": {}},
        b'{"main_category": "All Beauty", "title": "Cr\xe8me", "parent_asin": "C3"}',  # latin-1 byte
    ])
    rc, out, counts = run(tmp_path, warehouse, {
        "name": "amz23", "adapter": "amazon", "paths": {"root": str(root)},
        "options": {"category": "All_Beauty", "image": "hi_res"},
        "split": {"protocol": "temporal_ratio"}}, capsys)
    assert rc == 0, out
    items = by(table(spark, warehouse, "items", "amz23"), "item_id")
    assert set(items) == {"C1", "C2"}
    c1, c2 = items["C1"], items["C2"]
    assert c1["image_uri"] == "https://i/h0.jpg"  # the MAIN image at the requested size
    assert c2["image_uri"] == "https://i/l2.jpg"  # no hi_res: the large one
    assert c1["text"] is None and c2["text"] == "Olive oil soap."
    assert c1["attrs"]["features"] == "SPF 15; Vegan" and c1["attrs"]["category"] == "Beauty > Lips"
    assert c1["attrs"]["store"] == "Glow" and json.loads(c1["attrs"]["details"]) == {"Brand": "Glow", "Size": "4 g"}
    assert "details" not in c2["attrs"]
    inter = sorted((r["user_id"], r["item_id"], r["ts"], r["rating"])
                   for r in table(spark, warehouse, "interactions", "amz23"))
    assert inter == [("U1", "C1", 1_600_000_000, 5.0), ("U1", "C2", 1_600_000_061, 4.0),
                     ("U2", "C2", 1_600_000_005, 3.0)]
    rejects = table(spark, warehouse, "rejects", "amz23")
    assert [r["row"] for r in reject_with(rejects, "timestamp 'yesterday' is not a time in unix milliseconds")] \
        == ["line 3"]
    utf8 = reject_with(rejects, "not valid UTF-8")
    assert [(r["row"], r["source"].endswith("meta_All_Beauty.jsonl.gz")) for r in utf8] == [("line 3", True)]
    assert len(reject_with(rejects, "duplicate interaction")) == 1
    assert len(rejects) == 3


# ----------------------------------------------------------------------------- H&M

def test_hm_article_ids_keep_leading_zeros(spark, warehouse, tmp_path, capsys):
    root = tmp_path / "hm"
    root.mkdir()
    (root / "articles.csv").write_text(
        "article_id,product_code,prod_name,product_type_name,product_group_name,graphical_appearance_name,"
        "colour_group_name,perceived_colour_value_name,department_name,detail_desc\n"
        "0108775015,0108775,Strap top,Vest top,Garment Upper body,Solid,Black,Dark,Jersey Basic,"
        "\"Jersey top with narrow shoulder straps, fitted\"\n"
        "108775044,0108775,Strap top (1),Vest top,Garment Upper body,Solid,White,Light,Jersey Basic,\n"
        "0110065001,0110065,OP T-shirt,Bra,Underwear,Solid,Black,Dark,Clean Lingerie,Microfibre T-shirt bra\n"
        "12345678901,0,Too long,Bra,Underwear,Solid,Black,Dark,x,y\n")
    (root / "transactions_train.csv").write_text(
        "t_dat,customer_id,article_id,price,sales_channel_id\n"
        "2020-09-01,c1,0108775015,0.0508,2\n"
        "2020-09-01,c1,108775015,0.0508,2\n"  # the same purchase repeated the same day, id without zero
        "2020-09-02,c1,110065001,0.0339,1\n"
        "2020-09-03,c2,0108775044,0.0169,2\n"
        "2020-09-31,c2,0110065001,0.0339,1\n"
        "2020-09-04,c2,0999999999,0.01,1\n")
    write_jpeg(root / "images" / "010" / "0108775015.jpg", (0, 0, 0))
    write_not_image(root / "images" / "011" / "0110065001.jpg")
    rc, out, counts = run(tmp_path, warehouse, {"name": "hm", "adapter": "hm", "paths": {"root": str(root)},
                                                "split": {"protocol": "leave_one_out"}}, capsys)
    assert rc == 0, out
    items = by(table(spark, warehouse, "items", "hm"), "item_id")
    assert set(items) == {"0108775015", "0108775044", "0110065001"}
    top = items["0108775015"]
    assert top["title"] == "Strap top" and top["text"] == "Jersey top with narrow shoulder straps, fitted"
    assert top["image_uri"] == str((root / "images" / "010" / "0108775015.jpg").resolve())
    assert top["image_sha256"]
    assert top["attrs"] == {"product_type_name": "Vest top", "product_group_name": "Garment Upper body",
                            "graphical_appearance_name": "Solid", "colour_group_name": "Black",
                            "perceived_colour_value_name": "Dark", "department_name": "Jersey Basic"}
    assert items["0108775044"]["image_uri"] is None and items["0108775044"]["text"] is None
    bra = items["0110065001"]
    assert bra["image_uri"].endswith("/images/011/0110065001.jpg") and bra["image_sha256"] is None
    assert counts["article_ids_padded"] == 1 and counts["items_without_image_file"] == 1
    assert counts["same_day_repeat_purchases"] == 1
    inter = sorted((r["user_id"], r["item_id"], r["ts"], r["rating"])
                   for r in table(spark, warehouse, "interactions", "hm"))
    sep1 = 1598918400  # 2020-09-01T00:00:00Z
    assert inter == [("c1", "0108775015", sep1, None), ("c1", "0110065001", sep1 + DAY, None),
                     ("c2", "0108775044", sep1 + 2 * DAY, None)]
    rejects = table(spark, warehouse, "rejects", "hm")
    assert [r["row"] for r in reject_with(rejects, "article_id '12345678901' is not a number")] \
        == ["article_id=12345678901"]
    assert [r["row"] for r in reject_with(rejects, "t_dat '2020-09-31' is not a valid timestamp")] == ["record 5"]
    assert len(reject_with(rejects, "item_id '0999999999' is not among the ingested items")) == 1
    bad_image = reject_with(rejects, "not an image format")
    assert [r["row"] for r in bad_image] == ["item_id=0110065001"] and "item is kept" in bad_image[0]["reason"]
    assert len(rejects) == 4


def write_hm_partial_catalog(root: Path) -> None:
    """One article with metadata; two purchased articles without, one of which has its image."""
    root.mkdir()
    (root / "articles.csv").write_text(
        "article_id,prod_name,product_type_name,detail_desc\n"
        "0108775015,Strap top,Vest top,Jersey top\n")
    (root / "transactions_train.csv").write_text(
        "t_dat,customer_id,article_id,price,sales_channel_id\n"
        "2020-09-01,c1,0108775015,0.05,2\n"
        "2020-09-02,c1,200000001,0.03,1\n"   # image only, id without its leading zero
        "2020-09-03,c2,0200000001,0.03,1\n"
        "2020-09-04,c2,0200000002,0.02,1\n")  # neither metadata nor image
    write_jpeg(root / "images" / "010" / "0108775015.jpg", (0, 0, 0))
    write_jpeg(root / "images" / "020" / "0200000001.jpg", (90, 0, 0))


@pytest.mark.parametrize("image_only", [True, False])
def test_hm_image_only_items(spark, warehouse, tmp_path, capsys, image_only):
    root = tmp_path / "hmpart"
    write_hm_partial_catalog(root)
    name = f"hmpart{int(image_only)}"
    rc, out, counts = run(tmp_path, warehouse, {"name": name, "adapter": "hm", "paths": {"root": str(root)},
                                                "options": {"image_only_items": image_only},
                                                "split": {"protocol": "leave_one_out"}}, capsys)
    assert rc == 0, out
    items = by(table(spark, warehouse, "items", name), "item_id")
    inter = sorted((r["user_id"], r["item_id"]) for r in table(spark, warehouse, "interactions", name))
    unknown = sorted(r["content"] for r in reject_with(table(spark, warehouse, "rejects", name),
                                                         "is not among the ingested items"))
    if image_only:
        assert set(items) == {"0108775015", "0200000001"}
        only = items["0200000001"]
        assert only["title"] is None and only["text"] is None and only["attrs"] == {}
        assert only["image_uri"] == str((root / "images" / "020" / "0200000001.jpg").resolve())
        assert only["image_sha256"]
        assert inter == [("c1", "0108775015"), ("c1", "0200000001"), ("c2", "0200000001")]
        assert len(unknown) == 1 and '"item_id":"0200000002"' in unknown[0]
        assert counts["image_only_items"] == 1 and counts["items"] == 2
    else:
        assert set(items) == {"0108775015"}
        assert inter == [("c1", "0108775015")]
        assert len(unknown) == 3 and "image_only_items" not in counts


def test_padded_article_id_pads_only_short_digit_strings(spark):
    df = spark.createDataFrame([(" 108775015 ",), ("0108775015",), ("42",), ("abc",), ("12345678901",)], "a string")
    got = [r[0] for r in df.select(padded_article_id(df["a"])).collect()]
    assert got == ["0108775015", "0108775015", "0000000042", "abc", "12345678901"]


# ----------------------------------------------------------------------------- csv / parquet

def test_csv_bad_rows_are_rejected_and_the_rest_ingested(spark, warehouse, tmp_path, capsys):
    root = tmp_path / "shop"
    root.mkdir()
    write_jpeg(root / "img" / "a.jpg", (250, 0, 0))
    write_jpeg(root / "img" / "b.jpg", (0, 250, 0))
    write_not_image(root / "img" / "c.jpg")
    write_truncated_jpeg(root / "img" / "d.jpg")
    (root / "items.csv").write_bytes(
        b"item_id,title,description,image_path,colour\n"
        b"a,Red shirt,\"A red shirt, cotton\",img/a.jpg,red\n"
        b"b,Green shirt,A green shirt,img/b.jpg,green\n"
        b"c,Grey shirt,Grey,img/c.jpg,grey\n"
        b"d,Pink shirt,Pink,img/d.jpg,pink\n"
        b"e,Caf\xe9 mug,Latin-1 bytes in a UTF-8 file,,white\n"
        b"a,Red shirt again,duplicate id,img/a.jpg,red\n")
    (root / "interactions.csv").write_text(
        "user_id,item_id,timestamp,rating\n"
        "u1,a,100,5\n"
        "u1,b,200,4\n"
        "u1,b,200,4\n"       # duplicate interaction
        "u1,c,300,3\n"
        "u2,zz,400,3\n"      # unknown item
        "u2,a,500,2\n"
        "u2,d,600,1\n"
        "u2,b,soon,1\n"      # bad timestamp
        "u2,c,NaN,1\n"       # not a time either (a plain cast to long raises under ANSI)
        "u3,e,700,5\n")      # its item was rejected: unknown item
    rc, out, counts = run(tmp_path, warehouse, {
        "name": "shop", "adapter": "csv", "paths": {"root": str(root)},
        "options": {"text": "description", "image": "image_path", "attrs": ["colour"], "rating": "rating"},
        "split": {"protocol": "leave_one_out"}}, capsys)
    assert rc == 0, out
    items = by(table(spark, warehouse, "items", "shop"), "item_id")
    assert set(items) == {"a", "b", "c", "d"}
    assert items["a"]["title"] == "Red shirt" and items["a"]["text"] == "A red shirt, cotton"
    assert items["a"]["attrs"] == {"colour": "red"} and items["a"]["image_sha256"]
    for bad in ("c", "d"):  # kept, without an image hash
        assert items[bad]["image_uri"].endswith(f"img/{bad}.jpg") and items[bad]["image_sha256"] is None
    inter = sorted((r["user_id"], r["item_id"], r["ts"]) for r in table(spark, warehouse, "interactions", "shop"))
    assert inter == [("u1", "a", 100), ("u1", "b", 200), ("u1", "c", 300), ("u2", "a", 500), ("u2", "d", 600)]
    rejects = table(spark, warehouse, "rejects", "shop")
    assert [r["row"] for r in reject_with(rejects, "not an image format")] == ["item_id=c"]
    assert [r["row"] for r in reject_with(rejects, "truncated or corrupt")] == ["item_id=d"]
    latin = reject_with(rejects, "not valid utf-8")
    assert [r["row"] for r in latin] == ["record 5"] and "dataset.options.encoding" in latin[0]["reason"]
    assert [r["row"] for r in reject_with(rejects, "duplicate item_id")] == ["item_id=a"]
    # Interaction rejects are named by their record number in the file, the content shows the row.
    dup = reject_with(rejects, "duplicate interaction")
    assert [r["row"] for r in dup] == ["record 3"] and '"item_id":"b"' in dup[0]["content"]
    unknown = sorted(r["row"] for r in reject_with(rejects, "is not among the ingested items"))
    assert unknown == ["record 10", "record 5"]
    soon = reject_with(rejects, "timestamp 'soon' is not a valid timestamp")
    assert [r["row"] for r in soon] == ["record 8"]
    assert json.loads(soon[0]["content"]) == {"user_id": "u2", "item_id": "b", "timestamp": "soon", "rating": "1"}
    assert [r["row"] for r in reject_with(rejects, "timestamp 'NaN' is not a valid timestamp")] == ["record 9"]
    assert len(rejects) == 9
    assert counts["rejected"] == 9 and counts["items"] == 4


def test_csv_adapter_reads_a_parquet_pair(spark, warehouse, tmp_path, capsys):
    root = tmp_path / "pq"
    root.mkdir()
    pd.DataFrame({"item_id": ["e", "f"], "title": ["Café mug", "Plate"]}).to_parquet(root / "items.parquet")
    pd.DataFrame({"uid": ["u1", "u1", "u2"], "item_id": ["e", "f", "e"],
                  "when": pd.array([1_700_000_000_000, 1_700_000_100_000, 1_700_000_200_000], dtype="int64"),
                  "stars": [4.5, 3.0, None]}).to_parquet(root / "interactions.parquet")
    rc, out, _ = run(tmp_path, warehouse, {
        "name": "pq", "adapter": "csv", "paths": {"root": str(root)},
        "options": {"items": "items.parquet", "interactions": "interactions.parquet", "user_id": "uid",
                    "timestamp": "when", "timestamp_format": "unix_ms", "rating": "stars"},
        "split": {"protocol": "random_ratio"}}, capsys)
    assert rc == 0, out
    titles = {r["item_id"]: r["title"] for r in table(spark, warehouse, "items", "pq")}
    assert titles == {"e": "Café mug", "f": "Plate"}
    inter = sorted((r["user_id"], r["item_id"], r["ts"], r["rating"])
                   for r in table(spark, warehouse, "interactions", "pq"))
    assert inter == [("u1", "e", 1_700_000_000, 4.5), ("u1", "f", 1_700_000_100, 3.0), ("u2", "e", 1_700_000_200, None)]
    assert table(spark, warehouse, "rejects", "pq") == []


def test_csv_malformed_records_name_their_field_count_and_the_fix(spark, warehouse, tmp_path, capsys):
    root = tmp_path / "ragged"
    root.mkdir()
    write_jpeg(root / "zz.jpg", (0, 0, 250))  # an image, but image_only_items is off
    (root / "items.csv").write_text(
        "item_id,title,description,image_path,colour\n"
        "a,Red shirt,\"A red shirt, cotton\",,red\n"
        "b,Green shirt,A green shirt, with collar,,green\n"   # an unquoted ',': 6 fields
        "c,Grey shirt\n"                                       # 2 fields
        "d,\"Pink \"\"shirt\"\"\",Pink,,pink\n"                 # escaped quotes: fine
        "e,\"Blue shirt,Blue,,blue\n"                          # a quote never closed ...
        "f,Hat,A hat,,black\n")                                # ... swallows this record
    (root / "interactions.csv").write_text(
        "user_id,item_id,timestamp,rating\n"
        "u1,a,100,5\n"
        "u1,a,200,4,9\n"      # 5 fields
        "u2,a\n"              # 2 fields: timestamp missing, said as a field count
        "u2,\"a,300,1\n"       # a quote never closed on its line
        "u2,d,400,3\n"
        "u3,zz,500,1\n")      # no metadata row: rejected as before
    rc, out, counts = run(tmp_path, warehouse, {"name": "ragged", "adapter": "csv", "paths": {"root": str(root)},
                                                "options": {"text": "description", "image": "image_path",
                                                            "rating": "rating"}}, capsys)
    assert rc == 0, out
    items = by(table(spark, warehouse, "items", "ragged"), "item_id")
    assert set(items) == {"a", "d"} and items["d"]["title"] == 'Pink "shirt"'
    rejects = {(r["source"].rsplit("/", 1)[-1], r["row"]): r for r in table(spark, warehouse, "rejects", "ragged")}
    item_cols = "(columns item_id, title, description, image_path, colour)"
    long_item = rejects["items.csv", "record 2"]
    assert long_item["reason"] == (
        f"malformed record: it has 6 fields, the header has 5 {item_cols}: a field holds an unquoted ','; "
        "quote fields that contain the separator or fix the row")
    assert long_item["content"] == "b,Green shirt,A green shirt, with collar,,green"
    assert rejects["items.csv", "record 3"]["reason"].startswith(
        f"malformed record: it has 2 fields, the header has 5 {item_cols}: a field or a ',' is missing")
    swallowed = rejects["items.csv", "record 5"]["reason"]
    assert "a '\"' opens a quoted field that is never closed" in swallowed
    assert "runs on over the next 1 line(s)" in swallowed and "close the quote" in swallowed
    inter_cols = "(columns user_id, item_id, timestamp, rating)"
    assert rejects["interactions.csv", "record 2"]["reason"].startswith(
        f"malformed record: it has 5 fields, the header has 4 {inter_cols}: a field holds an unquoted ','")
    short = rejects["interactions.csv", "record 3"]
    assert short["reason"].startswith(f"malformed record: it has 2 fields, the header has 4 {inter_cols}")
    assert short["content"] == "u2,a"
    quote = rejects["interactions.csv", "record 4"]["reason"]
    assert "never closed" in quote and "runs on" not in quote
    assert "is not among the ingested items" in rejects["interactions.csv", "record 6"]["reason"]
    assert len(rejects) == 7 and counts["rejected_malformed_record"] == 6
    inter = sorted((r["user_id"], r["item_id"]) for r in table(spark, warehouse, "interactions", "ragged"))
    assert inter == [("u1", "a"), ("u2", "d")]


def test_csv_image_only_items_kept_by_their_image_file(spark, warehouse, tmp_path, capsys):
    root = tmp_path / "partial"
    root.mkdir()
    (root / "items.csv").write_text("item_id,title\na,Red shirt\n")
    write_jpeg(root / "pics" / "a.jpg", (250, 0, 0))
    write_jpeg(root / "pics" / "x.jpg", (0, 250, 0))
    write_jpeg(root / "secret.jpg", (0, 0, 250))  # outside images_root: never reached through an id
    (root / "interactions.csv").write_text(
        "user_id,item_id,timestamp\n"
        "u1,a,100\n"
        "u1,x,200\n"
        "u2,x,300\n"
        "u2,y,400\n"          # neither metadata nor image
        "u2,../secret,500\n")
    rc, out, counts = run(tmp_path, warehouse, {
        "name": "partial", "adapter": "csv", "paths": {"root": str(root)},
        "options": {"images_root": "pics", "image_only_items": True, "image_pattern": "{item_id}.jpg"},
        "split": {"protocol": "leave_one_out"}}, capsys)
    assert rc == 0, out
    items = by(table(spark, warehouse, "items", "partial"), "item_id")
    assert set(items) == {"a", "x"}
    x = items["x"]
    assert x["title"] is None and x["text"] is None and x["attrs"] == {}
    assert x["image_uri"] == str((root / "pics" / "x.jpg").resolve()) and x["image_sha256"]
    assert counts["image_only_items"] == 1
    inter = sorted((r["user_id"], r["item_id"]) for r in table(spark, warehouse, "interactions", "partial"))
    assert inter == [("u1", "a"), ("u1", "x"), ("u2", "x")]
    unknown = sorted(r["row"] for r in reject_with(table(spark, warehouse, "rejects", "partial"),
                                                   "is not among the ingested items"))
    assert unknown == ["record 4", "record 5"]


@pytest.mark.parametrize("pattern, expected", [
    ("", "dataset.options.image_only_items needs dataset.options.image_pattern"),
    ("{id}.jpg", "dataset.options.image_pattern '{id}.jpg': it uses {id}: only {item_id} is known"),
])
def test_csv_image_only_items_needs_a_valid_pattern(spark, warehouse, tmp_path, capsys, pattern, expected):
    root = tmp_path / "nopattern"
    root.mkdir()
    (root / "items.csv").write_text("item_id,title\na,A\n")
    (root / "interactions.csv").write_text("user_id,item_id,timestamp\nu1,a,1\n")
    rc, out, _ = run(tmp_path, warehouse, {"name": "nopattern", "adapter": "csv", "paths": {"root": str(root)},
                                           "options": {"image_only_items": True, "image_pattern": pattern}},
                     capsys)
    assert rc == 2 and "config error" in out
    assert expected in out


# ----------------------------------------------------------------------------- config and file errors

def test_missing_file_exits_2_naming_it(spark, warehouse, tmp_path, capsys):
    root = tmp_path / "nofile"
    root.mkdir()
    (root / "items.csv").write_text("item_id,title\na,A\n")
    rc, out, _ = run(tmp_path, warehouse, {"name": "nofile", "adapter": "csv", "paths": {"root": str(root)},
                                           "options": {"interactions": "clicks.csv"}}, capsys)
    assert rc == 2
    assert "config error" in out and str(root / "clicks.csv") in out and "does not exist" in out


def test_unknown_option_key_exits_2_naming_it(spark, warehouse, tmp_path, capsys):
    rc, out, _ = run(tmp_path, warehouse, {"name": "typo", "adapter": "hm", "paths": {"root": str(tmp_path)},
                                           "options": {"image_dir": "images"}}, capsys)
    assert rc == 2
    assert "dataset.options.image_dir" in out and "did you mean 'images_dir'" in out


def test_empty_interactions_file_exits_1(spark, warehouse, tmp_path, capsys):
    root = tmp_path / "empty"
    root.mkdir()
    (root / "items.csv").write_text("item_id,title\na,A\n")
    (root / "interactions.csv").write_bytes(b"")
    rc, out, _ = run(tmp_path, warehouse, {"name": "empty", "adapter": "csv", "paths": {"root": str(root)}}, capsys)
    assert rc == 1
    assert "nothing usable" in out and "interactions.csv" in out and "empty file" in out


def test_csv_wrong_separator_header_names_the_sep_option(spark, warehouse, tmp_path, capsys):
    root = tmp_path / "semi"
    root.mkdir()
    (root / "items.csv").write_text("item_id;title\na;A\n")
    (root / "interactions.csv").write_text("user_id;item_id;timestamp\nu1;a;1\n")
    rc, out, _ = run(tmp_path, warehouse, {"name": "semi", "adapter": "csv", "paths": {"root": str(root)}}, capsys)
    assert rc == 2
    assert "looks ';'-separated: set dataset.options.sep" in out


def test_amazon_version_mismatch_exits_2(spark, warehouse, tmp_path, capsys):
    root = tmp_path / "amzv"
    write_lines(root / "r.jsonl", [{"rating": 5.0, "parent_asin": "C1", "user_id": "U1", "timestamp": 1}])
    write_lines(root / "m.jsonl", [{"parent_asin": "C1", "title": "x", "main_category": "y"}])
    rc, out, _ = run(tmp_path, warehouse, {"name": "amzv", "adapter": "amazon", "paths": {"root": str(root)},
                                           "options": {"reviews": "r.jsonl", "meta": "m.jsonl", "version": 2018}},
                     capsys)
    assert rc == 2
    assert "version is 2018 but the file has 2023 fields" in out
