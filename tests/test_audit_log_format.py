"""The block format across versions: logs written before the compressor's window shrank still read,
and blocks written now read with the decoder every earlier version used."""

from __future__ import annotations

import base64
import hashlib
import zlib
from pathlib import Path

import msgpack
from hypothesis import given
from hypothesis import strategies as st

from bastion.core import auditlog

# One block (request, rows, response of chain "golden.main.00000000") as the writer framed it before
# the window was sized per block: zlib window 2**15, memLevel 4.
FULL_WINDOW_FRAME = base64.b64decode(
    "p0JSAQAAAVitRNmySCyqlWaym3yUUb1tKTi/bEnPzwHarZcLzDt6BlAAykSMiFx0RGEKl69QtduZH7opp/0t7Sfaucq5fArc"
    "IpwlOl3daofIVDtgPjvteDPkjwMDAwM4w8FCApLxOpFy3qJiQ2TVSCmeEZ5nViVn6uaBYiynEprTVgJ9kZeZrJuSBM4XiCBC"
    "yiETb5pAQwCYx3JAQa0ADomC9CRgpGfEJyYn55cCMw00YBIzUxRsFeytYRlrIjS0YXkGEjFHVhAKKCbkgLp6XmT/s22LPkzV"
    "WVf+8ZB4/6IXpuZV6xjtpJtPbuvPv1AK9zowpMABBcmC4OKplbhQQuQ4BrDmiROX6hqZG1ocuUTIpczILo1UWXOhLuZ9n7b7"
    "ZMmqh9zutVPLZM1X5NZGSyYfMpjurgp3aQPUpfBEDYnTDuJcCy1xgKkVVuhMXAGLHrDzGSHljyByabMCGo+GAJhdHWw="
)
FULL_WINDOW_FRAME_LAST_HASH = bytes.fromhex("06122194c89aa2f61228c2eeaf779ada26e248f09264c9e9220f6ce3ab8a66f1")

