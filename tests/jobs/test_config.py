"""Config loading: merge order, overrides, round trip, and errors that name key and file."""
from __future__ import annotations

import pytest

from jobs.config import Config, ConfigError, load_config


def test_base_defaults_and_dataset_file_merge():
    config = load_config(["datasets/ml100k.yaml"])
    assert config.spark.master == "local[*]"
    assert config.dataset.adapter == "movielens"
    assert config.dataset.split.protocol == "temporal_ratio"


def test_overrides_are_typed_and_win():
    config = load_config(["datasets/ml100k.yaml"],
                         ["spark.shuffle_partitions=3", "dataset.split.ratios=[0.6, 0.2, 0.2]",
                          "experiment.ks=[1, 5]", "dataset.min_rating=4"])
    assert config.spark.shuffle_partitions == 3
    assert config.dataset.split.ratios == [0.6, 0.2, 0.2]
    assert config.experiment.ks == [1, 5]
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
