"""Caption prompts and their ids: the ``prompt_id`` column of ``descriptions`` is a short hash of
the exact template, so editing a prompt (even one character) starts a new cache slice."""
from __future__ import annotations

import hashlib

# Valencia et al. (2026), the prompt the paper's LLaVA-NeXT descriptions were produced with.
PAPER_PROMPT = (
    "Describe this product image in detail, focusing on visual attributes like color, style, "
    "material, and what occasion it might be suitable for."
)
DEFAULT_PROMPT = PAPER_PROMPT

PROMPT_ID_HEX = 12


def prompt_id(template: str) -> str:
    """The first 12 hex digits of the SHA-256 of the UTF-8 template: short, stable across runs
    and machines, and different for any edit."""
    if not isinstance(template, str):
        raise TypeError(f"prompt_id: the prompt must be a string, got {type(template).__name__}")
    return hashlib.sha256(template.encode("utf-8")).hexdigest()[:PROMPT_ID_HEX]
