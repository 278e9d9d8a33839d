"""Annotations (core/payi.py) written into a usage event: the one place that knows the fields."""

from __future__ import annotations

from extproc.core.payi import NO_ANNOTATIONS, Annotations
from extproc.gen.tollgate.v1 import usage_pb2


def annotate_event(event: usage_pb2.UsageEvent, notes: Annotations) -> None:
    if notes is NO_ANNOTATIONS:  # most requests: every field stays at its default
        return
    event.use_case_name = notes.use_case_name
    event.use_case_id = notes.use_case_id
    event.use_case_version = notes.use_case_version
    event.use_case_step = notes.use_case_step
    event.use_case_properties.update(dict(notes.use_case_properties))
    event.request_properties.update(dict(notes.request_properties))
    event.account_name = notes.account_name
    event.resource_scope = notes.resource_scope
    event.price_as_category = notes.price_as_category
    event.price_as_resource = notes.price_as_resource
    event.logging_disabled = notes.logging_disabled
