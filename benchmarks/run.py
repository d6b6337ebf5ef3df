"""Bastion's benchmark harness: direct PostgreSQL, PgBouncer and Bastion in one interleaved run.

    .venv/bin/python benchmarks/run.py [--duration 10] [--quick] [--out benchmarks/results/latest.json]

Everything runs on this machine against a throwaway PostgreSQL (SCRAM authentication):

* pgbench ``-S`` (select only) in ``-M simple|extended|prepared`` with 1 and 8 clients, each
  round measuring direct, PgBouncer (session pooling), a bare hop (``bare_hop.py``: bytes copied
  on Bastion's own trio socket layer, no pipeline: the floor of this process model) and Bastion
  one after the other, so they share the machine's state; TPS, mean latency and the ratios to
  direct and to PgBouncer;
* the CPU the gateway process (and the bare hop) spends per query (its own utime + stime over
  the round);
* statement analysis µs on a fingerprint-cache hit and a miss; masking throughput in MB/s, with
  free-text notes that hold nothing to find and with notes that hold identifiers;
* the gateway's peak RSS while a result of at least 1 GB streams through masking, and its RSS
  with 1,000 idle sessions open;
* approval wake-up latency: from a reviewer's decision to the held statement's result;
* the fdatasync latency of a record-sized append on the audit log's disk: the floor under a
  lone session's statements with ``fsync = "durable"``, and pgbench ``-S`` through the same
  gateway with ``fsync = "interval"`` (what that durability costs);
* pgbench through ``bastion serve --workers 2``.

Bastion runs with the full pipeline: an API-key identity, the HIPAA baseline bundle plus grants,
a review rule and three column masks with every recognizer on for free text, statement
analysis, and the file audit sink with durable group commit. Results are printed as a table and
written as JSON. Benchmarks are measurements, never tests: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.servers import LOOPBACK, _as_user, _service_user, free_port, run_postgres, wait_for_port  # noqa: E402

BENCH_USER = "bench"
BENCH_PASSWORD = "bench-password-not-a-secret"
MODES = ("simple", "extended", "prepared")
CLIENTS = (1, 8)


# --- the three ways in ------------------------------------------------------------------------------


def start_pgbouncer(server, work: Path) -> tuple[subprocess.Popen, int]:
    binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    if not os.path.exists(binary):
        raise SystemExit("pgbouncer is not installed: apt-get install pgbouncer")
    port = free_port()
    (work / "userlist.txt").write_text(f'"{BENCH_USER}" "{BENCH_PASSWORD}"\n')
    (work / "pgbouncer.ini").write_text(
        textwrap.dedent(
            f"""
            [databases]
            bench = host={server.host} port={server.port} dbname=bench
            [pgbouncer]
            listen_addr = {LOOPBACK}
            listen_port = {port}
            unix_socket_dir =
            auth_type = scram-sha-256
            auth_file = {work / 'userlist.txt'}
            pool_mode = session
            max_client_conn = 2000
            default_pool_size = 50
            logfile = {work / 'pgbouncer.log'}
            """
        )
    )
    user = _service_user("postgres")
    if user is not None:
        for name in ("userlist.txt", "pgbouncer.ini"):
            shutil.chown(work / name, user)
        shutil.chown(work, user)
    process = subprocess.Popen([binary, str(work / "pgbouncer.ini")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **_as_user(user))
    wait_for_port(port, process)
    return process, port


def bastion_config(server, work: Path, listen_port: int, admin_port: int) -> Path:
    policy = work / "bench-grants.toml"
    policy.write_text(
        textwrap.dedent(
            """
            [[grant]]
            name = "bench"
            identities = { groups = ["bench"] }
            targets = ["bench-db"]
            statements = ["select", "insert", "update", "tcl", "set", "show", "explain", "ddl"]

            [[review]]
            name = "held-statement"
            when = { tables = ["public.held_for_review"] }
            approvers = { groups = ["reviewers"] }
            timeout = "5m"

            [[mask]]
            name = "ssn"
            columns = ["*.ssn"]
            strategy = "partial"

            [[mask]]
            name = "email"
            columns = ["*.email"]
            strategy = "partial"

            [[mask]]
            name = "notes"
            columns = ["*.note"]
            recognizers = ["ssn", "email", "phone", "card", "npi", "iban", "ipv4", "ipv6", "dob"]
            """
        )
    )
    (work / "upstream-password").write_text(BENCH_PASSWORD)
    config = work / "bastion.toml"
    config.write_text(
        textwrap.dedent(
            f"""
            [gateway]
            state_dir = "state"
            admin_listen = "{LOOPBACK}:{admin_port}"
            policies = ["{ROOT / 'policies/bundles/hipaa-baseline.toml'}", "bench-grants.toml"]
            log_level = "warning"

            [[identity]]
            kind = "static-token"
            tokens_file = "tokens.toml"

            [[targets]]
            name = "bench-db"
            protocol = "postgres"
            listen = "{LOOPBACK}:{listen_port}"
            upstream = "{server.host}:{server.port}"
            database = "bench"
            allow_plaintext_auth = true
            [targets.credentials]
            user = "{BENCH_USER}"
            password = {{ file = "upstream-password" }}

            [audit]
            fail_closed = true

            [[audit.sinks]]
            kind = "file"
            fsync = "durable"
            """
        )
    )
    return config


def mint_token(config: Path, subject: str, groups: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "bastion.core.cli", "tokens", "add", "-c", str(config), subject, "--groups", groups],
        capture_output=True, text=True, check=True,
    )
    return result.stdout.strip().splitlines()[-1]


class MeasuredProcess:
    """A relay running as its own process, so its own CPU and memory can be read."""

    process: subprocess.Popen

    def pids(self) -> list[int]:
        children = subprocess.run(["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True).stdout.split()
        return [self.process.pid, *map(int, children)]

    def cpu_seconds(self) -> float:
        total = 0.0
        for pid in self.pids():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return total

    def rss_kib(self, peak: bool = False) -> int:
        key = "VmHWM" if peak else "VmRSS"
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(rf"{key}:\s+(\d+)", status).group(1))

    def reset_peak(self) -> None:
        Path(f"/proc/{self.process.pid}/clear_refs").write_text("5")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()


class Bastion(MeasuredProcess):
    """``bastion serve``, as users run it."""

    def __init__(self, config: Path, listen_port: int, admin_port: int, workers: int = 1) -> None:
        command = [sys.executable, "-m", "bastion.core.cli", "serve", "-c", str(config)]
        if workers > 1:
            command += ["--workers", str(workers)]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=open(config.parent / f"bastion-{workers}.log", "ab"))
        self.port = listen_port
        self.admin_port = admin_port
        wait_for_port(listen_port, self.process)
        wait_for_port(admin_port, self.process)


class BareHop(MeasuredProcess):
    """``benchmarks/bare_hop.py``: bytes copied both ways on Bastion's runtime, no pipeline."""

    def __init__(self, server, work: Path) -> None:
        self.port = free_port()
        command = [sys.executable, str(ROOT / "benchmarks" / "bare_hop.py"), str(self.port), server.host, str(server.port)]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=open(work / "bare-hop.log", "ab"))
        wait_for_port(self.port, self.process)


