"""Config loading: merge order, overrides, round trip, and errors that name key and file; every
setting a typed field (every key of conf/ consumed, a misspelling at any depth rejected with the
right key named, old keys told where they moved); job flags as aliases of --set."""
from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest
import yaml

from jobs.config import CONF_ROOT, Config, ConfigError, load_config


def test_base_defaults_and_dataset_file_merge():
    config = load_config(["datasets/ml100k.yaml"])
    assert config.spark.master == "local[*]"
    assert config.dataset.adapter == "movielens"
    assert config.dataset.split.protocol == "temporal_ratio"


def test_overrides_are_typed_and_win():
    config = load_config(["datasets/ml100k.yaml"],
                         ["spark.shuffle_partitions=3", "dataset.split.ratios=[0.6, 0.2, 0.2]",
                          "experiment.evaluate.ks=[1, 5]", "dataset.min_rating=4"])
    assert config.spark.shuffle_partitions == 3
    assert config.dataset.split.ratios == [0.6, 0.2, 0.2]
    assert config.experiment.evaluate.ks == [1, 5]
    assert config.dataset.min_rating == 4.0


def test_round_trip_through_dict():
    config = load_config(["datasets/ml100k.yaml"], ["spark.extra={spark.foo: bar}"])
    assert Config.from_dict(config.to_dict()) == config


def test_unknown_key_names_key_file_and_suggestion(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("spark:\n  mastr: local[1]\n")
    with pytest.raises(ConfigError) as err:
        load_config([str(bad)])
    text = str(err.value)
    assert "spark.mastr" in text and str(bad) in text and "master" in text


def test_unknown_override_names_the_set_flag():
    with pytest.raises(ConfigError, match=r"dataset\.splt.*--set dataset\.splt"):
        load_config(None, ["dataset.splt.protocol=label"])


def test_wrong_type_is_an_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("spark:\n  shuffle_partitions: many\n")
    with pytest.raises(ConfigError, match="shuffle_partitions.*integer"):
        load_config([str(bad)])


def test_extends_merges_parent_first(tmp_path):
    (tmp_path / "parent.yaml").write_text("dataset:\n  name: p\n  adapter: csv\n")
    child = tmp_path / "child.yaml"
    child.write_text("extends: parent.yaml\ndataset:\n  name: c\n")
    config = load_config([str(child)])
    assert (config.dataset.name, config.dataset.adapter) == ("c", "csv")


def test_missing_conf_file_says_where_it_looked():
    with pytest.raises(ConfigError, match="not found"):
        load_config(["datasets/nope.yaml"])


def test_bad_set_syntax():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["spark.master"])


# --- every setting a typed field ------------------------------------------------------------

def leaves(tree: dict, prefix: str = "") -> dict[str, object]:
    """Dotted key -> value of every leaf of a nested mapping (an empty mapping is a leaf)."""
    out = {}
    for key, value in tree.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            out.update(leaves(value, dotted))
        else:
            out[dotted] = value
    return out


CONF_FILES = sorted(p.relative_to(CONF_ROOT).as_posix() for p in CONF_ROOT.rglob("*.yaml"))


def test_conf_holds_every_kind_of_file():
    assert {"base.yaml", "cluster.example.yaml", "datasets/ml100k.yaml", "experiments/ml100k.yaml",
            "experiments/llava_next_cluster.example.yaml"} <= set(CONF_FILES)


@pytest.mark.parametrize("name", CONF_FILES)
def test_every_key_of_every_conf_file_is_read_into_the_typed_config(name):
    written = yaml.safe_load((CONF_ROOT / name).read_text()) or {}
    written.pop("extends", None)
    dumped = leaves(Config.to_dict(load_config([name])))
    own = leaves(written)
    assert own, name
    for key, value in own.items():
        # A key the typed config dropped, or read into another field, is missing or differs here.
        assert key in dumped, f"{name}: {key} is not in the typed config"
        assert dumped[key] == value, f"{name}: {key} = {value!r} was read as {dumped[key]!r}"


def field_paths(cls: type = Config, prefix: str = "") -> list[str]:
    """The dotted path of every field of the typed tree (free maps are single fields)."""
    paths = []
    for f in dataclasses.fields(cls):
        dotted = f"{prefix}.{f.name}" if prefix else f.name
        paths.append(dotted)
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            paths += field_paths(hint, dotted)
    return paths


