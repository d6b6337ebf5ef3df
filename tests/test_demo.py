"""``bastion demo``: a newcomer's first run, checked by its outcomes.

The end-to-end tests run the real command as a subprocess, with TMPDIR pointed at a directory of
their own, and then look at what it left behind: what it printed (masked values, refusals with
SQLSTATE 42501), what the audit trail says (the reviewer's approval, the denied billing query),
whether a single raw SSN or e-mail address of the generated clinic escaped into the output or the
state directory, and that nothing is left running or lying around afterwards. The synthetic data
is regenerated here from the same seed, so the tests know every raw value to look for.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from bastion.core import demo, demo_config, demo_data, pgcluster
from bastion.policies.recognizers import compile_scanner, luhn_valid, ssn_valid
from tests.servers import missing

ROOT = Path(__file__).resolve().parent.parent
# The demo takes a few seconds; these bound a hung run so the test fails instead of hanging.
DEMO_DEADLINE = 180.0
STOP_DEADLINE = 60.0
PORT_PROBE_TIMEOUT = 1.0
CLINIC = demo_data.generate()
RAW = demo_data.raw_identifiers(CLINIC)
SSN_SHAPE = re.compile(r"\d{3}-\d{2}-\d{4}")
EMAIL_SHAPE = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")
CARD_SHAPE = re.compile(r"\d{4} \d{4} \d{4} \d{4}")


# --- the synthetic clinic --------------------------------------------------------------------------


def test_the_same_seed_gives_the_same_clinic_and_another_seed_another() -> None:
    assert demo_data.generate() == CLINIC
    assert demo_data.generate(seed=demo_data.DEFAULT_SEED + 1).patients[:10] != CLINIC.patients[:10]
    counts = CLINIC.counts()
    assert counts["patients"] == demo_data.DEFAULT_PATIENTS > demo_config.BULK_EXPORT_ROWS  # an export trips the review
    assert counts["visits"] and counts["notes"] and counts["billing"]


def test_every_identifier_is_valid_the_way_the_recognizers_check_it() -> None:
    scanner = compile_scanner(["ssn", "email", "phone", "card", "dob"], scoped=True)
    for patient in CLINIC.patients:
        digits = patient.ssn.replace("-", "")
        assert ssn_valid(digits) and patient.ssn[:3] not in ("000", "666") and not patient.ssn.startswith("9"), patient.ssn
        assert luhn_valid(patient.card_number.replace(" ", "")), patient.card_number
        for value, kind in ((patient.ssn, "ssn"), (patient.email, "email"), (patient.phone, "phone"), (patient.card_number, "card"), (patient.date_of_birth.isoformat(), "dob")):
            spans = scanner.find(value.encode())
            assert [(s.start, s.end) for s in spans] == [(0, len(value))] and kind in spans[0].recognizers, (kind, value)
    assert len(RAW["email"]) == len(CLINIC.patients)  # one address per patient


def test_the_phi_in_clinical_notes_is_found_by_the_free_text_recognizers() -> None:
    """The baseline masks notes with the ssn, email, phone and dob recognizers (free text): every
    identifier a note holds must be inside a span they find, or the demo would leak it."""
    scanner = compile_scanner(["ssn", "email", "phone", "dob"], scoped=False)
    patients = {p.id: p for p in CLINIC.patients}
    for note in CLINIC.notes:
        text = note.note.encode()
        spans = scanner.find(text)
        patient = patients[note.patient_id]
        for value in (patient.ssn, patient.email, patient.phone, patient.date_of_birth.isoformat()):
            start = text.find(value.encode())
            if start >= 0:
                assert any(s.start <= start and start + len(value) <= s.end for s in spans), (value, note.note)


# --- finding PostgreSQL ------------------------------------------------------------------------------


def _fake_programs(directory: Path, names=pgcluster.REQUIRED_PROGRAMS) -> Path:
    directory.mkdir(parents=True)
    for name in names:
        path = directory / name
        path.write_text("#!/bin/sh\nexit 0\n")
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return directory


def test_the_newest_debian_version_is_preferred_by_number_not_by_text(tmp_path: Path) -> None:
    for version in ("9.6", "16", "13"):
        _fake_programs(tmp_path / version / "bin")
    assert pgcluster.candidate_bin_dirs(tmp_path, path="")[:3] == [tmp_path / v / "bin" for v in ("16", "13", "9.6")]
    assert pgcluster.find_bin_dir(candidates=pgcluster.candidate_bin_dirs(tmp_path, path="")) == tmp_path / "16" / "bin"


def test_missing_programs_say_how_to_install_them(tmp_path: Path) -> None:
    incomplete = _fake_programs(tmp_path / "15" / "bin", names=("initdb", "pg_ctl"))  # no postgres
    with pytest.raises(pgcluster.ProgramsMissing, match=r"apt-get install postgresql"):
        pgcluster.find_bin_dir(candidates=[incomplete])
    with pytest.raises(pgcluster.ProgramsMissing, match=r"missing: postgres"):
        pgcluster.find_bin_dir(incomplete)


def test_the_demo_without_postgresql_exits_1_with_the_install_hint(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(pgcluster, "DEBIAN_ROOT", tmp_path / "none")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    assert demo.run(demo.DemoOptions()) == 1
    assert "apt-get install postgresql" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing created on the way out


def test_a_state_dir_that_holds_something_is_refused_before_anything_starts(tmp_path: Path, capsys) -> None:
    (tmp_path / "precious.txt").write_text("mine")
    assert demo.run(demo.DemoOptions(state_dir=tmp_path)) == 1
    assert "not an empty directory" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["precious.txt"]


def test_a_clinic_too_small_for_the_export_review_is_refused() -> None:
    with pytest.raises(ValueError, match="more than 1000 patients"):
        demo.DemoOptions(patients=demo_config.BULK_EXPORT_ROWS)


def test_the_command_is_registered() -> None:
    result = subprocess.run([sys.executable, "-m", "bastion.core.cli", "demo", "--help"], capture_output=True, text=True, cwd=ROOT, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert "--keep" in result.stdout and "--state-dir" in result.stdout


# --- end to end ---------------------------------------------------------------------------------------


@pytest.fixture
def pg_programs() -> Path:
    try:
        return pgcluster.find_bin_dir()
    except pgcluster.ProgramsMissing:
        missing("PostgreSQL (initdb, pg_ctl, postgres)")


@pytest.fixture
def demo_tmp() -> Iterator[Path]:
    """The demo's TMPDIR: outside pytest's private tree, since PostgreSQL runs as another user
    when the tests run as root and must reach its directory. Empty afterwards, or the test fails."""
    directory = Path(tempfile.mkdtemp(prefix="bastion-demo-test-", dir="/tmp"))
    directory.chmod(0o755)
    try:
        yield directory
    finally:
        subprocess.run(["rm", "-rf", str(directory)], check=False)


def demo_environment(tmp: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != "BASTION_CONFIG"}
    env.update(TMPDIR=str(tmp), PYTHONUNBUFFERED="1")
    return env


def demo_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "bastion.core.cli", "demo", *args]


def printed(pattern: str, text: str) -> re.Match[str]:
    match = re.search(pattern, text, re.MULTILINE)
    assert match, f"{pattern!r} not in the output:\n{text}"
    return match


def step(number: int, text: str) -> str:
    """The printed block of step ``number`` ("2. A destructive statement ..." up to the next)."""
    match = re.search(rf"^{number}\. .*?(?=^\d\. |^The extract disconnected)", text, re.MULTILINE | re.DOTALL)
    assert match, f"step {number} is not in the output:\n{text}"
    return match[0]


def leaked(text: str) -> dict[str, set[str]]:
    """Raw identifiers of the generated clinic that appear in ``text``."""
    return {
        "ssn": set(SSN_SHAPE.findall(text)) & RAW["ssn"],
        "email": set(EMAIL_SHAPE.findall(text)) & RAW["email"],
        "card": set(CARD_SHAPE.findall(text)) & RAW["card"],
    }


NOTHING_LEAKED = {"ssn": set(), "email": set(), "card": set()}


def test_the_leak_check_finds_raw_values_and_passes_masked_ones() -> None:
    patient = CLINIC.patients[42]
    raw_text = f"row: {patient.ssn} | {patient.email} | {patient.card_number}"
    assert leaked(raw_text) == {"ssn": {patient.ssn}, "email": {patient.email}, "card": {patient.card_number}}
    masked_text = f"row: ***-**-{patient.ssn[-4:]} | ****@{patient.email.split('@')[1]} | **** **** **** {patient.card_number[-4:]}"
    assert leaked(masked_text) == NOTHING_LEAKED


def assert_port_closed(port: int) -> None:
    with socket.socket() as sock:
        sock.settimeout(PORT_PROBE_TIMEOUT)
        assert sock.connect_ex(("127.0.0.1", port)) != 0, f"something still listens on port {port}"


def processes_mentioning(text: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in command:
            found.append(f"{entry.name}: {command}")
    return found


def assert_nothing_left(output: str, tmp: Path) -> None:
    cluster_dir = printed(r"a throwaway cluster in (\S+?)\)\.", output)[1]
    pg_port = int(printed(r"PostgreSQL [\d.]* is running on 127\.0\.0\.1:(\d+)", output)[1])
    gateway_port = int(printed(r"clinic-db on 127\.0\.0\.1:(\d+)", output)[1])
    admin_port = int(printed(r"approvals API on http://127\.0\.0\.1:(\d+)", output)[1])
    assert processes_mentioning(cluster_dir) == []
    for port in (pg_port, gateway_port, admin_port):
        assert_port_closed(port)
    assert not Path(cluster_dir).exists()
    assert list(tmp.iterdir()) == []  # every temporary directory the demo made is gone


def trail_records(config: Path, tmp: Path) -> list[dict]:
    """Every audit record, decompressed, through ``bastion audit export``."""
    export = tmp.parent / f"{tmp.name}-export.jsonl"
    try:
        result = subprocess.run([sys.executable, "-m", "bastion.core.cli", "audit", "export", "-c", str(config), "-o", str(export)], capture_output=True, text=True, cwd=ROOT, timeout=60, check=False)
        assert result.returncode == 0, result.stderr
        text = export.read_text()
    finally:
        export.unlink(missing_ok=True)
    assert leaked(text) == NOTHING_LEAKED
    return [json.loads(line) for line in text.splitlines()]


def event(record: dict) -> dict:
    """An exported record's event, with the record's type."""
    return {**record["event"], "type": record["type"]}


@pytest.mark.postgres
@pytest.mark.timeout(300)
def test_the_demo_runs_a_masked_blocked_approved_and_denied_extract_and_cleans_up(pg_programs: Path, demo_tmp: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    result = subprocess.run(demo_command("--state-dir", str(state)), capture_output=True, text=True, env=demo_environment(demo_tmp), cwd=ROOT, timeout=DEMO_DEADLINE, check=False)
    output = result.stdout
    assert result.returncode == 0, f"{output}\n{result.stderr}"

    # (a) the permitted query: rows printed, SSNs and e-mail addresses masked
    first = step(1, output)
    assert "ALLOW by clinic-demo:grant:nightly-extract" in first
    for patient in CLINIC.patients[: demo.SHOWN_ROWS]:
        assert f"***-**-{patient.ssn[-4:]}" in first
        assert f"****@{patient.email.split('@')[1]}" in first
        assert patient.last_name in first  # the rows really are the clinic's first patients
    assert "[REDACTED]" in first  # the clinical note's free text
    # (b) DELETE refused by the guardrail with SQLSTATE 42501, and the table untouched
    second = step(2, output)
    assert "SQLSTATE 42501" in second and "hipaa-baseline:guardrail:no-destructive-writes" in second
    assert f"patients still holds {len(CLINIC.patients)} rows" in second
    # (c) the export held, approved through the API by the reviewer, then complete
    third = step(3, output)
    assert re.search(r"HELD after 1000 rows as approval request apr-[0-9a-f]{12}", third), third
    assert "HTTP 200: approved by reviewer:dana" in third
    assert f"The export completed: {len(CLINIC.patients)} rows" in third
    # (d) billing denied by least privilege
    fourth = step(4, output)
    assert "DENY by default-deny" in fourth and "SQLSTATE 42501" in fourth and "public.billing" in fourth
    # the replay and the verification were printed
    assert "sessions replay" in output and re.search(r"^Session [0-9a-f]+: ci:nightly-extract -> clinic-db", output, re.MULTILINE)
    assert re.search(r"^OK: \d+ records checked, 0 problems", output, re.MULTILINE)

    # no raw identifier anywhere: the terminal, and every file of the state directory
    assert leaked(output) == NOTHING_LEAKED
    assert leaked(result.stderr) == NOTHING_LEAKED
    for path in state.rglob("*"):
        if path.is_file():
            assert leaked(path.read_bytes().decode("latin-1")) == (NOTHING_LEAKED), path

    # the trail: what the newcomer was told is what was recorded
    config = state / demo_config.CONFIG_FILE
    records = [event(r) for r in trail_records(config, demo_tmp)]
    requests = [r for r in records if r.get("type") == "request"]
    delete = next(r for r in requests if r["statements"][0].upper().startswith("DELETE"))
    assert delete["verdict"] == "deny" and "hipaa-baseline:guardrail:no-destructive-writes" in delete["rules"]
    billing = next(r for r in requests if "billing" in r["statements"][0])
    assert billing["verdict"] == "deny" and "default-deny" in billing["rules"]
    approvals = [r for r in records if r.get("type") == "approval"]
    assert any(a["step"] == "approved" and "reviewer:dana" in a["actor"] for a in approvals), approvals
    assert any(a["step"] == "approval" and "reviewer:dana" in a["actor"] and a["comment"] == demo.APPROVAL_COMMENT for a in approvals), approvals
    export_no = next(a["request_no"] for a in approvals)
    export_response = next(r for r in records if r.get("type") == "response" and r["request_no"] == export_no and r.get("session_id") == approvals[0]["session_id"])
    assert export_response["status"] == "ok" and export_response["rows"] == len(CLINIC.patients)
    verify = subprocess.run([sys.executable, "-m", "bastion.core.cli", "audit", "verify", "-c", str(config)], capture_output=True, text=True, cwd=ROOT, timeout=60, check=False)
    assert verify.returncode == 0 and "0 problems" in verify.stdout, verify.stdout + verify.stderr

    # nothing left running, no temporary directory left; the named state directory is kept
    assert_nothing_left(output, demo_tmp)
    assert config.exists()


class LineReader:
    """Lines of a child's stdout, read in a thread so every wait can have a deadline."""

    def __init__(self, child: subprocess.Popen) -> None:
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self.thread = threading.Thread(target=self._read, args=(child,), daemon=True)
        self.thread.start()

    def _read(self, child: subprocess.Popen) -> None:
        for line in child.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def until(self, pattern: str, deadline: float) -> str:
        while True:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"{pattern!r} was not printed in time:\n{''.join(self.seen)}"
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                continue
            assert line is not None, f"the demo ended before printing {pattern!r}:\n{''.join(self.seen)}"
            self.seen.append(line)
            if re.search(pattern, line):
                return line

    def rest(self, timeout: float) -> str:
        self.thread.join(timeout)
        while not self.lines.empty():
            line = self.lines.get_nowait()
            if line is not None:
                self.seen.append(line)
        return "".join(self.seen)