# --- measurements -------------------------------------------------------------------------------------


def pgbench(server, port: int, password: str, user: str, mode: str, clients: int, duration: int, database: str = "bench") -> dict:
    env = dict(os.environ, PGPASSWORD=password, PGSSLMODE="disable")
    command = [
        str(server.bin_dir / "pgbench"), "-n", "-S", "-M", mode, "-c", str(clients), "-j", str(min(clients, 2)),
        "-T", str(duration), "-h", LOOPBACK, "-p", str(port), "-U", user, database,
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=duration * 4 + 60)
    if result.returncode != 0:
        return {"error": (result.stderr or result.stdout).strip().splitlines()[-1:]}
    tps = float(re.search(r"tps = ([\d.]+)", result.stdout).group(1))
    latency = float(re.search(r"latency average = ([\d.]+) ms", result.stdout).group(1))
    transactions = int(re.search(r"number of transactions actually processed: (\d+)", result.stdout).group(1))
    return {"tps": round(tps, 1), "latency_ms": latency, "transactions": transactions}


def pgbench_through(relay: MeasuredProcess, *args) -> tuple[dict, float | None]:
    """pgbench through ``relay``, and the CPU µs the relay's processes spent per transaction."""
    before = relay.cpu_seconds()
    result = pgbench(*args)
    cpu = relay.cpu_seconds() - before
    return result, (round(cpu / result["transactions"] * 1e6, 1) if "tps" in result else None)


