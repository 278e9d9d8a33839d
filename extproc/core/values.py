"""`value_type`: the dataclass decorator for the values made on the request path (decisions, plans,
statuses, facts: about 40 of them per request on the full limits path).

They are frozen to the type checker and not at run time. A frozen dataclass's generated
`__init__` sets each field through `object.__setattr__` (its own `__setattr__` refuses), a call
that costs more than the rest of the constructor; on the full limits path that was ≈ 240 k
instructions per request, 12 % of the handlers' work (bench/README.md, "Tollgate's own work per
request, continued"). A plain slotted dataclass stores each field directly.

mypy still reads these classes as frozen (`dataclass_transform(frozen_default=True)`): an
assignment to a field is a type error, as before. Equality and hashing are exactly the frozen
dataclass's (`unsafe_hash=True` generates the same field-tuple hash), so a value can still be a
dict key or a set member.

Configuration (core/resources.py and the like) keeps `@dataclass(frozen=True, slots=True)`:
it is built once per snapshot, where run-time immutability costs nothing that shows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypeVar, dataclass_transform

_T = TypeVar("_T")


@dataclass_transform(frozen_default=True, field_specifiers=(field,))
def value_type(cls: type[_T]) -> type[_T]:
    return dataclass(slots=True, unsafe_hash=True)(cls)
