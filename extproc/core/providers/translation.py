"""OpenAI chat/completions in front of Anthropic Messages and Gemini generateContent.

Opt-in per Upstream (`translate: true`): a `/v1/chat/completions` call for a model such an
Upstream serves is rewritten into the provider's own request, and its answer (JSON, or each SSE
event) back into OpenAI's shape, usage included, so the `openai` SDK works unchanged and
pricing reads the provider's own usage. One translator per schema pair, pure functions of
bytes.

Rules:
* only what maps one to one is translated: messages (system/developer, user, assistant with
  tool calls, tool results), text and image (`data:` URL; Anthropic also `https:`) parts,
  function tools and `tool_choice`, the output cap, `temperature`, `top_p`, `stop`, `stream`;
* anything else that changes the answer (`n` > 1, `logprobs`, `response_format`, penalties,
  `logit_bias`, audio, ...) is a 400 naming the field, never silently dropped;
* fields that only inform the gateway (`stream_options`, `user`, `store`, `metadata`,
  `service_tier`, `parallel_tool_calls`) are accepted and not sent on.
"""

from __future__ import annotations

from typing import Any

import orjson

from extproc.core.decisions import Deny
from extproc.core.providers.base import Endpoint
from extproc.core.sse import SseEvent, SseSplitter
from extproc.core.usage import Usage
from extproc.core.values import value_type

_MAPPED = frozenset({"model", "messages", "max_tokens", "max_completion_tokens", "temperature",
                     "top_p", "stop", "stream", "tools", "tool_choice", "n"})
_IGNORED = frozenset({"stream_options", "user", "store", "metadata", "service_tier",
                      "parallel_tool_calls"})


def _bad(message: str) -> Deny:
    return Deny(400, "untranslatable_request", message)


@value_type
class Translated:
    """The provider's request: its body, path and endpoint."""

    body: bytes
    path: str
    endpoint: Endpoint


def _check_fields(doc: dict[str, Any], provider: str) -> Deny | None:
    for name, value in doc.items():
        if name in _MAPPED or name in _IGNORED or value is None:
            continue
        if name == "logprobs" and value is False:
            continue
        return _bad(f"Field '{name}' has no equivalent in the {provider} API; remove it to "
                    "call this model through chat/completions.")
    n = doc.get("n")
    if n is not None and n != 1:
        return _bad(f"Field 'n' must be 1: the {provider} API returns one choice per call.")
    return None


def _text(content: Any) -> str | None:
    """The text of a message content that is a string or a list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        for p in content
    ):
        return "".join(p["text"] for p in content)
    return None


def _data_url(url: str) -> tuple[str, str] | None:
    """(media type, base64 data) of a `data:<type>;base64,<data>` URL."""
    if not url.startswith("data:") or ";base64," not in url:
        return None
    head, _, data = url[5:].partition(";base64,")
    return head, data


def _arguments(call: dict[str, Any]) -> Any:
    function = call.get("function") or {}
    raw = function.get("arguments") or "{}"
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return {"arguments": raw}


def _finish(reason: str) -> str:
    return {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length",
            "tool_use": "tool_calls", "STOP": "stop", "MAX_TOKENS": "length",
            "pause_turn": "stop", "refusal": "content_filter"}.get(
        reason, "content_filter" if reason.isupper() else "stop")


def openai_usage(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.input,
        "completion_tokens": usage.output,
        "total_tokens": usage.total,
        "prompt_tokens_details": {"cached_tokens": usage.cached_input},
        "completion_tokens_details": {"reasoning_tokens": usage.reasoning},
    }


def _completion(rid: str, model: str, text: str | None, calls: list[dict[str, Any]],
                finish: str, usage: Usage | None) -> bytes:
    message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
    if calls:
        message["tool_calls"] = calls
    doc: dict[str, Any] = {
        "id": rid, "object": "chat.completion", "created": 0, "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": None,
                     "finish_reason": finish}],
    }
    if usage is not None:
        doc["usage"] = openai_usage(usage)
    return orjson.dumps(doc)


def _chunk(rid: str, model: str, delta: dict[str, Any], finish: str | None = None) -> bytes:
    doc = {"id": rid, "object": "chat.completion.chunk", "created": 0, "model": model,
           "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
    return b"data: " + orjson.dumps(doc) + b"\n\n"


class StreamTranslation:
    """Provider SSE events in, OpenAI chat.completion.chunk events out."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.rid = "chatcmpl-tollgate"
        self._splitter = SseSplitter()
        self.finish_reason: str | None = None

    def feed(self, data: bytes) -> bytes:
        """Translate complete provider events (what the stream meter forwards)."""
        return b"".join(self.event(e) for e in self._splitter.feed(data))

    def event(self, event: SseEvent) -> bytes:  # pragma: no cover - overridden
        raise NotImplementedError

    def finish(self, usage: Usage | None, include_usage: bool, result: bytes | None) -> bytes:
        """The end of the OpenAI stream: the finish chunk, the usage chunk when asked for (with
        the result object), the result comment and `[DONE]`."""
        out = [_chunk(self.rid, self.model, {}, self.finish_reason or "stop")]
        if include_usage and usage is not None:
            doc: dict[str, Any] = {"id": self.rid, "object": "chat.completion.chunk",
                                   "created": 0, "model": self.model, "choices": [],
                                   "usage": openai_usage(usage)}
            body = orjson.dumps(doc)
            if result is not None:
                body = body[:-1] + b',"xproxy_result":' + result + b"}"
            out.append(b"data: " + body + b"\n\n")
        if result is not None:
            out.append(b": xproxy_result " + result + b"\n\n")
        out.append(b"data: [DONE]\n\n")
        return b"".join(out)


