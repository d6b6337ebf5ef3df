"""Secrets held by the gateway: references in the config, values only at connect time.

A :class:`SecretRef` says where a secret lives (``{ env = "NAME" }``, ``{ file = "path" }`` or a
kind a plugin resolves through ``bastion_resolve_secret``, e.g. ``{ vault = "db#password" }``). It
is resolved each time it is needed, so a rotated secret is used without a restart. The resolved
:class:`Secret` hides its value from ``repr``/``str`` so it cannot leak into a log line by accident.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import attrs

CORE_KINDS = ("env", "file")


class SecretUnavailable(Exception):
    """The reference could not be resolved. The message names the reference, never a value."""


@attrs.frozen
class SecretRef:
    kind: str
    value: str
    base_dir: Path | None = attrs.field(default=None, eq=False, repr=False)

    def __str__(self) -> str:
        return f"{{ {self.kind} = {self.value!r} }}"


class Secret:
    """A resolved secret. ``reveal()`` is the only way to read it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __reduce__(self):  # never pickled into a worker or a record
        raise TypeError("secrets are not picklable")


def resolve(ref: SecretRef, plugin_resolver: Callable[[SecretRef], str | None] | None = None) -> Secret:
    """Resolve ``ref`` now. Blocking (reads a file, may ask a plugin): call it from a thread."""
    if ref.kind == "env":
        value = os.environ.get(ref.value)
        if value is None:
            raise SecretUnavailable(f"environment variable {ref.value} is not set")
        return Secret(value)
    if ref.kind == "file":
        path = Path(ref.value)
        if not path.is_absolute() and ref.base_dir is not None:
            path = ref.base_dir / path
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise SecretUnavailable(f"cannot read secret file {path}: {exc.strerror}") from None
        # files written by editors and `echo` end with a newline that is not part of the secret
        return Secret(text.rstrip("\r\n"))
    value = plugin_resolver(ref) if plugin_resolver is not None else None
    if value is None:
        raise SecretUnavailable(f"no plugin resolves secrets of kind {ref.kind!r} ({ref})")
    return Secret(value)
