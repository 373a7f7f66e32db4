"""The report page: one self-contained HTML file from the Jinja2 template in
``udfs/resources/report.html.j2`` (every figure and thumbnail inlined as a base64 data URI, no
external resource, so the file opens offline and can be mailed as is).

``render(context)`` fills the template (autoescaped: names and descriptions from a catalog
cannot inject markup); ``thumbnail`` turns an item image into a small inline JPEG.
"""
from __future__ import annotations

import base64
import io
import logging
from importlib import resources

from jinja2 import DictLoader, Environment, StrictUndefined, select_autoescape

from udfs.io.images import ImageError, load_image, readable_source

log = logging.getLogger(__name__)

TEMPLATE = "report.html.j2"
THUMB_SIDE = 160
# One thumbnail: its image, or a grey box saying why there is none; green frame for a hit.
_THUMB = ('<div class="thumb">{% if t.image %}<img alt="item {{ t.item_id }}" class="{{ \'hit\' if t.hit else \'\' }}" '
          'src="data:image/jpeg;base64,{{ t.image }}">{% else %}<div class="noimage">no image</div>{% endif %}'
          '{{ t.title or t.item_id }}</div>')


def render(context: dict) -> str:
    """The page for ``context`` (the names the template uses; a missing one is an error)."""
    text = resources.files("udfs").joinpath("resources", TEMPLATE).read_text(encoding="utf-8")
    environment = Environment(loader=DictLoader({TEMPLATE: text, "thumb": _THUMB}),
                              autoescape=select_autoescape(default=True, default_for_string=True),
                              undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    return environment.get_template(TEMPLATE).render(**context)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def thumbnail(image_uri: str | None, side: int = THUMB_SIDE) -> str | None:
    """A base64 JPEG of the image at ``image_uri`` at most ``side`` pixels wide, or None when
    there is no image or it cannot be read (logged; the page shows a grey box instead)."""
    path = readable_source(image_uri) if image_uri else None
    if not path:  # no image, or a web one (http://): the report fetches nothing from the web
        return None
    try:
        img = load_image(path, max_side=side, name=image_uri)
    except (ImageError, OSError, ValueError) as exc:
        log.warning("report: image %s not shown: %s", image_uri, exc)
        return None
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=82)
    return b64(buffer.getvalue())


def description_rows(figures: dict[str, float]) -> list[tuple[str, str]]:
    """(name, value) rows of the description figures (``udfs.caption.description_stats``) that were
    measured; the vectors' rows set the descriptions beside the titles."""
    def num(name: str, fmt: str) -> str | None:
        value = figures.get(name)
        return None if value is None or value != value else format(value, fmt)

    rows: list[tuple[str, str | None]] = []
    if figures.get("texts"):
        rows += [("images described", num("texts", ",.0f")),
                 ("distinct texts", f"{figures['distinct']:,.0f} ({figures['distinct_ratio']:.1%})"),
                 ("share of the most common text", num("top_text_share", ".1%")),
                 ("words per text: mean (p10 / p50 / p90)",
                  f"{figures['words_mean']:.1f} ({figures['words_p10']:.0f} / {figures['words_p50']:.0f} / "
                  f"{figures['words_p90']:.0f})"),
                 ("vocabulary (distinct words)", num("vocabulary", ",.0f"))]
    for label, name in (("mean cosine of two random items", "cosine"),
                        ("mean cosine of two items one user consumed (train)", "co_consumed_cosine"),
                        ("co-consumption lift (the difference to two random interactions' items)", "lift")):
        digits = "+.4f" if name == "lift" else "+.3f"  # the threshold is 0.003: a fourth digit
        lvlm, title = num(f"lvlm_{name}", digits), num(f"title_{name}", digits)
        if lvlm is not None:
            rows.append((f"{label}: descriptions / titles", f"{lvlm} / {title or '-'}"))
    return [(name, value) for name, value in rows if value is not None]