def misspellings() -> list[tuple[str, str]]:
    """(misspelt dotted key, the right field name): each field's name with one letter dropped,
    at every position where that makes a word that is not a field of the same section."""
    out = []
    for path in field_paths():
        section, _, name = path.rpartition(".")
        siblings = {p.rpartition(".")[2] for p in field_paths() if p.rpartition(".")[0] == section}
        for i in range(len(name)):
            wrong = name[:i] + name[i + 1:]
            if wrong and wrong not in siblings:
                out.append((f"{section}.{wrong}" if section else wrong, name))
    return list(dict.fromkeys(out))


MISSPELLINGS = misspellings()


def test_misspellings_reach_every_depth_of_the_typed_tree():
    depths = {key.count(".") for key, _ in MISSPELLINGS}
    assert depths == {0, 1, 2, 3}
    assert any(key.startswith("experiment.caption.tags.") for key, _ in MISSPELLINGS)
    assert any(key.startswith("experiment.topk.") for key, _ in MISSPELLINGS)


def nested(dotted: str, value: object) -> dict:
    for part in reversed(dotted.split(".")):
        value = {part: value}
    return value


def test_a_misspelt_key_at_any_depth_is_rejected_naming_the_right_key(tmp_path):
    failures = []
    for wrong, right in MISSPELLINGS:
        expected = f"unknown config key '{wrong}'"
        hint = f"did you mean '{right}'?"
        with pytest.raises(ConfigError) as by_set:
            load_config(None, [f"{wrong}=1"])
        if expected not in str(by_set.value) or hint not in str(by_set.value) or "--set" not in str(by_set.value):
            failures.append(("--set", str(by_set.value)))
        path = tmp_path / "wrong.yaml"
        path.write_text(yaml.safe_dump(nested(wrong, 1)))
        with pytest.raises(ConfigError) as by_file:
            load_config([str(path)])
        if expected not in str(by_file.value) or hint not in str(by_file.value) or str(path) not in str(by_file.value):
            failures.append(("file", str(by_file.value)))
    assert not failures, failures[:5]
    assert len(MISSPELLINGS) > 300


def test_a_misspelt_setting_names_the_right_one():
    with pytest.raises(ConfigError, match=r"'experiment\.profiles\.half_life_day' in --set .*"
                                          r"did you mean 'half_life_days'"):
        load_config(["experiments/ml100k.yaml"], ["experiment.profiles.half_life_day=30"])


@pytest.mark.parametrize("override, moved", [
    ("experiment.options.half_life_days=30",
     "experiment.options.half_life_days moved to experiment.profiles.half_life_days"),
    ("experiment.options={reuse_vectors: false, user_block: 8}",
     "experiment.options.reuse_vectors moved to experiment.embed.reuse_vectors; "
     "experiment.options.user_block moved to experiment.topk.user_block"),
    ("experiment.caption.options={top_k: 2, rows_per_file: 1}",
     "experiment.caption.options.top_k moved to experiment.caption.tags.top_k; "
     "experiment.caption.options.rows_per_file moved to experiment.caption.rows_per_file"),
    ("experiment.caption.options.tensor_parallel_size=2",
     "experiment.caption.options.tensor_parallel_size moved to experiment.caption.vllm.tensor_parallel_size"),
    ("experiment.caption.options.device=cpu",
     "moved to experiment.caption.tags.device or experiment.caption.hf.device"),
    ("experiment.ks=[10]", "it moved to experiment.evaluate.ks"),
    ("experiment.bootstrap_samples=10", "it moved to experiment.evaluate.bootstrap_samples"),
    ("experiment.seed=1", "experiment.evaluate.seed (the bootstrap) and experiment.topk.seed"),
])
def test_a_removed_key_says_where_it_moved(override, moved):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert moved in str(err.value) and "--set" in str(err.value)


