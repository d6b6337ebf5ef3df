"""What a Redis command is, in the words policies and the audit trail use.

**Actions.** A command's action is its name in lower case (``get``, ``flushall``). Redis groups some
commands under a container (``CONFIG SET``, ``CLIENT KILL``, ``SCRIPT FLUSH``): for those the action
is the container and the sub-command, separated by one space (``config set``, ``client kill``), so a
policy can allow ``config get`` and still refuse ``config set``. A container sent without a
sub-command is just its name (``config``).

**Redaction.** Keys and values may hold PHI (``patient:123-45-6789``), so the audit trail keeps the
command's shape, never its arguments: ``SET ? ?``, ``CONFIG SET ? ?``. Only the command name and a
container's sub-command are kept, and only when they look like command words.

A command name that is not a command word at all (binary junk, a value sent by mistake) is an
``unknown`` request, which policies deny.
"""

from __future__ import annotations

import re

import attrs

from bastion.policies.model import Finding, Message, Request

# Redis' container commands: their first argument names a sub-command, not a key.
CONTAINER_COMMANDS = frozenset(
    {
        "acl", "client", "cluster", "command", "config", "function", "latency", "memory",
        "module", "object", "pubsub", "script", "slowlog", "xgroup", "xinfo",
    }
)  # fmt: skip

# Commands after which the server sends replies that answer no command (published messages, the
# MONITOR feed): the proxy stops matching replies to commands (see bastion_redis.handler).
PASS_THROUGH_COMMANDS = frozenset({"subscribe", "psubscribe", "ssubscribe", "monitor"})

# Commands that run other commands inside the server, out of the gateway's sight.
SCRIPT_COMMANDS = frozenset(
    {"eval", "evalsha", "eval_ro", "evalsha_ro", "fcall", "fcall_ro", "function load", "script load"}
)

# Never forwarded, whatever the policy says, because the proxy could not stay correct or safe:
UNSUPPORTED = {
    # replies stop coming, and the gateway matches replies to commands one for one
    "client reply": "CLIENT REPLY would stop the one-reply-per-command matching Bastion relies on",
    # the reply is a raw database dump, not RESP, and hands over the whole dataset
    "sync": "replication commands are not available through Bastion",
    "psync": "replication commands are not available through Bastion",
    "replconf": "replication commands are not available through Bastion",
    # RESET logs the upstream connection in as the `default` user, not the target's credentials
    "reset": "RESET would drop the gateway's upstream login; open a new connection instead",
    # callers authenticate to Bastion once, when they connect; their tokens never reach the server
    "auth": "Bastion authenticates a connection once; open a new connection to change identity",
}

# the most `?` a redacted command shows before it just counts the rest
REDACTED_ARGUMENTS_SHOWN = 8

_WORD = re.compile(rb"[A-Za-z][A-Za-z0-9_.|-]{0,63}")


@attrs.frozen
class RedisCommand:
    """The parts of a command policies may look at: never its keys or values."""

    name: str  # lower case
    subcommand: str | None  # lower case; the first argument when it is a command word
    argc: int  # arguments after the name
    action: str
    # HELLO … AUTH …: a second login, with the caller's own secret, on an authenticated connection
    reauthenticates: bool = False

    def matches(self, entry: str) -> bool:
        """``entry`` is ``"name"`` or ``"name subcommand"``, lower case, single-spaced."""
        if entry == self.name:
            return True
        return self.subcommand is not None and entry == f"{self.name} {self.subcommand}"


def analyse(args: tuple[bytes, ...]) -> RedisCommand | None:
    """None when the first argument is not a command word."""
    if not args or not _WORD.fullmatch(args[0]):
        return None
    name = args[0].decode("ascii").lower()
    subcommand = None
    if len(args) > 1 and _WORD.fullmatch(args[1]):
        subcommand = args[1].decode("ascii").lower()
    action = f"{name} {subcommand}" if name in CONTAINER_COMMANDS and subcommand else name
    reauthenticates = name == "hello" and any(arg.lower() == b"auth" for arg in args[2:])
    return RedisCommand(name, subcommand, len(args) - 1, action, reauthenticates)


def redact(command: RedisCommand) -> str:
    words = command.action.upper().split(" ")
    hidden = command.argc - (len(words) - 1)
    shown = ["?"] * min(hidden, REDACTED_ARGUMENTS_SHOWN)
    if hidden > REDACTED_ARGUMENTS_SHOWN:
        shown.append(f"… ({hidden} arguments)")
    return " ".join(words + shown)


def unsupported_reason(command: RedisCommand) -> str | None:
    for entry in (command.action, command.name, f"{command.name} {command.subcommand}"):
        if entry in UNSUPPORTED:
            return UNSUPPORTED[entry]
    if command.reauthenticates:
        return UNSUPPORTED["auth"]
    return None


def to_request(message: Message) -> Request:
    command = analyse(tuple(message.args))
    if command is None:
        return Request.unknown(message, "the command name is not a Redis command word")
    findings: tuple[Finding, ...] = ()
    if command.action in SCRIPT_COMMANDS or command.name in SCRIPT_COMMANDS:
        findings = (
            Finding("redis-script", 40, "runs a server-side script whose commands Bastion cannot see"),
        )
    redacted = redact(command)
    return Request(
        message=message,
        action=command.action,
        findings=findings,
        fingerprint=f"{command.action}/{command.argc}",
        redacted_text=redacted,
        analysis=command,
    )