# A whole sealed log (segment, manifest, head; msgpack map of file name to bytes, zlib) written before
# the change: 10 records in blocks of 3 and 7, signed with the key whose seed is bytes(range(32)).
FULL_WINDOW_LOG = (
    "eNpr3pabmJmnawABhnq5iXmZaanFJUcZHzYvScpPqTzKGH+PQXBZWn5RbmIJ09LkDKDyDWW5eiBtemapRkZmholJS4pz8kuW"
    "gISWF6em56bmlTCuTMssKi6JL04tZFyRkwhhcS1Nzi/NK+FaWVCUWhafkViccUThOvtppqxa2ccsTwqdXjxR/d3f5KK1LvDs"
    "ZuWv65Y0fJxyayVYM0QtVzXPlxnd2tVLtt3R/x3Hl9J3LoXb7sOZOMVnD/jm8V1WXwGxM7HktOPNkD8ODgwMy8G6oQJODQwM"
    "QGflpMYXZ1alnmW+tRrCyUg0MjU7ovC88Dsf4+RwO797/p9Ov7BKW3XqreDzNnVuKbE6LW6DROWVxamJOakpcNMOAE2DCiVV"
    "Lk3OyS9OXVVQmpSTmRyfnVp5RIF5Ifv+z+cE9skW3JV47n1gZvqTawazl/LGy95pSxEKNdyxLCUxNzE9dcLK4sz0vMSS0qLU"
    "Iw7L7FZtWmnfUvXrxw3JaxdXMG9Xu+weIaVmv6XC+4r+nDW11WrZU+Qe3ucU37hw/YrzPgauMhvtpx1LzDnFUeO3OcWFgyQH"
    "bESNemDMHWW+5eQYHOLnGMq03CmIkYGB4Ubp5T+p3RRFPymxvSq5KDWxBBHIwChkWFyQmXLW0mxJRn5xyaKyXJK8uDo5Pxdo"
    "fXFxZn7exqqczCTdlMzkEkPdpJz85OxiiB8ZOZZcOqtQYb9qatqm2TVP6m4HFZTdDJi2ejr3GbOqtJVubmltnZ4L/hzuOOHg"
    "LrJu8/y0U6um1p75tOTCy6PCV+//9dWLes10Pi/s3648z8PHNbc3RL7Z8vjsBHs+Ph6eB3vYuFk85mW7nirp7uJ9sEpSQmKC"
    "kDVzkNP8isssrwQTwk4yts5guuHM+tLzwI7THf4+fuf0WZfVrvgvZBwskiP6Zm2ip6zQvB+2J1reOPbPj7/tJXfy7Idfa+fs"
    "7IqP9N+/wzn2QGXvxNDJsR8lv77sK1A3F3jo6LwjK4Tf6NL15jMn5ERWmiVfy1vRsycz+ee/15NOTDuquauyeHnmzIzSN/NL"
    "Ml9e3FygLq9wqHlH0oTOW3IsDBm5kk+hYXIu/+AtM2iY1OEOkyZQmOidUNOcIr9i5rOco2u3G36veB/WJysX2J2vlbEvvihq"
    "8VMmbYPuuWV7JD8dn9jYyDjnekIjw8nitR4z8wI3KvpsZQ4wDUpKd/N6IZw/y8GW6YyW5QKBYIbqFQq2nBLlkh87T578ufTA"
    "Fv6v8UlpXU1rm/aa6qx0PiS8nz1you2Op7X36yPvvjT7rm2yLb/qTcpE8bKnx/ccqTuZHt7Mt3bu27U8xZuUL5xlsc1gCO59"
    "5ij2q2oC781md3Ht+PfW6+/+7i2O/7Ir/5bap55904vm5c8Q3Pzwcfd/6ay8g3Pe3HBoYS88qqBda3ui783Bu9JvZq2ZK7n2"
    "1vR/1etfmTw/3rglVdU9bJ6u15ZX04ovzE7m/P6AUcmmQ5vt5ovXjnwp/O8+7PhkvETpj5vO+V3PNi8/cn72O1uzxdlyh6X/"
    "nfzJmfvJ9JoBv5UhML5iDE/4xfMXKVUXvKzslFh/8y/Twj9upZG33xmcltEuvCJke+7B39+P9tw03iV20JbjTFjKc0c+oDe4"
    "bza/uy4k9jZUt/a2ffm/szeNHpaXu/05Nf1vTdrhz0873x6/vyvkgK2Hp9yTJdvYGWVPTp+9EpxnM1ITU0YL9+FfuAMAIp6m"
    "xw=="
)
FULL_WINDOW_LOG_SEED = bytes(range(32))

bodies = st.lists(st.binary(max_size=2000), min_size=1, max_size=70)


def unchanged_decoder(payload: bytes) -> list[bytes]:
    """How every version so far reads a block's payload: inflate with the full window and the
    dictionary, then the msgpack array of bodies."""
    decompressor = zlib.decompressobj(zlib.MAX_WBITS, zdict=auditlog.ZDICT_V1)
    data = decompressor.decompress(payload)
    assert decompressor.eof and not decompressor.unconsumed_tail
    return msgpack.unpackb(data, raw=False)


def payload_of(frame: bytes) -> bytes:
    mark, length, checksum = auditlog.FRAME_HEADER.unpack_from(frame)
    payload = frame[auditlog.FRAME_HEADER.size :]
    assert (mark, length, checksum) == (auditlog.RECORD_MARK, len(payload), zlib.crc32(payload))
    return payload


def unpack_log(directory: Path) -> None:
    files = msgpack.unpackb(zlib.decompress(base64.b64decode("".join(FULL_WINDOW_LOG))), raw=False)
    for name, data in files.items():
        (directory / name).write_bytes(data)


@given(bodies)
def test_a_block_written_now_reads_with_the_unchanged_decoder(items) -> None:
    frame = auditlog.encode_bodies(items)
    payload = payload_of(frame)
    assert unchanged_decoder(payload) == items
    assert auditlog.unpack(auditlog.decompress(payload)) == items
    window_bits = (payload[0] >> 4) + 8  # the zlib header's CINFO
    assert window_bits <= zlib.MAX_WBITS


