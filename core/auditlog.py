"""The audit log on disk: append-only segments, a SHA-256 hash chain, signed manifests.

No trio here: everything is blocking file I/O, run by :mod:`bastion.core.audit` in worker threads
and by the CLI directly.

Layout of ``<state_dir>/audit/``::

    signing.key                 Ed25519 key generated on first start when audit.signing_key is unset
    <slot>.lock                 held (flock) by the process writing that slot's chain
    <slot>-00000001.seg         segments of one chain, numbered from 1
    <slot>-00000001.manifest    written when a segment is sealed (signed)
    <slot>.head                 a copy of the newest manifest: lets verify notice deleted tail segments
    retention.log               signed records of exports and prunes
    sinks/<sink>.<slot>.pos     how far each forwarded sink has got

A *slot* is a local name for one writer ("main", "main.1"…): each gateway process takes a free slot
(an exclusive lock) and keeps its own chain there, so several worker processes share the directory
without sharing a chain. A chain's *id* is global (``<host>.<slot>.<random>``, fixed when the chain is
created) so records from many gateways can meet in one PostgreSQL table or NATS stream: a record's
id is ``<chain id>:<seq>``.

A segment file is ``SEGMENT_MAGIC`` followed by frames; the first frame is the segment header (plain
msgpack), every further frame a *block* of one or more consecutive records. A frame is::

    RECORD_MARK (4 bytes) | payload length (u32, big-endian) | CRC-32 of payload (u32) | payload

so a torn write (crash, full disk) shows up as a short or failing frame, and a reader can find the
next frame after damage by looking for the mark. A record's *body* is the msgpack map
``{chain, seq, prev_hash, at, type, event}``; a block's payload is the msgpack array of its records'
bodies (as bin), compressed with zlib using a fixed preset dictionary of field names. The writer
puts what one write call appends into blocks of at most ``MAX_BLOCK_RECORDS`` records: one
compressor per block rather than per record (setting a compressor up costs more than compressing a
small record), while damage to one frame still loses at most one block. The dictionary makes small
blocks compress too. The chain hash of a record is SHA-256 of its body; ``prev_hash`` is the
previous record's hash, and the first record of a chain links to :func:`genesis_hash`. Compression
and blocks are outside the hash, so an exported body can be re-verified.

Format 2 (blocks) replaced format 1 (one compressed record per frame) before anything was
deployed: a format-1 segment is reported as unreadable, not read.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import fcntl
import hashlib
import mmap
import os
import re
import secrets
import socket
import struct
import threading
import time
import zlib
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from bastion.core.codec import converter

# --- format constants --------------------------------------------------------------------------

AUDIT_DIR_NAME = "audit"
FORMAT_VERSION = 2
# identifies a segment file (and its format version) before anything else is parsed
SEGMENT_MAGIC = b"BASTNAU\x02"
# what format 1 started with: recognised only to say why such a segment is not read
FORMAT_1_MAGIC = b"BASTNAU\x01"
# starts every frame: lets a reader resynchronise after a damaged frame by searching for it
RECORD_MARK = b"\xa7BR\x01"
FRAME_HEADER = struct.Struct(">4sII")
# no single frame may claim more than this: a corrupt length field must not make a reader
# allocate gigabytes, and no block (a chunk of result rows at most) comes near it
MAX_FRAME_PAYLOAD = 64 * 1024 * 1024
# zlib level 1: blocks of similar records compress to within a few per cent of level 6 for a
# third of its CPU (measured on blocks of 3 to 300 records, benchmarks/audit_bench.py)
COMPRESSION_LEVEL = 1
# Each block's compressor gets a window just big enough for the dictionary and the block (a match
# reaches back at most the window less zlib's lookahead), at least 2**MIN_WINDOW_BITS: no match is
# lost to the smaller window, and every reader reads it (inflate with 2**15 takes any smaller
# window). A full window makes zlib allocate 2 x 64 KB per compressor, freed again at once: enough
# to cross malloc's trim threshold, give the pages back and fault them in again for the next block
# (with a fixed 128 KB threshold: a page fault and about 20 µs more per block; none at 2**12).
MIN_WINDOW_BITS = 12
ZLIB_LOOKAHEAD = 262  # zlib's MIN_LOOKAHEAD: the window bytes a match can never reach
# zlib's memLevel for the smallest window: 4 halves the hash table level 8 allocates and clears for
# every compressor, the bigger part of compressing a small block. A bigger block gets one level more
# per doubling of its window: the symbol buffer (2**(memLevel+6)) then holds the whole block, one
# set of Huffman trees rather than several (a third less CPU on a 64-record block, and smaller).
COMPRESSION_MEM_LEVEL = 4
# names the block scheme and dictionary in each segment header
COMPRESSION = "zlib-dict1-blocks"
# the most records one block holds: enough to spread a compressor's set-up thinly, few enough
# that one damaged frame loses little
MAX_BLOCK_RECORDS = 64
# a block is closed once its bodies reach this many bytes (a single bigger record is a block alone)
MAX_BLOCK_BYTES = 256 * 1024
# Preset dictionary for block compression: the msgpack-encoded field names and common values
# of the events that existed when format 1 was fixed. It is part of the format — never edit it;
# a new dictionary needs a new COMPRESSION name.
ZDICT_V1 = (
    b"\xa5chain\xa3seq\xa9prev_hash\xa2at\xa4type\xa5event\xaasession_id\xa7version\xa7targets"
    b"\xaepolicy_version\xa3pid\xa6reason\xb4sessions_interrupted\xa6target\xa8protocol\xa6client"
    b"\xa6listen\xa3tls\xa8identity\xabclient_user\xa8database\xa8decision\xa5rules\xa8provider"
    b"\xaarequest_no\xa4kind\xaastatements\xa7actions\xacfingerprints\xa6tables\xa8findings\xa4risk"
    b"\xaaparameters\xa7verdict\xa7reasons\xa6status\xa7columns\xa4rows\xa5bytes\xa6masked"
    b"\xabduration_ms\xabcommand_tag\xaaerror_code\xaderror_message\xa9first_row\xabapproval_id"
    b"\xa4step\xa5actor\xa7comment\xa4rule\xa7outcome\xa8requests\xb1bytes_from_client"
    b"\xafbytes_to_client\xa5error\xa7subject\xa6issuer\xa6groups\xabauth_method\xa8token_id"
    b"\xaaexpires_at\xa2ci\xa4name\xa6weight\xa8sentence\xafgateway-started\xafgateway-stopped"
    b"\xb1connection-opened\xafsession-started\xb5authentication-failed\xa7request\xa8response"
    b"\xa4rows\xa8approval\xa6cancel\xadsession-ended\xa5allow\xa4deny\xa6review\xa9statement"
    b"\xa6select\xa6insert\xa6update\xa6delete\xa2ok\xa5error\xa8postgres\xa7SELECT \xa5FROM "
    b"\xa7 WHERE \xb3client disconnected"
)
# a record type the trail writes itself (not an AuditEvent): damage found and sealed at start-up
DAMAGE_RECORD_TYPE = "audit-damage"
SIGNING_KEY_FILE = "signing.key"
RETENTION_LOG = "retention.log"
SINK_POSITIONS_DIR = "sinks"
SLOT_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
SEGMENT_NAME = re.compile(r"(?P<slot>[A-Za-z0-9][A-Za-z0-9_.-]{0,62})-(?P<number>\d{8})\.(?P<ext>seg|manifest)")
# how many slots a process tries ("main", "main.1", …) before giving up: far more than the number
# of worker processes anyone runs on one state directory
MAX_SLOTS = 256
# msgpack cannot encode lone surrogates as UTF-8; text decoded from a client with
# errors="surrogateescape" may hold them, and a record must never fail for that reason
UNICODE_ERRORS = "surrogatepass"
# A thread's reusable packer keeps its buffer (msgpack grows it, never shrinks it) only up to this:
# past it the packer is dropped, so one huge record does not pin its size for the thread's life.
PACKER_KEEP_BYTES = 1024 * 1024


class AuditLogError(Exception):
    """The log cannot be opened or written (the message says what and where)."""


class SlotBusy(AuditLogError):
    """Another process holds every slot this process may use."""


# --- values ----------------------------------------------------------------------------------------


@attrs.frozen
class RecordBody:
    """What a record's hash covers (msgpack-encoded through the cattrs converter)."""

    chain: str
    seq: int
    prev_hash: bytes
    at: float
    type: str
    event: dict[str, Any] = attrs.field(hash=False)


