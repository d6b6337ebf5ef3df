"""The test token provider of tests/pg_helpers.py as a plugin module, so a ``bastion`` subprocess
started by a test (``serve``, ``approvals``) accepts the same tokens as the in-process gateway."""

from __future__ import annotations

from bastion.core.hookspecs import hookimpl
from bastion.core.specs import IdentityProviderSpec
from tests.pg_helpers import TokenOptions, TokenProvider


@hookimpl
def bastion_register_identity_providers():
    return [IdentityProviderSpec(kind="test-tokens", factory=TokenProvider, options=TokenOptions)]