# ---- Anthropic Messages ------------------------------------------------------------------


def _anthropic_part(part: Any) -> dict[str, Any] | Deny:
    if not isinstance(part, dict):
        return _bad("Message content parts must be objects.")
    if part.get("type") == "text" and isinstance(part.get("text"), str):
        return {"type": "text", "text": part["text"]}
    if part.get("type") == "image_url":
        url = (part.get("image_url") or {}).get("url")
        if isinstance(url, str):
            inline = _data_url(url)
            if inline is not None:
                return {"type": "image", "source": {"type": "base64", "media_type": inline[0],
                                                    "data": inline[1]}}
            if url.startswith("https://"):
                return {"type": "image", "source": {"type": "url", "url": url}}
    return _bad(f"Content part of type '{part.get('type')}' cannot be sent to Anthropic.")


def to_anthropic(doc: dict[str, Any], model: str, cap: int) -> Translated | Deny:
    refusal = _check_fields(doc, "Anthropic")
    if refusal is not None:
        return refusal
    system: list[str] = []
    messages: list[dict[str, Any]] = []
    for message in doc["messages"]:
        if not isinstance(message, dict):
            return _bad("Each message must be an object.")
        role, content = message.get("role"), message.get("content")
        if role in ("system", "developer"):
            text = _text(content)
            if text is None:
                return _bad("System messages must be text.")
            system.append(text)
            continue
        blocks: list[dict[str, Any]] = []
        if role == "tool":
            text = _text(content)
            blocks.append({"type": "tool_result", "tool_use_id": message.get("tool_call_id"),
                           "content": text if text is not None else orjson.dumps(
                               content).decode()})
            role = "user"
        elif isinstance(content, str):
            blocks.append({"type": "text", "text": content})
        elif isinstance(content, list):
            for part in content:
                block = _anthropic_part(part)
                if isinstance(block, Deny):
                    return block
                blocks.append(block)
        for call in message.get("tool_calls") or ():
            blocks.append({"type": "tool_use", "id": call.get("id"),
                           "name": (call.get("function") or {}).get("name"),
                           "input": _arguments(call)})
        if role not in ("user", "assistant"):
            return _bad(f"Message role '{role}' cannot be sent to Anthropic.")
        messages.append({"role": role, "content": blocks})
    body: dict[str, Any] = {"model": model, "messages": messages, "max_tokens": cap}
    if system:
        body["system"] = "\n\n".join(system)
    for src, dst in (("temperature", "temperature"), ("top_p", "top_p"), ("stream", "stream")):
        if doc.get(src) is not None:
            body[dst] = doc[src]
    stop = doc.get("stop")
    if stop is not None:
        body["stop_sequences"] = [stop] if isinstance(stop, str) else stop
    if isinstance(doc.get("user"), str):
        body["metadata"] = {"user_id": doc["user"]}
    tools = doc.get("tools")
    if tools:
        out = []
        for tool in tools:
            function = tool.get("function") if isinstance(tool, dict) else None
            if not isinstance(function, dict) or tool.get("type") != "function":
                return _bad("Only function tools can be sent to Anthropic.")
            out.append({"name": function.get("name"), "description": function.get(
                "description", ""), "input_schema": function.get("parameters") or {
                    "type": "object", "properties": {}}})
        body["tools"] = out
    choice = doc.get("tool_choice")
    if choice is not None:
        if choice in ("auto", "none"):
            body["tool_choice"] = {"type": choice}
        elif choice == "required":
            body["tool_choice"] = {"type": "any"}
        elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
            body["tool_choice"] = {"type": "tool", "name": choice["function"].get("name")}
        else:
            return _bad("Field 'tool_choice' has no Anthropic equivalent.")
    return Translated(orjson.dumps(body), "/v1/messages", Endpoint.MESSAGES)


