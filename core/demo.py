"""``bastion demo``: a newcomer's first ten minutes, on one machine, with nothing to set up.

The demo starts a throwaway PostgreSQL (:mod:`bastion.core.pgcluster`) holding a synthetic clinic
(:mod:`bastion.core.demo_data`), writes an ordinary Bastion configuration and policy bundle into a
state directory (:mod:`bastion.core.demo_config`), mints two API keys with ``bastion tokens add``,
and runs the gateway — loaded exactly as ``bastion serve`` loads it — as a task of this process.
Then a scripted "nightly extract" talks to the gateway with a real PostgreSQL client (psycopg),
as a CI job would:

1. a permitted query, whose SSNs and e-mail addresses come back masked;
2. ``DELETE FROM patients``, refused by the baseline's guardrail (SQLSTATE 42501);
3. a bulk export of every patient, paused at row 1001 until the demo reviewer approves it through
   the approvals HTTP API while the client waits, then completed;
4. a query on ``public.billing``, which no grant gives: denied by least privilege.

Each step is printed as it happens, with the decision and the rules the audit trail names; then
the session's replay (``bastion sessions replay``) and ``bastion audit verify``. With ``--keep``
everything stays up until Ctrl-C or SIGTERM, and the demo prints the ``psql`` line and the
reviewer's commands to try it by hand; otherwise it cleans up: the gateway stopped, PostgreSQL
stopped, temporary directories removed (a ``--state-dir`` the user named is left for inspection).

Blocking work (the database client, subprocesses, the reviewer's HTTP calls) runs in worker
threads so the gateway keeps serving; every wait has a deadline.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import secrets
import shlex
import shutil
import signal
import sys
import tempfile
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import attrs
import httpx
import psycopg
import trio

from bastion.core import demo_config as files
from bastion.core import demo_data, events, pgcluster
from bastion.core.config import ConfigError
from bastion.core.errors import GatewayError
from bastion.core.hookspecs import hookimpl

# The whole scripted extract, approval included, must finish within this; a hung step fails the
# demo (and its cleanup still runs) instead of hanging the terminal.
SCENARIO_DEADLINE = 120.0
CONNECT_TIMEOUT_SECONDS = 10  # the client's connection to the gateway (libpq connect_timeout)
HTTP_TIMEOUT = 10.0  # one call of the reviewer to the approvals API
APPROVAL_POLL_INTERVAL = 0.2  # how often the reviewer looks for the held export
# how long the demo waits for the held client's notice before showing the request without it
NOTICE_WAIT = 2.0
RECORD_DEADLINE = 10.0  # the audit trail writing what it was given (it does so in milliseconds)
RECORD_POLL_INTERVAL = 0.05
GATEWAY_STOP_DEADLINE = 15.0  # gateway.shutdown_grace (2s) plus flushing the trail
APP_PASSWORD_BYTES = 24  # the upstream role's password: random, in a 0600 file, never printed
SHOWN_ROWS = 3  # rows of the permitted query printed on screen
CELL_WIDTH = 44  # a longer cell is cut in the printed tables (notes are long)
INDENT = "     "
# exit statuses of a run stopped by a signal before it finished, as shells report them
SIGNAL_EXIT_BASE = 128
# loggers whose info lines would interleave with the story (the gateway's, the reviewer's HTTP client)
QUIETED_LOGGERS = ("bastion", "httpx", "httpcore")

PERMITTED_QUERY = f"SELECT mrn, last_name, date_of_birth, ssn, email, phone, card_number FROM patients ORDER BY id LIMIT {SHOWN_ROWS}"
NOTES_QUERY = "SELECT author, note FROM notes ORDER BY id LIMIT 1"
DELETE_STATEMENT = "DELETE FROM patients"
EXPORT_QUERY = "SELECT mrn, date_of_birth, zip, ssn, email FROM patients ORDER BY id"
BILLING_QUERY = "SELECT patient_id, amount, card_number FROM billing LIMIT 5"
APPROVAL_COMMENT = "Quarterly registry submission, ticket PRIV-2041"
INSUFFICIENT_PRIVILEGE = "42501"  # the SQLSTATE of every statement Bastion refuses


class DemoError(Exception):
    """Something the user can fix or should know; printed as ``bastion demo: <message>``."""


# What ends the demo with a sentence and status 1 (after cleaning up) rather than a traceback:
# problems it can explain, the gateway refusing to start, and a client failing (the gateway gone).
EXPECTED_FAILURES = (DemoError, pgcluster.ClusterError, GatewayError, ConfigError, psycopg.Error, httpx.HTTPError)


def _enough_patients(instance: Any, attribute: Any, value: int) -> None:
    if value <= files.BULK_EXPORT_ROWS:
        raise ValueError(f"the demo needs more than {files.BULK_EXPORT_ROWS} patients, or its bulk export is never held for review")


@attrs.frozen
class DemoOptions:
    """``keep``: stay up until a signal; ``state_dir``: the user's directory for Bastion's files
    (kept afterwards); ``pg_bin_dir``: where initdb and pg_ctl are; ``seed`` and ``patients``:
    which synthetic clinic (tests regenerate it from the same values)."""

    keep: bool = False
    state_dir: Path | None = None
    pg_bin_dir: Path | None = None
    seed: int = demo_data.DEFAULT_SEED
    patients: int = attrs.field(default=demo_data.DEFAULT_PATIENTS, validator=_enough_patients)


def run(options: DemoOptions, out: TextIO | None = None) -> int:
    """Run the demo; the exit status (0 done, 1 a problem, 128+N stopped by signal N)."""
    out = out or sys.stdout
    try:
        requested = _checked_state_dir(options.state_dir)
        bin_dir = pgcluster.find_bin_dir(options.pg_bin_dir)
    except (DemoError, pgcluster.ProgramsMissing) as exc:
        print(f"bastion demo: {exc}", file=sys.stderr)
        return 1
    demo = Demo(options, bin_dir, requested, out=out)
    with _quiet_gateway_logs():
        return trio.run(demo.main)


def _checked_state_dir(requested: Path | None) -> Path | None:
    """The user's state directory, which must be new or empty (the demo writes its own files)."""
    if requested is None:
        return None
    requested = requested.expanduser().absolute()
    if requested.exists() and (not requested.is_dir() or any(requested.iterdir())):
        raise DemoError(f"--state-dir {requested} is not an empty directory; name a new or empty one (the demo writes its own configuration there)")
    return requested


