"""The on-disk audit log: record codec, hash chain, signed manifests, tampering, recovery."""

from __future__ import annotations

import datetime
import os
import shutil
import typing
from pathlib import Path

import attrs
import cattrs
import msgpack
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bastion.core import auditlog, events
from bastion.policies.model import Identity

# --- strategies ----------------------------------------------------------------------------------

# every code point, lone surrogates included: text decoded with surrogateescape must still record
any_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=12)
short = st.text(max_size=8)
int64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
finite = st.floats(allow_nan=False, allow_infinity=False)
optional_text = st.none() | any_text
words = st.lists(any_text, max_size=4).map(tuple)

identities = st.builds(
    Identity,
    provider=short,
    subject=any_text,
    issuer=st.none() | short,
    groups=st.frozensets(short, max_size=3),
    auth_method=short,
    token_id=st.none() | short,
    expires_at=st.none() | st.datetimes(timezones=st.none() | st.just(datetime.timezone.utc)),
    ci=st.dictionaries(short, any_text, max_size=3),
)
common = {"session_id": any_text, "at": finite}
findings = st.builds(events.FindingRecord, name=short, weight=int64, sentence=any_text)

EVENT_STRATEGIES = {
    events.GatewayStarted: st.builds(events.GatewayStarted, version=short, targets=words, policy_version=short, pid=int64, **common),
    events.GatewayStopped: st.builds(events.GatewayStopped, reason=any_text, sessions_interrupted=int64, **common),
    events.ConnectionOpened: st.builds(events.ConnectionOpened, target=short, protocol=short, client=short, listen=short, **common),
    events.SessionStarted: st.builds(
        events.SessionStarted, target=short, protocol=short, client=short, tls=st.booleans(), identity=identities,
        client_user=optional_text, database=optional_text, decision=short, rules=words, **common,
    ),
    events.AuthenticationFailed: st.builds(events.AuthenticationFailed, target=short, client=short, reason=any_text, client_user=optional_text, provider=st.none() | short, **common),
    events.RequestJudged: st.builds(
        events.RequestJudged, request_no=int64, identity=any_text, target=short, kind=short, statements=words, actions=words,
        fingerprints=words, tables=words, findings=st.lists(findings, max_size=3).map(tuple), risk=int64,
        parameters=st.lists(optional_text, max_size=3).map(tuple), verdict=short, rules=words, reasons=words, policy_version=short, **common,
    ),
    events.ResponseCompleted: st.builds(
        events.ResponseCompleted, request_no=int64, status=short, columns=words, rows=int64, bytes=int64,
        masked=st.dictionaries(short, int64, max_size=3), duration_ms=finite, command_tag=short, error_code=short, error_message=any_text, **common,
    ),
    events.ResultRows: st.builds(
        events.ResultRows, request_no=int64, first_row=int64,
        rows=st.lists(st.lists(optional_text, max_size=4).map(tuple), max_size=4).map(tuple), **common,
    ),
    events.ApprovalEvent: st.builds(events.ApprovalEvent, request_no=int64, approval_id=short, step=short, actor=any_text, comment=any_text, rule=short, **common),
    events.CancelForwarded: st.builds(events.CancelForwarded, target=short, client=short, outcome=short, **common),
    events.SessionEnded: st.builds(
        events.SessionEnded, reason=any_text, requests=int64, bytes_from_client=int64, bytes_to_client=int64, duration_ms=finite, error=any_text, **common,
    ),
}
any_event = st.one_of(*EVENT_STRATEGIES.values())


def test_every_event_type_has_a_strategy() -> None:
    assert set(EVENT_STRATEGIES) == set(events.EVENT_TYPES.values())


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(event=any_event, seq=st.integers(1, 2**63 - 1), prev=st.binary(min_size=32, max_size=32), at=finite)
def test_every_event_round_trips_through_the_record_codec(event, seq, prev, at) -> None:
    data = events.event_to_dict(event)
    record = auditlog.make_record(auditlog.RecordBody("host.main.0001", seq, prev, at, data.pop("type"), data))
    decoded = auditlog.decode_record(auditlog.encode_record(record))
    assert decoded.to_event() == event
    assert (decoded.chain, decoded.seq, decoded.prev_hash, decoded.at, decoded.type) == ("host.main.0001", seq, prev, at, event.type)
    assert decoded.body == record.body and decoded.hash == record.hash
    assert auditlog.record_from_body(record.body) == record
    # the writer's fast path packs the very bytes the chain hash was defined over
    assert auditlog.pack_body("host.main.0001", seq, prev, at, event.type, data) == record.body


