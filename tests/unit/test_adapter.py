"""The reply messages the adapter writes: header mutations written as wire bytes must be exactly
what the protobuf API writes (Envoy reads them)."""

from __future__ import annotations

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from extproc.core.decisions import HeaderEdit
from extproc.server import adapter

pytestmark = pytest.mark.unit


def by_api(edit: HeaderEdit) -> bytes:
    mutation = ep.HeaderMutation()
    for name, value in edit.set:
        option = mutation.set_headers.add()
        option.header.key = name
        option.header.raw_value = value.encode("latin-1", "replace")
        option.append_action = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
    mutation.remove_headers.extend(edit.remove)
    return mutation.SerializeToString()


@pytest.mark.parametrize("edit", [
    HeaderEdit(),
    HeaderEdit(set=(("x-tollgate-cost", "0.000002550"), ("x-tollgate-request-id", "a" * 32))),
    # The same names and sizes again, other values (each entry's start is kept per name and size).
    HeaderEdit(set=(("x-tollgate-cost", "1.000009999"), ("x-tollgate-request-id", "b" * 32))),
    HeaderEdit(remove=("x-api-key", "api-key")),
    HeaderEdit(set=(("authorization", "Bearer " + "k" * 200),), remove=("x-goog-api-key",)),
    # Lengths around the one-byte boundaries of each nested length.
    *(HeaderEdit(set=(("x-h", "v" * n), ("x-" + "n" * n, "1"))) for n in range(110, 135)),
    HeaderEdit(set=(("x-long", "v" * 20_000), ("x-empty", ""))),
    HeaderEdit(set=(("x-latin", "caf\u00e9"), ("x-not-latin", "\u2603 snow"))),
    HeaderEdit(set=(("x-" + "n" * 300, "v" * 300),), remove=("x-" + "r" * 200,)),
])
def test_mutation_bytes_are_what_protobuf_writes(edit: HeaderEdit) -> None:
    written = adapter.mutation_bytes(edit)
    assert written == by_api(edit)
    parsed = ep.HeaderMutation.FromString(written)
    assert [(o.header.key, o.header.raw_value) for o in parsed.set_headers] == [
        (n, v.encode("latin-1", "replace")) for n, v in edit.set]
    assert list(parsed.remove_headers) == list(edit.remove)


@pytest.mark.parametrize("request_id", ["7a3712a215a9027432748af455eb80d1", "", "r" * 300, "é-id"])
def test_request_named_in_dynamic_metadata(request_id: str) -> None:
    response = ep.ProcessingResponse()
    adapter.name_request(response, "tollgate", request_id)
    adapter.name_request(ep.ProcessingResponse(), "tollgate", request_id)  # the kept prefix
    again = ep.ProcessingResponse()
    adapter.name_request(again, "tollgate", request_id)
    for named in (response, again):
        fields = named.dynamic_metadata.fields["tollgate"].struct_value.fields
        assert fields.keys() == {"request_id"}
        assert fields["request_id"].string_value == request_id