def test_a_removed_key_in_a_file_names_the_file(tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text("experiment:\n  options:\n    half_life_days: 30\n")
    with pytest.raises(ConfigError) as err:
        load_config([str(old)])
    assert str(old) in str(err.value)
    assert "experiment.options.half_life_days moved to experiment.profiles.half_life_days" in str(err.value)


def test_typed_sections_have_todays_defaults():
    experiment = load_config().experiment
    assert (experiment.embed.text_batch_size, experiment.embed.image_batch_size, experiment.embed.rows_per_task,
            experiment.embed.reuse_vectors, experiment.embed.concat_weights) == (64, 32, 20_000, True, {})
    assert experiment.profiles.half_life_days is None
    topk = experiment.topk
    assert (topk.k, topk.candidates, topk.exclude, topk.baselines) == (None, "common", ["train", "valid"],
                                                                       ["popularity", "random"])
    assert (topk.user_block, topk.item_block, topk.score_rows, topk.seed) == (16384, 32768, 1024, 42)
    assert (experiment.evaluate.ks, experiment.evaluate.bootstrap_samples, experiment.evaluate.seed) == (
        [5, 10, 20], 1000, 42)
    caption = experiment.caption
    assert (caption.actor_num_cpus, caption.torch_threads, caption.rows_per_file, caption.load_num_cpus,
            caption.accelerator_type) == (None, 0, 256, 0.0, None)


def test_each_engine_section_is_typed_by_the_engines_own_options():
    """Each engine owns its options (``udfs.caption.kinds``): the config's section is that type, and
    the engine gets it as its options mapping."""
    from udfs.caption.kinds import KINDS

    caption = load_config().experiment.caption
    assert set(KINDS) == {"tags", "hf", "vllm", "openai"}
    for name, kind in KINDS.items():
        assert type(getattr(caption, name)) is kind.options, name
    tuned = load_config(None, ["experiment.caption.engine=hf", "experiment.caption.hf.device=cpu"])
    assert tuned.experiment.caption.engine_options() == {**KINDS["hf"].defaults(), "device": "cpu"}


@pytest.mark.parametrize("override, message", [
    ("experiment.topk.user_block=0", r"'experiment\.topk\.user_block' in --set .* must be >= 1, got 0"),
    ("experiment.topk.candidates=some", r"'experiment\.topk\.candidates'.*one of \['common', 'all'\]"),
    ("experiment.topk.exclude=[train, test]", r"'experiment\.topk\.exclude'.*hide the very items"),
    ("experiment.topk.baselines=[popular]", r"'experiment\.topk\.baselines'.*unknown baselines \['popular'\]"),
    ("experiment.topk.k=5", r"'experiment\.topk\.k'.*below max\(experiment\.evaluate\.ks\) = 20"),
    ("experiment.evaluate.ks=[]", r"'experiment\.evaluate\.ks'.*non-empty"),
    ("experiment.evaluate.bootstrap_samples=0", r"'experiment\.evaluate\.bootstrap_samples'.*>= 1"),
    ("experiment.evaluate.test=ttest", r"'experiment\.evaluate\.test'.*one of \['t', 'randomization', 'wilcoxon'\]"),
    ("experiment.profiles.half_life_days=-3", r"'experiment\.profiles\.half_life_days'.*positive number of days"),
    ("experiment.profiles.half_life_days=.inf", r"'experiment\.profiles\.half_life_days'.*positive number of days"),
    ("experiment.embed.text_batch_size=0", r"'experiment\.embed\.text_batch_size'.*>= 1"),
    ("experiment.embed.reuse_vectors=maybe", r"'experiment\.embed\.reuse_vectors'.*true or false"),
    ("experiment.caption.engine=llava", r"'experiment\.caption\.engine'.*one of \['tags', 'hf', 'vllm', 'openai'\]"),
    ("experiment.caption.rows_per_file=0", r"'experiment\.caption\.rows_per_file'.*>= 1"),
    ("experiment.caption.actor_num_cpus=0", r"'experiment\.caption\.actor_num_cpus'.*> 0"),
    ("experiment.caption.vllm.tensor_parallel_size=0", r"'experiment\.caption\.vllm\.tensor_parallel_size'.*>= 1"),
])
def test_value_ranges_are_checked_once_naming_the_dotted_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_the_typed_config_round_trips_with_every_section_set():
    config = load_config(["experiments/ml100k.yaml"], [
        "experiment.topk.k=30", "experiment.topk.exclude=[train]", "experiment.profiles.half_life_days=30",
        "experiment.embed.concat_weights={title: 2}", "experiment.caption.vllm.engine_kwargs={enforce_eager: true}"])
    assert Config.from_dict(config.to_dict()) == config
    assert config.experiment.embed.concat_weights == {"title": 2.0}


# --- job flags are aliases of --set ---------------------------------------------------------

def parsed(add_arguments, argv: list[str]) -> tuple[Config, dict[str, str]]:
    from jobs.job_run import base_parser

    parser = base_parser("job", "")
    add_arguments(parser)
    args = parser.parse_args(argv)
    flags = parser.setting_overrides(args)
    return load_config(args.conf, [*args.overrides, *flags], flags), flags


def test_topk_flags_become_settings_of_the_typed_config():
    from jobs import topk

    config, flags = parsed(topk.add_arguments, [
        "--run-id", "r1", "--k", "30", "--exclude", "train", "--baselines", "", "--candidates", "all",
        "--user-block", "7", "--item-block", "9", "--representations", "title,visual"])
    settings = config.experiment.topk
    assert (settings.k, settings.exclude, settings.baselines, settings.candidates) == (30, ["train"], [], "all")
    assert (settings.user_block, settings.item_block) == (7, 9)
    assert config.experiment.representations == ["title", "visual"]
    assert len(flags) == 7
    # Not given: not an override, the config's value stays.
    config, flags = parsed(topk.add_arguments, ["--run-id", "r1"])
    assert flags == {} and config.experiment.topk.exclude == ["train", "valid"]


def test_a_flag_wins_over_set_and_a_bad_flag_value_names_the_flag():
    from jobs import caption, topk

    config, _ = parsed(topk.add_arguments, ["--set", "experiment.topk.k=40", "--k", "50"])
    assert config.experiment.topk.k == 50
    with pytest.raises(ConfigError, match=r"'experiment\.topk\.user_block' in --user-block .* must be >= 1"):
        parsed(topk.add_arguments, ["--user-block", "0"])
    with pytest.raises(ConfigError, match=r"'experiment\.topk\.exclude' in --exclude"):
        parsed(topk.add_arguments, ["--exclude", "train,test"])
    config, _ = parsed(caption.add_arguments, ["--force"])
    assert config.experiment.caption.force is True
    config, _ = parsed(caption.add_arguments, [])
    assert config.experiment.caption.force is False


# --- pydantic reads values as strictly as the hand-made builder did -------------------------

@pytest.mark.parametrize("override, message", [
    ("experiment.caption.force=1", r"'experiment\.caption\.force'.*true or false, got 1"),
    ("experiment.caption.hf.local_files_only=yes please", r"'experiment\.caption\.hf\.local_files_only'.*true or false"),
    ("experiment.topk.user_block=true", r"'experiment\.topk\.user_block'.*an integer, got True"),
    ("experiment.topk.user_block=2.5", r"'experiment\.topk\.user_block'.*an integer, got 2\.5"),
    ("experiment.fuse.lr='0.1'", r"'experiment\.fuse\.lr'.*a number, got '0\.1'"),
    ("dataset.name=true", r"'dataset\.name'.*a string, got True"),
    ("experiment.evaluate.ks=[5, x]", r"'experiment\.evaluate\.ks'.*an integer, got 'x' \(at \[1\]\)"),
    ("experiment.fuse.smore_knn_k={lvlm: 0}", r"'experiment\.fuse\.smore_knn_k'.*>= 1, got 0 \(at \['lvlm'\]\)"),
    ("experiment.fuse.tokens=7", r"'experiment\.fuse\.tokens'.*multiple of heads \(4\), got 7"),
    ("experiment.caption.openai.base_urls=[ftp://a]", r"'experiment\.caption\.openai\.base_urls'.*http://"),
    ("experiment=3", r"'experiment' in --set experiment=3 must be a mapping, got 3"),
])
def test_a_value_of_the_wrong_type_is_refused_not_converted(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_a_number_for_a_text_is_that_text_and_an_int_for_a_number_a_float():
    config = load_config(None, ["spark.extra={spark.executor.cores: 4}", "dataset.name=2024",
                                "experiment.embed.concat_weights={title: 2}", "heartbeat_s=60"])
    assert config.spark.extra == {"spark.executor.cores": "4"} and config.dataset.name == "2024"
    assert config.experiment.embed.concat_weights == {"title": 2.0} and isinstance(config.heartbeat_s, float)


def test_the_config_round_trips_through_json_as_the_runs_table_stores_it():
    import json

    config = load_config(["experiments/ml100k.yaml"], ["experiment.profiles.half_life_days=30",
                                                       "experiment.caption.vllm.engine_kwargs={enforce_eager: true}"])
    assert Config.from_dict(json.loads(config.to_json())) == config


def test_sections_stay_dataclasses_for_the_code_that_reads_them():
    from jobs.config import CaptionConf, FuseConf

    fuse = dataclasses.replace(FuseConf(), epochs=3)
    assert dataclasses.asdict(fuse)["epochs"] == 3 and "objective" in {f.name for f in dataclasses.fields(FuseConf)}
    assert dataclasses.asdict(CaptionConf().tags)["top_k"] == 3


def test_the_fuse_objectives_are_the_trainers_own():
    # The config cannot import the trainer (it loads torch), so the two lists are checked here.
    from jobs.config import FUSE_OBJECTIVES
    from udfs.fusion.fusion_training import OBJECTIVES

    assert FUSE_OBJECTIVES == OBJECTIVES
