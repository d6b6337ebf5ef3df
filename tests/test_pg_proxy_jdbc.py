"""JDBC through Bastion: pgjdbc (Debian's libpostgresql-jdbc-java), unmodified, with a real policy.

pgjdbc speaks only the extended protocol, turns a statement into a named server-side one after
five executions (binary int columns from then on), batches inserts and asks for rollbacks: the
program in tests/fixtures/jdbc does each of those against a real PostgreSQL through Bastion.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from bastion.core import events
from tests.pg_helpers import TOKEN, fresh_table, pg_gateway  # noqa: F401  (pg_gateway is a fixture)
from tests.servers import missing

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(180)]

PROGRAM = Path(__file__).parent / "fixtures" / "jdbc" / "ThroughBastion.java"
DRIVER = Path("/usr/share/java/postgresql.jar")

BUNDLE = """
[[grant]]
name = "java-job"
identities = { subjects = ["ci-bot"] }
targets = ["pg"]
statements = ["select", "insert", "tcl", "set"]
tables = ["public.{table}"]

[[mask]]
name = "ssn"
columns = ["*.ssn"]
strategy = "partial"
"""


@pytest.fixture(scope="module")
def jdbc_program(tmp_path_factory) -> Path:
    if not DRIVER.exists():
        missing("the PostgreSQL JDBC driver (apt-get install libpostgresql-jdbc-java)")
    javac = shutil.which("javac")
    if javac is None:
        missing("javac (apt-get install default-jdk-headless)")
    out = tmp_path_factory.mktemp("jdbc")
    subprocess.run([javac, "-d", str(out), str(PROGRAM)], check=True, capture_output=True, timeout=120)
    return out


def test_a_jdbc_job_runs_through_bastion_masked_and_guarded(pg_gateway, postgres_server, jdbc_program):
    table = fresh_table(postgres_server, "create table {t} (id int primary key, ssn text)")
    postgres_server.execute(f"insert into {table} values (1, '123-45-6789'), (2, '234-56-7890')")
    with pg_gateway(bundle=BUNDLE.replace("{table}", table)) as gw:
        url = f"jdbc:postgresql://{gw.host}:{gw.port}/postgres?sslmode=disable"
        run = subprocess.run(
            ["java", "-cp", f"{DRIVER}:{jdbc_program}", "ThroughBastion", url, "ci-bot", TOKEN, table],
            capture_output=True, text=True, timeout=120,
        )
        assert run.returncode == 0, run.stderr
        lines = run.stdout.splitlines()
        assert lines[0] == "simple 42"
        prepared = [line.split() for line in lines if line.startswith("prepared ")]
        assert [(p[2], p[3]) for p in prepared] == [("1", "***-**-6789"), ("2", "***-**-7890")] * 4
        assert "denied 42501" in lines  # pg_authid is not in the grant
        assert "batch 3" in lines and "after-rollback 2" in lines
        backend_pids = [int(line.split()[1]) for line in lines if line.startswith("pid ")]
        assert backend_pids and backend_pids[0] > 0
        assert "123-45-6789" not in run.stdout and "6789" in run.stdout
        judged = gw.events_of(events.RequestJudged)
        assert any(e.verdict == "deny" and "pg_authid" in " ".join(e.statements) for e in judged)
        executions = [e for e in judged if e.kind == "execute" and e.statements == (f"select id, ssn from {table} where id = $1",)]
        assert len(executions) == 8 and len({e.parameters for e in executions}) == 2  # two ids, recorded masked
