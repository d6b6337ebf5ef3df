"""The one cattrs converter for audit records and other plain-data values."""

from __future__ import annotations

import typing
from datetime import datetime

import cattrs

converter = cattrs.Converter()


def _is_frozenset(type_: object) -> bool:
    return type_ is frozenset or typing.get_origin(type_) is frozenset


# sets have no order; sorted lists keep records byte-identical for equal values
converter.register_unstructure_hook_func(_is_frozenset, lambda value: sorted(value))
converter.register_unstructure_hook(datetime, lambda value: value.isoformat())
converter.register_structure_hook(datetime, lambda value, _: datetime.fromisoformat(value))