@contextlib.contextmanager
def _quiet_gateway_logs():
    """The demo tells its own story: the gateway's info lines would interleave with it, so only
    its warnings and errors show (unless the user asked for debug logs)."""
    loggers = [logging.getLogger(name) for name in QUIETED_LOGGERS]
    before = [logger.level for logger in loggers]
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        for logger in loggers:
            logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, before, strict=True):
            logger.setLevel(level)


# --- what the gateway records, as it records it ------------------------------------------------------


class Observer:
    """A plugin that keeps every audit event the gateway records (``bastion_record``), so the demo
    can say which rule decided each step the moment it is decided."""

    def __init__(self) -> None:
        self.events: list[events.AuditEvent] = []
        self.listening = True

    @hookimpl
    def bastion_record(self, event: events.AuditEvent) -> None:
        if self.listening:  # after the script (--keep) the trail alone keeps what happens
            self.events.append(event)

    def of(self, cls: type, session_id: str | None = None) -> list[Any]:
        return [e for e in self.events if isinstance(e, cls) and (session_id is None or e.session_id == session_id)]

    def session_of(self, subject: str) -> str | None:
        started = [e for e in self.of(events.SessionStarted) if e.identity.subject == subject]
        return started[-1].session_id if started else None

    def judged(self, session_id: str, after: int) -> events.RequestJudged | None:
        """The last statement judged in the session after event index ``after``."""
        for event in reversed(self.events[after:]):
            if isinstance(event, events.RequestJudged) and event.session_id == session_id and event.statements:
                return event
        return None

    def response(self, session_id: str, request_no: int) -> events.ResponseCompleted | None:
        for event in reversed(self.events):
            if isinstance(event, events.ResponseCompleted) and event.session_id == session_id and event.request_no == request_no:
                return event
        return None


# --- the client: what a CI job would run ------------------------------------------------------------


@attrs.frozen
class Result:
    columns: tuple[str, ...] = ()
    rows: tuple[tuple[Any, ...], ...] = ()
    error_code: str = ""
    error: str = ""
    detail: str = ""

    @property
    def refused(self) -> bool:
        return bool(self.error_code)


