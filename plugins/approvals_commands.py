"""``bastion approvals list|show|approve|deny``: review held statements from a terminal.

The commands work on the approval store directly (``[approvals]`` in the configuration), so they
work whether the gateway runs on this host, in another process, or — with the PostgreSQL store —
elsewhere. The reviewer proves who they are with a token the gateway's identity providers accept:
``--token`` or, better (command lines are visible to other users of the host), ``BASTION_TOKEN``.

Exit status: 0 done, 1 a problem (bad token, unknown request, not allowed, already decided…),
2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import Any

import trio

from bastion.core.hookspecs import hookimpl

TOKEN_ENVIRONMENT = "BASTION_TOKEN"
# a statement wider than this is cut in the list, so each request stays on one line
STATEMENT_WIDTH = 60
DEFAULT_LIMIT = 50


@hookimpl
def bastion_add_commands(subparsers: argparse._SubParsersAction) -> None:
    from bastion.core.cli import add_config_argument

    approvals = subparsers.add_parser("approvals", help="review statements held for approval")
    actions = approvals.add_subparsers(dest="approvals_action", metavar="ACTION", required=True)

    def common(parser: argparse.ArgumentParser) -> None:
        add_config_argument(parser)
        parser.add_argument("--token", default=None, help=f"the reviewer's token (default: ${TOKEN_ENVIRONMENT}, which keeps it out of the process list)")

    listing = actions.add_parser("list", help="requests you may review (pending ones unless told otherwise)")
    common(listing)
    which = listing.add_mutually_exclusive_group()
    which.add_argument("--state", choices=("pending", "approved", "denied", "expired", "cancelled"), default="pending")
    which.add_argument("--all", action="store_true", help="every state")
    listing.add_argument("--limit", type=int, default=DEFAULT_LIMIT, help=f"at most this many (default {DEFAULT_LIMIT})")
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(handler=_handler(cmd_list))

    show = actions.add_parser("show", help="one request with its evidence and votes")
    common(show)
    show.add_argument("id", help="the approval request id (apr-…)")
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(handler=_handler(cmd_show))

    approve = actions.add_parser("approve", help="approve a request (this statement once, or a time-boxed window)")
    common(approve)
    approve.add_argument("id", help="the approval request id (apr-…)")
    approve.add_argument("--comment", default="", help="kept with your approval and shown in the audit trail")
    approve.add_argument("--window", default=None, help="also let the same identity run the same statement for this long, e.g. 30m (at most the rule's max_window)")
    approve.set_defaults(handler=_handler(cmd_approve))

    deny = actions.add_parser("deny", help="deny a request; the caller is told your reason")
    common(deny)
    deny.add_argument("id", help="the approval request id (apr-…)")
    deny.add_argument("--reason", required=True, help="why: the caller sees it")
    deny.set_defaults(handler=_handler(cmd_deny))


def _handler(command: Callable[[Any, Any, argparse.Namespace], Any]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        from bastion.core.approvals import reviewer_desk
        from bastion.core.approvals_model import ReviewRefused
        from bastion.core.approvals_store import StoreUnavailable
        from bastion.core.cli import load_all_for_command

        loaded = load_all_for_command(args)
        token = args.token or os.environ.get(TOKEN_ENVIRONMENT)

        async def main() -> int:
            async with reviewer_desk(loaded.config, loaded.hooks, token) as (desk, reviewer):
                return await command(desk, reviewer, args)

        try:
            return trio.run(main)
        except (ReviewRefused, StoreUnavailable) as exc:
            print(f"bastion approvals: {exc}", file=sys.stderr)
            return 1

    run.__name__ = command.__name__
    return run


async def cmd_list(desk: Any, reviewer: Any, args: argparse.Namespace) -> int:
    if args.limit < 1:
        print("bastion approvals: --limit must be at least 1", file=sys.stderr)
        return 2
    records = await desk.list(reviewer, None if args.all else (args.state,), args.limit)
    if args.json:
        print(json.dumps({"approvals": [desk.view(r) for r in records]}, indent=2, sort_keys=True))
        return 0
    if not records:
        print("no approval requests" if args.all else f"no {args.state} approval requests you may review")
        return 0
    rows = [("ID", "STATE", "TARGET", "REQUESTER", "EXPIRES", "RULES", "STATEMENT")]
    for record in records:
        request = record.request
        rows.append((request.id, record.state, request.target, request.requester.subject, _when(request.expires_at), ",".join(sorted(request.review_rules)), _cut(request.statement)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return 0


async def cmd_show(desk: Any, reviewer: Any, args: argparse.Namespace) -> int:
    record = await desk.show(reviewer, args.id)
    if args.json:
        print(json.dumps(desk.view(record), indent=2, sort_keys=True))
        return 0
    print(_describe(desk, record))
    return 0


async def cmd_approve(desk: Any, reviewer: Any, args: argparse.Namespace) -> int:
    from bastion.core.approvals import parse_window

    record = await desk.approve(reviewer, args.id, comment=args.comment, window_seconds=parse_window(args.window))
    if record.state == "approved":
        scope = f"; the same statement is approved until {_when(record.window_until)}" if record.window_until else " (this statement once)"
        print(f"approved {record.id}{scope}")
    else:
        missing = desk.view(record)["missing_approvals"]
        needs = ", ".join(f"{rule}: {count} more" for rule, count in missing.items())
        print(f"your approval of {record.id} is recorded; it still needs approvals ({needs})")
    return 0


async def cmd_deny(desk: Any, reviewer: Any, args: argparse.Namespace) -> int:
    record = await desk.deny(reviewer, args.id, reason=args.reason)
    print(f"denied {record.id}: the caller is told \"{record.outcome}\"")
    return 0


def _describe(desk: Any, record: Any) -> str:
    request = record.request
    view = desk.view(record)
    lines = [
        f"approval request {request.id} ({record.state})",
        f"  target:         {request.target} (session {request.session_id}, request {request.request_no})",
        f"  requester:      {request.requester.display}",
        f"  statement:      {request.statement}",
    ]
    for finding in request.findings:
        lines.append(f"  finding:        {finding.name} ({finding.weight}): {finding.sentence}")
    for requirement in request.requirements:
        window = f", windows up to {int(requirement.max_window_seconds)}s" if requirement.max_window_seconds else ""
        lines.append(f"  rule:           {requirement.rule}: {requirement.min_approvals} approval(s) from {', '.join(sorted(requirement.approver_groups))}{window}")
    for reason in request.reasons:
        lines.append(f"  reason:         {reason}")
    if request.justification:
        lines.append(f"  justification:  {request.justification}")
    lines.append(f"  created:        {_when(request.created_at)}")
    lines.append(f"  expires:        {_when(request.expires_at)}")
    if view["missing_approvals"]:
        lines.append("  still needs:    " + ", ".join(f"{rule}: {count}" for rule, count in view["missing_approvals"].items()))
    if record.decided_at is not None:
        lines.append(f"  decided:        {_when(record.decided_at)}: {record.outcome}")
    if record.window_until is not None:
        lines.append(f"  window until:   {_when(record.window_until)}")
    for vote in record.votes:
        comment = f": {vote.comment}" if vote.comment else ""
        window = f" (window {int(vote.window_seconds)}s)" if vote.window_seconds else ""
        lines.append(f"  vote:           {vote.reviewer.display} {vote.verdict}s at {_when(vote.at)}{window}{comment}")
    return "\n".join(lines)


def _when(moment: float | None) -> str:
    from bastion.core.approvals import iso

    return iso(moment) if moment is not None else "-"


def _cut(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= STATEMENT_WIDTH else text[: STATEMENT_WIDTH - 1] + "…"