def from_anthropic(body: bytes, model: str, usage: Usage | None) -> bytes | None:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("content"), list):
        return None
    texts = [b["text"] for b in doc["content"] if isinstance(b, dict) and b.get("type") == "text"]
    calls = [{"id": b.get("id"), "type": "function", "function": {
        "name": b.get("name"), "arguments": orjson.dumps(b.get("input") or {}).decode()}}
        for b in doc["content"] if isinstance(b, dict) and b.get("type") == "tool_use"]
    return _completion(str(doc.get("id", "")), model, "".join(texts) if texts else None, calls,
                       _finish(str(doc.get("stop_reason") or "end_turn")), usage)


class AnthropicStream(StreamTranslation):
    def __init__(self, model: str) -> None:
        super().__init__(model)
        self._tools: dict[int, int] = {}  # content block index -> tool call index

    def event(self, event: SseEvent) -> bytes:
        try:
            doc = orjson.loads(event.data) if event.data else None
        except orjson.JSONDecodeError:
            return b""
        if not isinstance(doc, dict):
            return b""
        kind = doc.get("type")
        if kind == "message_start":
            message = doc.get("message") or {}
            self.rid = str(message.get("id") or self.rid)
            return _chunk(self.rid, self.model, {"role": "assistant", "content": ""})
        if kind == "content_block_start":
            block = doc.get("content_block") or {}
            if block.get("type") == "tool_use":
                index = self._tools[doc.get("index", 0)] = len(self._tools)
                return _chunk(self.rid, self.model, {"tool_calls": [{
                    "index": index, "id": block.get("id"), "type": "function",
                    "function": {"name": block.get("name"), "arguments": ""}}]})
            return b""
        if kind == "content_block_delta":
            delta = doc.get("delta") or {}
            if delta.get("type") == "text_delta":
                return _chunk(self.rid, self.model, {"content": delta.get("text", "")})
            if delta.get("type") == "input_json_delta":
                index = self._tools.get(doc.get("index", 0), 0)
                return _chunk(self.rid, self.model, {"tool_calls": [{
                    "index": index, "function": {"arguments": delta.get("partial_json", "")}}]})
            return b""
        if kind == "message_delta":
            reason = (doc.get("delta") or {}).get("stop_reason")
            if reason:
                self.finish_reason = _finish(str(reason))
        return b""


# ---- Gemini generateContent ---------------------------------------------------------------


def _gemini_part(part: Any) -> dict[str, Any] | Deny:
    if not isinstance(part, dict):
        return _bad("Message content parts must be objects.")
    if part.get("type") == "text" and isinstance(part.get("text"), str):
        return {"text": part["text"]}
    if part.get("type") == "image_url":
        url = (part.get("image_url") or {}).get("url")
        inline = _data_url(url) if isinstance(url, str) else None
        if inline is not None:
            return {"inlineData": {"mimeType": inline[0], "data": inline[1]}}
        return _bad("Gemini takes images as data: URLs only (it does not fetch URLs).")
    return _bad(f"Content part of type '{part.get('type')}' cannot be sent to Gemini.")


