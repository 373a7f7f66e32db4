"""``recommend`` over the session's shared pipeline run (tests/conftest.py ``synthetic_run``):
the lists equal the run's stored ones, explanations are exact and name items by title, bad
requests name the fix, the latest completed run is served when none is named, and the command
line never imports Spark, torch or Ray."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jobs.recommend import table_lines
from udfs.recommender import RecommendError, Recommender, latest_pipeline_run
from udfs.io.warehouse_reader import read_frame

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.spark, pytest.mark.slow]


@pytest.fixture(scope="module")
def run(synthetic_run):
    plan = json.loads(read_frame(synthetic_run.warehouse, "plans", equal={"run_id": synthetic_run.run_id})["plan"][0])
    return synthetic_run, plan


def test_lists_equal_the_runs_stored_recommendations(run):
    shared, plan = run
    stored = read_frame(shared.warehouse, "recommendations", equal={"run_id": shared.run_id})
    assert len(plan["representations"]) == 4
    for rep in plan["representations"]:
        mine = stored[stored["representation"] == rep].sort_values(["user_id", "rank"])
        # torch: the topk job's own arithmetic, bit for bit; numpy (the default, no torch import):
        # the same scores to float32 rounding, so only items that close may swap.
        for use_torch in (True, False):
            recommender = Recommender.load(shared.warehouse, shared.run_id, rep, use_torch=use_torch)
            users = sorted(recommender.profiles)
            # One more than stored: the score just past the list shows a near-tie at its end.
            got = recommender.recommend(users=users, k=plan["k"] + 1)
            assert set(mine["user_id"]) == set(users)
            for q, user in enumerate(users):
                theirs = mine[mine["user_id"] == user]
                ids, scores = theirs["item_id"].tolist(), theirs["score"].to_numpy()
                n = len(ids)
                ours = [i for i in got.item_ids[q][:n] if i is not None]
                if use_torch:
                    assert ours == ids, (rep, user)
                    np.testing.assert_array_equal(got.scores[q][:n], scores)
                else:
                    gaps = np.abs(np.diff(np.r_[scores, got.scores[q][n]]))
                    apart = (np.r_[np.inf, gaps[:-1]] > 2e-6) & (gaps > 2e-6)
                    assert [i for i, a in zip(ours, apart) if a] == [i for i, a in zip(ids, apart) if a], (rep, user)
                    np.testing.assert_allclose(got.scores[q][:n], scores, atol=1e-6)


def test_lvlm_explanations_are_exact_shares_and_shared_phrases(run):
    shared, _ = run
    recommender = Recommender.load(shared.warehouse, shared.run_id, "lvlm")
    users = sorted(recommender.profiles)[:5]
    # Every history item as a contributor: their shares must add up to the score.
    result = recommender.recommend(users=users, k=5, explain=True, n_contributors=1000)
    texts = recommender.descriptions()
    phrases_seen = 0
    for q, user in enumerate(users):
        history = recommender.train[user][0]
        for r, why in enumerate(result.explanations[q]):
            assert why.exact and len(why.contributors) == len(history)
            assert sum(c.share for c in why.contributors) == pytest.approx(float(result.scores[q, r]), abs=1e-5)
            shares = [c.share for c in why.contributors]
            assert shares == sorted(shares, reverse=True)
            item = result.item_ids[q, r]
            for phrase in why.shared_phrases:
                phrases_seen += 1
                assert phrase in texts[item].lower()
                assert any(phrase in texts[c.item_id].lower() for c in why.contributors)
    assert phrases_seen > 0
    record = result.records()[0]["items"][0]
    assert record["shares_exact"] is True and "title" in record and record["because"]
    titles = recommender.titles(recommender.train[users[0]][0])
    assert titles and all(c["title"] == titles[c["item_id"]] for c in record["because"])


def test_an_ad_hoc_history_is_profiled_like_a_train_history(run):
    shared, plan = run
    for rep in ("title", "naive:lvlm+visual"):
        recommender = Recommender.load(shared.warehouse, shared.run_id, rep)
        user = sorted(recommender.profiles)[0]
        history = recommender.train[user][0]
        n = len(recommender.candidate_ids)
        known = recommender.recommend(users=[user], k=n)
        ad_hoc = recommender.recommend(histories=[history], k=n)
        # The same profile: the same score for every item both rank (the ad-hoc history
        # excludes only its own items, the user their train and valid items).
        theirs = dict(zip(ad_hoc.item_ids[0], ad_hoc.scores[0]))
        common = [(i, s) for i, s in zip(known.item_ids[0], known.scores[0]) if i is not None]
        assert common and all(theirs[i] == pytest.approx(s, abs=1e-5) for i, s in common)
        assert not set(history) & {i for i in ad_hoc.item_ids[0] if i is not None}


def test_bad_requests_name_the_fix(run):
    shared, _ = run
    with pytest.raises(RecommendError, match="no plan.*pipeline"):
        Recommender.load(shared.warehouse, "no-such-run", "lvlm")
    with pytest.raises(RecommendError, match="has no representation 'text'.*experiment.representations"):
        Recommender.load(shared.warehouse, shared.run_id, "text")
    recommender = Recommender.load(shared.warehouse, shared.run_id, "title")
    with pytest.raises(RecommendError, match="user 'nobody'.*pass their history"):
        recommender.recommend(users=["u0001", "nobody"])
    with pytest.raises(RecommendError, match="none of its 2 items has a 'title' vector.*'i99999'.*ingest"):
        recommender.recommend(histories=[["i99999", "nope"]])
    with pytest.raises(RecommendError, match="n_contributors must be a positive integer, got -1"):
        recommender.recommend(users=["u0001"], explain=True, n_contributors=-1)
    with pytest.raises(RecommendError, match="history 0 is empty"):
        recommender.recommend(histories=[[]])
    with pytest.raises(RecommendError, match="users or histories|either users"):
        recommender.recommend(users=["u0001"], histories=[["i00001"]])


def test_a_partly_unknown_history_is_served_and_says_which_items_were_left_out(run):
    shared, _ = run
    recommender = Recommender.load(shared.warehouse, shared.run_id, "title", users=[])
    assert recommender.profiles == {}  # an ad-hoc history reads no user's rows
    history = ["i00001", "i99999", "i00002", "i99999"]
    result = recommender.recommend(histories=[history, ["i00001", "i00002"]], k=5, explain=True)
    assert result.unknown == [["i99999"], []]
    # The unknown item is left out of the profile: the same list as without it.
    np.testing.assert_array_equal(result.item_ids[0], result.item_ids[1])
    np.testing.assert_allclose(result.scores[0], result.scores[1])
    records = result.records()
    assert records[0]["unknown_items"] == ["i99999"] and records[1]["unknown_items"] == []
    assert {c["item_id"] for entry in records[0]["items"] for c in entry["because"]} <= {"i00001", "i00002"}
    assert "left out of the history (no vector): i99999" in "\n".join(table_lines(records))
    known_user = Recommender.load(shared.warehouse, shared.run_id, "title", users=["u0001"])
    assert "unknown_items" not in known_user.recommend(users=["u0001"], k=2).records()[0]


def test_a_user_subset_load_serves_the_same_lists_and_names_unknown_users(run):
    shared, _ = run
    everyone = Recommender.load(shared.warehouse, shared.run_id, "lvlm")
    users = sorted(everyone.profiles)[:2]
    some = Recommender.load(shared.warehouse, shared.run_id, "lvlm", users=users)
    assert set(some.profiles) == set(users) and set(some.train) <= set(users)
    ours, theirs = some.recommend(users=users, k=5), everyone.recommend(users=users, k=5)
    np.testing.assert_array_equal(ours.item_ids, theirs.item_ids)
    np.testing.assert_array_equal(ours.scores, theirs.scores)
    with pytest.raises(RecommendError, match="user 'nobody'.*its users look like"):
        Recommender.load(shared.warehouse, shared.run_id, "lvlm", users=["nobody"]).recommend(users=["nobody"])
    with pytest.raises(RecommendError, match=f"user '{sorted(everyone.profiles)[3]}' is in run .* not loaded"):
        some.recommend(users=[sorted(everyone.profiles)[3]])


def test_the_latest_completed_pipeline_run_is_found(run):
    shared, _ = run
    served = latest_pipeline_run(shared.warehouse)
    assert (served.run_id, served.dataset) == (shared.run_id, "synthetic")
    assert latest_pipeline_run(shared.warehouse, "synthetic") == served
    with pytest.raises(RecommendError, match=r"no completed pipeline run of dataset 'other'.*\['synthetic'\]"):
        latest_pipeline_run(shared.warehouse, "other")


def test_latest_run_rules_on_a_runs_table_written_by_delta_rs(tmp_path):
    import datetime as dt

    import pyarrow as pa
    from deltalake import write_deltalake

    day = dt.datetime(2026, 12, 1)
    rows = [("pipeline-a1", "pipeline", "a", "succeeded", day),
            ("pipeline-a2", "pipeline", "a", "succeeded", day + dt.timedelta(hours=2)),
            ("pipeline-a3", "pipeline", "a", "failed", day + dt.timedelta(hours=3)),
            ("pipeline-a4", "pipeline", "a", "running", None),
            ("ingest-a5", "ingest", "a", "succeeded", day + dt.timedelta(hours=4)),
            ("pipeline-b1", "pipeline", "b", "succeeded", day + dt.timedelta(hours=1))]
    write_deltalake(str(tmp_path / "runs"), pa.table({
        "run_id": [r[0] for r in rows], "job": [r[1] for r in rows],
        "config": [json.dumps({"dataset": {"name": r[2]}}) for r in rows], "status": [r[3] for r in rows],
        "finished_at": pa.array([r[4] for r in rows], pa.timestamp("us"))}))
    assert latest_pipeline_run(tmp_path, "a").run_id == "pipeline-a2"
    assert latest_pipeline_run(tmp_path, "b").run_id == "pipeline-b1"
    with pytest.raises(RecommendError, match=r"2 datasets \['a', 'b'\]: pass --dataset NAME"):
        latest_pipeline_run(tmp_path)
    with pytest.raises(RecommendError, match="no completed pipeline run of dataset 'c'"):
        latest_pipeline_run(tmp_path, "c")


# The command line runs in a child process through the console script's entry (jobs.cli), and
# checks there what it imported: a cold start must not pay for these.
HEAVY = ("pyspark", "torch", "sentence_transformers", "matplotlib", "ray", "scipy")
PROBE = ("import sys; from jobs import cli; code = cli.main(['recommend'] + sys.argv[1:]); "
         f"heavy = [m for m in {HEAVY!r} if m in sys.modules]; "
         "assert not heavy, f'recommend imported {heavy}'; raise SystemExit(code)")


def command(shared, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PROBE, "--set", f"warehouse={shared.warehouse}", *argv],
                          capture_output=True, text=True, cwd=REPO, timeout=300)


def test_command_line_serves_json_lines_without_heavy_imports(run):
    shared, _ = run
    done = command(shared, "--run-id", shared.run_id, "--user", "u0001,u0002", "--k", "3")
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [line["user_id"] for line in lines] == ["u0001", "u0002"]
    assert all(len(line["items"]) == 3 and line["items"][0]["because"] for line in lines)
    assert all(c["title"] for line in lines for entry in line["items"] for c in entry["because"])
    partly = command(shared, "--run-id", shared.run_id, "--history", "i00001,nope", "--k", "2")
    assert partly.returncode == 0, partly.stderr
    assert json.loads(partly.stdout)["unknown_items"] == ["nope"]
    bad = command(shared, "--run-id", shared.run_id, "--history", "nope")
    assert bad.returncode == 2 and "item 'nope'" in bad.stderr


def test_command_line_serves_the_latest_completed_run_and_says_so_on_stderr(run):
    shared, _ = run
    done = command(shared, "--user", "u0001", "--k", "2", "--format", "jsonl")
    assert done.returncode == 0, done.stderr
    assert f"serving run {shared.run_id}, the latest completed pipeline run of dataset 'synthetic'" in done.stderr
    assert json.loads(done.stdout)["run_id"] == shared.run_id  # stdout: JSON only
    missing = command(shared, "--dataset", "other", "--user", "u0001")
    assert missing.returncode == 2 and "no completed pipeline run of dataset 'other'" in missing.stderr
    assert missing.stdout == ""
    wrong = command(shared, "--dataset", "other", "--run-id", shared.run_id, "--user", "u0001")
    assert wrong.returncode == 2 and "is of dataset 'synthetic', not 'other'" in wrong.stderr


def test_the_torch_kernel_flag_serves_the_stored_list(run):
    shared, _ = run
    done = subprocess.run([sys.executable, "-m", "jobs.recommend", "--set", f"warehouse={shared.warehouse}",
                           "--run-id", shared.run_id, "--representation", "title", "--user", "u0001",
                           "--torch-kernel", "--no-explain"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr
    stored = read_frame(shared.warehouse, "recommendations", equal={"run_id": shared.run_id,
                                                                    "representation": "title", "user_id": "u0001"})
    items = json.loads(done.stdout)["items"]
    assert [i["item_id"] for i in items] == stored.sort_values("rank")["item_id"].tolist()[:len(items)]


@pytest.mark.parametrize("flag", ["--contributors", "--k"])
@pytest.mark.parametrize("value", ["-1", "0"])
def test_a_count_flag_below_one_is_an_argument_error_naming_the_flag(run, flag, value):
    shared, _ = run
    done = command(shared, "--run-id", shared.run_id, "--user", "u0001", flag, value)
    assert done.returncode == 2 and f"argument {flag}: must be a positive integer" in done.stderr