def generic_converter() -> cattrs.Converter:
    """cattrs with nothing but the codec's value hooks (sets sorted, datetimes as ISO text): what
    event_to_dict's fast path must reproduce exactly."""
    generic = cattrs.Converter()
    generic.register_unstructure_hook_func(lambda t: t is frozenset or typing.get_origin(t) is frozenset, sorted)
    generic.register_unstructure_hook(datetime.datetime, lambda value: value.isoformat())
    return generic


GENERIC = generic_converter()


@settings(max_examples=300)
@given(event=any_event)
def test_event_to_dict_is_exactly_the_generic_unstructuring(event) -> None:
    expected = {**GENERIC.unstructure(event), "type": event.type}
    assert repr(events.event_to_dict(event)) == repr(expected)  # same keys, same order, lists where lists were


@settings(max_examples=300)
@given(event=any_event, seq=st.integers(0, 2**64 - 1), prev=st.binary(min_size=32, max_size=32), at=finite)
def test_the_writers_spliced_body_is_the_packed_body(event, seq, prev, at) -> None:
    """The writer packs event_fields alone and splices the body around it: the very bytes the
    chain hash was defined over (every width of seq, every event type)."""
    data = events.event_to_dict(event)
    record_type = data.pop("type")
    fields = events.event_fields(event)
    assert auditlog.pack(fields) == auditlog.pack(data)
    spliced = auditlog.spliced_body(auditlog.body_head("host.main.0001"), seq, prev, at, auditlog.body_type_part(record_type), auditlog.pack(fields))
    assert spliced == auditlog.pack_body("host.main.0001", seq, prev, at, record_type, data)


@pytest.mark.parametrize("at", [0, 1.5, 2**40])
@pytest.mark.parametrize("prev", [b"", b"\1" * 32, b"\2" * 300])
def test_a_spliced_body_with_unusual_fields_is_still_the_packed_body(at, prev) -> None:
    event = {"session_id": "s", "rows": ((None, "x"),)}
    spliced = auditlog.spliced_body(auditlog.body_head("c"), 5, prev, at, auditlog.body_type_part("rows"), auditlog.pack(event))
    assert spliced == auditlog.pack_body("c", 5, prev, at, "rows", event)


plain_values = st.recursive(
    st.none() | st.booleans() | int64 | finite | any_text | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(any_text, inner, max_size=3),
    max_leaves=12,
)


@given(value=plain_values)
def test_pack_gives_the_bytes_msgpack_gives_with_surrogatepass(value) -> None:
    data = auditlog.pack(value)
    assert data == msgpack.packb(value, use_bin_type=True, unicode_errors="surrogatepass")
    assert auditlog.unpack(data) == msgpack.unpackb(data, raw=False, unicode_errors="surrogatepass", strict_map_key=False)


@given(event=any_event, position=st.integers(min_value=0), value=st.integers(1, 255))
def test_a_changed_byte_in_a_frame_never_decodes_silently(event, position, value) -> None:
    data = events.event_to_dict(event)
    record = auditlog.make_record(auditlog.RecordBody("c", 1, b"\0" * 32, 0.0, data.pop("type"), data))
    frame = bytearray(auditlog.encode_record(record))
    frame[position % len(frame)] ^= value
    try:
        decoded = auditlog.decode_record(bytes(frame))
    except ValueError:
        return
    assert False, f"a damaged frame decoded as {decoded!r}"


@given(st.binary(max_size=300))
def test_scanning_arbitrary_bytes_never_raises_and_accounts_for_every_byte(data) -> None:
    covered = 0
    for item in auditlog.scan_frames(data, 0):
        assert isinstance(item, auditlog.Damage)  # random bytes are never a valid record
        assert item.offset == covered
        covered += item.length
    assert covered == len(data)


# --- a small log to tamper with ------------------------------------------------------------------


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def request(n: int) -> tuple[str, dict]:
    data = events.event_to_dict(
        events.RequestJudged(session_id=f"s{n % 3}", request_no=n, identity="ci", target="db", kind="statement", statements=(f"SELECT * FROM patients WHERE id = {n}",), actions=("select",), verdict="allow")
    )
    return data.pop("type"), data