def measure_pgbench(server, bouncer_port: int, bastion: Bastion, bare: BareHop, token: str, duration: int) -> list[dict]:
    rows = []
    for mode in MODES:
        for clients in CLIENTS:
            direct = pgbench(server, server.port, BENCH_PASSWORD, BENCH_USER, mode, clients, duration)
            bouncer = pgbench(server, bouncer_port, BENCH_PASSWORD, BENCH_USER, mode, clients, duration)
            hop, hop_cpu = pgbench_through(bare, server, bare.port, BENCH_PASSWORD, BENCH_USER, mode, clients, duration)
            through, cpu = pgbench_through(bastion, server, bastion.port, token, "bench-ci", mode, clients, duration)
            row = {"mode": mode, "clients": clients, "direct": direct, "pgbouncer": bouncer, "bare_hop": hop, "bastion": through}
            if hop_cpu is not None:
                row["bare_hop_cpu_us_per_query"] = hop_cpu
            if cpu is not None:
                row["bastion_cpu_us_per_query"] = cpu
                if "tps" in direct:
                    row["ratio_to_direct"] = round(through["tps"] / direct["tps"], 3)
                if "tps" in bouncer:
                    row["ratio_to_pgbouncer"] = round(through["tps"] / bouncer["tps"], 3)
            if "tps" in hop and "tps" in direct:
                row["bare_hop_ratio_to_direct"] = round(hop["tps"] / direct["tps"], 3)
            rows.append(row)
            print(
                f"  {mode:9} {clients} client(s): direct {direct.get('tps')} tps, pgbouncer {bouncer.get('tps')}, "
                f"bare hop {hop.get('tps')} ({hop_cpu} µs CPU/query), bastion {through.get('tps')} ({cpu} µs CPU/query) {through.get('error', '')}",
                flush=True,
            )
    return rows


def measure_analysis() -> dict:
    from bastion.policies.analysis import Analyzer

    analyzer = Analyzer()
    statement = "SELECT abalance FROM pgbench_accounts WHERE aid = {};"
    analyzer.analyze(statement.format(1), "postgres")
    count = 20000
    start = time.process_time()
    for i in range(count):
        analyzer.analyze(statement.format(i + 2), "postgres")
    hit = (time.process_time() - start) / count * 1e6
    misses = 50
    start = time.process_time()
    for i in range(misses):
        Analyzer().analyze(f"SELECT a{i}, b FROM t{i} JOIN u ON t{i}.id = u.id WHERE c > {i} LIMIT 5", "postgres")
    miss = (time.process_time() - start) / misses * 1e6
    return {"cache_hit_us": round(hit, 2), "cache_miss_us": round(miss, 1)}


