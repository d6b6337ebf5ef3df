"""The gateway's configuration: one TOML file, loaded with cattrs into frozen attrs classes.

Unknown keys are rejected and every error names its place and says what was wrong in a plain
sentence, e.g. ``targets[0].listen: expected "host:port", got "6432"``. Sections whose shape
depends on a plugin — a target's protocol options, an identity provider, an audit sink — are
checked against the attrs class the plugin registered (see :mod:`bastion.core.specs`).

Relative paths are resolved against the directory of the configuration file.
"""

from __future__ import annotations

import ipaddress
import re
import string
import tomllib
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import cattrs
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError, IterableValidationError

from bastion.core.secrets import CORE_KINDS, SecretRef


class ConfigError(Exception):
    """One or more problems with a configuration file; ``errors`` are located sentences."""

    def __init__(self, errors: list[str], source: str = "") -> None:
        self.errors = errors
        self.source = source
        prefix = f"{source}: " if source else ""
        super().__init__("\n".join(prefix + e for e in errors))


# --- value types with their own syntax ---------------------------------------------------------


@attrs.frozen
class Address:
    """``host:port``; IPv6 hosts in brackets (``[::1]:6432``). Port 0 picks a free port."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Address:
        if not isinstance(text, str):
            raise ValueError(f'expected "host:port", got {text!r}')
        match = re.fullmatch(r"\[(?P<v6>[0-9a-fA-F:.%]+)\]:(?P<port>\d{1,5})|(?P<host>[^:\[\]]+):(?P<port2>\d{1,5})", text)
        if not match:
            raise ValueError(f'expected "host:port", got "{text}"')
        host = match["v6"] or match["host"]
        port = int(match["port"] or match["port2"])
        if port > 65535:
            raise ValueError(f'port must be at most 65535, got "{text}"')
        if match["v6"]:
            ipaddress.ip_address(host.split("%")[0])
        return cls(host, port)

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


class Duration(float):
    """Seconds, written as ``30s``, ``15m``, ``2h``, ``1d``, ``6y`` or a plain number of seconds."""

    UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 365 * 86400}

    @classmethod
    def parse(cls, value: Any) -> Duration:
        if isinstance(value, bool):
            raise ValueError(f"expected a duration like 30s or 15m, got {value!r}")
        if isinstance(value, (int, float)):
            if value < 0:
                raise ValueError(f"a duration cannot be negative, got {value}")
            return cls(value)
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w|y)\s*", str(value))
        if not match:
            raise ValueError(f'expected a duration like "30s", "15m" or "2h", got {value!r}')
        return cls(float(match[1]) * cls.UNITS[match[2]])


# --- sections ------------------------------------------------------------------------------------


@attrs.frozen
class Credentials:
    """What Bastion logs in upstream with. The caller never sees these."""

    user: str
    password: SecretRef | None = None


@attrs.frozen
class ListenerTLS:
    """TLS offered to callers. ``client_ca`` makes the listener ask for (and verify) a client
    certificate; ``require_client_cert`` refuses callers without one."""

    cert: Path
    key: Path
    client_ca: Path | None = None
    require_client_cert: bool = False
    min_version: str = "1.2"


@attrs.frozen
class UpstreamTLS:
    """TLS to the upstream server. ``verify = false`` is refused unless ``insecure = true`` is
    also given, so skipping verification is never an accident."""

    ca: Path | None = None
    verify: bool = True
    server_name: str | None = None
    cert: Path | None = None
    key: Path | None = None
    insecure: bool = False

    def __attrs_post_init__(self) -> None:
        if not self.verify and not self.insecure:
            raise ValueError("verify = false needs insecure = true as well")


@attrs.frozen
class TargetConfig:
    """A protected upstream and the listener callers use to reach it.

    ``options`` holds the protocol's own keys (an instance of the attrs class the protocol plugin
    registered), e.g. ``database`` for PostgreSQL.
    """

    name: str
    protocol: str
    listen: Address
    upstream: Address
    credentials: Credentials | None = None
    tls: ListenerTLS | None = None
    upstream_tls: UpstreamTLS | None = None
    allow_plaintext_auth: bool = False  # accept secrets over plaintext (only on loopback listeners)
    connect_timeout: Duration = Duration(10)
    idle_timeout: Duration | None = None
    options: Any = None


@attrs.frozen
class PluginSection:
    """A plugin-typed section (``[[identity]]``, ``[[audit.sinks]]``): ``kind`` picks the class."""

    kind: str
    name: str
    options: Any = None


@attrs.frozen
class GatewaySection:
    state_dir: Path = Path("var")
    admin_listen: Address | None = Address("127.0.0.1", 8700)
    policies: tuple[Path, ...] = ()
    disable_plugins: tuple[str, ...] = ()
    shutdown_grace: Duration = Duration(10)
    handshake_timeout: Duration = Duration(15)
    max_sessions: int = 10000
    log_level: str = "info"
    expiry_grace: Duration = Duration(0)
    hash_key: SecretRef | None = None  # key for keyed-hash masking (pseudonyms that still join)


@attrs.frozen
class AuditSection:
    """``fail_closed``: refuse statements rather than run them unrecorded.
    ``record_rows``: ``"all"``, ``"none"`` or a number N (the first N rows of each result)."""

    fail_closed: bool = True
    record_rows: str | int = "all"
    signing_key: SecretRef | None = None
    segment_max_bytes: int = 64 * 1024 * 1024
    sinks: tuple[PluginSection, ...] = ()


# --- approvals (holding risky statements for a human; see bastion.core.approvals) ----------------

APPROVAL_STORES = ("sqlite", "postgres")
# the steps an approval request goes through; webhooks may subscribe to any of them
APPROVAL_STEPS = ("requested", "approval", "approved", "denied", "expired", "cancelled", "window")
DEFAULT_WEBHOOK_EVENTS = ("requested", "approved", "denied", "expired", "cancelled")
# what ``approvals.notice`` may name: the request id, its expiry, who may approve, the rules that
# asked, and the two ways to approve (the CLI command and the HTTP endpoint)
NOTICE_FIELDS = ("id", "expires", "timeout", "approvers", "rules", "cli", "http")


@attrs.frozen
class ApprovalsPostgres:
    """The shared approval store of several gateway instances (``store = "postgres"``)."""

    dbname: str
    user: str
    host: str = "127.0.0.1"
    port: int = 5432
    password: SecretRef | None = None
    sslmode: str = "prefer"
    connect_timeout: Duration = Duration(10)
    # a prefix for the store's tables, so several deployments can share one database
    table_prefix: str = "bastion_approval"


@attrs.frozen
class ApprovalWebhook:
    """A JSON POST for every approval step in ``events``, signed with HMAC-SHA256 of ``secret``."""

    url: str
    secret: SecretRef
    events: tuple[str, ...] = DEFAULT_WEBHOOK_EVENTS
    timeout: Duration = Duration(10)
    max_attempts: int = 8
    retry_initial: Duration = Duration(1)
    retry_max: Duration = Duration(300)


@attrs.frozen
class ApprovalsSection:
    """Just-in-time approval: where held requests are kept and how people hear about them.

    ``path`` is the SQLite file (default ``<state_dir>/approvals.sqlite``); ``default_timeout``
    applies to review decisions that carry no rule of their own; ``admin_groups`` may review any
    request (never their own); ``public_url`` is how reviewers reach the admin listener (default:
    ``http://<gateway.admin_listen>``); ``notice`` is the text the held caller gets.
    """

    enabled: bool = True
    store: str = "sqlite"
    path: Path | None = None
    postgres: ApprovalsPostgres | None = None
    default_timeout: Duration = Duration(900)
    admin_groups: tuple[str, ...] = ()
    public_url: str | None = None
    notice: str | None = None
    reminder_interval: Duration = Duration(60)
    poll_interval: Duration = Duration(0.5)
    webhooks: tuple[ApprovalWebhook, ...] = ()


@attrs.frozen
class Config:
    gateway: GatewaySection
    identity: tuple[PluginSection, ...]
    targets: tuple[TargetConfig, ...]
    audit: AuditSection
    approvals: ApprovalsSection = attrs.field(factory=ApprovalsSection)
    source: Path | None = None

    def target(self, name: str) -> TargetConfig:
        for target in self.targets:
            if target.name == name:
                return target
        raise KeyError(name)


@attrs.frozen
class Registry:
    """The attrs classes plugins registered for plugin-typed sections."""

    protocols: Mapping[str, type] = attrs.field(factory=dict)
    identity: Mapping[str, type] = attrs.field(factory=dict)
    sinks: Mapping[str, type] = attrs.field(factory=dict)


# --- loading -------------------------------------------------------------------------------------


def read_toml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"cannot read the file: {exc.strerror}"], str(path)) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"not valid TOML: {exc}"], str(path)) from None


def disabled_plugins(raw: Mapping[str, Any]) -> tuple[str, ...]:
    """Read ``gateway.disable_plugins`` before plugins are loaded (they decide the rest)."""
    value = raw.get("gateway", {}).get("disable_plugins", ()) if isinstance(raw.get("gateway"), dict) else ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        return ()
    return tuple(value)


def make_converter(base_dir: Path) -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=True)

    def structure_path(value: Any, _: type) -> Path:
        if not isinstance(value, str) or not value:
            raise ValueError(f"expected a file path, got {value!r}")
        path = Path(value).expanduser()
        return path if path.is_absolute() else base_dir / path

    def structure_secret(value: Any, _: type) -> SecretRef:
        if isinstance(value, str):
            raise ValueError(
                'inline secrets are not accepted; write { env = "NAME" } or { file = "path" }'
            )
        if not isinstance(value, dict) or len(value) != 1:
            raise ValueError('expected one reference such as { env = "NAME" } or { file = "path" }')
        ((kind, ref),) = value.items()
        if not isinstance(ref, str) or not ref:
            raise ValueError(f"the {kind} reference must be a non-empty string")
        return SecretRef(kind, ref, base_dir if kind == "file" else None)

    def structure_strict(type_: type):
        def hook(value: Any, _: type) -> Any:
            if type(value) is not type_ and not (type_ is float and type(value) is int):
                raise ValueError(f"expected {_type_word(type_)}, got {value!r}")
            return type_(value)

        return hook

    conv.register_structure_hook(Path, structure_path)
    conv.register_structure_hook(SecretRef, structure_secret)
    conv.register_structure_hook(Address, lambda v, _: Address.parse(v))
    conv.register_structure_hook(Duration, lambda v, _: Duration.parse(v))
    conv.register_structure_hook(str | int, lambda v, _: _str_or_int(v))
    for simple in (str, int, float, bool):
        conv.register_structure_hook(simple, structure_strict(simple))
    return conv


def _str_or_int(value: Any) -> str | int:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"expected a string or a number, got {value!r}")
    return value


def _type_word(type_: type) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}.get(type_, type_.__name__)


def describe_errors(exc: BaseException, path: str) -> list[str]:
    """Turn a cattrs exception tree into ``path: sentence`` lines."""

    def format_exception(error: BaseException, type_: Any) -> str:
        if isinstance(error, ForbiddenExtraKeysError):
            keys = ", ".join(f'"{k}"' for k in sorted(error.extra_fields))
            return f"unknown key{'s' if len(error.extra_fields) > 1 else ''} {keys}"
        if isinstance(error, KeyError):
            return "required key is missing"
        if isinstance(error, ValueError):
            # attrs validators raise ValueError(message, attribute, allowed, got): name the key
            if len(error.args) >= 2 and isinstance(error.args[1], attrs.Attribute):
                return f"\0{error.args[1].name}\0{error.args[0]}"
            return str(error)
        if isinstance(error, TypeError) and type_ is not None:
            return f"expected {_describe_type(type_)}"
        return str(error) or type(error).__name__

    lines = []
    for line in cattrs.transform_error(exc, path="$", format_exception=format_exception):
        message, _, where = line.rpartition(" @ ")
        where = where.removeprefix("$").removeprefix(".")
        if message.startswith("\0"):
            _, attribute, message = message.split("\0", 2)
            where = f"{where}.{attribute}" if where else attribute
        full = ".".join(p for p in (path, where) if p).replace(".[", "[")
        lines.append(f"{full}: {message}" if full else message)
    return lines


def _describe_type(type_: Any) -> str:
    origin = typing.get_origin(type_)
    if origin in (tuple, list):
        return "a list"
    if attrs.has(type_):
        return "a table"
    return getattr(type_, "__name__", str(type_))


def load_config(path: Path | str, registry: Registry, raw: Mapping[str, Any] | None = None) -> Config:
    """Load and check ``path``. Raises :class:`ConfigError` listing every problem found."""
    path = Path(path)
    if raw is None:
        raw = read_toml(path)
    conv = make_converter(path.parent.resolve())
    errors: list[str] = []

    def structure(value: Any, type_: Any, where: str) -> Any:
        try:
            return conv.structure(value, type_)
        except (ClassValidationError, IterableValidationError) as exc:
            errors.extend(describe_errors(exc, where))
        except (ValueError, TypeError, KeyError) as exc:
            errors.append(f"{where}: {describe_errors(exc, '')[0] if isinstance(exc, ForbiddenExtraKeysError) else exc}")
        return None

    raw = dict(raw)
    for key in sorted(set(raw) - {"gateway", "identity", "targets", "audit", "approvals"}):
        errors.append(f'{key}: unknown section "{key}" (known: gateway, identity, targets, audit, approvals)')

    gateway = structure(_table(raw.get("gateway", {}), "gateway", errors), GatewaySection, "gateway")

    identities = []
    for index, section in enumerate(_array(raw.get("identity", []), "identity", errors)):
        identities.append(_plugin_section(section, f"identity[{index}]", registry.identity, "identity provider", structure, errors))

    targets = []
    names: set[str] = set()
    for index, section in enumerate(_array(raw.get("targets", []), "targets", errors)):
        where = f"targets[{index}]"
        target = _target(section, where, registry, structure, errors)
        if target is None:
            continue
        if target.name in names:
            errors.append(f'{where}.name: another target is already called "{target.name}"')
        names.add(target.name)
        if target.allow_plaintext_auth and not target.listen.is_loopback:
            errors.append(f"{where}.allow_plaintext_auth: only allowed when the listener is on loopback, not {target.listen}")
        targets.append(target)

    audit_raw = dict(_table(raw.get("audit", {}), "audit", errors))
    sinks = []
    for index, section in enumerate(_array(audit_raw.pop("sinks", []), "audit.sinks", errors)):
        sinks.append(_plugin_section(section, f"audit.sinks[{index}]", registry.sinks, "audit sink", structure, errors))
    audit = structure(audit_raw, AuditSection, "audit")
    if isinstance(audit, AuditSection):
        record_rows = audit.record_rows
        if isinstance(record_rows, str) and record_rows not in ("all", "none"):
            errors.append(f'audit.record_rows: expected "all", "none" or a number of rows, got "{record_rows}"')
        if isinstance(record_rows, int) and record_rows < 0:
            errors.append("audit.record_rows: cannot be negative")

    approvals = structure(_table(raw.get("approvals", {}), "approvals", errors), ApprovalsSection, "approvals")
    if isinstance(approvals, ApprovalsSection):
        _check_approvals(approvals, errors)

    if not targets and not errors:
        errors.append("targets: at least one [[targets]] section is needed")
    _check_listen_conflicts(targets, gateway, errors)

    if errors:
        raise ConfigError(errors, str(path))
    if not gateway.state_dir.is_absolute():  # the default is relative to the config file too
        gateway = attrs.evolve(gateway, state_dir=path.parent.resolve() / gateway.state_dir)
    return Config(
        gateway=gateway,
        identity=tuple(identities),
        targets=tuple(targets),
        audit=attrs.evolve(audit, sinks=tuple(s for s in sinks if s is not None)),
        approvals=approvals,
        source=path,
    )


def _check_approvals(section: ApprovalsSection, errors: list[str]) -> None:
    """What the types alone cannot say about ``[approvals]``."""
    if section.store not in APPROVAL_STORES:
        errors.append(f'approvals.store: expected "sqlite" or "postgres", got "{section.store}"')
    if section.store == "postgres" and section.postgres is None:
        errors.append('approvals.postgres: required with store = "postgres" (dbname, user, password…)')
    if section.poll_interval <= 0:
        errors.append("approvals.poll_interval: must be more than 0")
    if section.postgres is not None and not re.fullmatch(r"[a-z_][a-z0-9_]{0,40}", section.postgres.table_prefix):
        errors.append(f'approvals.postgres.table_prefix: use lower-case letters, digits and _ (at most 41), got "{section.postgres.table_prefix}"')
    if section.public_url is not None and not re.match(r"https?://[^/\s]+", section.public_url):
        errors.append(f'approvals.public_url: expected an http:// or https:// address, got "{section.public_url}"')
    if section.notice is not None:
        try:
            names = [field for _, field, _, _ in string.Formatter().parse(section.notice) if field is not None]
        except ValueError as exc:
            errors.append(f"approvals.notice: not a valid template ({exc})")
        else:
            for name in names:
                if name not in NOTICE_FIELDS:
                    known = ", ".join("{" + f + "}" for f in NOTICE_FIELDS)
                    errors.append(f"approvals.notice: unknown placeholder {{{name}}} (known: {known})")
    for index, hook in enumerate(section.webhooks):
        where = f"approvals.webhooks[{index}]"
        if not re.match(r"https?://[^/\s]+", hook.url):
            errors.append(f'{where}.url: expected an http:// or https:// address, got "{hook.url}"')
        for event in hook.events:
            if event not in APPROVAL_STEPS:
                errors.append(f'{where}.events: unknown event "{event}" (known: {", ".join(APPROVAL_STEPS)})')
        if not hook.events:
            errors.append(f"{where}.events: an empty list sends nothing; leave the key out for the default")
        if hook.max_attempts < 1:
            errors.append(f"{where}.max_attempts: must be at least 1")


def _table(value: Any, where: str, errors: list[str]) -> Mapping[str, Any]:
    if isinstance(value, dict):
        return value
    errors.append(f"{where}: expected a table, got {value!r}")
    return {}


def _array(value: Any, where: str, errors: list[str]) -> list[Any]:
    if isinstance(value, list):
        return value
    errors.append(f"{where}: expected an array of tables ([[{where}]]), got {value!r}")
    return []


_TARGET_KEYS = {field.name for field in attrs.fields(TargetConfig)} - {"options"}


def _target(section: Any, where: str, registry: Registry, structure, errors: list[str]) -> TargetConfig | None:
    if not isinstance(section, dict):
        errors.append(f"{where}: expected a table")
        return None
    protocol = section.get("protocol")
    if protocol not in registry.protocols:
        known = ", ".join(sorted(registry.protocols)) or "none"
        errors.append(f'{where}.protocol: unknown protocol {protocol!r} (known: {known})')
        return None
    common = {k: v for k, v in section.items() if k in _TARGET_KEYS}
    extra = {k: v for k, v in section.items() if k not in _TARGET_KEYS}
    options = structure(extra, registry.protocols[protocol], where)
    if options is None:
        return None
    target = structure(common, TargetConfig, where)
    if target is None:
        return None
    return attrs.evolve(target, options=options)


def _plugin_section(section: Any, where: str, kinds: Mapping[str, type], what: str, structure, errors: list[str]) -> PluginSection | None:
    if not isinstance(section, dict):
        errors.append(f"{where}: expected a table")
        return None
    section = dict(section)
    kind = section.pop("kind", None)
    name = section.pop("name", None) or kind
    if kind not in kinds:
        known = ", ".join(sorted(kinds)) or "none"
        errors.append(f"{where}.kind: unknown {what} {kind!r} (known: {known})")
        return None
    if not isinstance(name, str):
        errors.append(f"{where}.name: expected a string")
        return None
    options = structure(section, kinds[kind], where)
    if options is None:
        return None
    return PluginSection(kind=kind, name=name, options=options)


def _check_listen_conflicts(targets: list[TargetConfig], gateway: GatewaySection | None, errors: list[str]) -> None:
    seen: dict[tuple[str, int], str] = {}
    entries = [(f"targets[{i}].listen", t.listen) for i, t in enumerate(targets)]
    if gateway is not None and gateway.admin_listen is not None:
        entries.append(("gateway.admin_listen", gateway.admin_listen))
    for where, address in entries:
        if address.port == 0:
            continue
        key = (address.host, address.port)
        if key in seen:
            errors.append(f"{where}: {address} is already used by {seen[key]}")
        seen[key] = where