def write_log(directory: Path, key, count: int, *, segment_max_bytes: int = 1500, close: bool = True, slot: str = "main") -> auditlog.LogWriter:
    lock = auditlog.SlotLock.acquire(directory, slot)
    writer, warnings = auditlog.LogWriter.open(lock, key, segment_max_bytes=segment_max_bytes)
    assert warnings == []
    for n in range(count):
        writer.append([request(n)])
        writer.sync()
        writer.rotate_if_full()
    if close:
        writer.close()
        lock.release()
    return writer


def trusted(key) -> list[bytes]:
    return [auditlog.public_key_bytes(key)]


def frames(path: Path) -> list[auditlog.ScannedRecord]:
    return list(auditlog.scan_segment(path).records)


def test_a_clean_log_verifies_and_reads_back_in_order(tmp_path: Path, key) -> None:
    write_log(tmp_path, key, 40)
    report = auditlog.verify(tmp_path, trusted(key))
    assert report.ok, report.problems
    assert report.records == 40
    (chain,) = report.chains
    assert chain.segments > 2 and (chain.first_seq, chain.last_seq) == (1, 40)
    records = list(auditlog.iter_records(tmp_path))
    assert [r.seq for r in records] == list(range(1, 41))
    assert [r.to_event().request_no for r in records] == list(range(40))
    assert all(b.prev_hash == a.hash for a, b in zip(records, records[1:]))
    assert records[0].prev_hash == auditlog.genesis_hash(records[0].chain)


def test_reopening_continues_the_chain_in_a_new_segment(tmp_path: Path, key) -> None:
    first = write_log(tmp_path, key, 5, segment_max_bytes=10**6)
    second = write_log(tmp_path, key, 5, segment_max_bytes=10**6)
    assert second.chain == first.chain and second.segment == first.segment + 1
    assert [r.seq for r in auditlog.iter_records(tmp_path)] == list(range(1, 11))
    assert auditlog.verify(tmp_path, trusted(key)).ok


def test_worker_processes_get_their_own_slot_and_chain(tmp_path: Path, key) -> None:
    first = auditlog.SlotLock.acquire(tmp_path, "main")
    second = auditlog.SlotLock.acquire(tmp_path, "main")
    assert (first.slot, second.slot) == ("main", "main.1")
    a, _ = auditlog.LogWriter.open(first, key, segment_max_bytes=10**6)
    b, _ = auditlog.LogWriter.open(second, key, segment_max_bytes=10**6)
    a.append([request(1)])
    b.append([request(2)])
    b.append([request(3)])
    a.close(), b.close()
    assert a.chain != b.chain
    report = auditlog.verify(tmp_path, trusted(key))
    assert report.ok and {(c.slot, c.records) for c in report.chains} == {("main", 1), ("main.1", 2)}
    first.release()
    assert auditlog.SlotLock.acquire(tmp_path, "main").slot == "main"  # freed slots are reused


# --- tampering -----------------------------------------------------------------------------------


def sealed_segment(directory: Path) -> Path:
    """The second segment: sealed, with records on both sides."""
    return auditlog.segment_path(directory, "main", 2)


def test_an_edited_byte_is_found(tmp_path: Path, key) -> None:
    write_log(tmp_path, key, 40)
    path = sealed_segment(tmp_path)
    victim = frames(path)[1]
    data = bytearray(path.read_bytes())
    data[victim.end - 3] ^= 0x01
    path.write_bytes(bytes(data))
    report = auditlog.verify(tmp_path, trusted(key))
    assert not report.ok
    first = report.first_problem
    assert (first.kind, first.segment, first.seq, first.offset) == ("damaged-record", 2, victim.record.seq, victim.offset)


def test_a_rewritten_record_with_a_valid_checksum_breaks_the_chain(tmp_path: Path, key) -> None:
    write_log(tmp_path, key, 40)
    path = sealed_segment(tmp_path)
    victim = frames(path)[1]
    event = dict(victim.record.event, statements=["SELECT 1"])  # what a forger would like the log to say
    forged = auditlog.make_record(attrs.evolve(auditlog.RecordBody(victim.record.chain, victim.record.seq, victim.record.prev_hash, victim.record.at, victim.record.type, event)))
    data = path.read_bytes()
    path.write_bytes(data[: victim.offset] + auditlog.encode_record(forged) + data[victim.end :])
    report = auditlog.verify(tmp_path, trusted(key))
    assert report.first_problem.kind == "chain-break"
    assert report.first_problem.seq == victim.record.seq + 1


