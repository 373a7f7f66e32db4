"""Caption engines: images in, one natural-language description per image out.

``make_engine("tags" | "hf" | "vllm", ...)`` builds an engine; ``describe_isolated`` runs it so
that a bad image fails alone. Importing this package loads no model and no torch.
"""
from udfs.caption.engine import (
    Caption,
    CaptionEngine,
    CaptionEngineError,
    describe_isolated,
    is_out_of_memory,
    make_engine,
)
from udfs.caption.prompts import DEFAULT_PROMPT, PAPER_PROMPT, prompt_id

__all__ = [
    "Caption",
    "CaptionEngine",
    "CaptionEngineError",
    "DEFAULT_PROMPT",
    "PAPER_PROMPT",
    "describe_isolated",
    "is_out_of_memory",
    "make_engine",
    "prompt_id",
]
