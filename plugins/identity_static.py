"""``[[identity]] kind = "static-token"``: API keys for simple setups.

A key looks like ``bst_3f9a1c0b7d2e_<43 random characters>``: the ``bst_`` prefix makes it
recognisable (to secret scanners, and to this provider, which leaves other credentials to the
next provider), the 12 hex digits are the key id (the lookup is one dictionary access, and the
id is what the audit trail and ``tokens revoke`` name), and the rest is 256 bits from the
operating system's CSPRNG.

The tokens file (TOML) keeps, per key id, the subject, groups, creation time, optional expiry and
revocation time, and a SHA-256 digest of the key — never the key itself, which is printed once
when it is minted. A fast hash is the right tool here, and a slow password KDF (bcrypt, scrypt,
Argon2) would be the wrong one: those slow down guessing of low-entropy human passwords, but a
key with 256 random bits cannot be guessed at any speed (2^256 candidates), so slowness would buy
nothing, while every connection — and every forged key in a flood — would pay for it in CPU.
Digests are compared in constant time.

The file is re-read when it changes (its modification time, size or inode), so ``tokens add`` and
``tokens revoke`` take effect on the next connection, without a restart. If it cannot be read or
is not valid, every key of this provider is refused until it is fixed (fail closed).

Example::

    [[identity]]
    kind = "static-token"
    tokens_file = "tokens.toml"

    $ bastion tokens add -c bastion.toml ci-nightly --groups etl,readers --expires 90d
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import hmac
import logging
import os
import re
import secrets
import sys
import tempfile
import threading
import tomllib
from collections.abc import Iterable, Iterator, Mapping
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

import attrs
import tomli_w
import trio

from bastion.core.config import Duration
from bastion.core.hookspecs import hookimpl
from bastion.core.specs import ComponentContext, IdentityProviderSpec
from bastion.policies.model import AuthOutcome, Credential, Identity

log = logging.getLogger("bastion.identity.static")

KIND = "static-token"
KEY_PREFIX = "bst_"
KEY_ID_BYTES = 6  # 12 hex digits: ids are picked at random and checked for collisions in the file
SECRET_BYTES = 32  # 256 bits: beyond guessing, which is why a fast hash suffices (see above)
# bst_<12 hex>_<43 base64url>: secrets.token_urlsafe(32) is always 43 characters
KEY_PATTERN = re.compile(r"bst_([0-9a-f]{12})_([A-Za-z0-9_-]{43})")
KEY_LENGTH = len(KEY_PREFIX) + 2 * KEY_ID_BYTES + 1 + 43
DIGEST_SCHEME = "sha256"
# Hashed in front of every key so a digest from this file cannot be replayed as, or confused
# with, a plain SHA-256 of the same text used anywhere else.
DIGEST_CONTEXT = b"bastion static-token v1\0"
TOKENS_FILE_VERSION = 1
TOKENS_FILE_MODE = 0o600  # digests only, but still nobody else's business
# Subjects and groups are names people write in policies and read in the audit trail: printable,
# no spaces, no control characters.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@/+=-]{0,199}")
_HEADER = (
    "# Bastion static API keys. Managed by `bastion tokens add|list|revoke`.\n"
    "# Only SHA-256 digests are stored: a key is shown once, when it is minted, and never again.\n\n"
)


# --- keys ----------------------------------------------------------------------------------------


def digest(key: str) -> str:
    """The stored form of a key: ``sha256:<hex>`` over a fixed context and the key text."""
    return f"{DIGEST_SCHEME}:{hashlib.sha256(DIGEST_CONTEXT + key.encode('utf-8')).hexdigest()}"


def parse_key(text: str) -> str | None:
    """The key id of a well-formed key, or None."""
    if len(text) != KEY_LENGTH:
        return None
    match = KEY_PATTERN.fullmatch(text)
    return match[1] if match else None


def new_key(taken: Iterable[str] = ()) -> tuple[str, str]:
    """(key id, key): a fresh key whose id is not in ``taken``."""
    taken = set(taken)
    while True:
        key_id = secrets.token_hex(KEY_ID_BYTES)
        if key_id not in taken:
            return key_id, f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(SECRET_BYTES)}"


# --- the tokens file -----------------------------------------------------------------------------


class TokensFileError(Exception):
    """The tokens file is unreadable or invalid; the message says where and why."""


@attrs.frozen
class StoredKey:
    key_id: str
    subject: str
    digest: str
    created: datetime
    groups: frozenset[str] = frozenset()
    expires: datetime | None = None
    revoked: datetime | None = None
    description: str = ""

    def status(self, now: datetime) -> str:
        if self.revoked is not None:
            return "revoked"
        if self.expires is not None and self.expires <= now:
            return "expired"
        return "active"

    def to_toml(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"subject": self.subject, "groups": sorted(self.groups), "hash": self.digest, "created": self.created}
        if self.expires is not None:
            entry["expires"] = self.expires
        if self.revoked is not None:
            entry["revoked"] = self.revoked
        if self.description:
            entry["description"] = self.description
        return entry


_ENTRY_KEYS = {"subject", "groups", "hash", "created", "expires", "revoked", "description"}
_DIGEST_PATTERN = re.compile(rf"{DIGEST_SCHEME}:[0-9a-f]{{64}}")


def parse_tokens(document: Mapping[str, Any]) -> dict[str, StoredKey]:
    """The keys of a parsed tokens file; :class:`TokensFileError` naming the first problem."""
    unknown = set(document) - {"version", "keys"}
    if unknown:
        raise TokensFileError(f"unknown key {sorted(unknown)[0]!r} at the top level")
    version = document.get("version", TOKENS_FILE_VERSION)
    if version != TOKENS_FILE_VERSION or isinstance(version, bool):
        raise TokensFileError(f"version: expected {TOKENS_FILE_VERSION}, got {version!r}")
    table = document.get("keys", {})
    if not isinstance(table, dict):
        raise TokensFileError("keys: expected a table")
    return {key_id: _parse_entry(key_id, entry) for key_id, entry in table.items()}


def _parse_entry(key_id: str, entry: Any) -> StoredKey:
    where = f"keys.{key_id}"
    if not re.fullmatch(r"[0-9a-f]{12}", key_id):
        raise TokensFileError(f"{where}: a key id is 12 lowercase hex digits")
    if not isinstance(entry, dict):
        raise TokensFileError(f"{where}: expected a table")
    unknown = set(entry) - _ENTRY_KEYS
    if unknown:
        raise TokensFileError(f"{where}: unknown key {sorted(unknown)[0]!r}")
    subject, key_digest, groups = entry.get("subject"), entry.get("hash"), entry.get("groups", [])
    if not isinstance(subject, str) or not NAME_PATTERN.fullmatch(subject):
        raise TokensFileError(f"{where}.subject: expected a name without spaces")
    if not isinstance(key_digest, str) or not _DIGEST_PATTERN.fullmatch(key_digest):
        raise TokensFileError(f"{where}.hash: expected {DIGEST_SCHEME}:<64 hex digits>")
    if not isinstance(groups, list) or not all(isinstance(g, str) and NAME_PATTERN.fullmatch(g) for g in groups):
        raise TokensFileError(f"{where}.groups: expected a list of names without spaces")
    description = entry.get("description", "")
    if not isinstance(description, str):
        raise TokensFileError(f"{where}.description: expected a string")
    return StoredKey(
        key_id=key_id,
        subject=subject,
        digest=key_digest,
        created=_timestamp(entry.get("created"), f"{where}.created", required=True),
        groups=frozenset(groups),
        expires=_timestamp(entry.get("expires"), f"{where}.expires"),
        revoked=_timestamp(entry.get("revoked"), f"{where}.revoked"),
        description=description,
    )


def _timestamp(value: Any, where: str, *, required: bool = False) -> datetime | None:
    if value is None and not required:
        return None
    if not isinstance(value, datetime) or value.tzinfo is None:
        raise TokensFileError(f"{where}: expected a date-time with a time zone, e.g. 2027-01-01T00:00:00Z")
    return value.astimezone(UTC)


def read_tokens(path: Path) -> dict[str, StoredKey]:
    """The keys in the tokens file at ``path``; an absent file holds no keys."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        raise TokensFileError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise TokensFileError(f"{path} is not valid TOML: {exc}") from None
    try:
        return parse_tokens(document)
    except TokensFileError as exc:
        raise TokensFileError(f"{path}: {exc}") from None