def test_a_deleted_record_is_found(tmp_path: Path, key) -> None:
    write_log(tmp_path, key, 40)
    path = sealed_segment(tmp_path)
    victim = frames(path)[1]
    data = path.read_bytes()
    path.write_bytes(data[: victim.offset] + data[victim.end :])
    report = auditlog.verify(tmp_path, trusted(key))
    assert (report.first_problem.kind, report.first_problem.seq) == ("missing-record", victim.record.seq)


def test_reordered_records_are_found(tmp_path: Path, key) -> None:
    write_log(tmp_path, key, 40)
    path = sealed_segment(tmp_path)
    a, b = frames(path)[1:3]
    data = path.read_bytes()
    path.write_bytes(data[: a.offset] + data[b.offset : b.end] + data[a.offset : a.end] + data[b.end :])
    report = auditlog.verify(tmp_path, trusted(key))
    assert report.first_problem.kind == "missing-record" and report.first_problem.seq == a.record.seq
    assert any(p.kind == "out-of-order" and p.seq == a.record.seq for p in report.problems)


def test_a_truncated_segment_is_found(tmp_path: Path, key) -> None:
    write_log(tmp_path, key, 40)
    path = sealed_segment(tmp_path)
    last = frames(path)[-1]
    for cut in (last.offset, last.offset + 5):  # at a record boundary, and inside a record
        shutil.copy(path, tmp_path / "backup")
        os.truncate(path, cut)
        report = auditlog.verify(tmp_path, trusted(key))
        assert any(p.kind == "truncated" and p.segment == 2 for p in report.problems), report.problems
        shutil.copy(tmp_path / "backup", path)
    assert auditlog.verify(tmp_path, trusted(key)).ok


def test_a_deleted_segment_is_found(tmp_path: Path, key) -> None:
    write_log(tmp_path, key, 40)
    auditlog.segment_path(tmp_path, "main", 2).unlink()
    report = auditlog.verify(tmp_path, trusted(key))
    assert (report.first_problem.kind, report.first_problem.segment) == ("missing-segment", 2)


def test_a_deleted_segment_with_its_manifest_is_found(tmp_path: Path, key) -> None:
    write_log(tmp_path, key, 40)
    auditlog.segment_path(tmp_path, "main", 2).unlink()
    auditlog.manifest_path(tmp_path, "main", 2).unlink()
    report = auditlog.verify(tmp_path, trusted(key))
    assert (report.first_problem.kind, report.first_problem.segment) == ("missing-segment", 2)


def test_deleting_the_newest_segments_is_found(tmp_path: Path, key) -> None:
    writer = write_log(tmp_path, key, 40)
    last = writer.segment
    for number in (last, last - 1):
        auditlog.segment_path(tmp_path, "main", number).unlink()
        auditlog.manifest_path(tmp_path, "main", number).unlink()
    report = auditlog.verify(tmp_path, trusted(key))
    assert report.first_problem.kind == "missing-segment" and report.first_problem.segment == last


def test_a_forged_manifest_is_found(tmp_path: Path, key) -> None:
    write_log(tmp_path, key, 40)
    path = auditlog.manifest_path(tmp_path, "main", 2)
    original = path.read_bytes()
    manifest, blob, _ = auditlog.open_signed(original, auditlog.Manifest)
    # an edited manifest under the old signature
    edited = auditlog.pack_value(attrs.evolve(blob, body=auditlog.pack_value(attrs.evolve(manifest, count=manifest.count - 1))))
    path.write_bytes(edited)
    assert auditlog.verify(tmp_path, trusted(key)).first_problem.kind == "forged-manifest"
    # a manifest re-signed by someone else's key, still naming ours
    forger = Ed25519PrivateKey.generate()
    path.write_bytes(auditlog.sign(forger, manifest))
    assert auditlog.verify(tmp_path, trusted(key)).first_problem.kind == "forged-manifest"
    # … or naming the forger's key
    path.write_bytes(auditlog.sign(forger, attrs.evolve(manifest, public_key=auditlog.public_key_bytes(forger))))
    report = auditlog.verify(tmp_path, trusted(key))
    assert (report.first_problem.kind, report.first_problem.segment) == ("untrusted-key", 2)
    # without a trust anchor the re-signed manifest still disagrees with the segment's header
    assert not auditlog.verify(tmp_path, None).ok
    path.write_bytes(original)
    assert auditlog.verify(tmp_path, trusted(key)).ok