@given(bodies, st.sampled_from([(1, 15, 4), (1, 15, 8), (6, 15, 8), (1, 12, 4), (9, 9, 1)]))
def test_blocks_compressed_with_any_earlier_window_and_level_still_read(items, parameters) -> None:
    level, window_bits, mem_level = parameters
    compressor = zlib.compressobj(level, zlib.DEFLATED, window_bits, mem_level, zdict=auditlog.ZDICT_V1)
    payload = compressor.compress(auditlog.pack(items)) + compressor.flush()
    assert auditlog.unpack(auditlog.decompress(payload)) == items


@given(st.integers(min_value=0, max_value=auditlog.MAX_FRAME_PAYLOAD))
def test_the_window_covers_the_dictionary_and_the_block_or_is_the_largest(size) -> None:
    window_bits, mem_level = auditlog.compression_parameters(size)
    assert auditlog.MIN_WINDOW_BITS <= window_bits <= zlib.MAX_WBITS and 1 <= mem_level <= 9
    reach = (1 << window_bits) - auditlog.ZLIB_LOOKAHEAD
    assert reach >= size + len(auditlog.ZDICT_V1) or window_bits == zlib.MAX_WBITS
    if window_bits > auditlog.MIN_WINDOW_BITS:  # not bigger than it needs to be
        assert (1 << (window_bits - 1)) - auditlog.ZLIB_LOOKAHEAD < size + len(auditlog.ZDICT_V1)


def test_a_full_window_block_still_reads() -> None:
    scanned = list(auditlog.scan_frames(FULL_WINDOW_FRAME, 0))
    assert [type(item) for item in scanned] == [auditlog.ScannedRecord] * 3
    records = [item.record for item in scanned]
    assert [(r.chain, r.seq, r.type) for r in records] == [("golden.main.00000000", n, t) for n, t in ((1, "request"), (2, "rows"), (3, "response"))]
    assert records[0].prev_hash == auditlog.genesis_hash("golden.main.00000000")
    assert all(b.prev_hash == a.hash for a, b in zip(records, records[1:]))
    assert records[-1].hash == FULL_WINDOW_FRAME_LAST_HASH
    assert records[0].event["statements"] == ["SELECT abalance FROM pgbench_accounts WHERE aid = ?;"]
    # the same bodies framed now: other compressed bytes (a smaller window), the same records
    again = auditlog.encode_bodies([r.body for r in records])
    assert [item.record for item in auditlog.scan_frames(again, 0)] == records
    assert hashlib.sha256(records[-1].body).digest() == FULL_WINDOW_FRAME_LAST_HASH


def test_a_full_window_log_verifies_and_a_writer_continues_its_chain(tmp_path: Path) -> None:
    unpack_log(tmp_path)
    key = auditlog.load_signing_key(FULL_WINDOW_LOG_SEED)
    trusted = [auditlog.public_key_bytes(key)]
    report = auditlog.verify(tmp_path, trusted)
    assert report.ok and report.records == 10, report.problems
    before = list(auditlog.iter_records(tmp_path))
    assert [r.seq for r in before] == list(range(1, 11))
    lock = auditlog.SlotLock.acquire(tmp_path, "main")
    writer, warnings = auditlog.LogWriter.open(lock, key, segment_max_bytes=10**6)
    assert warnings == [] and writer.next_seq == 11
    writer.append([("request", {"session_id": "s", "request_no": n, "statements": ["SELECT 1"]}) for n in range(5)])
    writer.append([("rows", {"session_id": "s", "request_no": 9, "rows": [[f"{n:06d}" * 40] for n in range(300)]})])
    writer.close()
    lock.release()
    report = auditlog.verify(tmp_path, trusted)
    assert report.ok and report.records == 16, report.problems
    after = list(auditlog.iter_records(tmp_path))
    assert after[:10] == before and [r.seq for r in after] == list(range(1, 17))
    assert after[10].prev_hash == before[-1].hash
    data = auditlog.segment_path(tmp_path, "main", writer.segment).read_bytes()
    offsets = sorted({item.offset for item in auditlog.scan_frames(data, auditlog.read_header(data).end)})
    windows = [(payload_of(data[start:end])[0] >> 4) + 8 for start, end in zip(offsets, offsets[1:] + [len(data)])]
    assert windows == [auditlog.MIN_WINDOW_BITS, zlib.MAX_WBITS]  # five requests; the big rows record alone