class ExtractClient:
    """The nightly extract's one connection (psycopg, blocking: the demo calls it from threads)."""

    def __init__(self, conninfo: str) -> None:
        self.notices: list[str] = []
        self.connection = psycopg.connect(conninfo, autocommit=True, connect_timeout=CONNECT_TIMEOUT_SECONDS)
        self.connection.add_notice_handler(lambda diagnostic: self.notices.append(diagnostic.message_primary or ""))

    def run(self, statement: str) -> Result:
        try:
            cursor = self.connection.execute(statement)
            if cursor.description is None:
                return Result()
            return Result(tuple(c.name for c in cursor.description), tuple(cursor.fetchall()))
        except psycopg.Error as exc:
            diagnostic = exc.diag
            return Result(error_code=exc.sqlstate or "", error=diagnostic.message_primary or str(exc), detail=diagnostic.message_detail or "")

    def close(self) -> None:
        self.connection.close()


class Reviewer:
    """The demo's privacy officer, using the approvals HTTP API with her own API key."""

    def __init__(self, base_url: str, key: str) -> None:
        self.client = httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {key}"}, timeout=HTTP_TIMEOUT)

    def pending(self) -> list[dict[str, Any]]:
        answer = self.client.get("/approvals", params={"state": "pending"})
        answer.raise_for_status()
        return answer.json()["approvals"]

    def approve(self, approval_id: str, comment: str) -> tuple[int, dict[str, Any]]:
        answer = self.client.post(f"/approvals/{approval_id}/approve", json={"comment": comment})
        return answer.status_code, answer.json()

    def close(self) -> None:
        self.client.close()


# --- printing ------------------------------------------------------------------------------------------


class Printer:
    """Short lines, flushed at once (the story must keep pace with what happens).

    When the reader goes away (``bastion demo | head``) the demo still runs to the end and
    cleans up; it just stops talking.
    """

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.gone = False

    def line(self, text: str = "") -> None:
        if self.gone:
            return
        try:
            self.out.write(text + "\n")
            self.out.flush()
        except BrokenPipeError:
            self.gone = True
            self._silence()

    def _silence(self) -> None:
        """Point the stream at /dev/null, so that the interpreter's final flush does not fail too."""
        with contextlib.suppress(OSError, ValueError, io.UnsupportedOperation):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self.out.fileno())
            os.close(devnull)

    def heading(self, text: str) -> None:
        self.line()
        self.line(text)

    def detail(self, text: str, indent: str = INDENT) -> None:
        for line in text.splitlines() or [""]:
            self.line(f"{indent}{line}".rstrip())

    def wrapped(self, text: str, indent: str = INDENT) -> None:
        for line in textwrap.wrap(text, width=100 - len(indent), break_on_hyphens=False, break_long_words=False):
            self.line(indent + line)


def _cell(value: Any) -> str:
    text = "" if value is None else str(value)
    return text if len(text) <= CELL_WIDTH else text[: CELL_WIDTH - 3] + "..."