def test_a_rewritten_log_signed_with_another_key_is_refused(tmp_path: Path, key) -> None:
    write_log(tmp_path, Ed25519PrivateKey.generate(), 10)
    report = auditlog.verify(tmp_path, trusted(key))
    assert {p.kind for p in report.problems} >= {"untrusted-key"}


# --- recovery ------------------------------------------------------------------------------------


def test_a_torn_last_segment_is_sealed_as_is_and_the_damage_recorded(tmp_path: Path, key) -> None:
    writer = write_log(tmp_path, key, 5, segment_max_bytes=10**6, close=False)
    torn_segment = writer.segment
    path = auditlog.segment_path(tmp_path, "main", torn_segment)
    partial = auditlog.encode_record(auditlog.make_record(auditlog.RecordBody(writer.chain, 6, writer.last_hash, 0.0, "request", request(6)[1])))
    with open(path, "ab") as handle:
        handle.write(partial[:-7])  # the crash hit in the middle of a write
    before = path.read_bytes()
    writer.abandon()
    writer.lock.release()

    lock = auditlog.SlotLock.acquire(tmp_path, "main")
    reopened, warnings = auditlog.LogWriter.open(lock, key, segment_max_bytes=10**6)
    (warning,) = warnings
    assert warning.segment == torn_segment and warning.damage[0].incomplete
    assert path.read_bytes() == before  # sealed as it was: nothing overwritten, nothing dropped
    assert reopened.segment == torn_segment + 1
    reopened.append([request(7)])
    reopened.close()

    records = list(auditlog.iter_records(tmp_path))
    assert [r.seq for r in records] == [1, 2, 3, 4, 5, 6, 7]  # the chain goes on from the last good record
    damage = records[5]
    assert damage.type == auditlog.DAMAGE_RECORD_TYPE and damage.event["resumed_after_seq"] == 5
    assert damage.event["damage"][0]["segment"] == torn_segment
    report = auditlog.verify(tmp_path, trusted(key))
    assert report.ok, report.problems
    assert [w.kind for w in report.warnings] == ["recovered-damage"]


def test_garbage_in_the_middle_of_the_last_segment_keeps_the_records_after_it(tmp_path: Path, key) -> None:
    writer = write_log(tmp_path, key, 6, segment_max_bytes=10**6, close=False)
    path = auditlog.segment_path(tmp_path, "main", writer.segment)
    writer.abandon()
    writer.lock.release()
    victim = frames(path)[2]
    data = bytearray(path.read_bytes())
    data[victim.offset + 14] ^= 0xFF  # disk damage inside record 3
    path.write_bytes(bytes(data))

    lock = auditlog.SlotLock.acquire(tmp_path, "main")
    reopened, warnings = auditlog.LogWriter.open(lock, key, segment_max_bytes=10**6)
    assert warnings and not warnings[0].damage[0].incomplete
    assert reopened.next_seq == 8  # 1..6, the lost 3 included, then the damage record is seq 7
    reopened.close()
    assert [r.seq for r in auditlog.iter_records(tmp_path)] == [1, 2, 4, 5, 6, 7]
    report = auditlog.verify(tmp_path, trusted(key))
    assert report.ok, report.problems
    assert [w.kind for w in report.warnings] == ["recovered-damage"]


def test_a_segment_without_its_header_is_recovered_from_the_previous_manifest(tmp_path: Path, key) -> None:
    write_log(tmp_path, key, 3, segment_max_bytes=10**6)
    auditlog.segment_path(tmp_path, "main", 2).write_bytes(b"BASTN")  # created, then the disk filled up
    lock = auditlog.SlotLock.acquire(tmp_path, "main")
    reopened, warnings = auditlog.LogWriter.open(lock, key, segment_max_bytes=10**6)
    assert warnings and reopened.next_seq == 5 and reopened.segment == 3
    reopened.close()
    assert [r.seq for r in auditlog.iter_records(tmp_path)] == [1, 2, 3, 4]


