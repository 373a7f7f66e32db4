"""Prompt ids: short, stable, and different for any edit."""
import hashlib

import pytest

from udfs.caption.prompts import DEFAULT_PROMPT, PAPER_PROMPT, prompt_id


def test_default_prompt_is_the_papers():
    assert DEFAULT_PROMPT == PAPER_PROMPT
    assert PAPER_PROMPT.startswith("Describe this product image in detail, focusing on visual attributes")
    assert PAPER_PROMPT.endswith("what occasion it might be suitable for.")


def test_prompt_id_is_the_first_12_hex_of_sha256():
    assert prompt_id(PAPER_PROMPT) == hashlib.sha256(PAPER_PROMPT.encode()).hexdigest()[:12]
    assert len(prompt_id("x")) == 12 and int(prompt_id("x"), 16) >= 0


def test_any_edit_changes_the_id():
    assert prompt_id(PAPER_PROMPT) != prompt_id(PAPER_PROMPT + " ")
    assert prompt_id(PAPER_PROMPT) != prompt_id(PAPER_PROMPT.lower())


def test_non_string_prompt_is_an_error():
    with pytest.raises(TypeError, match="string"):
        prompt_id(None)
