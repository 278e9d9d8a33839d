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
    response.dynamic_metadata.fields[namespace].struct_value.fields[
        "request_id"].string_value = request_id


def _fill_mutation(mutation: Any, edit: HeaderEdit) -> None:
    for name, value in edit.set:
        option = mutation.set_headers.add()
        option.header.key = name
        option.header.raw_value = value.encode("latin-1", "replace")
        option.append_action = _OVERWRITE
    if edit.remove:
        mutation.remove_headers.extend(edit.remove)


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