@attrs.frozen
class AuditRecord:
    """One record as read back or just written: its body's fields plus its exact bytes and hash.

    ``body`` is the msgpack the chain hash covers, so a consumer (a NATS subscriber, an auditor with
    an export) can re-check the chain without knowing the segment format.
    """

    chain: str
    seq: int
    prev_hash: bytes
    at: float
    type: str
    event: dict[str, Any] = attrs.field(hash=False, eq=False)
    body: bytes = attrs.field(repr=False)
    hash: bytes = attrs.field(repr=False)

    @property
    def record_id(self) -> str:
        """``<chain>:<seq>``: unique across gateways; sinks deduplicate on it."""
        return f"{self.chain}:{self.seq}"

    @property
    def session_id(self) -> str:
        return str(self.event.get("session_id", "") or "")

    def to_event(self) -> Any:
        """The :class:`~bastion.core.events.AuditEvent`, or None for the trail's own records."""
        from bastion.core.events import EVENT_TYPES, event_from_dict

        if self.type not in EVENT_TYPES:
            return None
        return event_from_dict({**self.event, "type": self.type})


@attrs.frozen
class SegmentHeader:
    format: int
    chain: str
    slot: str
    segment: int
    first_seq: int
    prev_hash: bytes
    created_at: float
    pid: int
    host: str
    public_key: bytes
    compression: str = COMPRESSION


@attrs.frozen
class Damage:
    """Bytes of a segment that hold no readable record. ``incomplete``: a frame cut short at the
    end of the file (a torn write), as opposed to bytes that are there but wrong."""

    offset: int
    length: int
    reason: str
    incomplete: bool = False


@attrs.frozen
class Manifest:
    """What a sealed segment holds, signed. ``sealed_by``: rotate | close | recovery."""

    format: int
    chain: str
    slot: str
    segment: int
    first_seq: int
    last_seq: int  # first_seq - 1 when the segment holds no record
    count: int
    prev_hash: bytes
    last_hash: bytes
    first_at: float | None
    last_at: float | None
    file_size: int
    file_sha256: bytes
    sealed_at: float
    sealed_by: str
    public_key: bytes
    damage: tuple[Damage, ...] = ()


@attrs.frozen
class SignedBlob:
    """Signed msgpack: ``body`` is exactly the bytes the signature covers."""

    body: bytes
    signature: bytes
    public_key: bytes


@attrs.frozen
class RecoveryWarning:
    """Damage found when a log was opened: the segment was sealed as-is and a new one started."""

    slot: str
    segment: int
    message: str
    damage: tuple[Damage, ...] = ()


@attrs.frozen
class SegmentRange:
    """A contiguous run of seqs of one chain, e.g. what an export covered."""

    chain: str
    first_seq: int
    last_seq: int


@attrs.frozen
class RetentionEntry:
    """One export or prune, kept (signed) in ``retention.log``.

    For an export, ``ranges`` are the seq runs it wrote; prune only removes segments whose every
    record lies in some export's ranges. For a prune, ``segments`` are the ``slot-number`` names
    removed (their manifests stay, so verify still checks the chain across them).
    """

    kind: str  # export | prune
    at: float
    ranges: tuple[SegmentRange, ...] = ()
    segments: tuple[str, ...] = ()
    since: float | None = None
    until: float | None = None
    format: str = ""
    output: str = ""
    output_sha256: bytes = b""
    records: int = 0


# --- codec -------------------------------------------------------------------------------------------


_packers = threading.local()


def pack(value: Any) -> bytes:
    """``value`` as msgpack; text with lone surrogates is kept (``UNICODE_ERRORS``).

    Tries the thread's reusable strict packer first: for text without lone surrogates strict
    UTF-8 gives the same bytes, at about half the cost of a new packer with an error handler
    per call (packing is the bigger part of recording an event).
    """
    packer = getattr(_packers, "strict", None)
    if packer is None:
        packer = _packers.strict = msgpack.Packer(use_bin_type=True)
    try:
        data = packer.pack(value)
    except UnicodeEncodeError:
        return msgpack.packb(value, use_bin_type=True, unicode_errors=UNICODE_ERRORS)
    if len(data) > PACKER_KEEP_BYTES:
        _packers.strict = None
    return data


def unpack(data: bytes) -> Any:
    """Inverse of :func:`pack`. Strict UTF-8 first (the same values, faster); text holding lone
    surrogates is decoded again with ``UNICODE_ERRORS``."""
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False)
    except UnicodeDecodeError:
        return msgpack.unpackb(data, raw=False, unicode_errors=UNICODE_ERRORS, strict_map_key=False)


def pack_value(value: Any) -> bytes:
    """An attrs value as msgpack, through the one cattrs converter."""
    return pack(converter.unstructure(value))


def unpack_value(data: bytes, cls: type) -> Any:
    return converter.structure(unpack(data), cls)


def genesis_hash(chain: str) -> bytes:
    """What the first record of a chain links to: tied to the chain id, so chains cannot be swapped."""
    return hashlib.sha256(b"bastion audit chain\0" + chain.encode()).digest()


def _unstructure_body(body: RecordBody) -> dict[str, Any]:
    # the event is already plain data (events.event_to_dict): walking it again through the
    # converter would only cost time on the writer's hot path
    return {"chain": body.chain, "seq": body.seq, "prev_hash": body.prev_hash, "at": body.at, "type": body.type, "event": body.event}


def _body_fields(data: Any) -> tuple[str, int, bytes, float, str, dict[str, Any]]:
    """(chain, seq, prev_hash, at, type, event) of an unpacked body. Raises ValueError when it is not one."""
    if not isinstance(data, dict) or not isinstance(data.get("event"), dict):
        raise ValueError("a record body is a map with an event map")
    try:
        fields = (data["chain"], data["seq"], data["prev_hash"], data["at"], data["type"], data["event"])
    except KeyError as exc:
        raise ValueError(f"a record body lacks {exc}") from None
    chain, seq, prev_hash, at, record_type, _ = fields
    if not (isinstance(chain, str) and type(seq) is int and isinstance(prev_hash, bytes) and isinstance(at, float) and isinstance(record_type, str)):
        raise ValueError("a record body field has the wrong type")
    return fields


def _structure_body(data: Any, _: type) -> RecordBody:
    return RecordBody(*_body_fields(data))


converter.register_unstructure_hook(RecordBody, _unstructure_body)
converter.register_structure_hook(RecordBody, _structure_body)


def encode_body(body: RecordBody) -> bytes:
    return pack_value(body)


def pack_body(chain: str, seq: int, prev_hash: bytes, at: float, record_type: str, event: dict[str, Any]) -> bytes:
    """The body of a record: the same bytes as :func:`encode_body` of the same fields, without
    building a :class:`RecordBody` and walking it through the converter (the writer's hot path)."""
    return pack({"chain": chain, "seq": seq, "prev_hash": prev_hash, "at": at, "type": record_type, "event": event})


# A record body's msgpack, piece by piece: the writer packs each event map alone and sets the
# other fields around it — the very bytes pack_body gives (a map's msgpack is its header, then
# each key and value in turn), without packing a nested map per record.
_BODY_START = b"\x86\xa5chain"  # a map of six entries, first key "chain"
_BODY_SEQ = b"\xa3seq"
_BODY_PREV_HASH = b"\xa9prev_hash\xc4"  # then bin 8: one length byte, the bytes
_BODY_AT = b"\xa2at\xcb"  # then a float 64
_BODY_TYPE = b"\xa4type"
_BODY_EVENT = b"\xa5event"
_FLOAT64 = struct.Struct(">d")
# how msgpack writes a non-negative int, by the largest value each width holds
_UINT_FORMATS = ((0xFF, b"\xcc", 1), (0xFFFF, b"\xcd", 2), (0xFFFFFFFF, b"\xce", 4), (0xFFFFFFFFFFFFFFFF, b"\xcf", 8))


def _pack_uint(value: int) -> bytes:
    if value < 0x80:
        return pack(value) if value < 0 else bytes((value,))
    for largest, marker, width in _UINT_FORMATS:
        if value <= largest:
            return marker + value.to_bytes(width, "big")
    return pack(value)  # raises OverflowError, as packing the whole body would


def body_head(chain: str) -> bytes:
    """What every body of ``chain`` starts with (see :func:`spliced_body`)."""
    return _BODY_START + pack(chain) + _BODY_SEQ


