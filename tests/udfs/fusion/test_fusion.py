"""Fusion baselines (udfs.fusion.fusion) and representation names (udfs.representations)."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from udfs.fusion.fusion import fuse
from udfs.rank.profiles import user_profiles
from udfs.representations import (
    CONCAT,
    NAIVE,
    TEXT,
    TITLE,
    VISUAL,
    RepresentationError,
    fusion_name,
    lvlm_name,
    parse_representation,
    required_base_representations,
    validate_representations,
)


def _unit(rng, n, d):
    x = rng.normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), dt=st.integers(2, 24), dv=st.integers(2, 40))
def test_naive_inner_products_are_averaged_cosines(seed, dt, dv):
    if dt == dv:
        dv += 1
    rng = np.random.default_rng(seed)
    t, v = _unit(rng, 30, dt), _unit(rng, 30, dv)
    pt, pv = _unit(rng, 5, dt), _unit(rng, 5, dv)
    items = fuse(NAIVE, {TEXT: t, VISUAL: v})
    profiles = fuse(NAIVE, {TEXT: pt, VISUAL: pv})
    assert items.dtype == np.float32 and items.shape == (30, dt + dv)
    np.testing.assert_allclose(np.linalg.norm(items, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(profiles @ items.T, 0.5 * pt @ t.T + 0.5 * pv @ v.T, atol=1e-6)


def test_profile_of_fused_items_reweights_modalities_by_history_coherence():
    # What the naive docstring states for the other order (profile the fused items).
    rng = np.random.default_rng(0)
    t, v = _unit(rng, 40, 8), _unit(rng, 40, 12)
    history = np.arange(6)
    fused_items = fuse(NAIVE, {TEXT: t, VISUAL: v})
    profile_of_fused, _ = user_profiles(np.zeros(6, dtype=int), fused_items[history])
    scores = profile_of_fused[0] @ fused_items.T
    m_t, m_v = t[history].mean(axis=0), v[history].mean(axis=0)
    r_t, r_v = np.linalg.norm(m_t), np.linalg.norm(m_v)
    p_t, p_v = m_t / r_t, m_v / r_v
    predicted = r_t * (t @ p_t) + r_v * (v @ p_v)  # up to a positive per-user constant
    np.testing.assert_allclose(scores / scores[0], predicted / predicted[0], rtol=1e-4)
    averaged = 0.5 * (t @ p_t) + 0.5 * (v @ p_v)
    assert not np.allclose(scores / scores[0], averaged / averaged[0], rtol=1e-3)
    # With a one-item history both orders give the same scores.
    single, _ = user_profiles(np.zeros(1, dtype=int), fused_items[:1])
    fused_profile = fuse(NAIVE, {TEXT: t[:1], VISUAL: v[:1]})
    np.testing.assert_allclose(single, fused_profile, atol=1e-6)


def test_naive_with_equal_dims_is_the_normalised_elementwise_mean():
    rng = np.random.default_rng(1)
    t, v = _unit(rng, 10, 16), _unit(rng, 10, 16)
    fused = fuse(NAIVE, {TITLE: t, TEXT: v})
    expected = 0.5 * t + 0.5 * v
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    assert fused.shape == (10, 16)
    np.testing.assert_allclose(fused, expected, atol=1e-6)


def test_default_concat_equals_naive_when_dims_differ():
    rng = np.random.default_rng(2)
    parts = {TEXT: _unit(rng, 10, 6), VISUAL: _unit(rng, 10, 9)}
    np.testing.assert_allclose(fuse(CONCAT, parts), fuse(NAIVE, parts), atol=1e-7)
    np.testing.assert_allclose(
        fuse(CONCAT, parts)[:, :6], parts[TEXT] / np.sqrt(2), atol=1e-6
    )


def test_weighted_concat_scores_are_cosines_weighted_by_squared_weights():
    rng = np.random.default_rng(3)
    t, v = _unit(rng, 25, 7), _unit(rng, 25, 11)
    pt, pv = _unit(rng, 4, 7), _unit(rng, 4, 11)
    weights = {TEXT: 2.0, VISUAL: 1.0}
    items = fuse(CONCAT, {TEXT: t, VISUAL: v}, weights)
    profiles = fuse(CONCAT, {TEXT: pt, VISUAL: pv}, weights)
    np.testing.assert_allclose(np.linalg.norm(items, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(
        profiles @ items.T, 0.8 * pt @ t.T + 0.2 * pv @ v.T, atol=1e-6
    )


def test_layout_does_not_depend_on_dict_order_and_parts_are_renormalised():
    rng = np.random.default_rng(4)
    t, v = _unit(rng, 5, 3), _unit(rng, 5, 4)
    a = fuse(CONCAT, {TEXT: t, VISUAL: v}, {VISUAL: 3.0})
    b = fuse(CONCAT, {VISUAL: 7.0 * v, TEXT: t}, {VISUAL: 3.0})
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_zero_weight_drops_a_part():
    rng = np.random.default_rng(5)
    t, v = _unit(rng, 5, 3), _unit(rng, 5, 4)
    fused = fuse(CONCAT, {TEXT: t, VISUAL: v}, {VISUAL: 0.0})
    np.testing.assert_allclose(fused[:, :3], t, atol=1e-6)
    assert not fused[:, 3:].any()


@pytest.mark.parametrize(
    "name, parts, weights, message",
    [
        ("mean", {TEXT: np.eye(2), VISUAL: np.eye(2)}, None, "unknown fusion 'mean'"),
        (NAIVE, {TEXT: np.eye(2), VISUAL: np.eye(3)[:2]}, {TEXT: 2}, "takes no weights"),
        (NAIVE, {TEXT: np.eye(2)}, None, "at least two parts"),
        (NAIVE, {TEXT: np.eye(2), VISUAL: np.eye(3)}, None, "'visual' has 3 rows"),
        (NAIVE, {TEXT: np.eye(2), VISUAL: np.ones(2)}, None, "reshape\\(1, -1\\)"),
        (NAIVE, {TEXT: np.eye(2), VISUAL: np.array([[1.0, 0], [0, 0]])}, None,
         "'visual' row 1 is zero"),
        (NAIVE, {TEXT: np.eye(2), VISUAL: -np.eye(2)}, None, "row 0 fuses to a zero vector"),
        (CONCAT, {TEXT: np.eye(2), VISUAL: np.eye(2)}, {"image": 1.0}, "\\['image'\\]"),
        (CONCAT, {TEXT: np.eye(2), VISUAL: np.eye(2)}, {TEXT: -1.0}, ">= 0"),
        (CONCAT, {TEXT: np.eye(2), VISUAL: np.eye(2)}, {TEXT: 0, VISUAL: 0}, "not all 0"),
    ],
)
def test_bad_fusion_inputs_are_errors_that_say_what_to_fix(name, parts, weights, message):
    with pytest.raises(ValueError, match=message):
        fuse(name, parts, weights)


# Representation names. These belong in tests/udfs/test_representations.py, which this
# change could not create.

LLAVA = "llava-hf/llava-v1.6-mistral-7b-hf"


def test_lvlm_name_round_trips_including_colons_in_the_model():
    name = lvlm_name("vllm", LLAVA, "p1")
    assert name == f"lvlm:vllm:{LLAVA}:p1"
    parsed = parse_representation(name)
    assert (parsed.kind, parsed.engine, parsed.model, parsed.prompt_id) == (
        "lvlm", "vllm", LLAVA, "p1"
    )
    assert parsed.is_text and not parsed.is_fusion and parsed.name == name
    ollama = parse_representation(lvlm_name("hf", "llava:7b", "default"))
    assert ollama.model == "llava:7b" and ollama.prompt_id == "default"


@pytest.mark.parametrize(
    "engine, model, prompt_id, message",
    [
        ("v:llm", LLAVA, "p1", "engine 'v:llm' contains ':'"),
        ("vllm", LLAVA, "p:1", "prompt_id 'p:1' contains ':'"),
        ("vllm", "", "p1", "model must be a non-empty"),
        ("vllm", "a+b", "p1", "contains '\\+'"),
    ],
)
def test_bad_lvlm_parts_are_rejected(engine, model, prompt_id, message):
    with pytest.raises(RepresentationError, match=message):
        lvlm_name(engine, model, prompt_id)


def test_fusion_names_are_canonical():
    lvlm = lvlm_name("tags", "efficientnet-lite0", "default")
    assert parse_representation(NAIVE).parts == (TITLE, VISUAL)
    assert fusion_name(NAIVE, [VISUAL, TITLE]) == NAIVE
    assert parse_representation("concat:visual+title").name == CONCAT
    named = fusion_name(CONCAT, [VISUAL, lvlm])
    assert named == f"concat:{lvlm}+visual"
    assert parse_representation(f"concat:visual+{lvlm}").parts == (lvlm, VISUAL)
    assert parse_representation(named).is_fusion


def test_validate_representations_returns_canonical_names():
    lvlm = lvlm_name("vllm", LLAVA, "p1")
    names = [TITLE, VISUAL, lvlm, NAIVE, f"naive:visual+{lvlm}"]
    assert validate_representations(names) == [
        TITLE, VISUAL, lvlm, NAIVE, f"naive:{lvlm}+visual"
    ]
    assert required_base_representations([CONCAT, f"naive:{lvlm}+visual"]) == [
        TITLE, VISUAL, lvlm
    ]


@pytest.mark.parametrize(
    "names, message",
    [
        ([TITLE, "lvlm"], "\\[1\\]: representation 'lvlm' is not one of the allowed forms"),
        (["Title"], "\\[0\\]: .*allowed forms: 'title', 'text', 'visual', 'lvlm:<engine>"),
        (["lvlm:vllm:p1"], "'lvlm:<engine>:<model>:<prompt_id>' with all three parts"),
        (["naive:title"], "at least two distinct parts"),
        (["naive:title+title"], "at least two distinct parts"),
        (["concat:naive+visual"], "is itself a fusion"),
        (["naive:title+image"], "'image' is not one of the allowed forms"),
        ([NAIVE, "naive:visual+title"], "\\[1\\] 'naive:visual\\+title' names the same"),
        ([" title"], "surrounding spaces"),
        ([], "is empty"),
        ("title", "must be a list"),
    ],
)
def test_validate_representations_names_the_bad_entry(names, message):
    with pytest.raises(RepresentationError, match=message) as err:
        validate_representations(names)
    assert "experiment.representations" in str(err.value)