# --- blocks: several records per frame ----------------------------------------------------------


def write_blocks(directory: Path, key, sizes: list[int], *, close: bool = True) -> auditlog.LogWriter:
    """One append (so one write, in blocks) per entry of ``sizes``, each of that many records."""
    lock = auditlog.SlotLock.acquire(directory, "main")
    writer, _ = auditlog.LogWriter.open(lock, key, segment_max_bytes=10**7)
    n = 0
    for size in sizes:
        writer.append([request(n + i) for i in range(size)])
        n += size
    writer.sync()
    if close:
        writer.close()
        lock.release()
    return writer


def frame_offsets(path: Path) -> list[int]:
    return sorted({item.offset for item in frames(path)})


def test_one_append_is_written_as_blocks_that_read_back_record_by_record(tmp_path: Path, key) -> None:
    writer = write_blocks(tmp_path, key, [10, 150])
    path = auditlog.segment_path(tmp_path, "main", writer.segment)
    scanned = frames(path)
    assert [item.record.seq for item in scanned] == list(range(1, 161))
    sizes = [sum(1 for item in scanned if item.offset == offset) for offset in frame_offsets(path)]
    assert sizes == [10, auditlog.MAX_BLOCK_RECORDS, auditlog.MAX_BLOCK_RECORDS, 150 - 2 * auditlog.MAX_BLOCK_RECORDS]
    assert [item.ends_frame for item in scanned[:10]] == [False] * 9 + [True]
    assert [r.to_event().request_no for r in auditlog.iter_records(tmp_path)] == list(range(160))
    assert auditlog.verify(tmp_path, trusted(key)).ok


def test_a_big_record_is_a_block_of_its_own(tmp_path: Path, key) -> None:
    lock = auditlog.SlotLock.acquire(tmp_path, "main")
    writer, _ = auditlog.LogWriter.open(lock, key, segment_max_bytes=10**7)
    big = events.event_to_dict(events.ResultRows(session_id="s", request_no=1, first_row=0, rows=tuple((f"{n:08d}" * 100,) for n in range(400))))
    writer.append([request(0), (big.pop("type"), big), request(2)])
    writer.close()
    path = auditlog.segment_path(tmp_path, "main", writer.segment)
    assert len(frame_offsets(path)) == 3  # the rows (over MAX_BLOCK_BYTES) did not share a block
    assert [r.seq for r in auditlog.iter_records(tmp_path)] == [1, 2, 3]


def test_an_edited_byte_in_a_block_loses_that_block_only_and_is_found(tmp_path: Path, key) -> None:
    write_blocks(tmp_path, key, [5, 5, 5])
    path = auditlog.segment_path(tmp_path, "main", 1)
    first, second, third = frame_offsets(path)
    data = bytearray(path.read_bytes())
    data[third - 3] ^= 0x01  # inside the second block
    path.write_bytes(bytes(data))
    assert [r.seq for r in auditlog.iter_records(tmp_path)] == [1, 2, 3, 4, 5, 11, 12, 13, 14, 15]
    report = auditlog.verify(tmp_path, trusted(key))
    assert (report.first_problem.kind, report.first_problem.seq, report.first_problem.offset) == ("damaged-record", 6, second)


def test_a_deleted_or_moved_block_is_found(tmp_path: Path, key) -> None:
    write_blocks(tmp_path, key, [5, 5, 5])
    path = auditlog.segment_path(tmp_path, "main", 1)
    first, second, third = frame_offsets(path)
    original = path.read_bytes()
    path.write_bytes(original[:second] + original[third:])
    report = auditlog.verify(tmp_path, trusted(key))
    assert (report.first_problem.kind, report.first_problem.seq) == ("missing-record", 6)
    path.write_bytes(original[:first] + original[second:third] + original[first:second] + original[third:])
    report = auditlog.verify(tmp_path, trusted(key))
    assert (report.first_problem.kind, report.first_problem.seq) == ("missing-record", 1)
    assert any(p.kind == "out-of-order" for p in report.problems)