def to_gemini(doc: dict[str, Any], model: str, cap: int | None) -> Translated | Deny:
    refusal = _check_fields(doc, "Gemini")
    if refusal is not None:
        return refusal
    system: list[dict[str, Any]] = []
    contents: list[dict[str, Any]] = []
    names: dict[str, str] = {}  # tool call id -> function name (Gemini answers by name)
    for message in doc["messages"]:
        if not isinstance(message, dict):
            return _bad("Each message must be an object.")
        role, content = message.get("role"), message.get("content")
        if role in ("system", "developer"):
            text = _text(content)
            if text is None:
                return _bad("System messages must be text.")
            system.append({"text": text})
            continue
        parts: list[dict[str, Any]] = []
        if role == "tool":
            text = _text(content)
            name = names.get(str(message.get("tool_call_id")), "")
            parts.append({"functionResponse": {"name": name, "response": {
                "content": text if text is not None else content}}})
            role = "user"
        elif isinstance(content, str):
            parts.append({"text": content})
        elif isinstance(content, list):
            for part in content:
                converted = _gemini_part(part)
                if isinstance(converted, Deny):
                    return converted
                parts.append(converted)
        for call in message.get("tool_calls") or ():
            called = str((call.get("function") or {}).get("name"))
            names[str(call.get("id"))] = called
            parts.append({"functionCall": {"name": called, "args": _arguments(call)}})
        if role not in ("user", "assistant"):
            return _bad(f"Message role '{role}' cannot be sent to Gemini.")
        contents.append({"role": "model" if role == "assistant" else "user", "parts": parts})
    body: dict[str, Any] = {"contents": contents}
    if system:
        body["systemInstruction"] = {"parts": system}
    config: dict[str, Any] = {}
    if cap is not None:
        config["maxOutputTokens"] = cap
    for src, dst in (("temperature", "temperature"), ("top_p", "topP")):
        if doc.get(src) is not None:
            config[dst] = doc[src]
    stop = doc.get("stop")
    if stop is not None:
        config["stopSequences"] = [stop] if isinstance(stop, str) else stop
    if config:
        body["generationConfig"] = config
    tools = doc.get("tools")
    if tools:
        declarations = []
        for tool in tools:
            function = tool.get("function") if isinstance(tool, dict) else None
            if not isinstance(function, dict) or tool.get("type") != "function":
                return _bad("Only function tools can be sent to Gemini.")
            declaration = {"name": function.get("name"),
                           "description": function.get("description", "")}
            if function.get("parameters"):
                declaration["parameters"] = function["parameters"]
            declarations.append(declaration)
        body["tools"] = [{"functionDeclarations": declarations}]
    choice = doc.get("tool_choice")
    if choice is not None:
        modes = {"auto": "AUTO", "none": "NONE", "required": "ANY"}
        if isinstance(choice, str) and choice in modes:
            body["toolConfig"] = {"functionCallingConfig": {"mode": modes[choice]}}
        elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
            body["toolConfig"] = {"functionCallingConfig": {
                "mode": "ANY", "allowedFunctionNames": [choice["function"].get("name")]}}
        else:
            return _bad("Field 'tool_choice' has no Gemini equivalent.")
    if doc.get("stream") is True:
        return Translated(orjson.dumps(body),
                          f"/v1beta/models/{model}:streamGenerateContent?alt=sse",
                          Endpoint.STREAM_GENERATE)
    return Translated(orjson.dumps(body), f"/v1beta/models/{model}:generateContent",
                      Endpoint.GENERATE)


def _gemini_candidate(doc: dict[str, Any]) -> tuple[str, list[dict[str, Any]], str | None]:
    """(text, function calls, finish reason) of the first candidate."""
    candidates = doc.get("candidates") or [{}]
    candidate = candidates[0] if isinstance(candidates[0], dict) else {}
    parts = (candidate.get("content") or {}).get("parts") or []
    text = "".join(p["text"] for p in parts if isinstance(p, dict)
                   and isinstance(p.get("text"), str) and not p.get("thought"))
    calls = [p["functionCall"] for p in parts if isinstance(p, dict)
             and isinstance(p.get("functionCall"), dict)]
    reason = candidate.get("finishReason")
    return text, calls, reason if isinstance(reason, str) else None


def _openai_calls(calls: list[dict[str, Any]], start: int = 0) -> list[dict[str, Any]]:
    return [{"index": start + i, "id": f"call_{start + i}", "type": "function", "function": {
        "name": c.get("name"), "arguments": orjson.dumps(c.get("args") or {}).decode()}}
        for i, c in enumerate(calls)]


def from_gemini(body: bytes, model: str, usage: Usage | None) -> bytes | None:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(doc, dict):
        return None
    text, calls, reason = _gemini_candidate(doc)
    finish = "tool_calls" if calls else _finish(reason or "STOP")
    tool_calls = [{k: v for k, v in c.items() if k != "index"} for c in _openai_calls(calls)]
    return _completion(str(doc.get("responseId") or "chatcmpl-tollgate"), model,
                       text if text or not calls else None, tool_calls, finish, usage)


class GeminiStream(StreamTranslation):
    def __init__(self, model: str) -> None:
        super().__init__(model)
        self._started = False
        self._calls = 0

    def event(self, event: SseEvent) -> bytes:
        try:
            doc = orjson.loads(event.data) if event.data else None
        except orjson.JSONDecodeError:
            return b""
        if not isinstance(doc, dict):
            return b""
        out = []
        if not self._started:
            self._started = True
            self.rid = str(doc.get("responseId") or self.rid)
            out.append(_chunk(self.rid, self.model, {"role": "assistant", "content": ""}))
        text, calls, reason = _gemini_candidate(doc)
        if text:
            out.append(_chunk(self.rid, self.model, {"content": text}))
        if calls:
            out.append(_chunk(self.rid, self.model, {
                "tool_calls": _openai_calls(calls, self._calls)}))
            self._calls += len(calls)
        if reason:
            self.finish_reason = "tool_calls" if self._calls else _finish(reason)
        return b"".join(out)


def translator_for(provider: str) -> str | None:
    """The provider names whose Upstreams may set `translate: true`."""
    return provider if provider in ("anthropic", "gemini") else None
