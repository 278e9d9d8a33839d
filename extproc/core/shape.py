"""The shape of a request body that the strict bound needs (see core/estimate.py).

Cheap by design, because it runs on every request: the body's length, and a walk of the parsed
JSON only when the body mentions an image, a document or a file (a substring test first), so the
common request costs no extra pass over the JSON.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

# Substrings that mean the body may carry media priced by a formula rather than by bytes.
_MEDIA_MARKERS = (b"image", b"document", b"file")
_IMAGE_TYPES = frozenset({"image_url", "input_image", "image"})
_DOCUMENT_TYPES = frozenset({"document", "file", "input_file"})


@dataclass(frozen=True, slots=True)
class PromptShape:
    """What the strict bound needs to know about a request body."""

    body_bytes: int
    images: int = 0
    image_bytes: int = 0  # bytes of the image parts' JSON, replaced by the per-image bound
    unbounded: bool = False  # input that the body does not carry (see module docstring)
    tools: bool = False
    choices: int = 1  # `n` / `best_of`: each choice writes up to the output cap


_UNBOUNDED_FIELDS = ("previous_response_id", "conversation", "prompt")


def prompt_shape(endpoint_name: str, doc: dict[str, Any], body: bytes) -> PromptShape:
    """Read the shape from the parsed body. `endpoint_name` is `Endpoint.value`."""
    choices = 1
    for name in ("n", "best_of"):
        value = doc.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > choices:
            choices = value
    unbounded = endpoint_name == "responses" and any(
        doc.get(name) is not None for name in _UNBOUNDED_FIELDS
    )
    tools = "tools" in doc or "functions" in doc
    if not any(marker in body for marker in _MEDIA_MARKERS):
        return PromptShape(len(body), unbounded=unbounded, tools=tools, choices=choices)
    counter = _MediaCounter()
    counter.walk(doc, 0)
    return PromptShape(
        len(body), counter.images, counter.image_bytes, unbounded or counter.documents,
        tools, choices,
    )


class _MediaCounter:
    """Finds image parts (to price them by formula) and documents (to bound them by the
    context window). Depth is limited: a body nested deeper is refused by the parser first."""

    __slots__ = ("documents", "image_bytes", "images")

    def __init__(self) -> None:
        self.images = 0
        self.image_bytes = 0
        self.documents = False

    def walk(self, value: Any, depth: int) -> None:
        if depth > 64:
            return
        if isinstance(value, list):
            for item in value:
                self.walk(item, depth + 1)
        elif isinstance(value, dict):
            kind = value.get("type")
            if kind in _IMAGE_TYPES or (kind is None and "image_url" in value):
                self.images += 1
                self.image_bytes += _json_len(value)
                return
            if kind in _DOCUMENT_TYPES or "file_id" in value:
                self.documents = True
                return
            for item in value.values():
                if isinstance(item, list | dict):
                    self.walk(item, depth + 1)


def _json_len(value: Any) -> int:
    """Bytes of a value's compact JSON: never more than its bytes in the body."""
    return len(orjson.dumps(value))
