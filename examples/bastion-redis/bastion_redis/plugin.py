"""The hooks that add ``protocol = "redis"`` to Bastion. Found through the ``bastion`` entry point.

A target using it::

    [[targets]]
    name = "cache"
    protocol = "redis"
    listen = "127.0.0.1:6380"
    upstream = "10.0.0.5:6379"
    credentials = { user = "bastion", password = { env = "REDIS_PASSWORD" } }
    deny_commands = ["FLUSHALL", "FLUSHDB", "CONFIG SET", "KEYS"]   # optional; see DEFAULT_DENY
    require_auth = true                                               # optional; the default

Three hooks, each doing one thing:

* ``bastion_register_protocols`` contributes the protocol, its target options and its handler;
* ``bastion_parse`` says what a command is (see :mod:`bastion_redis.commands` for the action names
  and the redaction); it answers only Redis commands, so other protocols are untouched;
* ``bastion_authorize`` refuses the target's ``deny_commands`` (rule ``redis:deny-commands``) and the
  few commands the proxy cannot carry (rule ``redis:unsupported``). It never allows anything: grants
  come from the policy bundles, and a command nobody grants is denied.
"""

from __future__ import annotations

import re

import attrs

from bastion.core.hookspecs import hookimpl
from bastion.core.specs import ProtocolSpec
from bastion.policies.model import Decision, Message, Request

from bastion_redis.commands import RedisCommand, to_request, unsupported_reason

DENY_RULE = "redis:deny-commands"
UNSUPPORTED_RULE = "redis:unsupported"

# Refused unless a target lists its own deny_commands: commands that destroy data, change or
# stop the server, make it a replica, load code into it, expose every key or every command
# (MONITOR), or copy data to another server.
DEFAULT_DENY = (
    "FLUSHALL", "FLUSHDB", "SWAPDB",
    "CONFIG SET", "CONFIG RESETSTAT", "CONFIG REWRITE",
    "KEYS", "DEBUG", "SHUTDOWN", "MONITOR",
    "SLAVEOF", "REPLICAOF", "FAILOVER",
    "MODULE", "SCRIPT FLUSH", "FUNCTION FLUSH", "FUNCTION DELETE", "FUNCTION RESTORE",
    "ACL", "CLIENT KILL", "MIGRATE",
)  # fmt: skip

_ENTRY = re.compile(r"[a-z][a-z0-9_.|-]*(?: [a-z][a-z0-9_.|-]*)?")


def _normalise_entries(entries) -> tuple[str, ...]:
    """Lower case, single spaces; each entry a command or a command and its sub-command."""
    if isinstance(entries, str):
        raise ValueError('deny_commands: expected a list of commands like ["FLUSHALL", "CONFIG SET"]')
    normalised = []
    for entry in entries:
        words = " ".join(str(entry).lower().split())
        if not _ENTRY.fullmatch(words):
            raise ValueError(f'deny_commands: "{entry}" is not a command or a "COMMAND SUBCOMMAND" pair')
        normalised.append(words)
    return tuple(normalised)


@attrs.frozen
class RedisOptions:
    """A redis target's own keys.

    ``deny_commands``: commands refused on this target whatever the grants say; an entry is a
    command (``"DEBUG"``, which covers all its sub-commands) or a command and its first argument
    (``"CONFIG SET"``); case does not matter. Giving the list replaces the defaults.
    ``require_auth``: callers must ``AUTH`` with a token an identity provider accepts; with
    ``false`` every caller is ``anonymous`` (and needs a grant naming it).
    """

    deny_commands: tuple[str, ...] = attrs.field(default=DEFAULT_DENY, converter=_normalise_entries)
    require_auth: bool = True

    def denied_by(self, command: RedisCommand) -> str | None:
        return next((entry for entry in self.deny_commands if command.matches(entry)), None)


@hookimpl
def bastion_register_protocols():
    from bastion_redis.handler import RedisHandler

    return [
        ProtocolSpec(
            name="redis",
            factory=RedisHandler,
            options=RedisOptions,
            description="Redis (RESP2/RESP3): per-command authorization, audit without values",
        )
    ]


@hookimpl
def bastion_parse(session, message: Message) -> list[Request] | None:
    if message.protocol != "redis" or message.kind != "command":
        return None
    return [to_request(message)]


@hookimpl
def bastion_authorize(session, request: Request) -> Decision | None:
    command = request.analysis
    if request.message.protocol != "redis" or not isinstance(command, RedisCommand):
        return None
    reason = unsupported_reason(command)
    if reason is not None:
        return Decision.deny(UNSUPPORTED_RULE, reason)
    options = session.target.options
    if not isinstance(options, RedisOptions):  # not configured through the loader: the defaults
        options = RedisOptions()
    entry = options.denied_by(command)
    if entry is not None:
        return Decision.deny(DENY_RULE, f"{entry.upper()} is not allowed on target {session.target.name}")
    return None