def table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A small psql-like table."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    lines.append("-+-".join("-" * w for w in widths))
    lines += [" | ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    return "\n".join(lines)


def _decides(rule: str, verdict: str) -> bool:
    """Whether ``rule`` (``<bundle>:<section>:<name>`` or ``default-deny``) is behind ``verdict``.
    A decision lists every rule that had a say; the screen shows the ones that carried it."""
    if rule == "default-deny":
        return verdict == "deny"
    parts = rule.split(":")
    if len(parts) != 3:
        return True
    _, section, name = parts
    if verdict == "deny":
        return section == "guardrail" or (section == "risk" and name == "deny")
    if verdict == "allow":
        return section == "grant"
    return section in ("review", "guardrail") or (section == "risk" and name == "review")


def verdict_line(judged: events.RequestJudged | None) -> str:
    """``ALLOW by <rules>`` for a recorded decision, naming a row review that still applies."""
    if judged is None:
        return "(no decision was recorded)"
    rules = [r for r in judged.rules if _decides(r, judged.verdict)] or list(judged.rules)
    line = f"{judged.verdict.upper()} by {', '.join(rules) or 'no rule'}"
    row_reviews = [r for r in judged.rules if r.split(":")[1:2] == ["review"]]
    if judged.verdict == "allow" and row_reviews:
        line += f" (a result past {files.BULK_EXPORT_ROWS} rows would wait for a reviewer: {', '.join(row_reviews)})"
    return line


def command_name() -> str:
    """How the user can run ``bastion`` again: by name when it is on PATH, else as invoked."""
    if shutil.which("bastion"):
        return "bastion"
    invoked = Path(sys.argv[0])
    if invoked.name == "bastion" and invoked.exists():
        return str(invoked.absolute())
    return f"{sys.executable} -m bastion.core.cli"


# --- the demo ------------------------------------------------------------------------------------------


class Demo:
    def __init__(self, options: DemoOptions, bin_dir: Path, state_dir: Path | None, *, out: TextIO) -> None:
        self.options = options
        self.bin_dir = bin_dir
        self.requested_state_dir = state_dir  # the user's --state-dir (kept), or None: a temporary one
        self.state_dir: Path | None = None  # once created
        self.say = Printer(out)
        self.observer = Observer()
        self.cluster: pgcluster.Cluster | None = None
        self.gateway: Any = None
        self.gateway_done = trio.Event()
        self.work = trio.CancelScope()
        self.stopped_by: int | None = None  # the signal that ended the run, if one did
        self.serving_by_hand = False  # --keep: the scripted part is done, waiting for the user's signal
        self.bastion = command_name()

    # --- lifecycle --------------------------------------------------------------------------------

    async def main(self) -> int:
        status = 1
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._watch_signals, signals)
                    try:
                        with self.work:
                            status = await self._run(nursery)
                    except* EXPECTED_FAILURES as failures:
                        for exc in _leaves(failures):
                            print(f"bastion demo: {_describe(exc)}", file=sys.stderr)
                        status = 1
                    finally:
                        with trio.CancelScope(shield=True):
                            await self._stop_gateway("demo finished")
                        nursery.cancel_scope.cancel()
            finally:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(self._clean_up)
        if self.stopped_by is not None:  # with --keep, a signal is how the user says "done"
            return 0 if self.serving_by_hand else SIGNAL_EXIT_BASE + self.stopped_by
        return status

    async def _watch_signals(self, signals) -> None:
        async for signum in signals:
            if self.stopped_by is None:
                self.stopped_by = signum
                self.say.heading(f"Received {signal.Signals(signum).name}: stopping the gateway and PostgreSQL, removing what the demo created.")
                self.work.cancel()
            # further signals: the clean-up is under way and has its own deadlines

    async def _run(self, nursery: trio.Nursery) -> int:
        say = self.say
        say.line("Bastion demo: a CI job's nightly extract from a clinic database, through Bastion.")
        say.line("Everything runs on this machine, on loopback, and is made up: no real person's data is involved.")

        # PostgreSQL and the clinic
        self.cluster = await trio.to_thread.run_sync(lambda: pgcluster.start(bin_dir=self.bin_dir, prefix="bastion-demo-pg-"))
        cluster = self.cluster
        version = await trio.to_thread.run_sync(pgcluster.server_version, self.bin_dir)
        say.heading(f"* PostgreSQL {version} is running on {cluster.host}:{cluster.port} (a throwaway cluster in {cluster.base_dir}).")
        clinic = demo_data.generate(self.options.seed, self.options.patients)
        app_password = secrets.token_urlsafe(APP_PASSWORD_BYTES)
        await trio.to_thread.run_sync(lambda: demo_data.load(cluster.dsn(), clinic, app_role=files.APP_ROLE, app_password=app_password, database=files.DATABASE))
        counts = clinic.counts()
        say.line(
            f"* Database \"{files.DATABASE}\": {counts['patients']} patients, {counts['visits']} visits, {counts['notes']} clinical notes, "
            f"{counts['billing']} billing rows (synthetic, seed {clinic.seed}), and a role \"{files.APP_ROLE}\" that may read and write all of it."
        )

        # Bastion's files, keys and the gateway
        if self.requested_state_dir is None:
            self.state_dir = Path(tempfile.mkdtemp(prefix="bastion-demo-"))
        else:
            self.requested_state_dir.mkdir(parents=True, exist_ok=True)
            self.state_dir = self.requested_state_dir
        state = files.write_state(self.state_dir, upstream=f"{cluster.host}:{cluster.port}", app_password=app_password)
        say.line(f"* Bastion's state (configuration, policy, keys, audit trail, approvals) is in {state.directory}")
        say.detail(f"policies: hipaa-baseline (guardrails and masks, shipped) + {files.BUNDLE_FILE} (this demo's grant and review)")
        ci_key = await self._mint(state, files.CI_SUBJECT, files.CI_GROUP, "the nightly CI extract")
        reviewer_key = await self._mint(state, files.REVIEWER_SUBJECT, files.REVIEWER_GROUP, "a privacy officer who reviews exports")
        await self._start_gateway(nursery, state.config)
        listen = self.gateway.addresses[files.TARGET]
        admin = self.gateway.admin_address
        say.line(f"* Bastion is running: {files.TARGET} on {listen} (PostgreSQL protocol), approvals API on http://{admin}")

        # the scripted extract
        say.heading(f"The nightly extract connects as {files.CI_SUBJECT} with its API key as the password (psycopg -> Bastion -> PostgreSQL).")
        conninfo = _conninfo(str(listen.host), listen.port, files.CI_SUBJECT, ci_key)
        try:
            with trio.fail_after(SCENARIO_DEADLINE):
                session_id = await self._scenario(conninfo, reviewer_key, clinic)
        except trio.TooSlowError:
            raise DemoError(f"the scripted extract did not finish within {SCENARIO_DEADLINE:.0f}s") from None

        # the record
        await self._wait_until_written()
        self.observer.listening = False
        say.heading("What the audit trail kept of that session (masked rows, decisions, the approval):")
        await self._bastion_command("sessions", "replay", "-c", str(state.config), session_id)
        if not self.options.keep:
            await self._stop_gateway("demo finished")  # so the check below covers the sealed trail
        say.heading("Is the trail intact? Every record is hash-chained and each segment signed:")
        verified = await self._bastion_command("audit", "verify", "-c", str(state.config))
        if verified != 0:
            raise DemoError("bastion audit verify found problems in the audit trail (see above)")
        if self.options.keep:
            self._print_try_it(state, listen, admin, ci_key, reviewer_key, session_id)
            self.serving_by_hand = True
            await trio.sleep_forever()
        say.heading("Done. Run `bastion demo --keep` to try it by hand, and read the files it writes with --state-dir DIR.")
        return 0

    async def _start_gateway(self, nursery: trio.Nursery, config: Path) -> None:
        from bastion.core.loading import load
        from bastion.core.server import Gateway

        loaded = await trio.to_thread.run_sync(lambda: load(config, extra_plugins=[self.observer]))
        self.gateway = Gateway(loaded.config, loaded.hooks, policy=loaded.policy)

        async def serve(task_status=trio.TASK_STATUS_IGNORED) -> None:
            try:
                await self.gateway.run(task_status=task_status)
            finally:
                self.gateway_done.set()

        await nursery.start(serve)

    async def _stop_gateway(self, reason: str) -> None:
        if self.gateway is None or self.gateway_done.is_set():
            return
        self.gateway.shutdown(reason)
        with trio.move_on_after(GATEWAY_STOP_DEADLINE):
            await self.gateway_done.wait()

    def _clean_up(self) -> None:
        """Blocking: stop PostgreSQL, remove the temporary directories (not a --state-dir)."""
        removed = []
        if self.cluster is not None:
            pgcluster.stop(self.cluster)
            removed.append(str(self.cluster.base_dir))
        temporary_state = self.state_dir is not None and self.requested_state_dir is None
        if temporary_state:
            shutil.rmtree(self.state_dir, ignore_errors=True)
            removed.append(str(self.state_dir))
        if self.cluster is not None:
            kept = f"; Bastion's state is kept in {self.state_dir}" if self.state_dir is not None and not temporary_state else ""
            self.say.line(f"* Cleaned up: PostgreSQL stopped, removed {', '.join(removed)}{kept}.")

    # --- steps ------------------------------------------------------------------------------------

    async def _mint(self, state: files.StateFiles, subject: str, group: str, who: str) -> str:
        """``bastion tokens add``: the key is printed once, alone on the last line."""
        argv = ["tokens", "add", "-c", str(state.config), subject, "--groups", group, "--expires", "30d"]
        status, output = await trio.to_thread.run_sync(_run_cli_captured, argv)
        key = output.strip().splitlines()[-1] if output.strip() else ""
        if status != 0 or not key.startswith("bst_"):
            raise DemoError(f"bastion tokens add failed ({status}): {output.strip()}")
        self.say.detail(f"$ {self.bastion} tokens add -c {state.config} {subject} --groups {group} --expires 30d")
        self.say.detail(f"  -> an API key for {subject} ({who}; group {group}): {_abbreviated(key)}")
        return key

    async def _statement(self, client: ExtractClient, session_id: str, statement: str) -> tuple[Result, events.RequestJudged | None, events.ResponseCompleted | None]:
        mark = len(self.observer.events)
        result = await trio.to_thread.run_sync(client.run, statement, abandon_on_cancel=True)
        judged = self.observer.judged(session_id, mark)
        response = self.observer.response(session_id, judged.request_no) if judged is not None else None
        return result, judged, response

    async def _scenario(self, conninfo: str, reviewer_key: str, clinic: demo_data.Clinic) -> str:
        say = self.say
        client = await trio.to_thread.run_sync(ExtractClient, conninfo, abandon_on_cancel=True)
        try:
            session_id = self.observer.session_of(files.CI_SUBJECT)
            if session_id is None:
                raise DemoError("the gateway recorded no session for the extract's connection")
            say.detail(f"session {session_id}", indent="  ")

            # 1. a permitted query, masked
            say.heading(f"1. A permitted query: {PERMITTED_QUERY}")
            result, judged, response = await self._statement(client, session_id, PERMITTED_QUERY)
            say.detail(f"-> {verdict_line(judged)}")
            if result.refused:
                raise DemoError(f"the permitted query was refused: {result.error}")
            say.detail(table(result.columns, result.rows))
            if any(_raw_cells(result.rows, demo_data.raw_identifiers(clinic)).values()):
                raise DemoError("raw identifiers reached the client: masking is not working (see the policy bundles)")
            if response is not None and response.masked:
                say.detail("masked on the way out: " + ", ".join(f"{name} x{count}" for name, count in sorted(response.masked.items())))
            say.detail("SSNs, phones and cards keep their last four digits, e-mail addresses their domain; MRNs become")
            say.detail("keyed pseudonyms (equal values still join); a date of birth in a date column is replaced whole.")
            result, judged, _ = await self._statement(client, session_id, NOTES_QUERY)
            if not result.refused and result.rows:
                author, note = result.rows[0]
                say.detail(f"Free text is scanned too. {NOTES_QUERY} -> {verdict_line(judged)}")
                say.wrapped(f"{author}: {note}", indent=INDENT + "  ")

            # 2. a destructive statement
            say.heading(f"2. A destructive statement: {DELETE_STATEMENT}")
            result, judged, _ = await self._statement(client, session_id, DELETE_STATEMENT)
            say.detail(f"-> {verdict_line(judged)}")
            self._print_refusal(result)
            remaining = await trio.to_thread.run_sync(self._count_patients)
            say.detail(f"The statement never reached PostgreSQL: patients still holds {remaining} rows.")

            # 3. a bulk export, held for a reviewer
            say.heading(f"3. A bulk export of every patient: {EXPORT_QUERY}")
            rows = await self._held_export(client, session_id, reviewer_key)
            raw = _raw_cells(rows, demo_data.raw_identifiers(clinic))
            say.detail(f"Checked against the generated data: {raw['ssn']} raw SSNs and {raw['email']} raw e-mail addresses among them.")
            if any(raw.values()):
                raise DemoError("raw identifiers reached the client: masking is not working (see the policy bundles)")

            # 4. least privilege
            say.heading(f"4. A table the extract has no business reading: {BILLING_QUERY}")
            result, judged, _ = await self._statement(client, session_id, BILLING_QUERY)
            say.detail(f"-> {verdict_line(judged)}")
            self._print_refusal(result)
        finally:
            await trio.to_thread.run_sync(client.close, abandon_on_cancel=True)
        say.heading(f"The extract disconnected. Bastion recorded {len(self.observer.of(events.RequestJudged, session_id))} decisions for session {session_id}.")
        return session_id

    def _print_refusal(self, result: Result) -> None:
        if result.error_code != INSUFFICIENT_PRIVILEGE:
            raise DemoError(f"a statement the policy refuses was not refused by Bastion ({result.error_code or 'it ran'}: {result.error})")
        self.say.detail(f"psycopg raised SQLSTATE {result.error_code}:")
        self.say.wrapped(f"ERROR:  {result.error}", indent=INDENT + "  ")
        if result.detail:
            self.say.wrapped(f"DETAIL: {result.detail}", indent=INDENT + "  ")

    def _count_patients(self) -> int:
        assert self.cluster is not None
        conninfo = psycopg.conninfo.make_conninfo(self.cluster.dsn(), dbname=files.DATABASE, connect_timeout=CONNECT_TIMEOUT_SECONDS)
        with psycopg.connect(conninfo) as conn:
            return conn.execute("SELECT count(*) FROM patients").fetchone()[0]

    async def _held_export(self, client: ExtractClient, session_id: str, reviewer_key: str) -> tuple[tuple[Any, ...], ...]:
        say = self.say
        reviewer = Reviewer(f"http://{self.gateway.admin_address}", reviewer_key)
        outcome: dict[str, Any] = {}
        finished = trio.Event()
        mark = len(self.observer.events)

        async def export() -> None:
            try:
                outcome["result"] = await trio.to_thread.run_sync(client.run, EXPORT_QUERY, abandon_on_cancel=True)
            finally:
                finished.set()

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(export)
                request = await self._wait_for_held_request(reviewer, session_id, finished)
                if request is None:  # the export finished without being held
                    raise DemoError("the bulk export was not held for review")
                judged = self.observer.judged(session_id, mark)
                review_rules = ", ".join(r["rule"] for r in request["requirements"]) or ", ".join(request["rules"])
                say.detail(f"-> {verdict_line(judged)}")
                say.detail(f"-> HELD after {request.get('rows_sent') or files.BULK_EXPORT_ROWS} rows as approval request {request['id']} ({review_rules}); the client waits.")
                with trio.move_on_after(NOTICE_WAIT):
                    while not client.notices:
                        await trio.sleep(APPROVAL_POLL_INTERVAL)
                if client.notices:
                    say.detail("The client was told (a PostgreSQL NOTICE):")
                    say.wrapped(client.notices[0], indent=INDENT + "  ")
                say.detail(f"{files.REVIEWER_SUBJECT} (group {files.REVIEWER_GROUP}) looks at it and approves it through the HTTP API:")
                say.detail(f"POST http://{self.gateway.admin_address}/approvals/{request['id']}/approve", indent=INDENT + "  ")
                say.detail(f'   Authorization: Bearer <her key>   {{"comment": "{APPROVAL_COMMENT}"}}', indent=INDENT + "  ")
                status, view = await trio.to_thread.run_sync(reviewer.approve, request["id"], APPROVAL_COMMENT, abandon_on_cancel=True)
                if status != 200:
                    raise DemoError(f"the approvals API answered {status}: {view}")
                say.detail(f"  -> HTTP {status}: {view['state']} by {', '.join(v['reviewer']['subject'] for v in view['votes'])}", indent=INDENT)
                await finished.wait()
        finally:
            await trio.to_thread.run_sync(reviewer.close)
        result: Result = outcome["result"]
        if result.refused:
            raise DemoError(f"the approved export failed: {result.error}")
        approved = [e for e in self.observer.of(events.ApprovalEvent, session_id) if e.step == "approved"]
        say.detail(f"-> The export completed: {len(result.rows)} rows, masked like the rows above. The trail records the approval by {approved[-1].actor if approved else '?'}.")
        return result.rows

    async def _wait_for_held_request(self, reviewer: Reviewer, session_id: str, finished: trio.Event) -> dict[str, Any] | None:
        while not finished.is_set():
            pending = await trio.to_thread.run_sync(reviewer.pending, abandon_on_cancel=True)
            mine = [r for r in pending if r["session_id"] == session_id]
            if mine:
                return mine[0]
            await trio.sleep(APPROVAL_POLL_INTERVAL)
        return None

    async def _wait_until_written(self) -> None:
        """Until every event recorded so far is in the log on disk (replay reads the log)."""
        with trio.move_on_after(RECORD_DEADLINE):
            while True:
                statistics = self.gateway.runtime.trail.statistics()
                if statistics.records + statistics.dropped >= len(self.observer.events):
                    return
                await trio.sleep(RECORD_POLL_INTERVAL)
        raise DemoError(f"the audit trail did not write the session's records within {RECORD_DEADLINE:.0f}s")

    async def _bastion_command(self, *argv: str) -> int:
        """Run a ``bastion`` sub-command in this process (same code as the command line) and show
        what it printed."""
        self.say.detail(f"$ {self.bastion} {shlex.join(argv)}", indent="  ")
        status, output = await trio.to_thread.run_sync(_run_cli_captured, list(argv))
        self.say.detail(output.rstrip("\n"), indent="")
        return status

    def _print_try_it(self, state: files.StateFiles, listen: Any, admin: Any, ci_key: str, reviewer_key: str, session_id: str) -> None:
        say = self.say
        config = shlex.quote(str(state.config))
        psql = shutil.which("psql") or str(self.bin_dir / "psql")
        say.heading("Everything is still running. Try it yourself in another terminal; Ctrl-C here stops it all.")
        say.line()
        say.line("  As the CI job (its key is the password; the user name is only recorded):")
        say.line(f"    PGPASSWORD={ci_key} {psql} \"host={listen.host} port={listen.port} dbname={files.DATABASE} user={files.CI_SUBJECT} sslmode=disable\"")
        say.line("      select ssn, email, notes.note from patients join notes on notes.patient_id = patients.id limit 5;")
        say.line("      delete from patients where id = 1;     select * from billing;")
        say.line(f"      select * from patients;                -- more than {files.BULK_EXPORT_ROWS} rows: held until a privacy officer approves")
        say.line()
        say.line(f"  As the reviewer ({files.REVIEWER_SUBJECT}, group {files.REVIEWER_GROUP}):")
        say.line(f"    export BASTION_TOKEN={reviewer_key}")
        say.line(f"    {self.bastion} approvals list -c {config}")
        say.line(f"    {self.bastion} approvals approve <ID> -c {config} --comment \"why\"")
        say.line(f"    curl -H \"Authorization: Bearer $BASTION_TOKEN\" http://{admin}/approvals")
        say.line()
        say.line("  The evidence:")
        say.line(f"    {self.bastion} sessions list -c {config}")
        say.line(f"    {self.bastion} sessions replay -c {config} {session_id}")
        say.line(f"    {self.bastion} audit verify -c {config}")
        say.line()
        say.line(f"  The policy in force: {state.bundle} and {files.BASELINE_BUNDLE}")