def body_type_part(record_type: str) -> bytes:
    """The ``type`` entry of a body and the ``event`` key after it (see :func:`spliced_body`)."""
    return _BODY_TYPE + pack(record_type) + _BODY_EVENT


def spliced_body(head: bytes, seq: int, prev_hash: bytes, at: float, type_part: bytes, packed_event: bytes) -> bytes:
    """The same bytes as :func:`pack_body`, from ``body_head(chain)``, ``body_type_part(type)`` and
    ``pack(event)``: the writer's hot path, one join instead of packing a nested map."""
    if type(at) is not float or len(prev_hash) > 0xFF:  # not what a writer stamps: the generic way
        at_part, prev_part = _BODY_AT[:-1] + pack(at), b"\xa9prev_hash" + pack(prev_hash)
    else:
        at_part, prev_part = _BODY_AT + _FLOAT64.pack(at), _BODY_PREV_HASH + bytes((len(prev_hash),)) + prev_hash
    return b"".join((head, _pack_uint(seq), prev_part, at_part, type_part, packed_event))


def compression_parameters(size: int) -> tuple[int, int]:
    """(window bits, memLevel) for compressing ``size`` bytes with the dictionary: see MIN_WINDOW_BITS."""
    window_bits = min(zlib.MAX_WBITS, max(MIN_WINDOW_BITS, (size + len(ZDICT_V1) + ZLIB_LOOKAHEAD - 1).bit_length()))
    return window_bits, COMPRESSION_MEM_LEVEL + window_bits - MIN_WINDOW_BITS


def compress(data: bytes) -> bytes:
    window_bits, mem_level = compression_parameters(len(data))
    compressor = zlib.compressobj(COMPRESSION_LEVEL, zlib.DEFLATED, window_bits, mem_level, zdict=ZDICT_V1)
    return compressor.compress(data) + compressor.flush()


def decompress(data: bytes) -> bytes:
    decompressor = zlib.decompressobj(zlib.MAX_WBITS, zdict=ZDICT_V1)
    out = decompressor.decompress(data, MAX_FRAME_PAYLOAD * 8)
    if decompressor.unconsumed_tail or not decompressor.eof:
        raise zlib.error("compressed block is incomplete or too large")
    return out


def frame(payload: bytes) -> bytes:
    return FRAME_HEADER.pack(RECORD_MARK, len(payload), zlib.crc32(payload)) + payload


def make_record(body: RecordBody) -> AuditRecord:
    data = encode_body(body)
    return AuditRecord(
        chain=body.chain,
        seq=body.seq,
        prev_hash=body.prev_hash,
        at=body.at,
        type=body.type,
        event=body.event,
        body=data,
        hash=hashlib.sha256(data).digest(),
    )


def split_blocks(bodies: Sequence[bytes]) -> Iterator[Sequence[bytes]]:
    """Record bodies in blocks of at most ``MAX_BLOCK_RECORDS`` and about ``MAX_BLOCK_BYTES``."""
    if len(bodies) <= MAX_BLOCK_RECORDS and sum(map(len, bodies)) <= MAX_BLOCK_BYTES:
        yield bodies  # the usual case: one block
        return
    first, size = 0, 0
    for index, body in enumerate(bodies):
        if index > first and (index - first >= MAX_BLOCK_RECORDS or size + len(body) > MAX_BLOCK_BYTES):
            yield bodies[first:index]
            first, size = index, 0
        size += len(body)
    if first < len(bodies):
        yield bodies[first:]


def encode_bodies(bodies: Sequence[bytes]) -> bytes:
    """The frame that stores these record bodies (consecutive records of one chain, at least one) as one block."""
    return frame(compress(pack(list(bodies))))


def encode_block(records: Sequence[AuditRecord]) -> bytes:
    """The frame that stores ``records`` (consecutive records of one chain, at least one) as one block."""
    return encode_bodies([record.body for record in records])


def encode_record(record: AuditRecord) -> bytes:
    """The frame that stores ``record`` alone in a segment."""
    return encode_block([record])


def decode_block(payload: bytes) -> list[AuditRecord]:
    """The records of one frame's payload. Raises (zlib, msgpack, ValueError…) when it is not a block."""
    bodies = unpack(decompress(payload))
    if not isinstance(bodies, list) or not bodies or not all(isinstance(body, bytes) for body in bodies):
        raise ValueError("a block is a non-empty array of record bodies")
    return [record_from_body(body) for body in bodies]


def record_from_body(data: bytes) -> AuditRecord:
    """Rebuild a record from its body bytes (as stored, exported or published)."""
    return AuditRecord(*_body_fields(unpack(data)), data, hashlib.sha256(data).digest())


def decode_record(frame_bytes: bytes) -> AuditRecord:
    """Inverse of :func:`encode_record` for one whole frame. Raises ValueError when it is damaged."""
    items = list(scan_frames(frame_bytes, 0))
    item = items[0] if len(items) == 1 else items
    if not isinstance(item, ScannedRecord) or item.end != len(frame_bytes):
        raise ValueError(f"not one intact record: {item!r}")
    return item.record


# --- keys ----------------------------------------------------------------------------------------------


def load_signing_key(material: bytes | str) -> Ed25519PrivateKey:
    """An Ed25519 key from what ``audit.signing_key`` holds.

    Accepted: an unencrypted PKCS#8 PEM (``openssl genpkey -algorithm ed25519``), the raw 32-byte
    seed, or the seed as 64 hex digits or base64. Anything else is refused with a reason that never
    quotes the material.
    """
    data = material.encode() if isinstance(material, str) else bytes(material)
    stripped = data.strip()
    if stripped.startswith(b"-----BEGIN"):
        try:
            key = serialization.load_pem_private_key(stripped, password=None)
        except (ValueError, TypeError) as exc:
            raise AuditLogError(f"audit signing key: not a readable unencrypted PEM private key ({type(exc).__name__})") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise AuditLogError("audit signing key: the PEM holds a key that is not Ed25519")
        return key
    if len(data) == 32:
        return Ed25519PrivateKey.from_private_bytes(data)
    text = stripped.decode("ascii", "replace")
    if re.fullmatch(r"[0-9a-fA-F]{64}", text):
        return Ed25519PrivateKey.from_private_bytes(bytes.fromhex(text))
    with contextlib.suppress(binascii.Error, ValueError):
        seed = base64.b64decode(text, validate=True)
        if len(seed) == 32:
            return Ed25519PrivateKey.from_private_bytes(seed)
    raise AuditLogError("audit signing key: expected an Ed25519 PEM, or a 32-byte seed (raw, hex or base64)")


