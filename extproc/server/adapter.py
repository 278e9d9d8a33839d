"""The only code that touches Envoy's generated protobuf types.

ProcessingRequest -> plain facts (header dicts, body bytes); core decisions -> ProcessingResponse.
Rules Envoy enforces that the core should not have to know about live here:
  * a ProcessingResponse with no oneof set makes Envoy answer 500, so "continue unchanged" is an
    explicitly set (empty) phase message;
  * a replaced buffered body needs `content-length` set in the same header mutation, or 500;
  * `clear_route_cache` only works together with a header mutation;
  * `mode_override` is honoured only in replies to header messages.
"""

from __future__ import annotations

from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from extproc.core.attribution import host_of
from extproc.core.decisions import BodyMode, Continue, Deny, HeaderEdit
from extproc.core.exchange import Reply

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_MODES = {
    BodyMode.NONE: processing_mode_pb2.ProcessingMode.NONE,
    BodyMode.BUFFERED: processing_mode_pb2.ProcessingMode.BUFFERED,
    BodyMode.STREAMED: processing_mode_pb2.ProcessingMode.STREAMED,
}


def header_entries(http_headers: Any) -> list[tuple[str, bytes]]:
    """Every entry as Envoy sent it (duplicates and pseudo-headers too), values as bytes. Each
    protobuf attribute read costs a lookup and a new Python object: read them once, here."""
    return [(h.key, h.raw_value or h.value.encode("latin-1", "replace"))
            for h in http_headers.headers.headers]


def header_map(http_headers: Any, entries: list[tuple[str, bytes]] | None = None,
               ) -> dict[str, str]:
    """Lower-case name -> value. Values arrive in `raw_value` bytes (Envoy >= 1.27); older
    Envoys sent `value`. `entries`: `header_entries(http_headers)`, when already read."""
    if entries is None:
        entries = header_entries(http_headers)
    return {name: value.decode("latin-1") for name, value in entries}


ATTRIBUTES = "envoy.filters.http.ext_proc"  # the key Envoy files ext_proc attributes under


def client_address(request: Any) -> str:
    """The client address Envoy derived (`source.address` request attribute, sent with the
    request headers when the filter lists it in `request_attributes`), without the port; ""
    when Envoy sent none."""
    attributes = request.attributes.get(ATTRIBUTES)
    if attributes is None:
        return ""
    value = attributes.fields.get("source.address")
    return host_of(value.string_value) if value is not None else ""


def name_request(response: ep.ProcessingResponse, namespace: str, request_id: str) -> None:
    """Put the request id into Envoy's dynamic metadata, for the errors Envoy makes itself."""
    raw = request_id.encode()
    prefix = _NAMING.get((namespace, len(raw)))
    if prefix is None:
        prefix = _naming_prefix(namespace, len(raw))
    response.dynamic_metadata.MergeFromString(prefix + raw)


# The metadata above as wire bytes: everything before the id depends only on the namespace and
# the id's length (ids have one length), so it is serialized once by the protobuf API, with a
# stand-in id, and reused (three nested map writes a request through the API cost ~4x more).
_NAMING: dict[tuple[str, int], bytes] = {}


def _naming_prefix(namespace: str, size: int) -> bytes:
    metadata = ep.ProcessingResponse().dynamic_metadata
    metadata.fields[namespace].struct_value.fields["request_id"].string_value = "x" * size
    whole: bytes = metadata.SerializeToString()
    prefix = whole[:-size] if size else whole
    if len(_NAMING) < 64:
        _NAMING[namespace, size] = prefix
    return prefix


# A HeaderMutation is written as protobuf wire bytes and merged in with one MergeFromString:
# ~25 headers a request set field by field through the protobuf API cost about twice as much
# (each `add()` and attribute write crosses into upb and makes a wrapper object). Names repeat
# from request to request, so each name's encoded prefix is kept. Field numbers (envoy
# config/core/v3 base.proto): HeaderMutation.set_headers = 1, .remove_headers = 2;
# HeaderValueOption.header = 1, .append_action = 3; HeaderValue.key = 1, .raw_value = 3.
# tests/unit/test_adapter.py checks the bytes against the ones the protobuf API writes.
_BYTE = [bytes((i,)) for i in range(128)]
_ACTION = b"\x18" + _BYTE[_OVERWRITE]  # append_action = OVERWRITE_IF_EXISTS_OR_ADD
_SET_HEADS: dict[str, tuple[bytes, int]] = {}  # name -> (HeaderValue key + raw_value tag, size)
_REMOVES: dict[str, bytes] = {}  # name -> its remove_headers entry
_MAX_CACHED = 4096  # names are few; a bound all the same (clients choose some of them)


def _varint(n: int) -> bytes:
    if n < 128:
        return _BYTE[n]
    out = bytearray()
    while n >= 128:
        out.append(n & 127 | 128)
        n >>= 7
    out.append(n)
    return bytes(out)


