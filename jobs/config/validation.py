"""How a config value is checked, and how a failed check is told.

Sections are pydantic dataclasses (``section``): pydantic checks each field's type and range and
refuses an unknown key, and the objects stay plain dataclasses (``dataclasses.asdict``,
``replace`` and ``fields`` work on them). ``explain`` turns pydantic's first error into the
message this project's configs have always given: the dotted key, the file or ``--set`` that set
it, the closest valid key, and where a key of an older config moved.
"""
import difflib
import functools
from collections.abc import Callable, Collection
from typing import Any

from pydantic import AfterValidator, ConfigDict, ValidationError
from pydantic.dataclasses import dataclass


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the key, the source and the fix."""


# Unknown keys are errors; a number given for a text field is that text (``spark.extra:
# {spark.executor.cores: 4}``). Fields are typed StrictInt / StrictFloat / StrictBool where a
# setting is a number or a flag: pydantic's lax mode would read ``true`` as 1 and ``"yes"`` as
# true, which this config has always refused. udfs.caption.kinds declares the engines' options
# with the same ConfigDict (udfs cannot import jobs).
SECTION_CONFIG = ConfigDict(extra="forbid", coerce_numbers_to_str=True)
section = functools.partial(dataclass, config=SECTION_CONFIG)


class FieldProblem(ValueError):
    """What a section's cross-field check finds wrong with one of its fields (``key``, dotted
    below the section): pydantic places such an error at the section, this names the field."""

    def __init__(self, key: str, problem: str):
        super().__init__(problem)
        self.key = key


def check(ok: Callable[[Any], bool], problem: str | Callable[[Any], str]) -> AfterValidator:
    """A field check: when ``ok(value)`` is false, ``problem`` formatted with ``value`` (or
    called with it: a message that says more than the value)."""

    def run(value: Any) -> Any:
        if not ok(value):
            raise ValueError(problem(value) if callable(problem) else problem.format(value=value))
        return value

    return AfterValidator(run)


def one_of(choices: Collection[str]) -> AfterValidator:
    return check(lambda value: value in choices, f"must be one of {list(choices)}, got {{value!r}}")


# Keys of older configs, and where each setting lives now.
MOVED_KEYS = {
    "experiment.ks": "experiment.evaluate.ks",
    "experiment.bootstrap_samples": "experiment.evaluate.bootstrap_samples",
    "experiment.seed": "experiment.evaluate.seed (the bootstrap) and experiment.topk.seed (the random baseline)",
}
# Free option maps of older configs: each of their keys is now a field of one of these sections.
MOVED_MAPS = {
    "experiment.options": ("experiment.embed", "experiment.profiles", "experiment.topk"),
    "experiment.caption.options": ("experiment.caption", "experiment.caption.tags", "experiment.caption.hf",
                                   "experiment.caption.vllm", "experiment.caption.openai"),
}
# What a value of the wrong type or out of range must be, by pydantic's error type.
WANTED = {"int_type": "must be an integer", "float_type": "must be a number", "bool_type": "must be true or false",
          "string_type": "must be a string", "list_type": "must be a list", "dict_type": "must be a mapping",
          "dataclass_type": "must be a mapping",
          "greater_than_equal": "must be >= {ge}", "greater_than": "must be > {gt}"}


def fields_of(cls: Any) -> dict[str, Any]:
    """Field name -> type of a section (``{}`` for anything that is not a section)."""
    return {name: info.annotation for name, info in getattr(cls, "__pydantic_fields__", {}).items()}


def section_type(root: type, dotted: str) -> type:
    """The dataclass of a dotted section below ``root`` (``experiment.caption.tags``)."""
    for part in dotted.split("."):
        root = fields_of(root)[part]
    return root


def source_of(sources: dict[str, str], key: str) -> str:
    # The source of this key, else of a key below it (a --set of a deeper key), else of its nearest parent.
    below = [where for known, where in sources.items() if known.startswith(key + ".")]
    parents = [key.rsplit(".", n)[0] for n in range(1, key.count(".") + 1)]
    in_order = [sources.get(key), *below, *(sources.get(parent) for parent in parents)]
    return next((where for where in in_order if where is not None), "the config")


def explain(error: ValidationError, root: type, sources: dict[str, str]) -> str:
    """Today's message for pydantic's first error below the section ``root``."""
    first = error.errors(include_url=False)[0]
    kind, value, context = first["type"], first["input"], first.get("ctx", {})
    # The walk down the sections ends at the field: a list index or a map's key is not a key.
    keys, cls, loc = [], root, list(first["loc"])
    while loc and fields_of(cls) and isinstance(loc[0], str):
        keys.append(loc.pop(0))
        cls = fields_of(cls).get(keys[-1])
    problem = context.get("error")
    if isinstance(problem, FieldProblem):
        keys += problem.key.split(".")
    dotted = ".".join(keys)
    where = source_of(sources, dotted)
    if kind == "unexpected_keyword_argument":
        return unknown_key(root, dotted, value, where)
    if problem is None:
        told = WANTED[kind].format(**context) if kind in WANTED else first["msg"]
        # A list's item or a map's entry: which one.
        entry = "".join(f"[{part!r}]" for part in loc if part != "[key]")
        problem = f"{told}, got {value!r}" + (f" (at {entry})" if entry else "")
    return f"config key '{dotted}' in {where} {problem}"


def unknown_key(root: type, dotted: str, value: Any, where: str) -> str:
    """A key no section reads: where it moved, else the closest key of its section."""
    moved = moved_to(root, dotted, value)
    if moved:
        return f"config key '{dotted}' in {where} is no longer read: {moved}"
    parent, _, key = dotted.rpartition(".")
    names = fields_of(section_type(root, parent) if parent else root)
    close = difflib.get_close_matches(key, names, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else f"; known keys: {', '.join(sorted(names))}"
    return f"unknown config key '{dotted}' in {where}{hint}"


def moved_to(root: type, dotted: str, value: Any) -> str | None:
    """Where a key of an older config moved (None when it is simply unknown)."""
    if dotted in MOVED_KEYS:
        return f"it moved to {MOVED_KEYS[dotted]}"
    if dotted not in MOVED_MAPS:
        return None
    sections = MOVED_MAPS[dotted]
    lines = []
    for key in value if isinstance(value, dict) else []:
        homes = [s for s in sections if key in fields_of(section_type(root, s))]
        where = " or ".join(f"{s}.{key}" for s in homes) or f"nowhere (not a setting of {', '.join(sections)})"
        lines.append(f"{dotted}.{key} moved to {where}")
    return "; ".join(lines) or f"its settings are typed fields of {', '.join(sections)} now"
