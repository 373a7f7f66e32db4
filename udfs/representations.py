"""Names of item representations: the ``representation`` column of the vector tables.

Allowed forms:

- ``title``, ``text``: the item's catalog title / text, encoded by the text encoder;
- ``visual``: image features from the image encoder;
- ``lvlm:<engine>:<model>:<prompt_id>``: the text encoding of the descriptions that caption
  engine ``<engine>`` with model ``<model>`` and prompt ``<prompt_id>`` wrote (the
  ``descriptions`` table's key); ``<model>`` may contain ``/`` and ``:``, the engine and
  prompt id may not contain ``:``;
- ``naive``, ``concat``: a fusion (``udfs.fusion.fusion``) of the paper's Title+Vision baseline,
  i.e. of ``title`` and ``visual``;
- ``naive:<a>+<b>[+...]``, ``concat:<a>+<b>[+...]``: a fusion of the named non-fused
  representations, e.g. ``naive:lvlm:vllm:llava-hf/llava-v1.6-mistral-7b-hf:p1+visual``;
- ``attention``, ``gating``, ``crossmodal``, ``smore`` (bare: of title and visual) and
  ``<method>:<a>+<b>[+...]``: a trained fusion (``udfs.fusion.fusion_models``, built by the ``fuse``
  job), whose item vectors are profiled and ranked like a base representation's.

A fusion's canonical name lists its parts sorted and is the bare ``naive``/``concat`` for the
default parts, so one fusion has one name (and one row per item).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# The collaborative-filtering reference: Spark ML's implicit ALS, trained from the train
# interactions by the ``profiles`` job (not embedded); its vectors are unnormalised factors
# ranked by dot product. It is not a fusion part.
ALS = "als"

TITLE = "title"
TEXT = "text"
VISUAL = "visual"
LVLM = "lvlm"
NAIVE = "naive"
CONCAT = "concat"

BASE_REPRESENTATIONS = (TITLE, TEXT, VISUAL)
FUSIONS = (NAIVE, CONCAT)
# Fusions with weights, trained by the ``fuse`` job (udfs.fusion.fusion_models).
TRAINED_FUSIONS = ("attention", "gating", "crossmodal", "smore")
ALL_FUSIONS = FUSIONS + TRAINED_FUSIONS
# The paper's "Title+Vision (Naive 50/50)" and "(Concat)" baselines.
DEFAULT_FUSION_PARTS = (TITLE, VISUAL)

ALLOWED_FORMS = (
    "'title', 'text', 'visual', 'lvlm:<engine>:<model>:<prompt_id>', "
    "'naive', 'concat' (fusions of title and visual), "
    "'naive:<a>+<b>' or 'concat:<a>+<b>' (fusions of the named non-fused representations), "
    "'attention', 'gating', 'crossmodal', 'smore' (trained fusions of title and visual) or "
    "'<method>:<a>+<b>' (trained fusions of the named non-fused representations)"
)


class RepresentationError(ValueError):
    """A representation name that is not one of the allowed forms."""


@dataclass(frozen=True)
class Representation:
    """A parsed representation name; ``name`` is its canonical spelling."""

    kind: str  # title | text | visual | lvlm | naive | concat | attention | gating | crossmodal | smore
    engine: str | None = None
    model: str | None = None
    prompt_id: str | None = None
    parts: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        if self.kind == LVLM:
            return f"{LVLM}:{self.engine}:{self.model}:{self.prompt_id}"
        if self.kind in ALL_FUSIONS:
            return fusion_name(self.kind, self.parts)
        return self.kind

    @property
    def is_fusion(self) -> bool:
        """Any fusion: parameter-free (built by ``embed``) or trained (built by ``fuse``)."""
        return self.kind in ALL_FUSIONS

    @property
    def is_trained(self) -> bool:
        """A trained fusion: its item vectors come from the ``fuse`` job and are profiled like a
        base representation's (a user's vector is the mean of the fused item vectors)."""
        return self.kind in TRAINED_FUSIONS

    @property
    def is_text(self) -> bool:
        """Whether the text encoder makes it (title, text and LVLM descriptions)."""
        return self.kind in (TITLE, TEXT, LVLM)


def lvlm_name(engine: str, model: str, prompt_id: str) -> str:
    """``lvlm:<engine>:<model>:<prompt_id>``, the representation of a caption run's texts."""
    for field, value, may_hold_colon in (
        ("engine", engine, False), ("model", model, True), ("prompt_id", prompt_id, False)
    ):
        if not isinstance(value, str) or not value.strip() or value != value.strip():
            raise RepresentationError(
                f"lvlm {field} must be a non-empty string without surrounding spaces, got "
                f"{value!r}"
            )
        if not may_hold_colon and ":" in value:
            raise RepresentationError(
                f"lvlm {field} {value!r} contains ':', which separates the parts of "
                f"'lvlm:<engine>:<model>:<prompt_id>': rename it"
            )
        if "+" in value:
            raise RepresentationError(
                f"lvlm {field} {value!r} contains '+', which separates fusion parts: rename it"
            )
    return f"{LVLM}:{engine}:{model}:{prompt_id}"


