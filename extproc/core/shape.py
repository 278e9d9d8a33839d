"""The shape of a request body that the strict bound needs (see core/estimate.py).

Cheap by design, because it runs on every request: the body's length, and what the one walk over
the prompt fields (which the closer estimate needs anyway) finds on its way: image and document
parts. No second pass over the JSON.
"""

from __future__ import annotations

from typing import Any

import orjson

from extproc.core.values import value_type

_IMAGE_TYPES = frozenset({"image_url", "input_image", "image"})
_DOCUMENT_TYPES = frozenset({"document", "file", "input_file"})
_TEXT_TYPES = frozenset({"text", "input_text"})
# For the closer estimate, a non-text content part (image, audio, file) counts as this many
# characters of prompt: about 1k tokens, a middle-of-the-road image cost.
NON_TEXT_PART_CHARS = 4000
_MAX_DEPTH = 64  # deeper structures are not searched for media (their bytes still count)


@value_type
class PromptShape:
    """What the strict bound needs to know about a request body."""

    body_bytes: int
    images: int = 0
    image_bytes: int = 0  # bytes of the image parts' JSON, replaced by the per-image bound
    unbounded: bool = False  # input that the body does not carry (see core/estimate.py)
    tools: bool = False
    choices: int = 1  # `n` / `best_of`: each choice writes up to the output cap


class PromptScan:
    """One walk over the prompt fields (messages, input, system, ...): the characters of text
    they hold (for the closer estimate), and the image and document parts among them (for the
    strict bound). Text parts end the descent at once; only typed non-text parts (tool results,
    function call outputs) are searched further for media inside them."""

    __slots__ = ("documents", "image_bytes", "images")

    def __init__(self) -> None:
        self.images = 0
        self.image_bytes = 0
        self.documents = False

    def chars(self, value: Any, depth: int = 0) -> int:
        """Characters of text in a prompt-like value: str, list of parts/messages, or dict."""
        if isinstance(value, str):
            return len(value)
        if depth > _MAX_DEPTH:
            return 0
        if isinstance(value, list):
            if value and type(value[0]) is int:
                # A token array (completions, embeddings): one token per id, as 4 characters.
                return 4 * len(value)
            return sum(self.chars(item, depth + 1) for item in value)
        if isinstance(value, dict):
            kind = value.get("type")
            if self._media(value, kind):
                return NON_TEXT_PART_CHARS
            if "text" in value and isinstance(value["text"], str):
                return len(value["text"])
            if "content" in value:
                return self.chars(value["content"], depth + 1)
            if "parts" in value:  # Gemini: {"role", "parts": [...]}
                return self.chars(value["parts"], depth + 1)
            if isinstance(kind, str) and kind not in _TEXT_TYPES:
                self._search(value, depth + 1)
                return NON_TEXT_PART_CHARS
        return 0

    def _media(self, value: dict[str, Any], kind: Any) -> bool:
        if kind in _IMAGE_TYPES or (kind is None and "image_url" in value):
            self.images += 1
            self.image_bytes += len(orjson.dumps(value))  # never more than its bytes in the body
            return True
        if kind in _DOCUMENT_TYPES or "file_id" in value:
            self.documents = True
            return True
        if kind is None:
            return self._gemini_media(value)
        return False

    def _gemini_media(self, value: dict[str, Any]) -> bool:
        """Gemini parts: `inlineData` images count as images; other inline media (audio,
        video, PDF) by their bytes, like text; `fileData` (a file by reference) is input the
        body does not carry."""
        inline = value.get("inlineData", value.get("inline_data"))
        if isinstance(inline, dict):
            mime = inline.get("mimeType", inline.get("mime_type"))
            if isinstance(mime, str) and mime.startswith("image/"):
                self.images += 1
                self.image_bytes += len(orjson.dumps(value))
            return True
        if "fileData" in value or "file_data" in value:
            self.documents = True
            return True
        return False

    def _search(self, value: Any, depth: int) -> None:
        """Media nested anywhere inside a non-text part."""
        if depth > _MAX_DEPTH:
            return
        if isinstance(value, list):
            for item in value:
                self._search(item, depth + 1)
        elif isinstance(value, dict):
            if depth and self._media(value, value.get("type")):
                return
            for item in value.values():
                if isinstance(item, list | dict):
                    self._search(item, depth + 1)


_UNBOUNDED_FIELDS = ("previous_response_id", "conversation", "prompt")


def prompt_shape(
    endpoint_name: str, doc: dict[str, Any], body: bytes, scan: PromptScan
) -> PromptShape:
    """The shape of a parsed body whose prompt fields `scan` has walked. `endpoint_name` is
    `Endpoint.value`."""
    choices = 1
    config = doc.get("generationConfig")
    gemini_choices = config.get("candidateCount") if isinstance(config, dict) else None
    for value in (doc.get("n"), doc.get("best_of"), gemini_choices):
        if isinstance(value, int) and not isinstance(value, bool) and value > choices:
            choices = value
    unbounded = scan.documents or (endpoint_name == "responses" and any(
        doc.get(name) is not None for name in _UNBOUNDED_FIELDS
    )) or doc.get("cachedContent") is not None  # Gemini: a cached prompt by reference
    tools = "tools" in doc or "functions" in doc
    return PromptShape(len(body), scan.images, scan.image_bytes, unbounded, tools, choices)