def _raw_cells(rows: Sequence[Sequence[Any]], raw: dict[str, frozenset[str]]) -> dict[str, int]:
    """How many cells of ``rows`` hold a raw identifier of the generated clinic, by kind."""
    return {kind: sum(1 for row in rows for cell in row if isinstance(cell, str) and cell in values) for kind, values in raw.items()}


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    return [leaf for exc in group.exceptions for leaf in (_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])]


def _describe(exc: BaseException) -> str:
    if isinstance(exc, (DemoError, pgcluster.ClusterError, GatewayError)):
        return str(exc)
    if isinstance(exc, ConfigError):
        return f"the demo's configuration does not load:\n{exc}"
    return f"the database client failed: {exc}"


def _conninfo(host: str, port: int, user: str, key: str) -> str:
    return psycopg.conninfo.make_conninfo(host=host, port=port, dbname=files.DATABASE, user=user, password=key, sslmode="disable", application_name="nightly-extract")


def _abbreviated(key: str) -> str:
    """Enough of a key to tell it apart on screen (its id), not enough to use it."""
    return key[: len("bst_") + 12] + "_..." if key.startswith("bst_") else "..."


def _run_cli_captured(argv: list[str]) -> tuple[int, str]:
    """``bastion <argv>`` in this process, its standard output captured. Only one runs at a time
    and nothing else of the demo writes to ``sys.stdout`` (the printer keeps its own stream)."""
    from bastion.core import cli

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        status = cli.main(argv)
    return status, buffer.getvalue()