def spell_out_lvlm(name: str, full: str) -> str:
    """``name`` with the ``lvlm`` shorthand (alone, or a fusion part as in ``naive:lvlm+visual``)
    spelt out as ``full``, an LVLM representation's full name; other names come back unchanged."""
    if name == LVLM:
        return full
    head, _, parts = name.partition(":")
    pieces = parts.split("+")
    if head not in ALL_FUSIONS or LVLM not in pieces:
        return name
    return f"{head}:" + "+".join(full if part == LVLM else part for part in pieces)


def fusion_name(method: str, parts: Iterable[str]) -> str:
    """Canonical name of fusion ``method`` over ``parts`` (bare for title + visual)."""
    if method not in ALL_FUSIONS:
        raise RepresentationError(f"unknown fusion {method!r}: choose one of {list(ALL_FUSIONS)}")
    canonical = []
    for part in parts:
        parsed = parse_representation(part)
        if parsed.is_fusion:
            raise RepresentationError(
                f"fusion part {part!r} is itself a fusion: fuse non-fused representations "
                f"only ({ALLOWED_FORMS})"
            )
        canonical.append(parsed.name)
    if ALS in canonical:
        raise RepresentationError(f"fusion part {ALS!r} is a collaborative-filtering model, not an item content "
                                  "representation: fuse content representations only")
    ordered = tuple(sorted(canonical))
    if len(set(ordered)) != len(ordered) or len(ordered) < 2:
        raise RepresentationError(
            f"fusion {method!r} needs at least two distinct parts, got {list(canonical)}"
        )
    return method if ordered == tuple(sorted(DEFAULT_FUSION_PARTS)) else f"{method}:{'+'.join(ordered)}"


def parse_representation(name: str) -> Representation:
    """Parse a representation name; raises ``RepresentationError`` naming the allowed forms."""
    if not isinstance(name, str) or not name or name != name.strip():
        raise RepresentationError(
            f"representation {name!r} is not a non-empty string without surrounding spaces; "
            f"allowed forms: {ALLOWED_FORMS}"
        )
    if name in BASE_REPRESENTATIONS or name == ALS:
        return Representation(kind=name)
    if name in ALL_FUSIONS:
        return Representation(kind=name, parts=tuple(sorted(DEFAULT_FUSION_PARTS)))
    head, sep, rest = name.partition(":")
    if sep and head == LVLM:
        engine, sep2, tail = rest.partition(":")
        model, sep3, prompt_id = tail.rpartition(":")
        if not (sep2 and sep3 and engine and model and prompt_id):
            raise RepresentationError(
                f"representation {name!r}: an LVLM representation is "
                f"'lvlm:<engine>:<model>:<prompt_id>' with all three parts non-empty, e.g. "
                f"'lvlm:tags:efficientnet-lite0:default'"
            )
        try:
            lvlm_name(engine, model, prompt_id)
        except RepresentationError as err:
            raise RepresentationError(f"representation {name!r}: {err}") from None
        return Representation(kind=LVLM, engine=engine, model=model, prompt_id=prompt_id)
    if sep and head in ALL_FUSIONS:
        pieces = rest.split("+")
        try:
            fusion_name(head, pieces)
            parts = tuple(sorted(parse_representation(p).name for p in pieces))
        except RepresentationError as err:
            raise RepresentationError(f"representation {name!r}: {err}") from None
        return Representation(kind=head, parts=parts)
    raise RepresentationError(
        f"representation {name!r} is not one of the allowed forms: {ALLOWED_FORMS}, or {ALS!r} "
        f"(the collaborative-filtering reference)"
    )


def validate_representations(
    names: Sequence[str], source: str = "experiment.representations"
) -> list[str]:
    """Check a configured list of representations; returns their canonical names.

    Raises ``RepresentationError`` naming ``source``, the bad entry and the allowed forms, and
    on an empty list or on two entries that name the same representation.
    """
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise RepresentationError(
            f"{source} must be a list of representation names, got {names!r}"
        )
    if not names:
        raise RepresentationError(f"{source} is empty: name at least one of {ALLOWED_FORMS}")
    seen: dict[str, str] = {}  # canonical name -> the entry that named it, in the list's order
    for i, entry in enumerate(names):
        try:
            parsed = parse_representation(entry)
        except RepresentationError as err:
            raise RepresentationError(f"{source}[{i}]: {err}") from None
        if parsed.name in seen:
            raise RepresentationError(
                f"{source}[{i}] {entry!r} names the same representation as "
                f"{seen[parsed.name]!r}: list it once"
            )
        seen[parsed.name] = entry
    return list(seen)


def required_base_representations(names: Sequence[str]) -> list[str]:
    """The non-fused representations that ``names`` need (fusion parts included), in order:
    the ones ``embed`` encodes. ``als`` is not one (``profiles`` trains it from interactions)."""
    needed: list[str] = []
    for name in names:
        parsed = parse_representation(name)
        if parsed.kind == ALS:
            continue
        for base in parsed.parts if parsed.is_fusion else (parsed.name,):
            if base not in needed:
                needed.append(base)
    return needed
