"""Pieces of a self-contained page: pictures as data URIs, figures, charts and notes."""

from __future__ import annotations

import base64
import io
from html import escape
from pathlib import Path


def png_data_uri(image) -> str:
    """A PIL image or PNG bytes/path as a data:image/png;base64 URI."""
    if isinstance(image, (str, Path)):
        raw = Path(image).read_bytes()
    elif isinstance(image, (bytes, bytearray)):
        raw = bytes(image)
    else:
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        raw = buf.getvalue()
    return "data:image/png;base64," + base64.b64encode(raw).decode("ascii")


def svg_data_uri(svg: str) -> str:
    return "data:image/svg+xml;base64," + base64.b64encode(svg.encode("utf-8")).decode("ascii")


def figure(uri: str, caption: str = "", alt: str = "") -> str:
    cap = f"<figcaption>{escape(caption)}</figcaption>" if caption else ""
    return f'<figure><img src="{uri}" alt="{escape(alt or caption)}">{cap}</figure>'


def chart(svg: str, caption: str = "", alt: str = "") -> str:
    return figure(svg_data_uri(svg), caption, alt)


def note(text: str) -> str:
    return f'<p class="note">{escape(text)}</p>'