def write_tokens(path: Path, keys: Mapping[str, StoredKey]) -> None:
    """Replace the tokens file atomically (a reader sees the old file or the new one, never half)."""
    document = {"version": TOKENS_FILE_VERSION, "keys": {key_id: keys[key_id].to_toml() for key_id in sorted(keys)}}
    text = _HEADER + tomli_w.dumps(document)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, TOKENS_FILE_MODE)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Serialise read-modify-write cycles of concurrent ``bastion tokens`` commands."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


@attrs.frozen
class MintedKey:
    key: str = attrs.field(repr=False)
    entry: StoredKey


def add_key(
    path: Path,
    subject: str,
    groups: Iterable[str] = (),
    *,
    expires: datetime | None = None,
    description: str = "",
    now: datetime | None = None,
) -> MintedKey:
    """Mint a key for ``subject`` and store its digest in the tokens file at ``path``."""
    now = now or datetime.now(UTC)
    groups = frozenset(groups)
    for name in (subject, *groups):
        if not NAME_PATTERN.fullmatch(name):
            raise ValueError(f"{name!r} is not a valid name (letters, digits and ._:@/+=-, no spaces)")
    if expires is not None and expires <= now:
        raise ValueError("the expiry is in the past")
    with locked(path):
        keys = read_tokens(path)
        key_id, key = new_key(keys)
        entry = StoredKey(
            key_id=key_id,
            subject=subject,
            digest=digest(key),
            created=now.replace(microsecond=0),
            groups=groups,
            expires=expires.replace(microsecond=0) if expires is not None else None,  # whole seconds, rounded down
            description=description,
        )
        write_tokens(path, {**keys, key_id: entry})
    return MintedKey(key, entry)