def public_key_bytes(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(public_key: bytes) -> str:
    """A short name for a public key in messages: the first 8 bytes of its SHA-256, in hex."""
    return hashlib.sha256(public_key).hexdigest()[:16]


def load_public_key(material: bytes | str) -> bytes:
    """A raw Ed25519 public key from a PEM public key, raw 32 bytes, hex or base64 (for verify)."""
    data = material.encode() if isinstance(material, str) else bytes(material)
    stripped = data.strip()
    if stripped.startswith(b"-----BEGIN PUBLIC KEY"):
        key = serialization.load_pem_public_key(stripped)
        if not isinstance(key, Ed25519PublicKey):
            raise AuditLogError("public key: not Ed25519")
        return public_key_bytes(key)
    if stripped.startswith(b"-----BEGIN"):
        return public_key_bytes(load_signing_key(stripped))
    if len(data) == 32:
        return data
    text = stripped.decode("ascii", "replace")
    if re.fullmatch(r"[0-9a-fA-F]{64}", text):
        return bytes.fromhex(text)
    with contextlib.suppress(binascii.Error, ValueError):
        raw = base64.b64decode(text, validate=True)
        if len(raw) == 32:
            return raw
    raise AuditLogError("public key: expected an Ed25519 PEM, or 32 bytes (raw, hex or base64)")


def public_key_pem(public_key: bytes) -> str:
    return Ed25519PublicKey.from_public_bytes(public_key).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def generated_signing_key(directory: Path) -> tuple[Ed25519PrivateKey, bool]:
    """The key in ``<audit dir>/signing.key``, created (mode 0600) when missing.

    Returns ``(key, created)``. A key kept next to the log proves integrity only against someone
    who cannot also write the state directory; configure ``audit.signing_key`` from elsewhere, or
    keep the public key apart (``bastion audit verify`` prints it) for that.
    """
    path = directory / SIGNING_KEY_FILE
    with contextlib.suppress(FileNotFoundError):
        return load_signing_key(path.read_bytes()), False
    directory.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    # a name of its own: worker processes starting together each make one, and the first link wins
    temporary = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        _write_all(descriptor, pem)
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    try:
        os.link(temporary, path)  # fails when another process created the key meanwhile
    except FileExistsError:
        temporary.unlink()
        return load_signing_key(path.read_bytes()), False
    temporary.unlink()
    fsync_directory(directory)
    return key, True


def sign(key: Ed25519PrivateKey, value: Any) -> bytes:
    body = pack_value(value)
    return pack_value(SignedBlob(body=body, signature=key.sign(body), public_key=public_key_bytes(key)))


def open_signed(data: bytes, cls: type) -> tuple[Any, SignedBlob, bool]:
    """(value, blob, signature_valid). The caller decides whether ``blob.public_key`` is trusted."""
    blob = unpack_value(data, SignedBlob)
    try:
        Ed25519PublicKey.from_public_bytes(blob.public_key).verify(blob.signature, blob.body)
        valid = True
    except (InvalidSignature, ValueError):
        valid = False
    return unpack_value(blob.body, cls), blob, valid


# --- small file helpers ------------------------------------------------------------------------------


def _write_all(descriptor: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        written = os.write(descriptor, view)
        if written <= 0:  # pragma: no cover - regular files write or raise
            raise OSError(errno.EIO, "short write")
        view = view[written:]


def fsync_directory(directory: Path) -> None:
    """Make a created or renamed file's directory entry durable."""
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_atomically(path: Path, data: bytes, *, durable: bool = True) -> None:
    temporary = path.with_name(path.name + ".tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    try:
        _write_all(descriptor, data)
        if durable:
            os.fsync(descriptor)
    finally:
        os.close(descriptor)
    os.replace(temporary, path)
    if durable:
        fsync_directory(path.parent)


def segment_path(directory: Path, slot: str, number: int) -> Path:
    return directory / f"{slot}-{number:08d}.seg"


def manifest_path(directory: Path, slot: str, number: int) -> Path:
    return directory / f"{slot}-{number:08d}.manifest"


def head_path(directory: Path, slot: str) -> Path:
    return directory / f"{slot}.head"


def list_slots(directory: Path) -> list[str]:
    """Slots that have segments or manifests in ``directory``."""
    slots = set()
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(directory):
            match = SEGMENT_NAME.fullmatch(entry.name)
            if match:
                slots.add(match["slot"])
    return sorted(slots)


def segment_numbers(directory: Path, slot: str) -> tuple[list[int], list[int]]:
    """(segment file numbers, manifest numbers) of one slot, each sorted."""
    segments, manifests = [], []
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(directory):
            match = SEGMENT_NAME.fullmatch(entry.name)
            if match and match["slot"] == slot:
                (segments if match["ext"] == "seg" else manifests).append(int(match["number"]))
    return sorted(segments), sorted(manifests)


def host_label() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname().split(".")[0])[:32] or "host"


# --- scanning --------------------------------------------------------------------------------------------


@attrs.frozen
class ScannedRecord:
    """One record found in a segment: ``offset`` and ``end`` are those of the frame (block) holding
    it; ``ends_frame`` says whether it is that block's last record, so a reader that stops after
    it may resume at ``end`` (otherwise at ``offset``, skipping the records it already has)."""

    offset: int
    end: int
    record: AuditRecord
    ends_frame: bool = True


@attrs.frozen
class ScannedHeader:
    end: int
    header: SegmentHeader


class _FrameError(Exception):
    def __init__(self, reason: str, incomplete: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.incomplete = incomplete


def _read_frame(buffer: Any, position: int) -> tuple[bytes, int]:
    size = len(buffer)
    if size - position < FRAME_HEADER.size:
        prefix = bytes(buffer[position:size])
        incomplete = RECORD_MARK.startswith(prefix[: len(RECORD_MARK)])
        raise _FrameError("a record cut short at the end of the segment" if incomplete else "bytes that are not a record", incomplete)
    mark, length, checksum = FRAME_HEADER.unpack_from(buffer, position)
    if mark != RECORD_MARK:
        raise _FrameError("bytes that are not a record (no record marker)")
    if length > MAX_FRAME_PAYLOAD:
        raise _FrameError("a record with an impossible length")
    start = position + FRAME_HEADER.size
    end = start + length
    if end > size:
        raise _FrameError("a record cut short at the end of the segment", incomplete=True)
    payload = bytes(buffer[start:end])
    if zlib.crc32(payload) != checksum:
        raise _FrameError("a record whose checksum does not match (changed or damaged bytes)")
    return payload, end


def read_header(buffer: Any) -> ScannedHeader:
    """The segment header. Raises AuditLogError when the file does not start with one."""
    magic = bytes(buffer[: len(SEGMENT_MAGIC)])
    if magic == FORMAT_1_MAGIC:
        raise AuditLogError(f"a format-1 segment (one record per frame); this version reads format {FORMAT_VERSION} only")
    if magic != SEGMENT_MAGIC:
        raise AuditLogError("not a Bastion audit segment (bad magic)")
    try:
        payload, end = _read_frame(buffer, len(SEGMENT_MAGIC))
        header = unpack_value(payload, SegmentHeader)
    except _FrameError as exc:
        raise AuditLogError(f"unreadable segment header: {exc.reason}") from None
    except Exception as exc:
        raise AuditLogError(f"unreadable segment header ({type(exc).__name__})") from None
    return ScannedHeader(end, header)


def scan_frames(buffer: Any, start: int, chain: str | None = None) -> Iterator[ScannedRecord | Damage]:
    """Every record from ``start`` to the end of ``buffer`` in file order, and the damage between.

    A frame that fails (checksum, decoding, a record of another chain) is damage as a whole: its
    block is lost, never part of it. After damage the scan resumes at the next record marker, so
    one bad frame does not hide the records behind it. Linkage (seq order, prev_hash) is the
    caller's business.
    """
    position = start
    size = len(buffer)
    while position < size:
        try:
            payload, end = _read_frame(buffer, position)
            try:
                records = decode_block(payload)
            except Exception as exc:  # zlib.error, msgpack and cattrs errors: all mean "undecodable"
                raise _FrameError(f"a record that cannot be decoded ({type(exc).__name__})") from None
            if chain is not None:
                foreign = next((record.chain for record in records if record.chain != chain), None)
                if foreign is not None:
                    raise _FrameError(f"a record of another chain ({foreign})")
        except _FrameError as exc:
            following = buffer.find(RECORD_MARK, position + 1)
            stop = size if following < 0 else following
            yield Damage(position, stop - position, exc.reason, exc.incomplete and following < 0)
            position = stop
            continue
        last = len(records) - 1
        for index, record in enumerate(records):
            yield ScannedRecord(position, end, record, index == last)
        position = end


@contextlib.contextmanager
def mapped(path: Path) -> Iterator[Any]:
    """The file's bytes without reading it all into memory (``b""`` for an empty file)."""
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size == 0:
            yield b""
            return
        with mmap.mmap(handle.fileno(), size, access=mmap.ACCESS_READ) as view:
            yield view


@attrs.frozen
class SegmentScan:
    """A whole segment read back: its header, intact records (in file order) and damage."""

    header: SegmentHeader | None
    header_error: str
    records: tuple[ScannedRecord, ...]
    damage: tuple[Damage, ...]
    size: int
    sha256: bytes


def scan_segment(path: Path, *, keep_records: bool = True) -> SegmentScan:
    with mapped(path) as buffer:
        digest = hashlib.sha256(buffer).digest()
        try:
            scanned = read_header(buffer)
        except AuditLogError as exc:
            damage = (Damage(0, len(buffer), str(exc), False),) if len(buffer) else ()
            return SegmentScan(None, str(exc), (), damage, len(buffer), digest)
        records, damage = [], []
        for item in scan_frames(buffer, scanned.end, scanned.header.chain):
            if isinstance(item, Damage):
                damage.append(item)
            elif keep_records:
                records.append(item)
            else:
                records.append(ScannedRecord(item.offset, item.end, attrs.evolve(item.record, event={}, body=b""), item.ends_frame))
        return SegmentScan(scanned.header, "", tuple(records), tuple(damage), len(buffer), digest)


def read_manifest(directory: Path, slot: str, number: int) -> tuple[Manifest | None, SignedBlob | None, str]:
    """(manifest, blob, problem). ``problem`` is empty when the file is there and well signed."""
    path = manifest_path(directory, slot, number)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None, None, "missing"
    try:
        manifest, blob, valid = open_signed(data, Manifest)
    except Exception as exc:
        return None, None, f"unreadable ({type(exc).__name__})"
    if not valid:
        return manifest, blob, "its signature does not match its content"
    if blob.public_key != manifest.public_key:
        return manifest, blob, "it is signed by a key other than the one it names"
    return manifest, blob, ""


# --- the writer ----------------------------------------------------------------------------------------


def _remove_leftovers(directory: Path, slot: str) -> None:
    """Half-made files a crash left (``*.tmp``): never renamed into place, so never part of the log.
    Only the slot's lock holder calls this, so nobody is still writing them."""
    for entry in os.scandir(directory):
        name = entry.name
        if name.endswith(".tmp") and (name == f"{slot}.head.tmp" or (SEGMENT_NAME.fullmatch(name[:-4]) and SEGMENT_NAME.fullmatch(name[:-4])["slot"] == slot)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)


class SlotLock:
    """An exclusive lock on one slot, held for the life of the writing process (flock)."""

    def __init__(self, directory: Path, slot: str, descriptor: int) -> None:
        self.directory = directory
        self.slot = slot
        self._descriptor: int | None = descriptor

    @classmethod
    def acquire(cls, directory: Path, preferred: str) -> SlotLock:
        """Lock ``preferred`` or the first free ``preferred.N``. Raises SlotBusy."""
        if not SLOT_PATTERN.fullmatch(preferred):
            raise AuditLogError(f"audit chain slot {preferred!r}: use letters, digits, '.', '_' or '-' (at most 63)")
        directory.mkdir(parents=True, exist_ok=True)
        for index in range(MAX_SLOTS):
            slot = preferred if index == 0 else f"{preferred}.{index}"
            descriptor = os.open(directory / f"{slot}.lock", os.O_RDWR | os.O_CREAT, 0o640)
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(descriptor)
                continue
            return cls(directory, slot, descriptor)
        raise SlotBusy(f"all {MAX_SLOTS} audit slots named {preferred}[.N] in {directory} are held by other processes")

    @staticmethod
    def is_held(directory: Path, slot: str) -> bool:
        """Whether a live process writes ``slot`` now."""
        try:
            descriptor = os.open(directory / f"{slot}.lock", os.O_RDWR)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(descriptor)
        return False

    def release(self) -> None:
        if self._descriptor is not None:
            os.close(self._descriptor)  # closing drops the flock
            self._descriptor = None


@attrs.frozen
class WriterStatistics:
    records: int
    bytes: int
    fsyncs: int
    segment: int
    segment_bytes: int
    next_seq: int


class LogWriter:
    """Appends records to one slot's chain. Not thread-safe: one caller at a time.

    :meth:`open` recovers the slot (seals whatever the last run left, damaged or not) and starts a
    new segment; :meth:`append` writes records; :meth:`sync` makes them durable; :meth:`rotate_if_full`
    seals a full segment and starts the next; :meth:`close` seals the open segment.
    """

    def __init__(self, lock: SlotLock, key: Ed25519PrivateKey, chain: str, segment_max_bytes: int, clock: Callable[[], float]) -> None:
        self.lock = lock
        self.directory = lock.directory
        self.slot = lock.slot
        self.chain = chain
        self.key = key
        self.public_key = public_key_bytes(key)
        self.segment_max_bytes = segment_max_bytes
        self.clock = clock
        self.next_seq = 1
        self.last_hash = genesis_hash(chain)
        self.segment = 0
        self.records = 0
        self.bytes = 0
        self.fsyncs = 0
        self.broken = False
        self._descriptor: int | None = None
        self._segment_hasher = hashlib.sha256()
        self._segment_size = 0
        self._segment_first_seq = 1
        self._segment_prev_hash = self.last_hash
        self._segment_count = 0
        self._segment_first_at: float | None = None
        self._segment_last_at: float | None = None
        self._unsynced = False
        self._body_head = body_head(chain)
        self._type_parts: dict[str, bytes] = {}

    # -- opening --------------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        lock: SlotLock,
        key: Ed25519PrivateKey,
        *,
        segment_max_bytes: int,
        clock: Callable[[], float] = time.time,
        unconfirmed_from: int | None = None,
    ) -> tuple[LogWriter, list[RecoveryWarning]]:
        """Open the slot for writing: recover, seal, start a new segment.

        ``unconfirmed_from``: when reopening after a failed write, the first seq whose caller was
        told the write failed; the damage record says records from there on were not confirmed.
        """
        directory, slot = lock.directory, lock.slot
        _remove_leftovers(directory, slot)
        segments, manifests = segment_numbers(directory, slot)
        last = max(segments[-1:] + manifests[-1:], default=0)
        warnings: list[RecoveryWarning] = []
        chain = None
        next_seq, last_hash = 1, b""
        if last:
            state = cls._recover_last(directory, slot, last, key, clock, warnings, segments, manifests)
            chain, next_seq, last_hash = state
        if chain is None:
            chain = f"{host_label()}.{slot}.{secrets.token_hex(4)}"
            last_hash = genesis_hash(chain)
        writer = cls(lock, key, chain, segment_max_bytes, clock)
        writer.next_seq, writer.last_hash, writer.segment = next_seq, last_hash, last
        writer._start_segment(last + 1)
        if warnings or unconfirmed_from is not None:
            writer._record_damage(warnings, unconfirmed_from)
        return writer, warnings

    @classmethod
    def _recover_last(cls, directory, slot, last, key, clock, warnings, segments, manifests) -> tuple[str | None, int, bytes]:
        """Chain state after the last segment; seal it (as-is) when the last run did not."""
        manifest, _, problem = read_manifest(directory, slot, last)
        if manifest is not None and not problem:
            return manifest.chain, manifest.last_seq + 1, manifest.last_hash
        if last not in segments:
            raise AuditLogError(f"audit segment {segment_path(directory, slot, last).name} is missing and its manifest is {problem}; run `bastion audit verify`")
        if manifest is not None:
            warnings.append(RecoveryWarning(slot, last, f"the manifest of segment {last} is invalid ({problem}); segment rescanned and sealed again"))
        path = segment_path(directory, slot, last)
        # the last run may have died before its data reached the disk (or after a failed fsync):
        # make the bytes durable before a manifest vouches for their hash
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        scan = scan_segment(path)
        previous, _, previous_problem = read_manifest(directory, slot, last - 1) if last > 1 else (None, None, "")
        header = scan.header
        if header is None:
            if previous is None or previous_problem:
                raise AuditLogError(f"audit segment {segment_path(directory, slot, last).name} has no readable header and no valid manifest precedes it")
            chain, first_seq, prev_hash = previous.chain, previous.last_seq + 1, previous.last_hash
        else:
            chain, first_seq, prev_hash = header.chain, header.first_seq, header.prev_hash
        records = [item.record for item in scan.records]
        next_seq, last_hash = first_seq, prev_hash
        if records:
            next_seq, last_hash = records[-1].seq + 1, records[-1].hash
        damage = scan.damage
        if damage:
            lost = sum(d.length for d in damage)
            torn = all(d.incomplete for d in damage)
            what = "a write torn by a crash or a full disk" if torn else "damaged bytes"
            warnings.append(
                RecoveryWarning(
                    slot,
                    last,
                    f"segment {segment_path(directory, slot, last).name} ends in {what} ({lost} bytes after seq {next_seq - 1}); "
                    "sealed as it is, chain continued from the last intact record",
                    tuple(damage),
                )
            )
        manifest = Manifest(
            format=FORMAT_VERSION,
            chain=chain,
            slot=slot,
            segment=last,
            first_seq=first_seq,
            last_seq=next_seq - 1,
            count=len(records),
            prev_hash=prev_hash,
            last_hash=last_hash,
            first_at=records[0].at if records else None,
            last_at=records[-1].at if records else None,
            file_size=scan.size,
            file_sha256=scan.sha256,
            sealed_at=clock(),
            sealed_by="recovery",
            public_key=public_key_bytes(key),
            damage=tuple(damage),
        )
        cls._write_manifest(directory, slot, manifest, key)
        return chain, next_seq, last_hash

    @staticmethod
    def _write_manifest(directory: Path, slot: str, manifest: Manifest, key: Ed25519PrivateKey) -> None:
        signed = sign(key, manifest)
        write_atomically(manifest_path(directory, slot, manifest.segment), signed)
        write_atomically(head_path(directory, slot), signed)

    def _start_segment(self, number: int) -> None:
        header = SegmentHeader(
            format=FORMAT_VERSION,
            chain=self.chain,
            slot=self.slot,
            segment=number,
            first_seq=self.next_seq,
            prev_hash=self.last_hash,
            created_at=self.clock(),
            pid=os.getpid(),
            host=socket.gethostname(),
            public_key=self.public_key,
        )
        start = SEGMENT_MAGIC + frame(pack_value(header))
        path = segment_path(self.directory, self.slot, number)
        temporary = path.with_name(path.name + ".tmp")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        try:
            _write_all(descriptor, start)
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        os.rename(temporary, path)  # a segment never exists without its whole header
        fsync_directory(self.directory)
        self._descriptor = os.open(path, os.O_WRONLY | os.O_APPEND)
        self.segment = number
        self._segment_hasher = hashlib.sha256(start)
        self._segment_size = len(start)
        self._segment_first_seq = self.next_seq
        self._segment_prev_hash = self.last_hash
        self._segment_count = 0
        self._segment_first_at = self._segment_last_at = None
        self._unsynced = False

    def _record_damage(self, warnings: list[RecoveryWarning], unconfirmed_from: int | None) -> None:
        event = {
            "damage": [
                {
                    "segment": warning.segment,
                    "message": warning.message,
                    "ranges": [converter.unstructure(d) for d in warning.damage],
                }
                for warning in warnings
            ],
            "resumed_after_seq": self.next_seq - 1,
            "unconfirmed_from_seq": unconfirmed_from,
        }
        self.append([(DAMAGE_RECORD_TYPE, event)])
        self.sync()

    # -- writing --------------------------------------------------------------------------------------

    def append(self, entries: Sequence[tuple[str, dict[str, Any]]]) -> list[int | None]:
        """Write ``(type, event dict)`` entries as records, in blocks, with one write call (to the OS:
        not yet durable, see :meth:`sync`).

        Returns one item per entry: its record's seq, or None when the entry cannot be encoded (a
        value msgpack cannot hold) — that entry alone is refused and takes no seq. I/O errors raise.
        """
        if self._descriptor is None or self.broken:
            raise AuditLogError("the audit log is closed")
        results: list[int | None] = []
        bodies: list[bytes] = []
        clock, sha256, head, type_parts = self.clock, hashlib.sha256, self._body_head, self._type_parts
        seq, previous = self.next_seq, self.last_hash
        first_at = last_at = None
        for record_type, event in entries:
            at = clock()
            type_part = type_parts.get(record_type)
            if type_part is None:
                type_part = type_parts[record_type] = body_type_part(record_type)
            try:
                body = spliced_body(head, seq, previous, at, type_part, pack(event))
            except (TypeError, ValueError, OverflowError):
                results.append(None)
                continue
            results.append(seq)
            bodies.append(body)
            first_at = at if first_at is None else first_at
            last_at = at
            seq, previous = seq + 1, sha256(body).digest()
        data = b"".join(encode_bodies(block) for block in split_blocks(bodies))
        try:
            _write_all(self._descriptor, data)
        except OSError:
            self.broken = True  # some of the bytes may be on disk: only a reopen (recovery) may continue
            raise
        self._segment_hasher.update(data)
        self._segment_size += len(data)
        self.next_seq, self.last_hash = seq, previous
        self.records += len(bodies)
        self.bytes += len(data)
        if bodies:
            self._segment_count += len(bodies)
            if self._segment_first_at is None:
                self._segment_first_at = first_at
            self._segment_last_at = last_at
            self._unsynced = True
        return results

    def sync(self) -> None:
        """Make everything appended so far durable (one fdatasync covers every record since the last)."""
        if self._descriptor is None or not self._unsynced:
            return
        try:
            os.fdatasync(self._descriptor)
        except OSError:
            self.broken = True  # after a failed fsync the page cache cannot be trusted
            raise
        self.fsyncs += 1
        self._unsynced = False

    def rotate_if_full(self) -> bool:
        if self._segment_size < self.segment_max_bytes:
            return False
        self._seal("rotate")
        self._start_segment(self.segment + 1)
        return True

    def close(self) -> None:
        """Seal the open segment. The slot lock stays with its owner."""
        if self._descriptor is None:
            return
        if self.broken:
            self.abandon()
            return
        self._seal("close")

    def abandon(self) -> None:
        """Drop the open segment without sealing it (after a failed write): the next open recovers it."""
        if self._descriptor is not None:
            with contextlib.suppress(OSError):
                os.close(self._descriptor)
            self._descriptor = None

    def _seal(self, why: str) -> None:
        self.sync()
        assert self._descriptor is not None
        manifest = Manifest(
            format=FORMAT_VERSION,
            chain=self.chain,
            slot=self.slot,
            segment=self.segment,
            first_seq=self._segment_first_seq,
            last_seq=self.next_seq - 1,
            count=self._segment_count,
            prev_hash=self._segment_prev_hash,
            last_hash=self.last_hash,
            first_at=self._segment_first_at,
            last_at=self._segment_last_at,
            file_size=self._segment_size,
            file_sha256=self._segment_hasher.digest(),
            sealed_at=self.clock(),
            sealed_by=why,
            public_key=self.public_key,
        )
        os.close(self._descriptor)
        self._descriptor = None
        self._write_manifest(self.directory, self.slot, manifest, self.key)

    @property
    def segment_bytes(self) -> int:
        return self._segment_size

    def statistics(self) -> WriterStatistics:
        return WriterStatistics(self.records, self.bytes, self.fsyncs, self.segment, self._segment_size, self.next_seq)


# --- reading ----------------------------------------------------------------------------------------------


class ChainCursor:
    """Reads one slot's records in seq order, from the files, remembering where it got to.

    Used by sink forwarders (which read only what the writer has made durable) and by the CLI.
    Crossing into the next segment happens when the current one is sealed or a later one exists.
    """

    def __init__(self, directory: Path, slot: str) -> None:
        self.directory = directory
        self.slot = slot
        self._segment = 0
        self._offset = 0
        self._next_seq = 1
        self.skipped: list[tuple[int, int]] = []  # seq runs that no readable segment holds (pruned)

    def _locate(self, seq: int) -> None:
        """Position on the segment holding ``seq`` (or the first one after it)."""
        segments, _ = segment_numbers(self.directory, self.slot)
        chosen, chosen_first = 0, None
        for number in segments:
            first = self._first_seq(number)
            if first is None:
                continue
            if first <= seq or chosen == 0:
                chosen, chosen_first = number, first
            if first > seq:
                break
        self._segment, self._offset, self._next_seq = chosen, 0, seq
        if chosen_first is not None and chosen_first > seq:
            self.skipped.append((seq, chosen_first - 1))  # pruned before anyone read them
            self._next_seq = chosen_first

    def _first_seq(self, number: int) -> int | None:
        manifest, _, problem = read_manifest(self.directory, self.slot, number)
        if manifest is not None and not problem:
            return manifest.first_seq
        try:
            with mapped(segment_path(self.directory, self.slot, number)) as buffer:
                return read_header(buffer).header.first_seq
        except (OSError, AuditLogError):
            return None

    def read(self, after_seq: int, upto_seq: int | None = None, limit: int = 1000) -> list[AuditRecord]:
        """Records with ``after_seq < seq <= upto_seq`` (no upper bound when None), at most ``limit``."""
        if self._segment == 0 or after_seq + 1 != self._next_seq:
            self._locate(after_seq + 1)
        out: list[AuditRecord] = []
        while self._segment and len(out) < limit:
            number = self._segment
            sealed = manifest_path(self.directory, self.slot, number).exists()
            following_exists = segment_path(self.directory, self.slot, number + 1).exists() or manifest_path(self.directory, self.slot, number + 1).exists()
            finished = self._read_segment(number, sealed or following_exists, upto_seq, limit, out)
            if not finished or not following_exists:
                break
            self._segment, self._offset = number + 1, 0
        return out

    def _read_segment(self, number: int, complete: bool, upto_seq: int | None, limit: int, out: list[AuditRecord]) -> bool:
        """Append this segment's next records to ``out``; True when the segment is read to its end."""
        path = segment_path(self.directory, self.slot, number)
        if not path.exists():
            manifest, _, _ = read_manifest(self.directory, self.slot, number)
            if manifest is not None and manifest.last_seq >= self._next_seq:  # pruned: skip its records
                self.skipped.append((self._next_seq, manifest.last_seq))
                self._next_seq = manifest.last_seq + 1
            return True
        with mapped(path) as buffer:
            if self._offset == 0:
                try:
                    self._offset = read_header(buffer).end
                except AuditLogError:
                    return complete  # no readable header: nothing to take from it
            for item in scan_frames(buffer, self._offset):
                if isinstance(item, Damage):
                    if item.incomplete and not complete:
                        return False  # being written right now: come back later
                    self._offset = item.offset + item.length
                    continue
                record = item.record
                if upto_seq is not None and record.seq > upto_seq:
                    return False
                # inside a block, come back to the block's start: the seq check below skips what was taken
                self._offset = item.end if item.ends_frame else item.offset
                if record.seq < self._next_seq:
                    continue
                out.append(record)
                self._next_seq = record.seq + 1
                if len(out) >= limit:
                    return False
        return complete


def iter_segment(path: Path) -> Iterator[ScannedRecord]:
    """The intact records of one segment file in file order (no linkage checks: see verify)."""
    with mapped(path) as buffer:
        try:
            start = read_header(buffer).end
        except AuditLogError:
            return
        for item in scan_frames(buffer, start):
            if isinstance(item, ScannedRecord):
                yield item


def chain_of(directory: Path, slot: str) -> str | None:
    """The chain id written in a slot (from its newest readable header or manifest)."""
    segments, manifests = segment_numbers(directory, slot)
    for number in reversed(manifests):
        manifest, _, problem = read_manifest(directory, slot, number)
        if manifest is not None:
            return manifest.chain
    for number in reversed(segments):
        with contextlib.suppress(OSError, AuditLogError), mapped(segment_path(directory, slot, number)) as buffer:
            return read_header(buffer).header.chain
    return None


def iter_records(directory: Path, slots: Iterable[str] | None = None) -> Iterator[AuditRecord]:
    """Every intact record, slot by slot, in seq order within each slot."""
    for slot in (list_slots(directory) if slots is None else slots):
        cursor = ChainCursor(directory, slot)
        after = 0
        while True:
            batch = cursor.read(after, None, limit=2000)
            if not batch:
                break
            yield from batch
            after = batch[-1].seq


def log_size(directory: Path) -> int:
    return sum(entry.stat().st_size for entry in os.scandir(directory) if entry.name.endswith(".seg")) if directory.exists() else 0


# --- verification ----------------------------------------------------------------------------------------


@attrs.frozen
class Problem:
    """Something verification found. ``kind`` is a stable word; ``message`` a plain sentence."""

    kind: str
    slot: str
    segment: int
    message: str
    seq: int | None = None
    offset: int | None = None
    chain: str = ""


@attrs.frozen
class ChainReport:
    slot: str
    chain: str
    segments: int
    records: int
    first_seq: int | None
    last_seq: int | None
    keys: tuple[str, ...]  # key ids that signed this chain's manifests
    open_segment: int | None  # the unsealed last segment, when there is one


@attrs.frozen
class VerifyReport:
    """``ok`` when no problem was found. ``problems`` in the order met, so per chain the first one
    is the first broken record or missing segment; ``warnings`` are explained damage (a crash's
    torn write, sealed and recorded at the next start) and notes such as an open segment."""

    directory: str
    chains: tuple[ChainReport, ...]
    problems: tuple[Problem, ...]
    warnings: tuple[Problem, ...]
    records: int
    trusted_keys: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def first_problem(self) -> Problem | None:
        return self.problems[0] if self.problems else None


class _ChainVerifier:
    def __init__(self, directory: Path, slot: str, trusted: Collection[bytes] | None, pruned: set[str]) -> None:
        self.directory = directory
        self.slot = slot
        self.trusted = trusted
        self.pruned = pruned
        self.problems: list[Problem] = []
        self.warnings: list[Problem] = []
        self.chain = ""
        self.expect_seq = 1
        self.expect_prev: bytes | None = None
        self.records = 0
        self.first_seq: int | None = None
        self.keys: set[str] = set()
        self.open_segment: int | None = None

    def problem(self, kind: str, segment: int, message: str, seq: int | None = None, offset: int | None = None) -> None:
        self.problems.append(Problem(kind, self.slot, segment, message, seq, offset, self.chain))

    def warn(self, kind: str, segment: int, message: str, seq: int | None = None, offset: int | None = None) -> None:
        self.warnings.append(Problem(kind, self.slot, segment, message, seq, offset, self.chain))

    def run(self) -> ChainReport:
        segments, manifests = segment_numbers(self.directory, self.slot)
        present = set(segments)
        last = max(segments[-1:] + manifests[-1:], default=0)
        first = min(segments[:1] + manifests[:1], default=1)
        if first != 1:
            self.problem("missing-segment", 1, f"segments 1 to {first - 1} of slot {self.slot} are missing (no file, no manifest)")
        for number in range(first, last + 1):
            manifest = self.check_manifest(number)
            if number in present:
                self.check_segment(number, manifest, is_last=number == last)
            elif manifest is not None and f"{self.slot}-{number:08d}" in self.pruned:
                self.follow_manifest(number, manifest)
                self.warn("pruned", number, f"segment {number} was pruned after an export (records {manifest.first_seq}-{manifest.last_seq})")
            else:
                what = f" (records {manifest.first_seq}-{manifest.last_seq})" if manifest is not None else ""
                self.problem("missing-segment", number, f"segment {number} of slot {self.slot} is missing{what}", seq=self.expect_seq)
                if manifest is not None:
                    self.follow_manifest(number, manifest, check=False)
                else:
                    self.expect_prev = None  # unknown: accept what the next segment says, once
        self.check_head(last)
        return ChainReport(
            self.slot,
            self.chain,
            len(present),
            self.records,
            self.first_seq,
            self.expect_seq - 1 if self.first_seq is not None else None,
            tuple(sorted(self.keys)),
            self.open_segment,
        )

    def check_manifest(self, number: int) -> Manifest | None:
        manifest, blob, problem = read_manifest(self.directory, self.slot, number)
        if problem == "missing":
            return None
        if problem:
            self.problem("forged-manifest", number, f"the manifest of segment {number} is not valid: {problem}")
            return None
        assert manifest is not None and blob is not None
        self.keys.add(key_id(blob.public_key))
        if self.trusted is not None and blob.public_key not in self.trusted:
            self.problem("untrusted-key", number, f"the manifest of segment {number} is signed by key {key_id(blob.public_key)}, which is not a trusted key")
            return None
        if manifest.slot != self.slot or manifest.segment != number:
            self.problem("forged-manifest", number, f"the manifest of segment {number} describes {manifest.slot} segment {manifest.segment}")
            return None
        return manifest

    def follow_manifest(self, number: int, manifest: Manifest, check: bool = True) -> None:
        if check:
            self.check_link(number, manifest.first_seq, manifest.prev_hash, None, "segment")
        if self.first_seq is None:
            self.first_seq = manifest.first_seq
        self.chain = self.chain or manifest.chain
        self.expect_seq, self.expect_prev = manifest.last_seq + 1, manifest.last_hash

    def check_link(self, number: int, seq: int, prev_hash: bytes, offset: int | None, what: str) -> bool:
        if self.expect_prev is None:  # after a missing segment: resume from here
            self.expect_seq, self.expect_prev = seq, prev_hash
            return True
        if seq != self.expect_seq:
            if seq > self.expect_seq:
                missing = f"{self.expect_seq}" if seq == self.expect_seq + 1 else f"{self.expect_seq}-{seq - 1}"
                self.problem("missing-record", number, f"record {missing} is missing: the {what} at this point starts at seq {seq}", seq=self.expect_seq, offset=offset)
            else:
                self.problem("out-of-order", number, f"seq {seq} appears where seq {self.expect_seq} was expected (records reordered or replayed)", seq=seq, offset=offset)
            return False
        if prev_hash != self.expect_prev:
            self.problem("chain-break", number, f"record {seq} does not link to the record before it (an earlier record was changed or replaced)", seq=seq, offset=offset)
            return False
        return True

    def check_segment(self, number: int, manifest: Manifest | None, *, is_last: bool) -> None:
        path = segment_path(self.directory, self.slot, number)
        scan = scan_segment(path)
        header = scan.header
        if header is None:
            self.problem("damaged-segment", number, f"segment {number} has no readable header: {scan.header_error}", seq=self.expect_seq)
        else:
            self.chain = self.chain or header.chain
            if header.chain != self.chain or header.segment != number or header.slot != self.slot:
                self.problem("foreign-segment", number, f"segment file {path.name} holds segment {header.segment} of chain {header.chain}")
            self.check_link(number, header.first_seq, header.prev_hash, 0, "segment")
            if self.first_seq is None:
                self.first_seq = header.first_seq
            if manifest is not None and header.public_key != manifest.public_key:
                self.problem("forged-manifest", number, f"segment {number} names key {key_id(header.public_key)} but its manifest is signed by {key_id(manifest.public_key)}")
        known = {(d.offset, d.length) for d in manifest.damage} if manifest is not None else set()
        items: list[ScannedRecord | Damage] = sorted([*scan.records, *scan.damage], key=lambda i: i.offset)
        after_known_damage = False
        count = 0
        for item in items:
            if isinstance(item, Damage):
                if (item.offset, item.length) in known:
                    self.warn("recovered-damage", number, f"segment {number}: {item.length} bytes at offset {item.offset} hold {item.reason}; found and sealed at start-up", offset=item.offset)
                    after_known_damage = True
                elif manifest is None and is_last and item.incomplete:
                    self.warn("incomplete-tail", number, f"open segment {number} ends in a record still being written or torn by a crash (offset {item.offset})", offset=item.offset)
                else:
                    self.problem("damaged-record", number, f"segment {number} holds {item.reason} at offset {item.offset}, where record {self.expect_seq} was expected", seq=self.expect_seq, offset=item.offset)
                continue
            record = item.record
            count += 1
            self.records += 1
            if after_known_damage and record.seq >= self.expect_seq:
                self.expect_seq, self.expect_prev = record.seq, record.prev_hash  # explained gap
            after_known_damage = False
            if not self.check_link(number, record.seq, record.prev_hash, item.offset, "record"):
                pass
            self.expect_seq, self.expect_prev = record.seq + 1, record.hash
        if manifest is None:
            if is_last:
                self.open_segment = number
                self.warn("open-segment", number, f"segment {number} is open (being written, or left by a crash and sealed at the next start)")
            else:
                self.problem("unsealed-segment", number, f"segment {number} has no manifest although later segments exist")
            return
        if scan.size != manifest.file_size:
            kind = "truncated" if scan.size < manifest.file_size else "extended"
            self.problem(kind, number, f"segment {number} is {scan.size} bytes but was sealed at {manifest.file_size}", seq=manifest.last_seq)
        elif scan.sha256 != manifest.file_sha256:
            self.problem("changed-segment", number, f"segment {number} does not match the hash in its manifest (bytes were changed)")
        if count != manifest.count or self.expect_seq - 1 != manifest.last_seq or self.expect_prev != manifest.last_hash:
            self.problem("manifest-mismatch", number, f"segment {number} holds {count} intact records ending at seq {self.expect_seq - 1}; its manifest says {manifest.count} ending at seq {manifest.last_seq}", seq=manifest.last_seq)
            self.expect_seq, self.expect_prev = manifest.last_seq + 1, manifest.last_hash

    def check_head(self, last: int) -> None:
        try:
            data = head_path(self.directory, self.slot).read_bytes()
        except FileNotFoundError:
            if any(n for n in segment_numbers(self.directory, self.slot)[1]):
                self.problem("missing-head", last, f"{self.slot}.head is missing although segments were sealed")
            return
        try:
            head, blob, valid = open_signed(data, Manifest)
        except Exception:
            self.problem("forged-manifest", last, f"{self.slot}.head is unreadable")
            return
        if not valid or (self.trusted is not None and blob.public_key not in self.trusted):
            self.problem("forged-manifest", last, f"{self.slot}.head is not validly signed by a trusted key")
            return
        if head.segment > last or not manifest_path(self.directory, self.slot, head.segment).exists():
            self.problem("missing-segment", head.segment, f"segment {head.segment} (records up to {head.last_seq}) was sealed but it and its manifest are gone", seq=head.last_seq)


def pruned_segments(directory: Path, trusted: Collection[bytes] | None = None) -> set[str]:
    return {name for entry in read_retention(directory, trusted) if entry.kind == "prune" for name in entry.segments}


def verify(directory: Path, public_keys: Collection[bytes] | None = None) -> VerifyReport:
    """Check every chain in ``directory``: frames, seq order, hash links, manifests, signatures.

    ``public_keys``: the keys manifests must be signed with. None trusts whatever key a manifest
    names (it still catches edits, but not a forger who re-signs): say so to the user.
    """
    directory = Path(directory)
    trusted = set(public_keys) if public_keys is not None else None
    pruned = pruned_segments(directory, trusted)
    chains, problems, warnings = [], [], []
    total = 0
    for slot in list_slots(directory):
        verifier = _ChainVerifier(directory, slot, trusted, pruned)
        report = verifier.run()
        chains.append(report)
        problems += verifier.problems
        warnings += verifier.warnings
        total += report.records
    return VerifyReport(
        directory=str(directory),
        chains=tuple(chains),
        problems=tuple(problems),
        warnings=tuple(warnings),
        records=total,
        trusted_keys=tuple(sorted(key_id(k) for k in trusted)) if trusted is not None else (),
    )


# --- retention: exports and prunes ----------------------------------------------------------------------


def append_retention(directory: Path, entry: RetentionEntry, key: Ed25519PrivateKey) -> None:
    """Append a signed entry to ``retention.log`` (durably: prune relies on it)."""
    directory.mkdir(parents=True, exist_ok=True)
    data = frame(sign(key, entry))
    descriptor = os.open(directory / RETENTION_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    try:
        _write_all(descriptor, data)
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def read_retention(directory: Path, trusted: Collection[bytes] | None = None) -> list[RetentionEntry]:
    """Entries whose signature is valid (and by a trusted key, when given); others are ignored."""
    try:
        data = (directory / RETENTION_LOG).read_bytes()
    except FileNotFoundError:
        return []
    entries = []
    position = 0
    while position < len(data):
        try:
            payload, position = _read_frame(data, position)
            entry, blob, valid = open_signed(payload, RetentionEntry)
        except (_FrameError, Exception):
            following = data.find(RECORD_MARK, position + 1)
            if following < 0:
                break
            position = following
            continue
        if valid and (trusted is None or blob.public_key in trusted):
            entries.append(entry)
    return entries


def merge_ranges(ranges: Iterable[SegmentRange]) -> dict[str, list[tuple[int, int]]]:
    """Per chain, the union of seq runs as sorted, non-overlapping ``(first, last)`` pairs."""
    by_chain: dict[str, list[tuple[int, int]]] = {}
    for item in sorted(ranges, key=lambda r: (r.chain, r.first_seq)):
        runs = by_chain.setdefault(item.chain, [])
        if runs and item.first_seq <= runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], max(runs[-1][1], item.last_seq))
        else:
            runs.append((item.first_seq, item.last_seq))
    return by_chain


def covered(runs: Mapping[str, list[tuple[int, int]]], chain: str, first: int, last: int) -> bool:
    if last < first:
        return True
    return any(start <= first and last <= end for start, end in runs.get(chain, ()))


# --- sink positions ----------------------------------------------------------------------------------------


@attrs.frozen
class SinkPosition:
    chain: str
    seq: int


def position_path(directory: Path, sink: str, slot: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", sink)
    return directory / SINK_POSITIONS_DIR / f"{safe}.{slot}.pos"


def read_position(directory: Path, sink: str, slot: str, chain: str) -> int:
    """The last seq of ``chain`` the sink confirmed (0 when none, or the slot now holds another chain)."""
    try:
        position = unpack_value(position_path(directory, sink, slot).read_bytes(), SinkPosition)
    except (OSError, Exception):
        return 0
    return position.seq if position.chain == chain else 0


def write_position(directory: Path, sink: str, slot: str, chain: str, seq: int) -> None:
    """Not fsynced: a lost position only means records are sent again, and sinks deduplicate."""
    path = position_path(directory, sink, slot)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, pack_value(SinkPosition(chain, seq)), durable=False)
