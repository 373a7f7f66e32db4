"""The ``hf`` engine run from a saved folder, as a user runs it, on a tiny random-weight LLaVA.

Random weights make gibberish, so these tests check the plumbing: one caption per image, input
order kept, left padding right (a caption does not depend on what shares its batch), only new
tokens decoded, token limits honoured, failures isolated, offline loading."""
from __future__ import annotations


import pytest
from PIL import Image

from udfs.caption import Caption, make_engine, prompt_id
from udfs.caption.hf_engine import HFEngine

PROMPTS = [
    "Describe this product image in detail, focusing on visual attributes like color, style, material.",
    "describe this",
    "tell me about this picture please",
]


@pytest.fixture(scope="module")
def engine(tiny_llava) -> HFEngine:
    return make_engine("hf", model=str(tiny_llava), batch_size=4, max_new_tokens=10, options={"device": "cpu"})


@pytest.mark.realdata
def test_one_caption_per_image_in_order(engine, posters):
    captions = engine.describe(posters[:3])
    assert len(captions) == 3 and all(isinstance(c, Caption) for c in captions)
    assert all(0 < c.n_tokens <= 10 for c in captions)
    reversed_captions = engine.describe(posters[:3][::-1])
    assert reversed_captions == captions[::-1]


@pytest.mark.realdata
def test_a_caption_does_not_depend_on_its_batch(engine, posters):
    """Three prompts of different lengths share a left-padded batch; each alone needs no
    padding. Greedy decoding must give the same text either way."""
    batched = engine.describe_with_prompts(posters[:3], PROMPTS)
    alone = [engine.describe_with_prompts([img], [p])[0] for img, p in zip(posters[:3], PROMPTS)]
    assert batched == alone
    assert engine.tokenizer.padding_side == "left"


@pytest.mark.realdata
def test_batches_smaller_than_the_input_keep_order(tiny_llava, posters):
    one_at_a_time = make_engine("hf", model=str(tiny_llava), batch_size=1, max_new_tokens=10)
    five_at_once = make_engine("hf", model=str(tiny_llava), batch_size=5, max_new_tokens=10)
    assert one_at_a_time.describe(posters) == five_at_once.describe(posters)


def test_prompt_is_rendered_through_the_chat_template(engine):
    rendered = engine.render_prompt("describe this")
    assert rendered == "USER: <image> describe this ASSISTANT:"
    assert engine.prompt_id == prompt_id(engine.prompt)


@pytest.mark.realdata
def test_only_new_tokens_are_decoded_and_min_new_tokens_forces_length(tiny_llava, posters):
    fixed = make_engine(
        "hf", model=str(tiny_llava), batch_size=2, max_new_tokens=6, options={"min_new_tokens": 6}
    )
    captions = fixed.describe(posters[:2])
    assert [c.n_tokens for c in captions] == [6, 6]
    for caption in captions:
        # The prompt's own words and the chat markers are not part of the caption.
        assert "USER:" not in caption.text and "ASSISTANT:" not in caption.text
        assert len(caption.text.split()) <= 6


@pytest.mark.realdata
def test_static_cache_gives_the_same_captions(tiny_llava, engine, posters):
    static = make_engine("hf", model=str(tiny_llava), batch_size=4, max_new_tokens=10, options={"static_cache": True})
    assert static.describe(posters[:2]) == engine.describe(posters[:2])


def test_any_image_mode_and_size_is_accepted(engine):
    images = [Image.new("L", (17, 90), 30), Image.new("RGBA", (300, 40), (0, 0, 255, 128))]
    assert len(engine.describe(images)) == 2


def test_missing_model_folder_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match=r"could not be loaded from a local folder.*huggingface-cli download"):
        make_engine("hf", model=str(tmp_path / "no-such-model"))
    with pytest.raises(OSError, match="llava-hf/not-a-cached-model"):
        make_engine("hf", model="llava-hf/not-a-cached-model")


def test_bad_options_are_errors(tiny_llava):
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['temprature'\]"):
        make_engine("hf", model=str(tiny_llava), options={"temprature": 0.5})
    with pytest.raises(ValueError, match="min_new_tokens=20 must be in 0..max_new_tokens=10"):
        make_engine("hf", model=str(tiny_llava), max_new_tokens=10, options={"min_new_tokens": 20})
    with pytest.raises(ValueError, match="dtype must be"):
        make_engine("hf", model=str(tiny_llava), options={"dtype": "int8"})


def test_describe_with_prompts_checks_lengths(engine):
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        engine.describe_with_prompts([Image.new("RGB", (4, 4))] * 2, ["x"])