def revoke_key(path: Path, key_id: str, *, now: datetime | None = None) -> StoredKey:
    """Mark a key revoked (kept in the file, so ``tokens list`` still shows who it was)."""
    now = now or datetime.now(UTC)
    with locked(path):
        keys = read_tokens(path)
        if key_id not in keys:
            raise KeyError(key_id)
        entry = keys[key_id]
        if entry.revoked is None:
            entry = attrs.evolve(entry, revoked=now.replace(microsecond=0))
            write_tokens(path, {**keys, key_id: entry})
    return entry


def parse_expiry(text: str, now: datetime | None = None) -> datetime:
    """``30d``/``12h``/``2w``/``1y`` from now, or a date (``2027-01-01``, midnight UTC) or date-time.

    ValueError with a sentence when ``text`` is neither or lies in the past.
    """
    now = now or datetime.now(UTC)
    text = text.strip()
    moment: datetime | None = None
    if re.fullmatch(r"\d+(?:\.\d+)?\s*(?:s|m|h|d|w|y)", text):
        seconds = Duration.parse(text)
        try:
            moment = now + timedelta(seconds=seconds)
        except OverflowError:
            raise ValueError(f"{text!r} is too far in the future") from None
    elif re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
        try:
            day = date.fromisoformat(text)
        except ValueError:
            raise ValueError(f"{text!r} is not a calendar date") from None
        moment = datetime(day.year, day.month, day.day, tzinfo=UTC)
    elif re.fullmatch(r"\d{4}-\d{2}-\d{2}[T ][0-9:.]+(?:Z|[+-]\d{2}:?\d{2})?", text):
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            raise ValueError(f"{text!r} is not a date-time") from None
        moment = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    if moment is None:
        raise ValueError(f'expected a duration like "30d" or a date like "2027-01-01", got {text!r}')
    if moment <= now:
        raise ValueError(f"{text!r} is not in the future")
    return moment


# --- the provider --------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class StaticTokenOptions:
    """``tokens_file``: where the digests live (relative to the configuration file)."""

    tokens_file: Path