def measure_fsync_floor(directory: Path, rounds: int = 200) -> dict:
    """What one durable statement waits for at least: appending a record-sized write to a file on
    the audit log's disk and fdatasync-ing it. A lone session's statements cannot go faster than
    one per fdatasync (``fsync = "durable"`` makes each request record durable before the statement
    is forwarded); concurrent sessions share one fdatasync per group commit."""
    path = directory / "fsync-probe.bin"
    descriptor = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
    record = b"r" * 300
    latencies = []
    try:
        for _ in range(rounds):
            start = time.perf_counter()
            os.write(descriptor, record)
            os.fdatasync(descriptor)
            latencies.append(time.perf_counter() - start)
    finally:
        os.close(descriptor)
        path.unlink()
    latencies.sort()
    median = latencies[len(latencies) // 2]
    return {"rounds": rounds, "median_ms": round(median * 1000, 3), "p90_ms": round(latencies[rounds * 9 // 10] * 1000, 3), "lone_session_max_tps": round(1 / median, 1)}


def measure_fsync_interval(server, config: Path, listen_port: int, admin_port: int, token: str, duration: int) -> list[dict]:
    """The same gateway with ``fsync = "interval"`` (records written at once, fdatasync'd every
    interval instead of before each statement): what making every request record durable costs."""
    relaxed = config.with_name("bastion-interval.toml")
    relaxed.write_text(config.read_text().replace('fsync = "durable"', 'fsync = "interval"'))
    gateway = Bastion(relaxed, listen_port, admin_port)
    rows = []
    try:
        for clients in CLIENTS:
            result, cpu = pgbench_through(gateway, server, listen_port, token, "bench-ci", "simple", clients, duration)
            rows.append({"mode": "simple", "clients": clients, "bastion": result, "bastion_cpu_us_per_query": cpu})
    finally:
        gateway.stop()
    return rows


# The free-text column of measure_masking: a note with nothing to find, as most are, and one that
# holds a phone number, an e-mail address and a date of birth (every recognizer then searches).
MASKING_NOTES = {
    "plain": "Seen on visit {i}; follow up by phone, nothing else of note in this long free text field.",
    "identifiers": "Seen on visit {i}; call back on (555) {phone:03d}-{line:04d} or pat{i}@example.org, born 03/{day:02d}/19{year:02d}.",
}


def measure_masking(note: str = "plain", rounds: int = 5, repeats: int = 3) -> dict:
    """Masking MB/s of result rows, in process: the best of ``repeats`` timings (the machine is
    shared; the best is the code's cost with the least interference)."""
    from bastion.policies import masking, recognizers  # noqa: F401  (imports warm the patterns)
    from bastion.policies.model import Column, MaskingSettings, MaskRule, ResultShape

    shape = ResultShape(
        columns=(
            Column("id", type_oid=23, table="public.patients"),
            Column("name", type_oid=25, table="public.patients"),
            Column("ssn", type_oid=25, table="public.patients", sources=frozenset({"public.patients.ssn"})),
            Column("email", type_oid=25, table="public.patients", sources=frozenset({"public.patients.email"})),
            Column("note", type_oid=25, table="public.notes", sources=frozenset({"public.notes.note"})),
        )
    )
    rules = [
        MaskRule("ssn", ("*.ssn",), "partial"),
        MaskRule("email", ("*.email",), "partial"),
        MaskRule("notes", ("*.note",), "redact", ("ssn", "email", "phone", "card", "npi", "iban", "ipv4", "ipv6", "dob")),
    ]
    plan = masking.compile_plan(shape, rules, (), MaskingSettings(), hash_key=b"k" * 32)
    rows = []
    for i in range(5000):
        rows.append([
            str(i).encode(), f"Patient Number {i}".encode(), f"{100 + i % 800:03d}-{10 + i % 89:02d}-{1000 + i:04d}".encode(),
            f"patient{i}@example.org".encode(),
            MASKING_NOTES[note].format(i=i, phone=200 + i % 700, line=1000 + i % 9000, day=1 + i % 28, year=30 + i % 60).encode(),
        ])
    size = sum(len(c) for row in rows for c in row)
    best = None
    for _ in range(repeats):
        start = time.process_time()
        for _ in range(rounds):
            for row in rows:
                plan.apply(list(row))
        elapsed = time.process_time() - start
        best = elapsed if best is None else min(best, elapsed)
    return {"mb_per_s": round(size * rounds / best / 1e6, 1), "row_bytes": size // len(rows), "note": note}


def measure_big_result(server, bastion: Bastion, token: str, target_bytes: int) -> dict:
    """Stream a result of ``target_bytes`` through the gateway (a masked column) and read its peak RSS."""
    row_bytes = 9 + 11 + 230
    rows = target_bytes // row_bytes + 1
    query = f"SELECT g AS id, lpad((g % 899999999 + 100000000)::text, 9, '0') AS ssn, repeat('x', 230) AS filler FROM generate_series(1, {rows}) g"
    bastion.reset_peak()
    env = dict(os.environ, PGPASSWORD=token, PGSSLMODE="disable")
    start = time.monotonic()
    process = subprocess.Popen(
        [str(server.bin_dir / "psql"), "-X", "-q", "-h", LOOPBACK, "-p", str(bastion.port), "-U", "bench-ci", "bench",
         "-v", "FETCH_COUNT=0", "-A", "-t", "-c", query],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )
    received = 0
    while chunk := process.stdout.read(1 << 20):
        received += len(chunk)
    process.wait()
    elapsed = time.monotonic() - start
    return {
        "rows": rows,
        "bytes_received": received,
        "seconds": round(elapsed, 1),
        "mb_per_s": round(received / elapsed / 1e6, 1),
        "peak_rss_mb": round(bastion.rss_kib(peak=True) / 1024, 1),
        "psql_status": process.returncode,
    }


def measure_idle_sessions(bastion: Bastion, token: str, count: int) -> dict:
    import psycopg

    baseline = bastion.rss_kib()
    connections = []
    try:
        for _ in range(count):
            connections.append(psycopg.connect(host=LOOPBACK, port=bastion.port, user="bench-ci", password=token, dbname="bench", sslmode="disable", autocommit=True))
        time.sleep(1)
        rss = bastion.rss_kib()
    finally:
        for conn in connections:
            conn.close()
    return {"sessions": len(connections), "rss_mb": round(rss / 1024, 1), "rss_before_mb": round(baseline / 1024, 1)}


def measure_approval_wakeup(server, bastion: Bastion, token: str, reviewer_token: str, rounds: int = 5) -> dict:
    """From a reviewer's POST /approvals/{id}/approve to the held statement's result."""
    import psycopg

    server.execute("CREATE TABLE IF NOT EXISTS held_for_review (id int)", dbname="bench")
    server.execute(f"GRANT SELECT ON held_for_review TO {BENCH_USER}", dbname="bench")
    base = f"http://{LOOPBACK}:{bastion.admin_port}"
    latencies = []
    for _ in range(rounds):
        done = {}

        def run_held() -> None:
            with psycopg.connect(host=LOOPBACK, port=bastion.port, user="bench-ci", password=token, dbname="bench", sslmode="disable", autocommit=True) as conn:
                conn.execute("SELECT count(*) FROM held_for_review").fetchone()
                done["at"] = time.monotonic()

        thread = threading.Thread(target=run_held)
        thread.start()
        pending = None
        deadline = time.monotonic() + 30
        while pending is None and time.monotonic() < deadline:
            listing = _http(f"{base}/approvals?state=pending", reviewer_token)
            items = listing.get("approvals", listing) if isinstance(listing, dict) else listing
            pending = next((a for a in items if a.get("state", a.get("status")) == "pending"), None)
            if pending is None:
                time.sleep(0.05)
        if pending is None:
            return {"error": "no pending approval appeared"}
        decided = time.monotonic()
        _http(f"{base}/approvals/{pending['id']}/approve", reviewer_token, {"comment": "benchmark"})
        thread.join(30)
        if "at" in done:
            latencies.append((done["at"] - decided) * 1000)
    latencies.sort()
    return {"rounds": len(latencies), "median_ms": round(latencies[len(latencies) // 2], 1) if latencies else None, "max_ms": round(max(latencies), 1) if latencies else None}


def _http(url: str, token: str, body: dict | None = None):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method="POST" if body is not None else "GET", headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read() or b"{}")


# --- the run --------------------------------------------------------------------------------------------


def prepare_database(server, scale: int) -> None:
    server.execute("CREATE DATABASE bench")
    server.execute(f"CREATE ROLE {BENCH_USER} LOGIN PASSWORD '{BENCH_PASSWORD}'")
    server.execute(f"GRANT ALL ON DATABASE bench TO {BENCH_USER}")
    server.execute(f"ALTER DATABASE bench OWNER TO {BENCH_USER}")
    env = dict(os.environ, PGPASSWORD=BENCH_PASSWORD)
    subprocess.run([str(server.bin_dir / "pgbench"), "-i", "-q", "-s", str(scale), "-h", server.host, "-p", str(server.port), "-U", BENCH_USER, "bench"], env=env, check=True, capture_output=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per pgbench run")
    parser.add_argument("--scale", type=int, default=10, help="pgbench scale factor")
    parser.add_argument("--big-result-mb", type=int, default=1100, help="size of the streamed result")
    parser.add_argument("--idle-sessions", type=int, default=1000)
    parser.add_argument("--quick", action="store_true", help="short runs and small results (a smoke test of the harness)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "latest.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.scale, args.big_result_mb, args.idle_sessions = 2, 1, 20, 50

    results: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, {platform.platform()}",
        "command": "benchmarks/run.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": {"duration_s": args.duration, "scale": args.scale},
    }
    work = Path(tempfile.mkdtemp(prefix="bastion-bench-"))
    work.chmod(0o755)  # PgBouncer runs as the postgres user and must reach its files
    with run_postgres("max_connections = 1300\nshared_buffers = 128MB\n") as server:
        print("preparing the database…", flush=True)
        prepare_database(server, args.scale)
        (work / "pgbouncer").mkdir()
        bouncer, bouncer_port = start_pgbouncer(server, work / "pgbouncer")
        listen_port, admin_port = free_port(), free_port()
        config = bastion_config(server, work, listen_port, admin_port)
        token = mint_token(config, "bench-ci", "bench")
        reviewer = mint_token(config, "bench-reviewer", "reviewers")
        bastion = Bastion(config, listen_port, admin_port)
        bare = BareHop(server, work)
        try:
            print("pgbench -S (direct, pgbouncer, bare hop, bastion interleaved):", flush=True)
            results["pgbench"] = measure_pgbench(server, bouncer_port, bastion, bare, token, args.duration)
            print("statement analysis and masking…", flush=True)
            results["analysis"] = measure_analysis()
            results["masking"] = measure_masking()
            results["masking_identifiers"] = measure_masking("identifiers")
            results["fsync_floor"] = measure_fsync_floor(work)
            print(f"streaming {args.big_result_mb} MB through masking…", flush=True)
            results["big_result"] = measure_big_result(server, bastion, token, args.big_result_mb * 1_000_000)
            print(f"{args.idle_sessions} idle sessions…", flush=True)
            results["idle_sessions"] = measure_idle_sessions(bastion, token, args.idle_sessions)
            print("approval wake-up…", flush=True)
            try:
                results["approval_wakeup"] = measure_approval_wakeup(server, bastion, token, reviewer)
            except Exception as exc:  # the harness reports what it could not measure
                results["approval_wakeup"] = {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            bare.stop()
            bastion.stop()
        print("two workers…", flush=True)
        workers = Bastion(config, listen_port, admin_port, workers=2)
        try:
            results["workers"] = {
                "clients": 8,
                "one_worker_tps": next((r["bastion"].get("tps") for r in results["pgbench"] if r["mode"] == "simple" and r["clients"] == 8), None),
                "two_workers": pgbench(server, listen_port, token, "bench-ci", "simple", 8, args.duration),
            }
        finally:
            workers.stop()
        print("fsync = \"interval\"…", flush=True)
        results["fsync_interval"] = measure_fsync_interval(server, config, listen_port, admin_port, token, args.duration)
        bouncer.terminate()
        bouncer.wait(10)
    shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(render_table(results))
    print(f"\nwritten to {args.out}")
    return 0


def render_table(results: dict) -> str:
    lines = [
        f"Bastion benchmark, {results['date']}, {results['machine']}",
        "",
        "| pgbench -S | clients | direct TPS | PgBouncer TPS | bare hop TPS (CPU µs/query) | Bastion TPS | Bastion / direct | Bastion / PgBouncer | Bastion latency ms | gateway CPU µs/query |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in results.get("pgbench", []):
        hop = row.get("bare_hop", {})
        lines.append(
            f"| {row['mode']} | {row['clients']} | {row['direct'].get('tps')} | {row['pgbouncer'].get('tps')} | {hop.get('tps')} ({row.get('bare_hop_cpu_us_per_query')}) "
            f"| {row['bastion'].get('tps')} | {row.get('ratio_to_direct')} | {row.get('ratio_to_pgbouncer')} | {row['bastion'].get('latency_ms')} | {row.get('bastion_cpu_us_per_query')} |"
        )
    analysis, mask = results.get("analysis", {}), results.get("masking", {})
    big, idle = results.get("big_result", {}), results.get("idle_sessions", {})
    approval, workers = results.get("approval_wakeup", {}), results.get("workers", {})
    fsync = results.get("fsync_floor", {})
    lines += [
        "",
        "| measure | value |",
        "| --- | --- |",
        f"| analysis, fingerprint-cache hit | {analysis.get('cache_hit_us')} µs |",
        f"| analysis, miss | {analysis.get('cache_miss_us')} µs |",
        f"| masking throughput (3 column rules, recognizers on free text) | {mask.get('mb_per_s')} MB/s |",
        f"| the same, every note holding a phone number, an e-mail address and a date | {results.get('masking_identifiers', {}).get('mb_per_s')} MB/s |",
        f"| peak RSS streaming {round(big.get('bytes_received', 0) / 1e9, 2)} GB through masking | {big.get('peak_rss_mb')} MB ({big.get('mb_per_s')} MB/s) |",
        f"| RSS with {idle.get('sessions')} idle sessions | {idle.get('rss_mb')} MB |",
        f"| approval wake-up, decision to result | median {approval.get('median_ms')} ms, max {approval.get('max_ms')} ms {approval.get('error', '')} |",
        f"| pgbench -S simple, 8 clients, 1 → 2 workers | {workers.get('one_worker_tps')} → {workers.get('two_workers', {}).get('tps')} TPS |",
        *(
            f"| pgbench -S simple, {row['clients']} client(s), fsync = \"interval\" | {row['bastion'].get('tps')} TPS, {row.get('bastion_cpu_us_per_query')} µs CPU/query |"
            for row in results.get("fsync_interval", [])
        ),
        f"| fdatasync of a record on the audit disk (a lone durable session's floor) | median {fsync.get('median_ms')} ms, p90 {fsync.get('p90_ms')} ms: at most {fsync.get('lone_session_max_tps')} statements/s |",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