def _set_head(name: str) -> tuple[bytes, int]:
    key = name.encode("utf-8")
    encoded = b"\x0a" + _varint(len(key)) + key + b"\x1a"  # key, then raw_value's tag
    head = (encoded, len(encoded))
    if len(_SET_HEADS) < _MAX_CACHED:
        _SET_HEADS[name] = head
    return head


def _remove_entry(name: str) -> bytes:
    key = name.encode("utf-8")
    entry = b"\x12" + _varint(len(key)) + key
    if len(_REMOVES) < _MAX_CACHED:
        _REMOVES[name] = entry
    return entry


# (name, value size) -> everything of a set_headers entry before the value's bytes, when every
# length in it fits in one byte (nearly all headers): the lengths depend only on the sizes, so
# an entry is this prefix, the value and `_ACTION` (a third faster than assembling it each time).
_SET_PREFIXES: dict[tuple[str, int], bytes] = {}


def _set_prefix(name: str, size: int) -> bytes | None:
    head, head_size = _SET_HEADS.get(name) or _set_head(name)
    inner = head_size + 1 + size  # the HeaderValue: key, then raw_value
    if inner >= 124 or not size:
        return None
    prefix = b"\x0a" + _BYTE[inner + 4] + b"\x0a" + _BYTE[inner] + head + _BYTE[size]
    if len(_SET_PREFIXES) < _MAX_CACHED:
        _SET_PREFIXES[name, size] = prefix
    return prefix


def mutation_bytes(edit: HeaderEdit) -> bytes:
    """`edit` as a serialized HeaderMutation (sets overwrite, then the removes)."""
    out: list[bytes] = []
    for name, value in edit.set:
        raw = value.encode("latin-1", "replace")
        size = len(raw)
        prefix = _SET_PREFIXES.get((name, size)) or _set_prefix(name, size)
        if prefix is not None:
            out += (prefix, raw, _ACTION)
            continue
        head = (_SET_HEADS.get(name) or _set_head(name))[0]
        # An empty value is left out, as protobuf leaves out every field at its default.
        header = head + _varint(size) + raw if size else head[:-1]
        option = b"\x0a" + _varint(len(header)) + header + _ACTION
        out += (b"\x0a", _varint(len(option)), option)
    for name in edit.remove:
        out.append(_REMOVES.get(name) or _remove_entry(name))
    return b"".join(out)


def _fill_mutation(mutation: Any, edit: HeaderEdit) -> None:
    mutation.MergeFromString(mutation_bytes(edit))


def _fill_common(common: Any, decision: Continue) -> None:
    edit = decision.headers
    if decision.streamed_chunk:
        # A chunk of a streamed body: headers are long gone, only the bytes change.
        if decision.body:
            common.body_mutation.body = decision.body
        else:
            common.body_mutation.clear_body = True
        return
    if decision.body is not None:
        edit = edit.plus(HeaderEdit(set=(("content-length", str(len(decision.body))),)))
        common.body_mutation.body = decision.body
    if decision.clear_route_cache and not edit:
        # Envoy ignores clear_route_cache from a body reply without a header mutation.
        edit = HeaderEdit(remove=("x-tollgate-none",))
    if edit:
        _fill_mutation(common.header_mutation, edit)
    if decision.clear_route_cache:
        common.clear_route_cache = True


def continue_response(phase: str, decision: Continue) -> ep.ProcessingResponse:
    """`phase` is the ProcessingResponse oneof name, e.g. "request_headers"."""
    response = ep.ProcessingResponse()
    message = getattr(response, phase)
    if decision.headers or decision.body is not None or decision.clear_route_cache:
        _fill_common(message.response, decision)
    else:
        message.SetInParent()
    if decision.response_body_mode is not None:
        response.mode_override.response_body_mode = _MODES[decision.response_body_mode]
    return response


# "Go on unchanged" for a chunk of a streamed body: one message shared by every such reply
# (most of a stream's chunks), never modified after this line.
UNCHANGED_RESPONSE_BODY = continue_response("response_body", Continue())


def immediate_response(
    status: int,
    body: bytes,
    headers: tuple[tuple[str, str], ...],
    details: str,
) -> ep.ProcessingResponse:
    response = ep.ProcessingResponse()
    immediate = response.immediate_response
    immediate.status.code = status  # the HttpStatus enum accepts any integer code
    immediate.body = body
    immediate.details = details
    _fill_mutation(
        immediate.headers,
        HeaderEdit(set=(("content-type", "application/json"), *headers)),
    )
    return response


def deny_response(
    deny: Deny, body: bytes, extra_headers: tuple[tuple[str, str], ...]
) -> ep.ProcessingResponse:
    """`body`: the refusal in the client's API shape (`Exchange.error_body`)."""
    return immediate_response(
        deny.status,
        body,
        (*deny.headers, *extra_headers),
        f"tollgate_{deny.code}",
    )


def reply_response(
    reply: Reply, extra_headers: tuple[tuple[str, str], ...]
) -> ep.ProcessingResponse:
    headers = (*reply.headers, *extra_headers)
    return immediate_response(reply.status, reply.body, headers, "tollgate")