class TokenStore:
    """The tokens file, re-read whenever it changes on disk."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()  # worker threads of concurrent connections share the cache
        self._signature: tuple[int, ...] | None = None
        self._keys: dict[str, StoredKey] = {}
        self._error: TokensFileError | None = None

    def current(self) -> dict[str, StoredKey]:
        """The keys as the file says now. Blocking (stat, maybe read): call from a worker thread."""
        with self._lock:
            return self._current()

    def _current(self) -> dict[str, StoredKey]:
        try:
            stat = os.stat(self.path)
            signature: tuple[int, ...] = (stat.st_mtime_ns, stat.st_size, stat.st_ino, stat.st_dev, stat.st_ctime_ns)
        except FileNotFoundError:
            signature = ()
        except OSError as exc:
            raise TokensFileError(f"cannot read {self.path}: {exc.strerror}") from None
        if signature != self._signature:
            try:
                self._keys, self._error = read_tokens(self.path), None
            except TokensFileError as exc:
                log.error("static-token: %s; refusing every key until it is fixed", exc)
                self._keys, self._error = {}, exc
            self._signature = signature
        if self._error is not None:
            raise self._error
        return self._keys


class StaticTokenProvider:
    def __init__(self, options: StaticTokenOptions, context: ComponentContext) -> None:
        self.name = context.name
        self.store = TokenStore(options.tokens_file)

    async def authenticate(self, credential: Credential) -> AuthOutcome:
        key = credential.secret
        if not key or not key.startswith(KEY_PREFIX):
            return AuthOutcome.unknown("not a Bastion API key")
        key_id = parse_key(key)
        if key_id is None:
            return AuthOutcome.reject(f"{self.name}: malformed API key (bst_ prefix, wrong shape)")
        try:
            keys = await trio.to_thread.run_sync(self.store.current)
        except TokensFileError as exc:
            return AuthOutcome.reject(f"{self.name}: the tokens file is unusable: {exc}")
        entry = keys.get(key_id)
        if entry is None:  # another static-token provider (another file) may know it
            return AuthOutcome.unknown(f"key id {key_id} is not in {self.store.path}")
        if not hmac.compare_digest(entry.digest.encode(), digest(key).encode()):
            return AuthOutcome.reject(f"{self.name}: wrong secret for key id {key_id}")
        now = datetime.now(UTC)
        if entry.revoked is not None:
            return AuthOutcome.reject(f"{self.name}: key {key_id} was revoked at {_iso(entry.revoked)}")
        if entry.expires is not None and entry.expires <= now:
            return AuthOutcome.reject(f"{self.name}: key {key_id} expired at {_iso(entry.expires)}")
        return AuthOutcome.ok(
            Identity(
                provider=self.name,
                subject=entry.subject,
                groups=entry.groups,
                auth_method="api-key",
                token_id=key_id,
                expires_at=entry.expires,
            )
        )

    async def aclose(self) -> None:
        pass


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def make_provider(options: StaticTokenOptions, context: ComponentContext) -> StaticTokenProvider:
    return StaticTokenProvider(options, context)


@hookimpl
def bastion_register_identity_providers() -> list[IdentityProviderSpec]:
    return [
        IdentityProviderSpec(
            kind=KIND,
            factory=make_provider,
            options=StaticTokenOptions,
            description="API keys (bst_…) whose SHA-256 digests live in a tokens file",
        )
    ]


# --- the `bastion tokens` command --------------------------------------------------------------


def run_add(path: Path, subject: str, groups: Iterable[str], expires: datetime | None, description: str = "", out: TextIO | None = None) -> int:
    """Mint a key and print it, alone, on the last line (so ``| tail -n1`` captures it)."""
    out = out or sys.stdout
    try:
        minted = add_key(path, subject, groups, expires=expires, description=description)
    except (ValueError, TokensFileError) as exc:
        print(f"bastion tokens add: {exc}", file=sys.stderr)
        return 1
    entry = minted.entry
    groups_text = ", ".join(sorted(entry.groups)) or "none"
    expiry_text = _iso(entry.expires) if entry.expires else "never"
    print(f"minted key {entry.key_id} for {entry.subject} (groups: {groups_text}; expires: {expiry_text})", file=out)
    print(f"its digest is stored in {path}; the key itself is stored nowhere, so copy it now:", file=out)
    print(minted.key, file=out)
    return 0


def run_list(path: Path, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    try:
        keys = read_tokens(path)
    except TokensFileError as exc:
        print(f"bastion tokens list: {exc}", file=sys.stderr)
        return 1
    now = datetime.now(UTC)
    rows = [("KEY ID", "SUBJECT", "GROUPS", "CREATED", "EXPIRES", "STATUS")]
    for entry in sorted(keys.values(), key=lambda e: (e.subject, e.created)):
        expires = _iso(entry.expires) if entry.expires else "never"
        rows.append((entry.key_id, entry.subject, ",".join(sorted(entry.groups)) or "-", _iso(entry.created), expires, entry.status(now)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip(), file=out)
    return 0


def run_revoke(path: Path, key_id: str, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    try:
        entry = revoke_key(path, key_id)
    except KeyError:
        print(f"bastion tokens revoke: no key {key_id} in {path}", file=sys.stderr)
        return 1
    except TokensFileError as exc:
        print(f"bastion tokens revoke: {exc}", file=sys.stderr)
        return 1
    print(f"revoked key {entry.key_id} of {entry.subject}", file=out)
    return 0


def tokens_file_of(config: Any, provider: str | None) -> Path:
    """The tokens file of the configuration's static-token provider (``provider`` picks one by name)."""
    sections = [s for s in config.identity if s.kind == KIND]
    configured = ", ".join(s.name for s in sections) or "none"
    if provider is not None:
        sections = [s for s in sections if s.name == provider]
        if not sections:
            raise LookupError(f'no {KIND} identity provider is named "{provider}" (configured: {configured})')
    if not sections:
        raise LookupError(f'the configuration has no [[identity]] section with kind = "{KIND}"')
    if len(sections) > 1:
        raise LookupError(f"several {KIND} providers are configured ({configured}): pick one with --provider")
    return sections[0].options.tokens_file


