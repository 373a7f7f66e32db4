"""``recommend`` over the session's shared pipeline run (tests/conftest.py ``synthetic_run``):
the lists equal the run's stored ones, explanations are exact, bad requests name the fix, and
the command line never starts Spark."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from udfs.recommender import RecommendError, Recommender
from udfs.warehouse_reader import read_frame

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
        recommender = Recommender.load(shared.warehouse, shared.run_id, rep)
        users = sorted(recommender.profiles)
        got = recommender.recommend(users=users, k=plan["k"])
        mine = stored[stored["representation"] == rep].sort_values(["user_id", "rank"])
        assert set(mine["user_id"]) == set(users)
        for q, user in enumerate(users):
            theirs = mine[mine["user_id"] == user]
            assert [i for i in got.item_ids[q] if i is not None] == theirs["item_id"].tolist(), (rep, user)
            np.testing.assert_allclose(got.scores[q][:len(theirs)], theirs["score"], atol=1e-6)


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
    with pytest.raises(RecommendError, match="item 'i99999' has no 'title' vector.*ingest"):
        recommender.recommend(histories=[["i00001", "i99999"]])
    with pytest.raises(RecommendError, match="history 0 is empty"):
        recommender.recommend(histories=[[]])
    with pytest.raises(RecommendError, match="users or histories|either users"):
        recommender.recommend(users=["u0001"], histories=[["i00001"]])


def test_command_line_serves_json_lines_without_starting_spark(run):
    shared, _ = run
    probe = ("import sys; from jobs import recommend; code = recommend.main(sys.argv[1:]); "
             "assert 'pyspark' not in sys.modules, 'recommend imported pyspark'; raise SystemExit(code)")
    base = [sys.executable, "-c", probe, "--set", f"warehouse={shared.warehouse}", "--run-id", shared.run_id]
    done = subprocess.run(base + ["--user", "u0001,u0002", "--k", "3"], capture_output=True, text=True,
                          cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [line["user_id"] for line in lines] == ["u0001", "u0002"]
    assert all(len(line["items"]) == 3 and line["items"][0]["because"] for line in lines)
    bad = subprocess.run(base + ["--history", "i00001,nope"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert bad.returncode == 2 and "item 'nope'" in bad.stderr