def test_records_after_a_damaged_block_survive_recovery(tmp_path: Path, key) -> None:
    writer = write_blocks(tmp_path, key, [4, 4, 4], close=False)
    path = auditlog.segment_path(tmp_path, "main", writer.segment)
    writer.abandon()
    writer.lock.release()
    _, second, _ = frame_offsets(path)
    data = bytearray(path.read_bytes())
    data[second + 20] ^= 0xFF
    path.write_bytes(bytes(data))
    lock = auditlog.SlotLock.acquire(tmp_path, "main")
    reopened, warnings = auditlog.LogWriter.open(lock, key, segment_max_bytes=10**6)
    assert warnings and reopened.next_seq == 14  # 1..12, then the damage record is 13
    reopened.close()
    assert [r.seq for r in auditlog.iter_records(tmp_path)] == [1, 2, 3, 4, 9, 10, 11, 12, 13]
    report = auditlog.verify(tmp_path, trusted(key))
    assert report.ok, report.problems


@pytest.mark.parametrize("limit", [1, 3, 7, 100])
def test_a_cursor_stopping_inside_a_block_resumes_without_gaps_or_repeats(tmp_path: Path, key, limit: int) -> None:
    write_blocks(tmp_path, key, [10, 1, 20])
    cursor = auditlog.ChainCursor(tmp_path, "main")
    seen: list[int] = []
    while batch := cursor.read(seen[-1] if seen else 0, None, limit):
        seen += [r.seq for r in batch]
    assert seen == list(range(1, 32))
    cursor = auditlog.ChainCursor(tmp_path, "main")
    assert [r.seq for r in cursor.read(0, 4, limit)] == list(range(1, min(4, limit) + 1))  # up to a seq inside a block
    assert [r.seq for r in cursor.read(min(4, limit), 13, 100)] == list(range(min(4, limit) + 1, 14))


def test_a_format_1_segment_is_named_as_such(tmp_path: Path, key) -> None:
    write_log(tmp_path, key, 1, segment_max_bytes=10**6)
    path = auditlog.segment_path(tmp_path, "main", 1)
    path.write_bytes(auditlog.FORMAT_1_MAGIC + path.read_bytes()[len(auditlog.SEGMENT_MAGIC) :])
    with pytest.raises(auditlog.AuditLogError, match="format-1"):
        auditlog.read_header(path.read_bytes())


# --- keys ------------------------------------------------------------------------------------------


def test_signing_key_formats(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    import base64

    expected = auditlog.public_key_bytes(key)
    for material in (pem, pem.decode(), seed, seed.hex(), base64.b64encode(seed).decode() + "\n"):
        assert auditlog.public_key_bytes(auditlog.load_signing_key(material)) == expected
    with pytest.raises(auditlog.AuditLogError) as info:
        auditlog.load_signing_key("not a key at all")
    assert "not a key" not in str(info.value)  # never echo the material


def test_a_generated_key_is_private_and_stable(tmp_path: Path) -> None:
    key, created = auditlog.generated_signing_key(tmp_path)
    again, created_again = auditlog.generated_signing_key(tmp_path)
    assert created and not created_again
    assert auditlog.public_key_bytes(key) == auditlog.public_key_bytes(again)
    assert (tmp_path / auditlog.SIGNING_KEY_FILE).stat().st_mode & 0o077 == 0


def test_workers_generating_the_key_at_once_all_end_up_with_the_same_key(tmp_path: Path) -> None:
    import threading

    starting_line = threading.Barrier(8)
    results = []

    def worker() -> None:
        starting_line.wait()
        key, created = auditlog.generated_signing_key(tmp_path)
        results.append((auditlog.public_key_bytes(key), created))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 8 and len({public for public, _ in results}) == 1
    assert sum(created for _, created in results) == 1
    assert [p.name for p in tmp_path.iterdir()] == [auditlog.SIGNING_KEY_FILE]  # no temporary file left


def test_half_made_files_of_the_own_slot_are_removed_at_open(tmp_path: Path, key) -> None:
    write_log(tmp_path, key, 2, segment_max_bytes=10**6)
    own = tmp_path / "main-00000002.seg.tmp"
    others = tmp_path / "main.1-00000001.seg.tmp"
    own.write_bytes(b"crash")
    others.write_bytes(b"someone else's")
    write_log(tmp_path, key, 1, segment_max_bytes=10**6)
    assert not own.exists() and others.exists()
    assert auditlog.verify(tmp_path, trusted(key)).ok