def _name(text: str) -> str:
    if not NAME_PATTERN.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a valid name (letters, digits and ._:@/+=-, no spaces)")
    return text


def _groups(text: str) -> frozenset[str]:
    return frozenset(_name(part.strip()) for part in text.split(",") if part.strip())


def _expiry(text: str) -> datetime:
    try:
        return parse_expiry(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _with_tokens_file(run):
    def handler(args: argparse.Namespace) -> int:
        from bastion.core.cli import load_for_command

        config, _hooks = load_for_command(args)
        try:
            path = tokens_file_of(config, args.provider)
        except LookupError as exc:
            print(f"bastion tokens: {exc}", file=sys.stderr)
            return 1
        return run(path, args)

    return handler


@hookimpl
def bastion_add_commands(subparsers: argparse._SubParsersAction) -> None:
    from bastion.core.cli import add_config_argument

    tokens = subparsers.add_parser("tokens", help="manage static API keys (static-token identity provider)")
    actions = tokens.add_subparsers(dest="tokens_action", metavar="ACTION", required=True)

    def common(parser: argparse.ArgumentParser) -> None:
        add_config_argument(parser)
        parser.add_argument("--provider", help=f"name of the {KIND} provider, when there are several")

    add = actions.add_parser("add", help="mint a key; it is printed once, alone on the last line")
    common(add)
    add.add_argument("subject", type=_name, help="who the key stands for, as policies name it")
    add.add_argument("--groups", type=_groups, default=frozenset(), help="comma-separated groups")
    add.add_argument("--expires", type=_expiry, default=None, help='"30d", "12h", "1y" or a date "2027-01-01"')
    add.add_argument("--description", default="", help="a note kept with the key")
    add.set_defaults(
        handler=_with_tokens_file(lambda path, args: run_add(path, args.subject, args.groups, args.expires, args.description))
    )

    listing = actions.add_parser("list", help="list keys (never their secrets)")
    common(listing)
    listing.set_defaults(handler=_with_tokens_file(lambda path, args: run_list(path)))

    revoke = actions.add_parser("revoke", help="revoke a key by its id")
    common(revoke)
    revoke.add_argument("key_id", help="the 12 hex digits after bst_")
    revoke.set_defaults(handler=_with_tokens_file(lambda path, args: run_revoke(path, args.key_id)))
