"""``bastion sessions …`` and ``bastion audit …``: look at, prove, export and prune the audit trail.

Every command reads the configuration (``-c FILE``) to find the audit directory and the key, and
works on the files directly — the gateway may be running. ``sessions`` commands read the SQLite
index (``<state_dir>/audit/index.sqlite`` or the ``sqlite`` sink's ``path``) after bringing it up
to date from the log, so they work whether or not a ``sqlite`` sink is configured.

Exit status: 0 done, 1 a problem (verification failed, unknown session, no key…), 2 bad usage.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import IO, Any

import attrs

from bastion.core import auditlog
from bastion.core.audit import configured_audit_directory
from bastion.core.hookspecs import hookimpl
from bastion.plugins.audit_sinks import SqliteIndex, default_index_path, record_json

# the longest a progress bar goes without being redrawn, and the least time between redraws
PROGRESS_REDRAW_INTERVAL = 0.1
PROGRESS_WIDTH = 30
# how many sessions `sessions list` shows unless told otherwise
DEFAULT_LIST_LIMIT = 50
# a cell wider than this is cut in replay tables so one huge value does not hide the rest
MAX_CELL_WIDTH = 60
EXPORT_FORMATS = ("jsonl", "msgpack")


class CommandError(Exception):
    """A problem the user can fix; printed as ``bastion: <message>`` with exit status 1."""


@hookimpl
def bastion_add_commands(subparsers: argparse._SubParsersAction) -> None:
    from bastion.core.cli import add_config_argument

    sessions = subparsers.add_parser("sessions", help="list, show and replay recorded sessions")
    sessions_sub = sessions.add_subparsers(dest="sessions_command", metavar="SUBCOMMAND", required=True)

    listing = sessions_sub.add_parser("list", help="recorded sessions, newest first")
    add_config_argument(listing)
    listing.add_argument("--identity", help="only sessions of this caller (subject)")
    listing.add_argument("--target", help="only sessions to this target")
    listing.add_argument("--since", help="only sessions started since: a date/time (2026-01-31, 2026-01-31T08:00Z) or an age (15m, 2d)")
    listing.add_argument("--until", help="only sessions started before (same forms as --since)")
    listing.add_argument("--limit", type=int, default=DEFAULT_LIST_LIMIT, help=f"at most this many (default {DEFAULT_LIST_LIMIT})")
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(handler=_handler(cmd_sessions_list))

    show = sessions_sub.add_parser("show", help="one session and its events")
    add_config_argument(show)
    show.add_argument("id", help="session id (a unique prefix is enough)")
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(handler=_handler(cmd_sessions_show))

    replay = sessions_sub.add_parser("replay", help="what the caller sent and saw, as a timed transcript")
    add_config_argument(replay)
    replay.add_argument("id", help="session id (a unique prefix is enough)")
    replay.set_defaults(handler=_handler(cmd_sessions_replay))

    audit = subparsers.add_parser("audit", help="verify, export and prune the audit log")
    audit_sub = audit.add_subparsers(dest="audit_command", metavar="SUBCOMMAND", required=True)

    verify = audit_sub.add_parser("verify", help="check the hash chains, manifests and signatures")
    add_config_argument(verify)
    verify.add_argument("--public-key", action="append", type=Path, default=[], metavar="FILE", help="also trust this Ed25519 public key (e.g. a rotated-out key); repeatable")
    verify.add_argument("--json", action="store_true", help="print JSON")
    verify.set_defaults(handler=_handler(cmd_audit_verify))

    export = audit_sub.add_parser("export", help="write records to a file, and remember it for prune")
    add_config_argument(export)
    export.add_argument("--since", help="records from this date/time or age on")
    export.add_argument("--until", help="records before this date/time or age")
    export.add_argument("--format", choices=EXPORT_FORMATS, default="jsonl")
    export.add_argument("-o", "--output", type=Path, help="output file (default: standard output)")
    export.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="progress bar on standard error (default: when it is a terminal)")
    export.set_defaults(handler=_handler(cmd_audit_export))

    prune = audit_sub.add_parser("prune", help="remove sealed segments that are old enough and exported")
    add_config_argument(prune)
    prune.add_argument("--older-than", required=True, help="an age such as 6y or 2190d")
    prune.add_argument("--dry-run", action="store_true", help="say what would go, remove nothing")
    prune.set_defaults(handler=_handler(cmd_audit_prune))

    key = audit_sub.add_parser("public-key", help="print the public key that signs the log (keep a copy elsewhere)")
    add_config_argument(key)
    key.set_defaults(handler=_handler(cmd_audit_public_key))


def _handler(function):
    def run(args: argparse.Namespace) -> int:
        try:
            return function(args, load_context(args))
        except (CommandError, auditlog.AuditLogError) as exc:
            print(f"bastion: {exc}", file=sys.stderr)
            return 1

    run.__name__ = function.__name__
    run.__doc__ = function.__doc__
    return run


# --- context -----------------------------------------------------------------------------------------


@attrs.frozen
class AuditContext:
    """What the commands work on. Tests build one directly; the CLI builds it from the config."""

    audit_dir: Path
    index_path: Path
    signing_key: Any = None  # Ed25519 private key, when one is configured or was generated
    key_problem: str = ""  # why there is no key


def load_context(args: argparse.Namespace) -> AuditContext:
    from bastion.core.cli import load_for_command
    from bastion.core.secrets import SecretUnavailable, resolve

    config, hooks = load_for_command(args)
    audit_dir = configured_audit_directory(config)
    index_path = default_index_path(config.gateway.state_dir)
    for section in config.audit.sinks:
        if section.kind == "sqlite" and getattr(section.options, "path", None) is not None:
            index_path = Path(section.options.path)
            break
    key, problem = None, ""
    if config.audit.signing_key is not None:
        try:
            key = auditlog.load_signing_key(resolve(config.audit.signing_key, hooks.resolve_secret).reveal())
        except (SecretUnavailable, auditlog.AuditLogError) as exc:
            problem = f"audit.signing_key: {exc}"
    else:
        key, problem = key_from_directory(audit_dir)
    return AuditContext(audit_dir, index_path, key, problem)


def key_from_directory(audit_dir: Path) -> tuple[Any, str]:
    """The key the gateway generated, without generating one (a command must not invent keys)."""
    path = audit_dir / auditlog.SIGNING_KEY_FILE
    try:
        return auditlog.load_signing_key(path.read_bytes()), ""
    except FileNotFoundError:
        return None, f"no audit.signing_key is configured and {path} does not exist (has the gateway run?)"


# --- time ----------------------------------------------------------------------------------------------


def parse_when(text: str | None, now: float | None = None) -> float | None:
    """A Unix time from ``2026-01-31``, ``2026-01-31T08:00:00Z`` (UTC unless an offset is given)
    or an age such as ``15m`` / ``2d`` / ``6y`` (that long before now)."""
    if text is None:
        return None
    from bastion.core.config import Duration

    now = time.time() if now is None else now
    try:
        return now - float(Duration.parse(text))
    except ValueError:
        pass
    try:
        moment = datetime.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise CommandError(f"not a date/time or an age: {text!r} (try 2026-01-31, 2026-01-31T08:00Z or 2d)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return moment.timestamp()


def format_time(at: float | None) -> str:
    if at is None:
        return ""
    return datetime.datetime.fromtimestamp(at, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


# --- sessions ------------------------------------------------------------------------------------------


def open_index(context: AuditContext) -> SqliteIndex:
    index = SqliteIndex(context.index_path)
    index.catch_up(context.audit_dir)
    return index


SESSION_COLUMNS = ("session_id", "started_at", "identity", "target", "client", "requests", "denied", "rows", "ended_at", "end_reason")


def list_sessions(context: AuditContext, *, identity: str | None = None, target: str | None = None, since: float | None = None, until: float | None = None, limit: int = DEFAULT_LIST_LIMIT) -> list[dict[str, Any]]:
    index = open_index(context)
    clauses, parameters = [], []
    for column, value in (("identity", identity), ("target", target)):
        if value is not None:
            clauses.append(f"{column} = ?")
            parameters.append(value)
    if since is not None:
        clauses.append("started_at >= ?")
        parameters.append(since)
    if until is not None:
        clauses.append("started_at < ?")
        parameters.append(until)
    where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
    rows = index.query(f"SELECT * FROM sessions {where} ORDER BY started_at DESC, session_id LIMIT ?", (*parameters, limit))
    return [dict(row) for row in rows]


def cmd_sessions_list(args: argparse.Namespace, context: AuditContext, out: IO[str] | None = None) -> int:
    """``bastion sessions list``."""
    out = out if out is not None else sys.stdout
    sessions = list_sessions(context, identity=args.identity, target=args.target, since=parse_when(args.since), until=parse_when(args.until), limit=args.limit)
    if args.json:
        json.dump(sessions, out, indent=2)
        out.write("\n")
        return 0
    headers = ("SESSION", "STARTED (UTC)", "IDENTITY", "TARGET", "CLIENT", "REQUESTS", "DENIED", "ROWS", "DURATION", "END")
    rows = [
        (
            s["session_id"],
            format_time(s["started_at"]),
            s["identity"] or "-",
            s["target"] or "-",
            s["client"] or "-",
            str(s["requests"]),
            str(s["denied"]),
            str(s["rows"]),
            f"{s['ended_at'] - s['started_at']:.1f}s" if s["ended_at"] is not None else "open",
            s["end_reason"] or "",
        )
        for s in sessions
    ]
    out.write(plain_table(headers, rows))
    out.write(f"{len(rows)} session{'s' if len(rows) != 1 else ''}\n")
    return 0


def find_session(index: SqliteIndex, wanted: str) -> dict[str, Any]:
    rows = index.query("SELECT * FROM sessions WHERE session_id = ?", (wanted,))
    if not rows:
        escaped = wanted.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        rows = index.query("SELECT * FROM sessions WHERE session_id LIKE ? ESCAPE '\\' LIMIT 2", (escaped + "%",))
    if not rows:
        raise CommandError(f"no recorded session {wanted!r}")
    if len(rows) > 1:
        raise CommandError(f"{wanted!r} matches more than one session; give more of the id")
    return dict(rows[0])


def session_records(index: SqliteIndex, session_id: str) -> list[dict[str, Any]]:
    rows = index.query("SELECT chain, seq, at, type, event, hash FROM events WHERE session_id = ? ORDER BY chain, seq", (session_id,))
    return [{"chain": r["chain"], "seq": r["seq"], "at": r["at"], "type": r["type"], "hash": bytes(r["hash"]).hex(), "event": json.loads(r["event"])} for r in rows]


def cmd_sessions_show(args: argparse.Namespace, context: AuditContext, out: IO[str] | None = None) -> int:
    """``bastion sessions show ID``."""
    out = out if out is not None else sys.stdout
    index = open_index(context)
    session = find_session(index, args.id)
    records = session_records(index, session["session_id"])
    if args.json:
        json.dump({"session": session, "events": records}, out, indent=2)
        out.write("\n")
        return 0
    for column in SESSION_COLUMNS[1:] + ("protocol", "provider", "client_user", "database", "decision", "errors", "chain"):
        value = session.get(column)
        if column.endswith("_at"):
            value = format_time(value)
        out.write(f"{column.replace('_', ' '):>12}: {'' if value is None else value}\n")
    out.write(f"{'session':>12}: {session['session_id']}\n\n")
    rows = [(format_time(r["at"]), f"{r['chain']}:{r['seq']}", r["type"], summarize(r["type"], r["event"])) for r in records]
    out.write(plain_table(("AT (UTC)", "RECORD", "TYPE", "WHAT"), rows))
    return 0


def summarize(kind: str, event: dict[str, Any]) -> str:
    """One line about an event for listings."""
    if kind == "request":
        statement = " ".join((event.get("statements") or [""])[0].split())
        return f"#{event.get('request_no')} {event.get('verdict')}: {statement[:80]}"
    if kind == "response":
        return f"#{event.get('request_no')} {event.get('status')} {event.get('command_tag') or ''} rows={event.get('rows')}".strip()
    if kind == "rows":
        return f"#{event.get('request_no')} {len(event.get('rows') or [])} rows recorded from row {event.get('first_row')}"
    if kind == "session-started":
        identity = event.get("identity") or {}
        return f"{identity.get('subject')} via {identity.get('provider')}: {event.get('decision')}"
    if kind == "approval":
        return f"#{event.get('request_no')} {event.get('step')} by {event.get('actor') or '-'}"
    for key in ("reason", "client", "outcome"):
        if event.get(key):
            return str(event[key])
    return ""


def cmd_sessions_replay(args: argparse.Namespace, context: AuditContext, out: IO[str] | None = None) -> int:
    """``bastion sessions replay ID``: statements, decisions and masked results as the caller saw them."""
    out = out if out is not None else sys.stdout
    index = open_index(context)
    session = find_session(index, args.id)
    out.write(render_transcript(session, session_records(index, session["session_id"])))
    return 0


def render_transcript(session: dict[str, Any], records: Sequence[dict[str, Any]]) -> str:
    lines: list[str] = []
    start = min((r["event"].get("at") or r["at"] for r in records), default=session["started_at"])

    def stamp(record: dict[str, Any]) -> str:
        return f"[+{(record['event'].get('at') or record['at']) - start:8.3f}s]"

    who = session.get("identity") or "(not authenticated)"
    lines.append(f"Session {session['session_id']}: {who} -> {session.get('target') or '?'} ({session.get('protocol') or '?'}) from {session.get('client') or '?'}")
    lines.append(f"Started {format_time(start)} UTC")
    lines.append("")
    pending_rows: dict[int, list[list[Any]]] = {}
    columns: dict[int, list[str]] = {}
    for record in records:
        kind, event = record["type"], record["event"]
        if kind == "connection-opened":
            lines.append(f"{stamp(record)} connection from {event.get('client')} to {event.get('listen')}")
        elif kind == "session-started":
            identity = event.get("identity") or {}
            lines.append(f"{stamp(record)} authenticated as {identity.get('subject')} ({identity.get('provider')}, {identity.get('auth_method') or 'no method'}){', tls' if event.get('tls') else ''}; connect {event.get('decision')}")
        elif kind == "authentication-failed":
            lines.append(f"{stamp(record)} authentication failed: {event.get('reason')}")
        elif kind == "request":
            verdict = event.get("verdict", "?")
            because = "; ".join(event.get("reasons") or []) or ", ".join(event.get("rules") or [])
            lines.append(f"{stamp(record)} #{event.get('request_no')} {event.get('kind')}: {verdict.upper()}{f' ({because})' if because else ''}")
            for statement in event.get("statements") or []:
                lines.extend(f"    {line}" for line in statement.splitlines() or [""])
            if event.get("parameters"):
                lines.append(f"    parameters: {', '.join('NULL' if p is None else p for p in event['parameters'])}")
        elif kind == "rows":
            pending_rows.setdefault(event.get("request_no"), []).extend(event.get("rows") or [])
        elif kind == "response":
            number = event.get("request_no")
            recorded = pending_rows.pop(number, [])
            if event.get("columns"):
                columns[number] = list(event["columns"])
                lines.extend(f"    {line}" for line in psql_table(columns[number], recorded, event.get("rows", 0)).splitlines())
            detail = [event.get("status", "?")]
            if event.get("command_tag"):
                detail.append(event["command_tag"])
            if event.get("error_code") or event.get("error_message"):
                detail.append(f"error {event.get('error_code', '')}: {event.get('error_message', '')}".strip())
            if event.get("masked"):
                detail.append("masked " + ", ".join(f"{k}={v}" for k, v in sorted(event["masked"].items())))
            lines.append(f"{stamp(record)} #{number} -> {'; '.join(detail)} ({event.get('duration_ms', 0):.1f} ms)")
        elif kind == "approval":
            lines.append(f"{stamp(record)} #{event.get('request_no')} approval {event.get('step')} by {event.get('actor') or '-'}{': ' + event['comment'] if event.get('comment') else ''}")
        elif kind == "cancel":
            lines.append(f"{stamp(record)} cancel request {event.get('outcome')}")
        elif kind == "session-ended":
            lines.append(f"{stamp(record)} session ended: {event.get('reason')}{' (' + event['error'] + ')' if event.get('error') else ''}; {event.get('requests', 0)} requests")
        else:
            lines.append(f"{stamp(record)} {kind}")
    for number, rows in pending_rows.items():  # rows whose response was never recorded
        lines.append(f"    result of #{number} (no response recorded):")
        lines.extend(f"    {line}" for line in psql_table([f"column{i + 1}" for i in range(max(map(len, rows), default=0))], rows, len(rows)).splitlines())
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    if value is None:
        return ""
    text = str(value).replace("\r", "\\r").replace("\n", "\\n").replace("\t", "\\t")
    return text if len(text) <= MAX_CELL_WIDTH else text[: MAX_CELL_WIDTH - 1] + "…"


def psql_table(columns: Sequence[str], rows: Sequence[Sequence[Any]], total_rows: int) -> str:
    """Rows the way psql's aligned format prints them: centred headers, ``|`` separators."""
    cells = [[_cell(v) for v in row] + [""] * (len(columns) - len(row)) for row in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    header = "|".join(f" {c:^{w}} " for c, w in zip(columns, widths))
    rule = "+".join("-" * (w + 2) for w in widths)
    body = ["|".join(f" {v:<{w}} " for v, w in zip(row, widths)).rstrip() for row in cells]
    count = f"({total_rows} row{'s' if total_rows != 1 else ''}"
    if total_rows > len(rows):
        count += f"; the first {len(rows)} recorded"
    return "\n".join([header.rstrip(), rule, *body, count + ")"]) + "\n"


def plain_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    rows = [list(map(str, row)) for row in rows]
    widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(headers)]
    lines = ["  ".join(f"{h:<{w}}" for h, w in zip(headers, widths)).rstrip()]
    lines += ["  ".join(f"{v:<{w}}" for v, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines) + "\n"


# --- verify ------------------------------------------------------------------------------------------------


def trusted_keys(context: AuditContext, extra: Iterable[Path] = ()) -> list[bytes] | None:
    keys = [auditlog.public_key_bytes(context.signing_key)] if context.signing_key is not None else []
    for path in extra:
        try:
            keys.append(auditlog.load_public_key(path.read_bytes()))
        except OSError as exc:
            raise CommandError(f"cannot read public key {path}: {exc.strerror}") from None
    return keys or None


def cmd_audit_verify(args: argparse.Namespace, context: AuditContext, out: IO[str] | None = None) -> int:
    """``bastion audit verify``: exit 0 when every chain checks out."""
    out = out if out is not None else sys.stdout
    keys = trusted_keys(context, args.public_key)
    report = auditlog.verify(context.audit_dir, keys)
    if args.json:
        json.dump(report_json(report, keys is None), out, indent=2)
        out.write("\n")
        return 0 if report.ok else 1
    if keys is None:
        out.write(f"warning: {context.key_problem}; checked signatures against the keys the manifests name, which proves no more than that the files agree with each other\n")
    else:
        out.write(f"trusted keys: {', '.join(auditlog.key_id(k) for k in keys)}\n")
    if not report.chains:
        out.write(f"no audit segments in {context.audit_dir}\n")
    for chain in report.chains:
        span = f"records {chain.first_seq}-{chain.last_seq}" if chain.first_seq is not None else "no records"
        state = f", segment {chain.open_segment} open" if chain.open_segment is not None else ""
        out.write(f"chain {chain.chain or '?'} (slot {chain.slot}): {chain.segments} segments, {span}{state}; signed by {', '.join(chain.keys) or 'nobody'}\n")
    for warning in report.warnings:
        out.write(f"note: {warning.slot}: {warning.message}\n")
    for problem in report.problems:
        where = f" (seq {problem.seq})" if problem.seq is not None else ""
        out.write(f"PROBLEM [{problem.kind}] {problem.slot}: {problem.message}{where}\n")
    out.write(f"{'OK' if report.ok else 'FAILED'}: {report.records} records checked, {len(report.problems)} problems\n")
    return 0 if report.ok else 1


def report_json(report: auditlog.VerifyReport, untrusted: bool) -> dict[str, Any]:
    return {
        "ok": report.ok,
        "records": report.records,
        "directory": report.directory,
        "trusted_keys": list(report.trusted_keys),
        "trust_anchor": not untrusted,
        "chains": [attrs.asdict(c) for c in report.chains],
        "problems": [attrs.asdict(p) for p in report.problems],
        "warnings": [attrs.asdict(w) for w in report.warnings],
    }


# --- export --------------------------------------------------------------------------------------------


class Progress:
    """A progress bar on a terminal; silent otherwise (scripts read the summary line)."""

    def __init__(self, total: int, stream: IO[str], enabled: bool, label: str) -> None:
        self.total = max(total, 1)
        self.stream = stream
        self.enabled = enabled
        self.label = label
        self.done = 0
        self.count = 0
        self._drawn = 0.0

    def advance(self, amount: int, records: int = 0) -> None:
        self.done += amount
        self.count += records
        now = time.monotonic()
        if self.enabled and now - self._drawn >= PROGRESS_REDRAW_INTERVAL:
            self._draw()
            self._drawn = now

    def _draw(self) -> None:
        fraction = min(self.done / self.total, 1.0)
        filled = int(fraction * PROGRESS_WIDTH)
        self.stream.write(f"\r{self.label} [{'#' * filled}{'-' * (PROGRESS_WIDTH - filled)}] {fraction:4.0%} {self.count} records")
        self.stream.flush()

    def finish(self) -> None:
        if self.enabled:
            self.done = self.total
            self._draw()
            self.stream.write("\n")
            self.stream.flush()


@attrs.frozen
class ExportResult:
    records: int
    ranges: tuple[auditlog.SegmentRange, ...]
    sha256: bytes


def export_records(directory: Path, output: IO[bytes], *, since: float | None, until: float | None, fmt: str, progress: Progress | None = None) -> ExportResult:
    """Write every intact record with ``since <= at < until``; returns what was covered."""
    if fmt not in EXPORT_FORMATS:
        raise CommandError(f"unknown export format {fmt!r}")
    digest = hashlib.sha256()
    ranges: list[auditlog.SegmentRange] = []
    count = 0
    for slot in auditlog.list_slots(directory):
        segments, _ = auditlog.segment_numbers(directory, slot)
        run: list[int] | None = None  # [chain, first, last] of the current contiguous run
        chain = ""
        for number in segments:
            path = auditlog.segment_path(directory, slot, number)
            offset = 0
            for item in auditlog.iter_segment(path):
                record = item.record
                if progress is not None:
                    progress.advance(item.end - offset, 0)
                offset = item.end
                inside = (since is None or record.at >= since) and (until is None or record.at < until)
                if not inside:
                    continue
                if fmt == "jsonl":
                    data = (json.dumps(record_json(record), ensure_ascii=True) + "\n").encode()
                else:
                    data = auditlog.pack({"chain": record.chain, "seq": record.seq, "hash": record.hash, "body": record.body})
                output.write(data)
                digest.update(data)
                count += 1
                if progress is not None:
                    progress.advance(0, 1)
                if run is not None and chain == record.chain and record.seq == run[1] + 1:
                    run[1] = record.seq
                else:
                    if run is not None:
                        ranges.append(auditlog.SegmentRange(chain, run[0], run[1]))
                    chain, run = record.chain, [record.seq, record.seq]
            if progress is not None:
                progress.advance(max(0, path.stat().st_size - offset), 0)
        if run is not None:
            ranges.append(auditlog.SegmentRange(chain, run[0], run[1]))
    return ExportResult(count, tuple(ranges), digest.digest())


def cmd_audit_export(args: argparse.Namespace, context: AuditContext, out: IO[bytes] | None = None, err: IO[str] | None = None) -> int:
    """``bastion audit export``: records to a file, and a signed note of what it covered."""
    err = err if err is not None else sys.stderr
    if context.signing_key is None:
        raise CommandError(f"{context.key_problem}; an export must be recorded with the audit key so prune can trust it")
    since, until = parse_when(args.since), parse_when(args.until)
    show_progress = args.progress if args.progress is not None else err.isatty()
    progress = Progress(auditlog.log_size(context.audit_dir), err, show_progress, "exporting")
    if args.output is not None:
        temporary = args.output.with_name(args.output.name + ".partial")
        with open(temporary, "wb") as handle:
            result = export_records(context.audit_dir, handle, since=since, until=until, fmt=args.format, progress=progress)
            handle.flush()
            os.fsync(handle.fileno())  # an export that prune relies on must really be on disk
        os.replace(temporary, args.output)
        target = str(args.output.resolve())
    else:
        stream = out if out is not None else sys.stdout.buffer
        result = export_records(context.audit_dir, stream, since=since, until=until, fmt=args.format, progress=progress)
        stream.flush()
        target = "-"
    progress.finish()
    auditlog.append_retention(
        context.audit_dir,
        auditlog.RetentionEntry(kind="export", at=time.time(), ranges=result.ranges, since=since, until=until, format=args.format, output=target, output_sha256=result.sha256, records=result.records),
        context.signing_key,
    )
    err.write(f"exported {result.records} records to {target if target != '-' else 'standard output'} (sha256 {result.sha256.hex()})\n")
    return 0


# --- prune -----------------------------------------------------------------------------------------------


@attrs.frozen
class PruneCandidate:
    slot: str
    segment: int
    size: int
    reason: str  # why it stays; empty when it goes


def prune_plan(context: AuditContext, older_than: float, now: float | None = None) -> list[PruneCandidate]:
    """Every segment file with the reason it stays, or none when it may go.

    A segment goes only when it is sealed (never the open one), everything in it is older than
    the cutoff, and every one of its records was written by an export recorded in retention.log.
    """
    now = time.time() if now is None else now
    cutoff = now - older_than
    keys = trusted_keys(context)
    exports = [e for e in auditlog.read_retention(context.audit_dir, keys) if e.kind == "export"]
    runs = auditlog.merge_ranges(r for e in exports for r in e.ranges)
    plan = []
    for slot in auditlog.list_slots(context.audit_dir):
        segments, _ = auditlog.segment_numbers(context.audit_dir, slot)
        for number in segments:
            size = auditlog.segment_path(context.audit_dir, slot, number).stat().st_size
            manifest, blob, problem = auditlog.read_manifest(context.audit_dir, slot, number)
            if manifest is None or problem:
                reason = "open (not sealed)" if problem == "missing" else f"manifest {problem}"
            elif keys is not None and blob is not None and blob.public_key not in keys:
                reason = "sealed by an untrusted key"
            elif (manifest.last_at if manifest.last_at is not None else manifest.sealed_at) >= cutoff:
                reason = "not old enough"
            elif not auditlog.covered(runs, manifest.chain, manifest.first_seq, manifest.last_seq):
                reason = "not exported"
            else:
                reason = ""
            plan.append(PruneCandidate(slot, number, size, reason))
    return plan


def cmd_audit_prune(args: argparse.Namespace, context: AuditContext, out: IO[str] | None = None) -> int:
    """``bastion audit prune --older-than 6y``: remove exported, sealed, old segments (manifests stay)."""
    out = out if out is not None else sys.stdout
    from bastion.core.config import Duration

    try:
        older_than = float(Duration.parse(args.older_than))
    except ValueError as exc:
        raise CommandError(f"--older-than: {exc}") from None
    if context.signing_key is None:
        raise CommandError(f"{context.key_problem}; a prune must be recorded with the audit key")
    plan = prune_plan(context, older_than)
    going = [c for c in plan if not c.reason]
    names = tuple(f"{c.slot}-{c.segment:08d}" for c in going)
    if going and not args.dry_run:
        # recorded first: a crash between the record and the removal leaves a file verify still
        # checks; the other order would leave a gap verify reports as a deleted segment
        auditlog.append_retention(context.audit_dir, auditlog.RetentionEntry(kind="prune", at=time.time(), segments=names), context.signing_key)
        for candidate in going:
            auditlog.segment_path(context.audit_dir, candidate.slot, candidate.segment).unlink(missing_ok=True)
    verb = "would remove" if args.dry_run else "removed"
    for candidate in going:
        out.write(f"{verb} {candidate.slot}-{candidate.segment:08d}.seg ({candidate.size} bytes)\n")
    kept: dict[str, int] = {}
    for candidate in plan:
        if candidate.reason:
            kept[candidate.reason] = kept.get(candidate.reason, 0) + 1
    summary = ", ".join(f"{n} {reason}" for reason, n in sorted(kept.items()))
    out.write(f"{verb} {len(going)} segments ({sum(c.size for c in going)} bytes); kept {len(plan) - len(going)}{': ' + summary if summary else ''}\n")
    return 0


def cmd_audit_public_key(args: argparse.Namespace, context: AuditContext, out: IO[str] | None = None) -> int:
    """``bastion audit public-key``: the PEM to keep somewhere the gateway cannot write."""
    out = out if out is not None else sys.stdout
    if context.signing_key is None:
        raise CommandError(context.key_problem)
    public = auditlog.public_key_bytes(context.signing_key)
    out.write(auditlog.public_key_pem(public))
    print(f"key id {auditlog.key_id(public)}", file=sys.stderr)
    return 0
