"""`bastion policy explain` and `bastion policy test`: the gateway's own decision, offline."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from bastion.policies.bundle import shipped_bundle

BASTION = [sys.executable, "-m", "bastion.core.cli"]

GRANTS = """
[[grant]]
name = "nightly-extract"
identities = { groups = ["analytics-jobs"] }
targets = ["clinic-db"]
statements = ["select"]
tables = ["public.patients", "public.visits"]

[[grant]]
name = "cleanup"
identities = { subjects = ["janitor"] }
targets = ["clinic-db"]
statements = ["delete", "select"]
tables = ["public.visits"]
"""


def config(tmp_path: Path) -> Path:
    (tmp_path / "grants.toml").write_text(GRANTS)
    path = tmp_path / "bastion.toml"
    path.write_text(
        textwrap.dedent(
            f"""
            [gateway]
            policies = ["{shipped_bundle('hipaa-baseline')}", "grants.toml"]

            [[targets]]
            name = "clinic-db"
            protocol = "postgres"
            listen = "127.0.0.1:0"
            upstream = "127.0.0.1:5432"
            database = "clinic"
            allow_plaintext_auth = true
            """
        )
    )
    return path


def explain(path: Path, *args: str) -> dict:
    result = subprocess.run([*BASTION, "policy", "explain", "-c", str(path), "--json", *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_explain_allows_what_a_grant_gives(tmp_path):
    report = explain(config(tmp_path), "--identity", "ci", "--groups", "analytics-jobs", "--target", "clinic-db", "SELECT id FROM patients LIMIT 5")
    assert report["decision"] == "allow"
    assert "grants:grant:nightly-extract" in report["rules"]
    assert report["statements"][0]["tables_read"] == ["public.patients"]


def test_explain_sees_a_write_hidden_in_a_cte(tmp_path):
    report = explain(
        config(tmp_path), "--identity", "ci", "--groups", "analytics-jobs", "--target", "clinic-db",
        "WITH d AS (DELETE FROM patients RETURNING *) SELECT * FROM d",
    )
    assert report["decision"] == "deny"
    assert "write-in-cte" in {f["name"] for f in report["findings"]}
    assert report["statements"][0]["kind"] == "delete"


def test_explain_keeps_literals_out_of_its_output(tmp_path):
    report = explain(config(tmp_path), "--identity", "janitor", "--target", "clinic-db", "DELETE FROM visits WHERE reason = '123-45-6789'")
    assert report["decision"] == "allow"
    assert "123-45-6789" not in json.dumps(report)
    report = explain(config(tmp_path), "--identity", "janitor", "--target", "clinic-db", "DELETE FROM visits")
    assert report["decision"] == "deny" and "delete-without-where" in {f["name"] for f in report["findings"]}


def test_explain_without_a_target_judges_by_dialect(tmp_path):
    report = explain(config(tmp_path), "--identity", "ci", "--dialect", "mysql", "SELECT 1; /*!50000 DROP TABLE t */")
    assert report["decision"] == "deny"
    assert "drop" in {f["name"] for f in report["findings"]}


def test_explain_prints_a_readable_report(tmp_path):
    result = subprocess.run(
        [*BASTION, "policy", "explain", "-c", str(config(tmp_path)), "--identity", "x", "--target", "clinic-db", "COPY patients TO PROGRAM 'curl evil'"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0
    assert "decision: deny" in result.stdout and "copy-program" in result.stdout
    assert "curl evil" not in result.stdout


def test_policy_test_runs_golden_cases_and_fails_on_a_mismatch(tmp_path):
    path = config(tmp_path)
    golden = tmp_path / "golden.toml"
    golden.write_text(
        textwrap.dedent(
            """
            [[case]]
            name = "nightly reads"
            identity = { subject = "ci", groups = ["analytics-jobs"] }
            target = "clinic-db"
            statement = "SELECT id FROM visits LIMIT 1"
            expect = "allow"

            [[case]]
            name = "nobody may truncate"
            identity = { subject = "janitor" }
            target = "clinic-db"
            statement = "TRUNCATE visits"
            expect = "deny"
            findings = ["truncate"]
            """
        )
    )
    result = subprocess.run([*BASTION, "policy", "test", "-c", str(path), str(golden)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 of 2 cases passed" in result.stdout
    golden.write_text(golden.read_text().replace('expect = "deny"', 'expect = "allow"'))
    result = subprocess.run([*BASTION, "policy", "test", "-c", str(path), str(golden)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "FAIL nobody may truncate" in result.stdout
