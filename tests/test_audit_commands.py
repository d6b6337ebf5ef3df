"""``bastion sessions …`` and ``bastion audit …`` through the real command line."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import msgpack
import pytest
import trio

from bastion.core import auditlog, cli, events
from bastion.core.audit import AuditTrail
from bastion.core.config import AuditSection
from bastion.plugins import audit_commands
from bastion.policies.model import Identity

TEST_DEADLINE = 30


def write_config(directory: Path, extra: str = "") -> Path:
    path = directory / "bastion.toml"
    path.write_text(
        f"""
[gateway]
state_dir = "state"
admin_listen = "127.0.0.1:0"

[[targets]]
name = "clinic"
protocol = "tcp"
listen = "127.0.0.1:0"
upstream = "127.0.0.1:5432"
{extra}
"""
    )
    return path


def a_session(session: str, subject: str, *, at: float, denied: bool = False) -> list[events.AuditEvent]:
    identity = Identity(provider="static-token", subject=subject, auth_method="api-key")
    out: list[events.AuditEvent] = [
        events.ConnectionOpened(session_id=session, at=at, target="clinic", protocol="postgres", client="127.0.0.1:40000", listen="127.0.0.1:6432"),
        events.SessionStarted(session_id=session, at=at + 0.001, target="clinic", protocol="postgres", client="127.0.0.1:40000", tls=True, identity=identity, database="clinic"),
        events.RequestJudged(
            session_id=session, at=at + 0.010, request_no=1, identity=subject, target="clinic", kind="statement",
            statements=("SELECT id, name FROM patients WHERE id = $1",), actions=("select",), parameters=("***",), verdict="allow", rules=("read-patients",),
        ),
        events.ResultRows(session_id=session, at=at + 0.020, request_no=1, first_row=0, rows=(("1", "J*** D**"), ("2", None))),
        events.ResponseCompleted(session_id=session, at=at + 0.021, request_no=1, status="ok", columns=("id", "name"), rows=2, command_tag="SELECT 2", masked={"name": 1}, duration_ms=1.5),
    ]
    if denied:
        out.append(
            events.RequestJudged(
                session_id=session, at=at + 0.030, request_no=2, identity=subject, target="clinic", kind="statement",
                statements=("DELETE FROM patients",), actions=("delete",), verdict="deny", rules=("no-writes",), reasons=("writes are not allowed",),
            )
        )
    out.append(events.SessionEnded(session_id=session, at=at + 1.5, reason="client disconnected", requests=2 if denied else 1))
    return out


def record_sessions(state: Path, sessions: list[list[events.AuditEvent]], *, segment_max_bytes: int = 2048, keep_open: bool = False, age: float = 0.0):
    """Record the sessions with a trail whose clock runs ``age`` seconds behind."""

    async def run() -> AuditTrail:
        with trio.fail_after(TEST_DEADLINE):
            trail = AuditTrail(AuditSection(segment_max_bytes=segment_max_bytes), state, clock=lambda: time.time() - age)
            async with trio.open_nursery() as nursery:
                await nursery.start(trail.run)
                for session in sessions:
                    for event in session:
                        await trail.record(event, durable=True)
                if not keep_open:
                    await trail.aclose()
                    return trail
                await trio.sleep_forever()
        return trail

    return trio.run(run)


def bastion(*argv: str) -> int:
    return cli.main(list(argv))


@pytest.fixture
def recorded(tmp_path: Path) -> Path:
    config = write_config(tmp_path)
    now = time.time()
    record_sessions(tmp_path / "state", [a_session("sess-alpha-1", "ci-deploy", at=now - 7200)], age=7200)
    record_sessions(tmp_path / "state", [a_session("sess-beta-2", "nightly-etl", at=now - 60, denied=True)], age=60)
    return config


def test_sessions_list_filters_and_prints_json(recorded: Path, capsys) -> None:
    assert bastion("sessions", "list", "-c", str(recorded)) == 0
    table = capsys.readouterr().out
    assert "sess-alpha-1" in table and "sess-beta-2" in table and "2 sessions" in table
    assert table.index("sess-beta-2") < table.index("sess-alpha-1")  # newest first

    assert bastion("sessions", "list", "-c", str(recorded), "--json", "--identity", "nightly-etl") == 0
    (only,) = json.loads(capsys.readouterr().out)
    assert (only["session_id"], only["requests"], only["denied"], only["rows"], only["end_reason"]) == ("sess-beta-2", 2, 1, 2, "client disconnected")

    assert bastion("sessions", "list", "-c", str(recorded), "--json", "--since", "1h") == 0
    assert [s["session_id"] for s in json.loads(capsys.readouterr().out)] == ["sess-beta-2"]
    assert bastion("sessions", "list", "-c", str(recorded), "--json", "--target", "elsewhere") == 0
    assert json.loads(capsys.readouterr().out) == []
    assert bastion("sessions", "list", "-c", str(recorded), "--since", "last tuesday") == 1
    assert "not a date/time" in capsys.readouterr().err


def test_sessions_show_takes_a_prefix_and_lists_events(recorded: Path, capsys) -> None:
    assert bastion("sessions", "show", "-c", str(recorded), "sess-beta") == 0
    text = capsys.readouterr().out
    assert "nightly-etl" in text and "#2 deny: DELETE FROM patients" in text and "session-ended" in text
    assert bastion("sessions", "show", "-c", str(recorded), "sess-beta-2", "--json") == 0
    shown = json.loads(capsys.readouterr().out)
    assert [e["type"] for e in shown["events"]] == ["connection-opened", "session-started", "request", "rows", "response", "request", "session-ended"]
    assert bastion("sessions", "show", "-c", str(recorded), "sess-") == 1
    assert "more than one" in capsys.readouterr().err
    assert bastion("sessions", "show", "-c", str(recorded), "nope") == 1
    assert "no recorded session" in capsys.readouterr().err


def test_sessions_replay_shows_what_the_caller_saw(recorded: Path, capsys) -> None:
    assert bastion("sessions", "replay", "-c", str(recorded), "sess-beta-2") == 0
    text = capsys.readouterr().out
    expected_table = "\n".join(
        [
            "     id |   name",
            "    ----+----------",
            "     1  | J*** D**",
            "     2  |",
            "    (2 rows)",
        ]
    )
    assert expected_table in text
    assert "#1 statement: ALLOW (read-patients)" in text
    assert "    SELECT id, name FROM patients WHERE id = $1" in text and "parameters: ***" in text
    assert "#1 -> ok; SELECT 2; masked name=1 (1.5 ms)" in text
    assert "#2 statement: DENY (writes are not allowed)" in text
    assert "[+   1.500s] session ended: client disconnected" in text
    # the transcript is ordered in time
    assert text.index("authenticated as nightly-etl") < text.index("#1 statement") < text.index("#2 statement") < text.index("session ended")


def test_psql_table_says_when_only_some_rows_were_recorded() -> None:
    table = audit_commands.psql_table(["n"], [["1"], ["2"]], 10)
    assert table.splitlines() == [" n", "---", " 1", " 2", "(10 rows; the first 2 recorded)"]


def test_verify_passes_then_fails_on_tampering(recorded: Path, capsys) -> None:
    assert bastion("audit", "verify", "-c", str(recorded)) == 0
    out = capsys.readouterr().out
    assert "OK:" in out and "trusted keys:" in out
    segment = auditlog.segment_path(recorded.parent / "state" / "audit", "main", 1)
    data = bytearray(segment.read_bytes())
    data[-5] ^= 0x20
    segment.write_bytes(bytes(data))
    assert bastion("audit", "verify", "-c", str(recorded)) == 1
    assert "PROBLEM [damaged-record]" in capsys.readouterr().out
    assert bastion("audit", "verify", "-c", str(recorded), "--json") == 1
    report = json.loads(capsys.readouterr().out)
    assert not report["ok"] and report["problems"][0]["segment"] == 1 and report["trust_anchor"]


def test_verify_with_a_configured_key_refuses_a_log_signed_by_another(tmp_path: Path, capsys, monkeypatch) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    record_sessions(tmp_path / "state", [a_session("s", "ci", at=time.time())])  # signed with a generated key
    monkeypatch.setenv("BASTION_TEST_AUDIT_KEY", Ed25519PrivateKey.generate().private_bytes_raw().hex())
    config = write_config(tmp_path, '[audit]\nsigning_key = { env = "BASTION_TEST_AUDIT_KEY" }\n')
    assert bastion("audit", "verify", "-c", str(config)) == 1
    assert "untrusted-key" in capsys.readouterr().out
    # the operator names the old key explicitly: trusted again
    old_public = tmp_path / "old.pem"
    key, _ = audit_commands.key_from_directory(tmp_path / "state" / "audit")
    old_public.write_text(auditlog.public_key_pem(auditlog.public_key_bytes(key)))
    assert bastion("audit", "verify", "-c", str(config), "--public-key", str(old_public)) == 0


def test_verify_without_any_key_warns_that_nothing_anchors_trust(tmp_path: Path, capsys) -> None:
    config = write_config(tmp_path)
    record_sessions(tmp_path / "state", [a_session("s", "ci", at=time.time())])
    (tmp_path / "state" / "audit" / auditlog.SIGNING_KEY_FILE).unlink()
    assert bastion("audit", "verify", "-c", str(config)) == 0
    assert "warning:" in capsys.readouterr().out


def test_export_jsonl_with_a_progress_bar_and_msgpack_that_re_verifies(recorded: Path, tmp_path: Path, capsys) -> None:
    output = tmp_path / "trail.jsonl"
    assert bastion("audit", "export", "-c", str(recorded), "--format", "jsonl", "-o", str(output), "--progress") == 0
    err = capsys.readouterr().err
    assert "exporting [" in err and "100%" in err and "exported 13 records" in err
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    assert [line["seq"] for line in lines] == list(range(1, 14))
    assert {line["event"]["session_id"] for line in lines} == {"sess-alpha-1", "sess-beta-2"}

    assert bastion("audit", "export", "-c", str(recorded), "--format", "msgpack", "--since", "1h", "-o", str(tmp_path / "recent.msgpack")) == 0
    capsys.readouterr()
    unpacker = msgpack.Unpacker(io.BytesIO((tmp_path / "recent.msgpack").read_bytes()), raw=False)
    exported = [auditlog.record_from_body(item["body"]) for item in unpacker]
    assert {r.session_id for r in exported} == {"sess-beta-2"}  # --since keeps only the recent session
    # an auditor can re-check the chain from the export alone
    assert all(b.prev_hash == a.hash for a, b in zip(exported, exported[1:]))
    entries = auditlog.read_retention(recorded.parent / "state" / "audit")
    assert [e.kind for e in entries] == ["export", "export"] and entries[0].records == 13


def test_prune_removes_only_exported_sealed_old_segments_and_verify_still_passes(tmp_path: Path, capsys) -> None:
    config = write_config(tmp_path)
    state = tmp_path / "state"
    now = time.time()
    record_sessions(state, [a_session(f"old-{n}", "ci", at=now - 3600) for n in range(3)], segment_max_bytes=1024, age=3600)
    audit_dir = state / "audit"
    segments_before = auditlog.segment_numbers(audit_dir, "main")[0]
    assert len(segments_before) > 3

    assert bastion("audit", "prune", "-c", str(config), "--older-than", "0s") == 0
    out = capsys.readouterr().out
    assert "removed 0 segments" in out and "not exported" in out
    assert auditlog.segment_numbers(audit_dir, "main")[0] == segments_before

    assert bastion("audit", "export", "-c", str(config), "-o", str(tmp_path / "all.jsonl")) == 0
    assert bastion("audit", "prune", "-c", str(config), "--older-than", "6y") == 0
    assert "removed 0 segments" in capsys.readouterr().out  # exported, but not old enough
    assert bastion("audit", "prune", "-c", str(config), "--older-than", "0s", "--dry-run") == 0
    assert "would remove" in capsys.readouterr().out
    assert auditlog.segment_numbers(audit_dir, "main")[0] == segments_before

    # the gateway runs again: its open segment (and anything recorded after the export) stays
    async def reopen_and_prune() -> None:
        with trio.fail_after(TEST_DEADLINE):
            trail = AuditTrail(AuditSection(segment_max_bytes=1024), state)
            async with trio.open_nursery() as nursery:
                await nursery.start(trail.run)
                await trail.record(a_session("new", "ci", at=time.time())[0], durable=True)
                assert await trio.to_thread.run_sync(bastion, "audit", "prune", "-c", str(config), "--older-than", "0s") == 0
                assert auditlog.segment_path(audit_dir, "main", trail.statistics().segment).exists()
                await trail.aclose()

    trio.run(reopen_and_prune)
    out = capsys.readouterr().out
    assert f"removed {len(segments_before)} segments" in out and "open (not sealed)" in out
    remaining = auditlog.segment_numbers(audit_dir, "main")[0]
    assert remaining and min(remaining) > max(segments_before)
    # manifests of pruned segments stay: the chain still verifies across them
    assert bastion("audit", "verify", "-c", str(config)) == 0
    out = capsys.readouterr().out
    assert "OK:" in out and "pruned" in out


def test_a_segment_deleted_by_hand_is_not_mistaken_for_a_pruned_one(recorded: Path, capsys) -> None:
    auditlog.segment_path(recorded.parent / "state" / "audit", "main", 2).unlink()
    assert bastion("audit", "verify", "-c", str(recorded)) == 1
    assert "PROBLEM [missing-segment]" in capsys.readouterr().out


def test_commands_without_a_key_say_why(tmp_path: Path, capsys) -> None:
    config = write_config(tmp_path)
    assert bastion("audit", "export", "-c", str(config), "-o", str(tmp_path / "x.jsonl")) == 1
    assert "has the gateway run?" in capsys.readouterr().err
    assert bastion("audit", "public-key", "-c", str(config)) == 1


def test_public_key_prints_a_pem_verify_accepts(recorded: Path, tmp_path: Path, capsys) -> None:
    assert bastion("audit", "public-key", "-c", str(recorded)) == 0
    pem = capsys.readouterr().out
    assert pem.startswith("-----BEGIN PUBLIC KEY-----")
    assert auditlog.load_public_key(pem) == auditlog.public_key_bytes(audit_commands.key_from_directory(recorded.parent / "state" / "audit")[0])


def test_the_index_follows_the_sqlite_sink_path(tmp_path: Path, capsys) -> None:
    config = write_config(tmp_path, '[[audit.sinks]]\nkind = "sqlite"\npath = "elsewhere/index.db"\n')
    record_sessions(tmp_path / "state", [a_session("s-1", "ci", at=time.time())])
    assert bastion("sessions", "list", "-c", str(config), "--json") == 0
    assert [s["session_id"] for s in json.loads(capsys.readouterr().out)] == ["s-1"]
    assert (tmp_path / "elsewhere" / "index.db").exists()


@pytest.mark.parametrize("text", ["2026-01-31", "2026-01-31T08:00:00Z", "2026-01-31T09:00:00+01:00"])
def test_times_are_utc_unless_an_offset_is_given(text: str) -> None:
    expected = 1769817600.0 + (0 if text == "2026-01-31" else 8 * 3600)
    assert audit_commands.parse_when(text) == expected


def test_ages_count_back_from_now() -> None:
    assert audit_commands.parse_when("2d", now=1_000_000.0) == 1_000_000.0 - 2 * 86400
