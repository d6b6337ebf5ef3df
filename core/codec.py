"""The one cattrs converter for audit records and other plain-data values."""

from __future__ import annotations

import types
import typing
from datetime import datetime

import cattrs

converter = cattrs.Converter()

# Element types cattrs unstructures to the value itself. A tuple of them (``tuple[str, ...]``,
# ``tuple[str | None, ...]``) becomes ``list(value)``: what cattrs' generic sequence hook builds,
# without its call per element — audit events carry many such tuples and are unstructured on
# every statement's hot path.
PASS_THROUGH_TYPES = (str, int, float, bool, bytes, type(None))


def _is_frozenset(type_: object) -> bool:
    return type_ is frozenset or typing.get_origin(type_) is frozenset


def _is_tuple_of_pass_through(type_: object) -> bool:
    if typing.get_origin(type_) is not tuple:
        return False
    arguments = typing.get_args(type_)
    if len(arguments) != 2 or arguments[1] is not Ellipsis:
        return False
    element = arguments[0]
    options = typing.get_args(element) if typing.get_origin(element) in (typing.Union, types.UnionType) else (element,)
    return all(option in PASS_THROUGH_TYPES for option in options)


# sets have no order; sorted lists keep records byte-identical for equal values
converter.register_unstructure_hook_func(_is_frozenset, lambda value: sorted(value))
converter.register_unstructure_hook_func(_is_tuple_of_pass_through, list)
converter.register_unstructure_hook(datetime, lambda value: value.isoformat())
converter.register_structure_hook(datetime, lambda value, _: datetime.fromisoformat(value))
