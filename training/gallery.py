"""A self-contained HTML page of evaluated images: each with its generated and reference captions.

Images are inlined as base64 PNG (no files beside the page, so it can be mailed or attached to a
review) and shown upscaled with `image-rendering: pixelated`, so 64x64 shapes stay crisp. Where the
shapes checker judged the generated caption, it is marked true or false with the checker's reasons.
Every caption is escaped: references come from dataset files and captions from a model.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

THUMBNAIL_SIDE = 256  # photos are shrunk to this before inlining, to keep the page small
DISPLAY_SIDE = 192  # CSS pixels


@dataclass
class GalleryRow:
    image_id: str
    image: np.ndarray | Image.Image
    generated: str
    references: list[str]
    correct: bool | None = None  # None: no checker for this dataset
    false_facts: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    parse_error: str = ""  # why the checker could not read the caption


def image_data_uri(image: np.ndarray | Image.Image, max_side: int = THUMBNAIL_SIDE) -> str:
    """PNG data URI of the image, shrunk (never enlarged) to fit max_side."""
    picture = Image.fromarray(np.asarray(image, dtype=np.uint8)) if isinstance(image, np.ndarray) else image.copy()
    if picture.mode != "RGB":
        picture = picture.convert("RGB")
    picture.thumbnail((max_side, max_side))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


_STYLE = f"""
body {{ font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; background: #fafafa; }}
h1 {{ font-size: 1.3rem; margin: 0 0 .3rem; }}
.summary {{ color: #555; margin: 0 0 1.2rem; }}
.summary span {{ margin-right: 1.2em; white-space: nowrap; }}
.grid {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(22rem, 1fr)); gap: 1rem; }}
.card {{ display: flex; gap: .8rem; background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: .7rem; }}
.card img {{ width: {DISPLAY_SIDE}px; height: auto; flex: none; align-self: flex-start;
            image-rendering: pixelated; border: 1px solid #ccc; }}
.id {{ font-size: .75rem; color: #888; }}
.generated {{ font-weight: 600; margin: .2rem 0; }}
.true {{ color: #17692e; }} .false {{ color: #b3261e; }}
.reasons {{ font-size: .85rem; color: #b3261e; margin: 0 0 .3rem 1rem; padding: 0; }}
.references {{ font-size: .85rem; color: #444; margin: .3rem 0 0 1.2rem; padding: 0; }}
"""


def write_gallery(
    path: str | Path,
    rows: Iterable[GalleryRow],
    *,
    title: str = "Caption gallery",
    summary: Mapping[str, object] | None = None,
) -> Path:
    """Writes the page to `path`; `summary` (e.g. metric name -> value) is shown under the title."""
    path = Path(path)
    summary_items = "".join(
        f"<span>{html.escape(str(name))}: <b>{html.escape(_format_value(value))}</b></span>"
        for name, value in (summary or {}).items()
    )
    cards = "\n".join(_card(row) for row in rows)
    page = (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
        f'<h1>{html.escape(title)}</h1>\n<p class="summary">{summary_items}</p>\n'
        f'<div class="grid">\n{cards}\n</div>\n</body>\n</html>\n'
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


def _card(row: GalleryRow) -> str:
    verdict_class, mark = {True: ("true", "\u2713 "), False: ("false", "\u2717 "), None: ("", "")}[row.correct]
    reasons = [f"does not parse: {row.parse_error}"] if row.parse_error else []
    reasons += [f"false: {fact}" for fact in row.false_facts] + [f"missing: {obj}" for obj in row.missing]
    reason_list = "".join(f"<li>{html.escape(reason)}</li>" for reason in reasons)
    reference_list = "".join(f"<li>{html.escape(reference)}</li>" for reference in row.references)
    generated = html.escape(row.generated) if row.generated else "<i>(empty caption)</i>"
    return (
        f'<div class="card"><img src="{image_data_uri(row.image)}" alt="{html.escape(row.image_id)}">'
        f'<div><div class="id">{html.escape(row.image_id)}</div>'
        f'<div class="generated {verdict_class}">{mark}{generated}</div>'
        + (f'<ul class="reasons">{reason_list}</ul>' if reasons else "")
        + f'<ol class="references">{reference_list}</ol></div></div>'
    )


def _format_value(value: object) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)