@pytest.mark.postgres
@pytest.mark.timeout(300)
def test_keep_leaves_it_running_for_psql_until_sigterm_then_cleans_up(pg_programs: Path, demo_tmp: Path) -> None:
    child = subprocess.Popen(demo_command("--keep"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=demo_environment(demo_tmp), cwd=ROOT)
    try:
        reader = LineReader(child)
        deadline = time.monotonic() + DEMO_DEADLINE
        reader.until(r"Everything is still running", deadline)
        psql_line = reader.until(r"PGPASSWORD=", deadline)
        config = Path(reader.until(r"approvals list -c ", deadline).split(" -c ")[1].strip().strip("'"))

        # what the newcomer is told to type works: the key, the port, the masking, the guardrail
        key = printed(r"PGPASSWORD=(\S+)", psql_line)[1]
        port = int(printed(r"port=(\d+)", psql_line)[1])
        conninfo = psycopg.conninfo.make_conninfo(host="127.0.0.1", port=port, dbname="clinic", user=demo_config.CI_SUBJECT, password=key, sslmode="disable", connect_timeout=10)
        with psycopg.connect(conninfo, autocommit=True) as conn:
            ssn, email = conn.execute("select ssn, email from patients where id = 1").fetchone()
            assert (ssn, email) == (f"***-**-{CLINIC.patients[0].ssn[-4:]}", f"****@{CLINIC.patients[0].email.split('@')[1]}")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("delete from patients")
        sessions = subprocess.run([sys.executable, "-m", "bastion.core.cli", "sessions", "list", "-c", str(config)], capture_output=True, text=True, cwd=ROOT, timeout=60, check=False)
        assert sessions.returncode == 0 and sessions.stdout.count(demo_config.CI_SUBJECT) == 2, sessions.stdout  # the script's and ours

        child.send_signal(signal.SIGTERM)
        status = child.wait(STOP_DEADLINE)
        output = reader.rest(STOP_DEADLINE)
        stderr = child.stderr.read()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert status == 0, f"{output}\n{stderr}"
    assert "Received SIGTERM" in output and "Cleaned up: PostgreSQL stopped" in output
    assert leaked(output) == NOTHING_LEAKED and leaked(stderr) == NOTHING_LEAKED
    assert not config.exists()  # the temporary state directory went too
    assert_nothing_left(output, demo_tmp)
