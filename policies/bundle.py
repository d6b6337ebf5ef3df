"""Policy bundles: TOML files that say who may do what, where, and what stops or pauses them.

A deployment names its bundles in ``gateway.policies``; they are parsed here (purely: reading a
file's text is :func:`load_bundle_file`'s only I/O) and merged into one :class:`PolicySet`, which
:mod:`bastion.policies.engine` evaluates for every request. Anything wrong with a bundle is a
:class:`BundleError` listing every problem found, each located like
``hipaa.toml: guardrail[1].detect[0]: unknown detector "dorp" (known: drop, truncate, …)``.
A bundle that does not load never half-applies: the gateway refuses to start (fail closed).

Reference
=========

A bundle has the sections below, each optional; any other key is an error. Rule names are
letters, digits, ``-``, ``_`` and ``.`` (at most 64), unique per section within a bundle. Every
rule gets a stable id ``<bundle file stem>:<section>:<name>`` (``hipaa-baseline:guardrail:no-drop``)
that decisions, the audit trail and golden cases refer to. Every rule may carry a free-text
``description``.

Identity matchers (``identities``, ``exempt``)
    ``{ groups = [...], subjects = [...], providers = [...] }``. Each list that is given must
    match: the caller belongs to at least one of ``groups``, its subject matches one of the
    ``subjects`` globs (case-sensitive, e.g. ``"repo:acme/etl:*"``), it was verified by one of
    ``providers`` (exact provider names such as ``"oidc:github"``). At least one list must be
    given, and a given list must not be empty.

Globs (``targets``, ``tables``, ``columns``)
    ``*`` is any run of characters *including dots*, ``?`` one character, ``[abc]`` / ``[!abc]``
    a set. No spaces, no empty dot-separated parts, brackets must close. Tables and columns are
    matched case-insensitively against schema-qualified names (``public.patients``,
    ``public.patients.ssn``), so ``public.*`` covers every table of ``public`` and ``*.email``
    every column called ``email``; target names are matched exactly as configured.

``[[grant]]`` — least privilege; nothing is reachable unless a grant gives it (default deny)
    ``name``          required.
    ``identities``    required identity matcher: who the grant is for.
    ``targets``       required list of target globs (``["*"]`` for every target).
    ``statements``    required list of statement kinds (``select insert update delete merge ddl
                      dcl tcl copy call do explain set show prepare execute utility``) or
                      protocol actions (Redis command names such as ``get`` or ``config get``),
                      any case; ``"*"`` is any of them except ``unknown``. A grant also lets its
                      identities connect to its targets. Listing ``unknown`` (statements Bastion
                      could not classify) is allowed but warned about.
    ``tables``        optional table globs: every table the request reads or writes must match
                      one. Omitted: any table. An empty list is an error.
    ``columns``       optional column globs: every column the request reads must match one.
                      A statement whose columns the analysis cannot list (``SELECT *`` without
                      a catalog) is covered only when every table it reads is allowed whole
                      (``"public.visits.*"``, ``"public.*"``).
    ``capabilities``  optional protocol capabilities beyond statements: ``function-call``
                      (PostgreSQL fast-path calls), ``replication``, ``startup-options``. A
                      request needs a capability when its action, its message kind or one of its
                      findings carries the capability's name; ``"*"`` does not imply any.

``[[guardrail]]`` — refuse (or hold) what a grant would allow, by analysis findings
    ``name``          required.
    ``detect``        required list of finding names from the catalogue in
                      :mod:`bastion.policies.findings` (``drop``, ``truncate``, ``copy-program``…).
    ``action``        ``"deny"`` (default) or ``"review"``.
    ``enforce``       default ``true``; ``false`` is a dry run: the decision records what the
                      guardrail would have done without acting on it.
    ``targets``       optional target globs (default: every target).
    ``identities``    optional identity matcher (default: everyone).
    ``exempt``        optional identity matcher: callers it matches are not subject to the rule.
    ``approvers``, ``timeout``, ``min_approvals``, ``max_window``: as for ``[[review]]``; only
                      with ``action = "review"``, where ``approvers`` is required.

``[[review]]`` — hold a request for a human
    ``name``          required.
    ``when``          required table of conditions; every condition given must hold:
                      ``statements`` (kinds/actions; ``"*"`` any but ``connect``; without it a
                      review never applies to ``connect``), ``tables`` (globs; any table read or
                      written matching one), ``findings`` (catalogue names; any present),
                      ``risk_over`` (risk score 0-100 above this), ``rows_over`` (N >= 1: the
                      statement runs and its *result* pauses for approval when it reaches row
                      N+1; without it approval comes before the statement runs).
    ``approvers``     required ``{ groups = [...] }``: who may approve.
    ``timeout``       how long to wait for approval before denying; default ``"15m"``.
                      Durations are a number and a unit: ``500ms``, ``30s``, ``15m``, ``2h``,
                      ``1d``, ``1w``, or a plain number of seconds.
    ``min_approvals`` default 1.
    ``max_window``    optional duration: approvers may approve a time-boxed window for this
                      identity and statement fingerprint, at most this long (default: each
                      approval covers one statement).
    ``targets``, ``identities``, ``exempt``: optional scoping, as for guardrails.

``[risk]`` — thresholds on the request's risk score (the capped sum of its findings' weights)
    ``review_over``   score above which a request is held for review; needs ``approvers``
                      (and takes ``timeout``, ``min_approvals``, ``max_window`` as above).
    ``deny_over``     score above which a request is denied; must exceed ``review_over``.
    Applies to every request on every target. Rule ids ``<stem>:risk:review`` / ``:risk:deny``.

``[[mask]]`` — mask PHI in results (see :class:`bastion.policies.model.MaskRule` and
:mod:`bastion.policies.masking` for the matching and the strategies)
    ``name``          required.
    ``columns``       required column globs (qualified names, e.g. ``"*.ssn"``).
    ``strategy``      ``redact`` (default), ``partial``, ``hash`` or ``null``.
    ``recognizers``   optional recognizer names (built-in: ``ssn email phone card npi iban dob
                      ipv4 ipv6 zip``, or a ``[[recognizer]]``): mask only what they find in the
                      value. Empty: the whole value is masked.
    ``exempt``        optional ``{ groups = [...] }``: members see the raw value.
    ``targets``       optional target globs (default: every target).

``[[recognizer]]`` — a custom recognizer for ``[[mask]]`` rules
    ``name``          lower-case letters, digits, ``_ - .``; not a built-in name; unique across
                      all bundles (mask rules in any bundle may use it).
    ``pattern``       RE2 syntax (linear time: no backreferences or lookaround).
    ``validator``     optional ``"luhn"`` or ``"mod97"`` checksum.

``[masking]`` — masking choices for the whole policy
    ``untraced``      ``"mask-all"`` (default) or ``"deny"``: what to do with a result column
                      the analysis could not trace to its sources while masks are in force.
    ``default_recognizers``  recognizers that scan text columns no rule matches.
    With several bundles the strictest wins: ``deny`` if any bundle says so, and the union of
    the default recognizers.

Merging and versions
    Bundles are independent: each rule keeps its own id and is evaluated on its own, and the
    engine combines the decisions (deny over review over allow). Two bundles may not share a
    file stem, nor define the same custom recognizer. :attr:`PolicySet.version` is a short
    hash of the bundles' names and exact text, independent of their order, so the audit trail
    can name the policy that decided. Rule targets are checked against the configured targets
    with :meth:`PolicySet.check_targets` (loading itself knows no targets).
"""

from __future__ import annotations

import difflib
import fnmatch
import hashlib
import json
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, get_args, get_origin

import attrs
import cattrs
from cattrs.cols import homogenous_tuple_structure_factory
from cattrs.errors import ForbiddenExtraKeysError

from bastion.policies.findings import FINDINGS
from bastion.policies.masking import STRATEGIES, UNTRACED_MODES, MaskingConfigError, check_policy
from bastion.policies.model import Identity, MaskingSettings, MaskRule, RecognizerRule, ReviewRequirement, Verdict
from bastion.policies.recognizers import BUILTIN_RECOGNIZERS, RecognizerError, compile_custom

SECTIONS = ("grant", "guardrail", "review", "risk", "mask", "recognizer", "masking")
CAPABILITIES = ("function-call", "replication", "startup-options")
SQL_STATEMENT_KINDS = (
    "select", "insert", "update", "delete", "merge", "ddl", "dcl", "tcl", "copy", "call", "do",
    "explain", "set", "show", "prepare", "execute", "utility",
)  # fmt: skip
ANY = "*"
CONNECT = "connect"
UNKNOWN = "unknown"
_KNOWN_STATEMENTS = frozenset({*SQL_STATEMENT_KINDS, *CAPABILITIES, ANY, CONNECT, UNKNOWN})
DEFAULT_REVIEW_TIMEOUT = 900.0
SHIPPED_BUNDLES_DIR = Path(__file__).resolve().parent / "bundles"

_RULE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_ACTION_WORD = r"[a-z][a-z0-9_.|-]*"
_ACTION = re.compile(rf"{_ACTION_WORD}(?: {_ACTION_WORD})?")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_MAX_GLOB_CHARS = 256
_VERSION_HEX_DIGITS = 12
_RULES_FOR_CACHE_SIZE = 4096  # distinct (target, identity) pairs; far more than a gateway sees
_PATTERN_MEMO_SIZE = 4096  # names remembered per pattern list
_MEMO_SIZE = 16384  # remembered decisions: one per identity, target and statement shape in use


class BundleError(Exception):
    """One or more problems with policy bundles; ``errors`` are located plain sentences."""

    def __init__(self, errors: Iterable[str]) -> None:
        self.errors = tuple(errors)
        super().__init__("\n".join(self.errors))


# --- globs ------------------------------------------------------------------------------------------


def glob_problem(text: str, *, dotted: bool) -> str | None:
    """Why ``text`` is not a usable glob, or None. ``dotted``: a qualified name (no empty parts)."""
    if not text:
        return "a pattern cannot be empty"
    if len(text) > _MAX_GLOB_CHARS:
        return f"a pattern is at most {_MAX_GLOB_CHARS} characters"
    if any(ch.isspace() or not ch.isprintable() for ch in text):
        return f'"{text}" contains spaces or control characters'
    index = 0
    while index < len(text):
        char = text[index]
        if char == "]":
            return f'"{text}" has a "]" without its "["'
        if char == "[":
            close = text.find("]", index + 2 if text[index + 1 : index + 2] in ("!", "]") else index + 1)
            body = text[index + 1 : close]
            if close == -1 or body in ("", "!"):
                return f'"{text}" has a "[" set that is not closed or is empty'
            if "[" in body:
                return f'"{text}" has a "[" inside a "[...]" set'
            index = close
        index += 1
    if dotted and "" in text.split("."):
        return f'"{text}" has an empty part between dots'
    return None


@attrs.frozen
class Patterns:
    """A list of globs compiled into one regular expression (see the module docstring)."""

    texts: tuple[str, ...]
    case_sensitive: bool = False
    everything: bool = attrs.field(init=False)
    _regex: re.Pattern[str] = attrs.field(init=False, eq=False, repr=False)
    # the same few table and column names come back with every statement: remember the answers
    _seen: dict[str, bool] = attrs.field(init=False, eq=False, repr=False, factory=dict)

    def __attrs_post_init__(self) -> None:
        flags = 0 if self.case_sensitive else re.IGNORECASE
        combined = "|".join(f"(?:{fnmatch.translate(text)})" for text in self.texts) or "(?!)"
        object.__setattr__(self, "everything", ANY in self.texts)
        object.__setattr__(self, "_regex", re.compile(combined, flags))

    def matches(self, name: str) -> bool:
        if self.everything:
            return True
        found = self._seen.get(name)
        if found is None:
            found = self._regex.fullmatch(name) is not None
            if len(self._seen) >= _PATTERN_MEMO_SIZE:
                self._seen.clear()
            self._seen[name] = found
        return found

    def matching(self, names: Iterable[str]) -> list[str]:
        return [name for name in names if self.matches(name)]

    def cover_every_column_of(self, table: str) -> bool:
        """Whether every ``table.<column>`` matches, whatever the column: a glob ending in ``*``
        that matches ``"table."`` does, because its last ``*`` takes any further characters."""
        prefix = f"{table}."
        for text in self.texts:
            if text.endswith("*"):
                matched = fnmatch.fnmatchcase(prefix, text) if self.case_sensitive else fnmatch.fnmatchcase(prefix.lower(), text.lower())
                if matched:
                    return True
        return False


@attrs.frozen
class IdentityMatch:
    """Which callers a rule is about: every list that is given must match (None: not given)."""

    groups: frozenset[str] | None = None
    subjects: Patterns | None = None
    providers: frozenset[str] | None = None

    def matches(self, identity: Identity) -> bool:
        if self.groups is not None and self.groups.isdisjoint(identity.groups):
            return False
        if self.providers is not None and identity.provider not in self.providers:
            return False
        return self.subjects is None or self.subjects.matches(identity.subject)


EVERYONE = IdentityMatch()


# --- rules --------------------------------------------------------------------------------------------


@attrs.frozen
class Approval:
    """Who approves a held request and on what terms."""

    approver_groups: frozenset[str]
    timeout_seconds: float = DEFAULT_REVIEW_TIMEOUT
    min_approvals: int = 1
    max_window_seconds: float = 0.0

    def requirement(self, rule: str, rows_over: int | None = None) -> ReviewRequirement:
        return ReviewRequirement(
            rule=rule,
            approver_groups=self.approver_groups,
            timeout_seconds=self.timeout_seconds,
            min_approvals=self.min_approvals,
            rows_over=rows_over,
            max_window_seconds=self.max_window_seconds,
        )


@attrs.frozen
class Grant:
    """A ``[[grant]]``: lets ``identities`` run ``statements`` on ``targets`` (see the reference)."""

    id: str
    name: str
    where: str  # "file.toml: grant[0]", for messages about the rule
    identities: IdentityMatch
    targets: Patterns
    statements: frozenset[str]
    tables: Patterns | None = None
    columns: Patterns | None = None
    capabilities: frozenset[str] = frozenset()
    description: str = ""

    def allows_action(self, action: str) -> bool:
        if action in self.statements or action in self.capabilities:
            return True
        return action != UNKNOWN and action != CONNECT and ANY in self.statements


@attrs.frozen
class Guardrail:
    """A ``[[guardrail]]``: denies or holds requests carrying one of the ``detect`` findings."""

    id: str
    name: str
    where: str
    detect: frozenset[str]
    verdict: Verdict  # DENY or REVIEW
    enforce: bool = True
    targets: Patterns | None = None
    identities: IdentityMatch = EVERYONE
    exempt: IdentityMatch | None = None
    approval: Approval | None = None  # set exactly when verdict is REVIEW
    description: str = ""


@attrs.frozen
class ReviewCondition:
    """``when`` of a review: every condition that is not None must hold."""

    statements: frozenset[str] | None = None
    tables: Patterns | None = None
    findings: frozenset[str] | None = None
    risk_over: int | None = None
    rows_over: int | None = None

    def statement_matches(self, action: str) -> bool:
        if self.statements is None:
            return action != CONNECT
        return action in self.statements or (ANY in self.statements and action != CONNECT)


@attrs.frozen
class Review:
    """A ``[[review]]``: holds requests for which ``when`` holds, for ``approval``."""

    id: str
    name: str
    where: str
    when: ReviewCondition
    approval: Approval
    targets: Patterns | None = None
    identities: IdentityMatch = EVERYONE
    exempt: IdentityMatch | None = None
    description: str = ""


@attrs.frozen
class RiskThresholds:
    """One bundle's ``[risk]``: ids ``<stem>:risk:review`` and ``<stem>:risk:deny``."""

    bundle: str
    where: str
    review_over: int | None = None
    deny_over: int | None = None
    approval: Approval | None = None

    @property
    def review_id(self) -> str:
        return f"{self.bundle}:risk:review"

    @property
    def deny_id(self) -> str:
        return f"{self.bundle}:risk:deny"


@attrs.frozen
class Mask:
    """A ``[[mask]]`` rule: ``rule.name`` is the rule id, so masking reports name their rule."""

    id: str
    where: str
    rule: MaskRule
    targets: Patterns | None = None


@attrs.frozen
class Bundle:
    """One parsed bundle file."""

    name: str  # the file stem, first part of every rule id
    source: str  # the file name, first part of every message
    digest: str  # sha256 of the text: feeds the policy version
    grants: tuple[Grant, ...] = ()
    guardrails: tuple[Guardrail, ...] = ()
    reviews: tuple[Review, ...] = ()
    risk: RiskThresholds | None = None
    masks: tuple[Mask, ...] = ()
    recognizers: tuple[RecognizerRule, ...] = ()
    recognizer_sources: tuple[str, ...] = ()  # where each recognizer is defined, same order
    masking: MaskingSettings | None = None
    warnings: tuple[str, ...] = ()


@attrs.frozen
class ApplicableRules:
    """The rules that apply to one identity on one target, in bundle order."""

    grants: tuple[Grant, ...]
    guardrails: tuple[Guardrail, ...]
    reviews: tuple[Review, ...]
    masks: tuple[MaskRule, ...]


def _in_scope(targets: Patterns | None, identities: IdentityMatch, exempt: IdentityMatch | None, target: str, identity: Identity) -> bool:
    if targets is not None and not targets.matches(target):
        return False
    if not identities.matches(identity):
        return False
    return exempt is None or not exempt.matches(identity)


@attrs.frozen
class PolicySet:
    """Every loaded bundle, merged: what the engine evaluates. Build with :func:`merge`."""

    bundles: tuple[Bundle, ...]
    version: str
    grants: tuple[Grant, ...]
    guardrails: tuple[Guardrail, ...]
    reviews: tuple[Review, ...]
    risks: tuple[RiskThresholds, ...]
    masks: tuple[Mask, ...]
    recognizers: tuple[RecognizerRule, ...]
    masking: MaskingSettings
    warnings: tuple[str, ...] = ()
    _applicable: dict[tuple[Any, ...], ApplicableRules] = attrs.field(factory=dict, init=False, eq=False, repr=False)
    _memo: dict[Any, Any] = attrs.field(factory=dict, init=False, eq=False, repr=False)

    def memoised(self, key: Any) -> Any:
        """What :meth:`memo` keeps for ``key``, or None."""
        return self._memo.get(key)

    def memo(self, key: Any, make: Callable[[], Any]) -> Any:
        """``make()``, computed once per ``key``: for values that depend on nothing but this
        policy and the key. Bounded: the whole memo is dropped when it fills up."""
        found = self._memo.get(key)
        if found is None:
            found = make()
            if len(self._memo) >= _MEMO_SIZE:
                self._memo.clear()
            self._memo[key] = found
        return found

    def rules_for(self, target: str, identity: Identity) -> ApplicableRules:
        """The rules in scope for ``identity`` on ``target`` (memoised: sessions repeat these)."""
        key = (target, identity.provider, identity.subject, identity.groups)
        found = self._applicable.get(key)
        if found is None:
            found = ApplicableRules(
                grants=tuple(g for g in self.grants if g.targets.matches(target) and g.identities.matches(identity)),
                guardrails=tuple(g for g in self.guardrails if _in_scope(g.targets, g.identities, g.exempt, target, identity)),
                reviews=tuple(r for r in self.reviews if _in_scope(r.targets, r.identities, r.exempt, target, identity)),
                masks=tuple(
                    m.rule
                    for m in self.masks
                    if (m.targets is None or m.targets.matches(target)) and m.rule.exempt_groups.isdisjoint(identity.groups)
                ),
            )
            if len(self._applicable) >= _RULES_FOR_CACHE_SIZE:
                self._applicable.clear()
            self._applicable[key] = found
        return found

    def rule_ids(self) -> tuple[str, ...]:
        ids = [r.id for r in (*self.grants, *self.guardrails, *self.reviews, *self.masks)]
        for risk in self.risks:
            ids += [risk.review_id] if risk.review_over is not None else []
            ids += [risk.deny_id] if risk.deny_over is not None else []
        return tuple(ids)

    def check_targets(self, known_target_names: Iterable[str]) -> list[str]:
        """Located errors for rules whose targets name no configured target."""
        known = sorted(set(known_target_names))
        listing = ", ".join(known) or "none configured"
        errors = []
        scoped: list[tuple[str, Patterns | None]] = [(g.where, g.targets) for g in self.grants]
        scoped += [(g.where, g.targets) for g in self.guardrails]
        scoped += [(r.where, r.targets) for r in self.reviews]
        scoped += [(m.where, m.targets) for m in self.masks]
        for where, targets in scoped:
            for index, text in enumerate(targets.texts if targets is not None else ()):
                if text == ANY or Patterns((text,), case_sensitive=True).matching(known):
                    continue
                what = "no configured target matches" if _is_glob(text) else "there is no configured target called"
                errors.append(f'{where}.targets[{index}]: {what} "{text}" (known: {listing})')
        return errors

    def summary(self) -> str:
        names = ", ".join(b.name for b in self.bundles) or "no bundles: every request is denied"
        counts = [
            _count(len(self.grants), "grant"),
            _count(len(self.guardrails), "guardrail"),
            _count(len(self.reviews), "review"),
            _count(sum((r.review_over is not None) + (r.deny_over is not None) for r in self.risks), "risk threshold"),
            _count(len(self.masks), "mask"),
            _count(len(self.recognizers), "custom recognizer"),
        ]
        return f"{_count(len(self.bundles), 'bundle')} ({names}); " + ", ".join(counts)


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _is_glob(text: str) -> bool:
    return any(ch in text for ch in "*?[")


# --- what a bundle file says: structured by cattrs, then checked and compiled --------------------------


class _Name(str):
    """A non-empty string (group or provider name)."""


class _RuleName(str):
    pass


class _TargetGlob(str):
    pass


class _TableGlob(str):
    pass


class _ColumnGlob(str):
    pass


class _SubjectGlob(str):
    pass


class _Statement(str):
    pass


class _Detector(str):
    pass


class _Capability(str):
    pass


class _Strategy(str):
    pass


class _Untraced(str):
    pass


class _GuardrailAction(str):
    pass


class _Duration(float):
    pass


class _Score(int):
    pass


class _Count(int):
    """An integer of at least 1."""


@attrs.frozen
class _IdentitiesSpec:
    groups: tuple[_Name, ...] | None = None
    subjects: tuple[_SubjectGlob, ...] | None = None
    providers: tuple[_Name, ...] | None = None


@attrs.frozen
class _GroupsSpec:
    groups: tuple[_Name, ...]


@attrs.frozen
class _GrantSpec:
    name: _RuleName
    identities: _IdentitiesSpec
    targets: tuple[_TargetGlob, ...]
    statements: tuple[_Statement, ...]
    tables: tuple[_TableGlob, ...] | None = None
    columns: tuple[_ColumnGlob, ...] | None = None
    capabilities: tuple[_Capability, ...] = ()
    description: str = ""


@attrs.frozen
class _GuardrailSpec:
    name: _RuleName
    detect: tuple[_Detector, ...]
    action: _GuardrailAction = _GuardrailAction("deny")
    enforce: bool = True
    targets: tuple[_TargetGlob, ...] | None = None
    identities: _IdentitiesSpec | None = None
    exempt: _IdentitiesSpec | None = None
    approvers: _GroupsSpec | None = None
    timeout: _Duration | None = None
    min_approvals: _Count | None = None
    max_window: _Duration | None = None
    description: str = ""


@attrs.frozen
class _WhenSpec:
    statements: tuple[_Statement, ...] | None = None
    tables: tuple[_TableGlob, ...] | None = None
    findings: tuple[_Detector, ...] | None = None
    risk_over: _Score | None = None
    rows_over: _Count | None = None


@attrs.frozen
class _ReviewSpec:
    name: _RuleName
    when: _WhenSpec
    approvers: _GroupsSpec
    timeout: _Duration | None = None
    min_approvals: _Count | None = None
    max_window: _Duration | None = None
    targets: tuple[_TargetGlob, ...] | None = None
    identities: _IdentitiesSpec | None = None
    exempt: _IdentitiesSpec | None = None
    description: str = ""


@attrs.frozen
class _RiskSpec:
    review_over: _Score | None = None
    deny_over: _Score | None = None
    approvers: _GroupsSpec | None = None
    timeout: _Duration | None = None
    min_approvals: _Count | None = None
    max_window: _Duration | None = None
    description: str = ""


@attrs.frozen
class _MaskSpec:
    name: _RuleName
    columns: tuple[_ColumnGlob, ...]
    strategy: _Strategy = _Strategy("redact")
    recognizers: tuple[_Name, ...] = ()
    exempt: _GroupsSpec | None = None
    targets: tuple[_TargetGlob, ...] | None = None
    description: str = ""


@attrs.frozen
class _RecognizerSpec:
    name: str
    pattern: str
    validator: str | None = None
    description: str = ""


@attrs.frozen
class _MaskingSpec:
    untraced: _Untraced = _Untraced("mask-all")
    default_recognizers: tuple[_Name, ...] = ()


def _known(value: str, known: Iterable[str]) -> str:
    """`` (known: a, b, c)`` with a suggestion for a near miss."""
    known = list(known)
    close = difflib.get_close_matches(value, known, n=1)
    hint = f'did you mean "{close[0]}"? ' if close else ""
    return f" ({hint}known: {', '.join(known)})"


def parse_duration(value: Any) -> float:
    """Seconds from ``"30s"``, ``"15m"``, ``"2h"``, ``"1d"``, ``"1w"``, ``"500ms"`` or a number."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f'expected a duration such as "30s", "15m" or "2h", got {value!r}')
    if isinstance(value, str):
        match = _DURATION.fullmatch(value.strip())
        if not match:
            raise ValueError(f'expected a duration such as "30s", "15m" or "2h", got "{value}"')
        seconds = float(match[1]) * _DURATION_UNITS[match[2]]
    else:
        seconds = float(value)
    if not seconds > 0 or seconds == float("inf"):
        raise ValueError(f"a duration must be more than zero, got {value!r}")
    return seconds


def _string(value: Any, what: str = "a string") -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected {what}, got {value!r}")
    return value


def _structure_glob(dotted: bool) -> Any:
    def hook(value: Any, type_: type) -> str:
        text = _string(value, "a pattern string")
        problem = glob_problem(text, dotted=dotted)
        if problem:
            raise ValueError(problem)
        return type_(text)

    return hook


def _structure_name(value: Any, type_: type) -> _Name:
    text = _string(value)
    if not text.strip():
        raise ValueError("a name cannot be empty")
    return _Name(text)


def _structure_rule_name(value: Any, _: type) -> _RuleName:
    text = _string(value)
    if not _RULE_NAME.fullmatch(text):
        raise ValueError(f'"{text}" is not a usable rule name: use letters, digits, "-", "_" and "." (at most 64)')
    return _RuleName(text)


def _structure_statement(value: Any, _: type) -> _Statement:
    text = " ".join(_string(value).lower().split())
    if text != ANY and not _ACTION.fullmatch(text):
        raise ValueError(f'"{value}" is not a statement kind or protocol action (e.g. "select", "config get", "*")')
    return _Statement(text)


def _structure_choice(known: Sequence[str], what: str) -> Any:
    def hook(value: Any, type_: type) -> str:
        text = _string(value)
        if text not in known:
            raise ValueError(f'unknown {what} "{text}"' + _known(text, known))
        return type_(text)

    return hook


def _structure_score(value: Any, _: type) -> _Score:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 100:
        raise ValueError(f"expected a risk score from 0 to 100, got {value!r}")
    return _Score(value)


def _structure_count(value: Any, _: type) -> _Count:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"expected a whole number of at least 1, got {value!r}")
    return _Count(value)


def _strict(type_: type, word: str) -> Any:
    def hook(value: Any, _: type) -> Any:
        if type(value) is not type_:
            raise ValueError(f"expected {word}, got {value!r}")
        return value

    return hook


def _is_homogeneous_tuple(type_: Any) -> bool:
    args = get_args(type_)
    return get_origin(type_) is tuple and len(args) == 2 and args[1] is Ellipsis


def _list_only(type_: Any, converter: cattrs.Converter) -> Any:
    structure_items = homogenous_tuple_structure_factory(type_, converter)

    def hook(value: Any, _: Any) -> Any:
        if not isinstance(value, list):
            raise ValueError(f"expected a list such as [\"a\", \"b\"], got {value!r}")
        return structure_items(value, type_)

    return hook


def _make_converter() -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=True)
    conv.register_structure_hook(str, _strict(str, "a string"))
    conv.register_structure_hook(bool, _strict(bool, "true or false"))
    conv.register_structure_hook(int, _strict(int, "a whole number"))
    conv.register_structure_hook_factory(_is_homogeneous_tuple, _list_only)
    conv.register_structure_hook(_Name, _structure_name)
    conv.register_structure_hook(_RuleName, _structure_rule_name)
    conv.register_structure_hook(_TargetGlob, _structure_glob(dotted=False))
    conv.register_structure_hook(_SubjectGlob, _structure_glob(dotted=False))
    conv.register_structure_hook(_TableGlob, _structure_glob(dotted=True))
    conv.register_structure_hook(_ColumnGlob, _structure_glob(dotted=True))
    conv.register_structure_hook(_Statement, _structure_statement)
    conv.register_structure_hook(_Detector, _structure_choice(tuple(FINDINGS), "detector"))
    conv.register_structure_hook(_Capability, _structure_choice(CAPABILITIES, "capability"))
    conv.register_structure_hook(_Strategy, _structure_choice(STRATEGIES, "masking strategy"))
    conv.register_structure_hook(_Untraced, _structure_choice(UNTRACED_MODES, "untraced mode"))
    conv.register_structure_hook(_GuardrailAction, _structure_choice(("deny", "review"), "guardrail action"))
    conv.register_structure_hook(_Duration, lambda value, _: _Duration(parse_duration(value)))
    conv.register_structure_hook(_Score, _structure_score)
    conv.register_structure_hook(_Count, _structure_count)
    return conv


_CONVERTER = _make_converter()


def _describe_errors(exc: BaseException) -> list[tuple[str, str]]:
    """``(path, sentence)`` for every problem in a cattrs exception tree."""

    def sentence(error: BaseException, type_: Any) -> str:
        if isinstance(error, ForbiddenExtraKeysError):
            keys = ", ".join(f'"{k}"' for k in sorted(error.extra_fields))
            known = [field.name for field in attrs.fields(error.cl)] if attrs.has(error.cl) else []
            plural = "s" if len(error.extra_fields) > 1 else ""
            hint = _known(sorted(error.extra_fields)[0], known) if known else ""
            return f"unknown key{plural} {keys}{hint}"
        if isinstance(error, KeyError):
            return "required key is missing"
        if isinstance(error, ValueError):
            return str(error)
        if attrs.has(type_) or any(attrs.has(arg) for arg in get_args(type_)):
            return "expected a table ({ key = value, … })"
        return f"unexpected value ({type(error).__name__})"

    located = []
    for line in cattrs.transform_error(exc, path="$", format_exception=sentence):
        message, _, where = line.rpartition(" @ ")
        located.append((where.removeprefix("$").removeprefix("."), message))
    return located


class _Problems:
    """Collects located errors and warnings for one bundle file."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.errors: list[str] = []
        self.warnings: list[str] = []

    def error(self, where: str, message: str) -> None:
        self.errors.append(f"{self.source}: {where}: {message}" if where else f"{self.source}: {message}")

    def warn(self, where: str, message: str) -> None:
        self.warnings.append(f"{self.source}: {where}: {message}")

    def structure(self, value: Any, type_: type, where: str) -> Any:
        if not isinstance(value, dict):
            self.error(where, f"expected a table, got {value!r}")
            return None
        try:
            return _CONVERTER.structure(value, type_)
        except Exception as exc:  # cattrs raises several kinds; every one is reported, none escapes
            for path, message in _describe_errors(exc):
                joined = ".".join(p for p in (where, path) if p).replace(".[", "[")
                self.error(joined, message)
            return None


def _identities(spec: _IdentitiesSpec | None, where: str, problems: _Problems, *, required: bool) -> IdentityMatch | None:
    if spec is None:
        if required:
            problems.error(where, 'required: say who the rule is for, e.g. { groups = ["analytics-jobs"] }')
            return None
        return EVERYONE
    fields = {"groups": spec.groups, "subjects": spec.subjects, "providers": spec.providers}
    if all(value is None for value in fields.values()):
        problems.error(where, "give at least one of groups, subjects or providers")
        return None
    ok = True
    for key, value in fields.items():
        if value is not None and not value:
            problems.error(f"{where}.{key}", "an empty list matches nobody; leave the key out instead")
            ok = False
    if not ok:
        return None
    return IdentityMatch(
        groups=frozenset(spec.groups) if spec.groups is not None else None,
        subjects=Patterns(tuple(spec.subjects), case_sensitive=True) if spec.subjects is not None else None,
        providers=frozenset(spec.providers) if spec.providers is not None else None,
    )


def _patterns(texts: tuple[str, ...] | None, where: str, problems: _Problems, *, case_sensitive: bool, empty: str) -> Patterns | None:
    if texts is None:
        return None
    if not texts:
        problems.error(where, empty)
        return None
    return Patterns(tuple(str(t) for t in texts), case_sensitive=case_sensitive)


def _approval(
    approvers: _GroupsSpec | None,
    timeout: float | None,
    min_approvals: int | None,
    max_window: float | None,
    where: str,
    problems: _Problems,
) -> Approval | None:
    if approvers is None:
        return None
    if not approvers.groups:
        problems.error(f"{where}.approvers.groups", "list at least one group that may approve")
        return None
    return Approval(
        approver_groups=frozenset(approvers.groups),
        timeout_seconds=float(timeout) if timeout is not None else DEFAULT_REVIEW_TIMEOUT,
        min_approvals=int(min_approvals) if min_approvals is not None else 1,
        max_window_seconds=float(max_window) if max_window is not None else 0.0,
    )


def _array(raw: Mapping[str, Any], key: str, problems: _Problems) -> list[tuple[str, Any]]:
    value = raw.get(key, [])
    if not isinstance(value, list):
        problems.error(key, f"expected [[{key}]] sections (an array of tables), got {type(value).__name__}")
        return []
    return [(f"{key}[{index}]", item) for index, item in enumerate(value)]


def _warn_about_near_misses(statements: Iterable[str], where: str, problems: _Problems) -> None:
    """A misspelt statement kind grants nothing (fail closed) but silently: say so at load time.
    Protocol actions cannot be checked, so only names close to a SQL kind are mentioned."""
    for index, name in enumerate(statements):
        if name in _KNOWN_STATEMENTS:
            continue
        close = difflib.get_close_matches(name, SQL_STATEMENT_KINDS, n=1, cutoff=0.8)
        if close:
            problems.warn(f"{where}[{index}]", f'"{name}" is not a SQL statement kind; did you mean "{close[0]}"? (fine if it is a protocol action)')


def _unique(name: str, where: str, seen: dict[str, str], kind: str, problems: _Problems) -> bool:
    if name in seen:
        problems.error(f"{where}.name", f'another {kind} is already called "{name}" ({seen[name]})')
        return False
    seen[name] = where
    return True


def _compile_grant(spec: _GrantSpec, stem: str, where: str, problems: _Problems) -> Grant | None:
    identities = _identities(spec.identities, f"{where}.identities", problems, required=True)
    targets = _patterns(spec.targets, f"{where}.targets", problems, case_sensitive=True, empty='list at least one target (or "*")')
    tables = _patterns(spec.tables, f"{where}.tables", problems, case_sensitive=False, empty="an empty list would allow no table; leave the key out to allow any table")
    columns = _patterns(spec.columns, f"{where}.columns", problems, case_sensitive=False, empty="an empty list would allow no column; leave the key out to allow any column")
    if not spec.statements:
        problems.error(f"{where}.statements", 'list at least one statement kind, e.g. ["select"] (or "*")')
        return None
    _warn_about_near_misses(spec.statements, f"{where}.statements", problems)
    if UNKNOWN in spec.statements:
        problems.warn(f"{where}.statements", '"unknown" lets through statements Bastion could not classify; prefer listing what is needed')
    if identities is None or targets is None or (spec.tables is not None and tables is None) or (spec.columns is not None and columns is None):
        return None
    return Grant(
        id=f"{stem}:grant:{spec.name}",
        name=str(spec.name),
        where=where,
        identities=identities,
        targets=targets,
        statements=frozenset(spec.statements),
        tables=tables,
        columns=columns,
        capabilities=frozenset(spec.capabilities),
        description=spec.description,
    )


def _compile_guardrail(spec: _GuardrailSpec, stem: str, where: str, problems: _Problems) -> Guardrail | None:
    ok = True
    if not spec.detect:
        problems.error(f"{where}.detect", 'list at least one finding to detect, e.g. ["drop"]')
        ok = False
    review = spec.action == "review"
    if review and spec.approvers is None:
        problems.error(f"{where}.approvers", 'required with action = "review": who may approve, e.g. { groups = ["privacy-officers"] }')
        ok = False
    if not review:
        for key in ("approvers", "timeout", "min_approvals", "max_window"):
            if getattr(spec, key) is not None:
                problems.error(f"{where}.{key}", 'only applies to action = "review"')
                ok = False
    if not spec.enforce:
        problems.warn(where, f'guardrail "{spec.name}" is a dry run (enforce = false): it records, it does not act')
    identities = _identities(spec.identities, f"{where}.identities", problems, required=False)
    exempt = _identities(spec.exempt, f"{where}.exempt", problems, required=False) if spec.exempt is not None else None
    targets = _patterns(spec.targets, f"{where}.targets", problems, case_sensitive=True, empty="leave the key out to cover every target")
    approval = _approval(spec.approvers, spec.timeout, spec.min_approvals, spec.max_window, where, problems)
    if not ok or identities is None or (spec.exempt is not None and exempt is None) or (spec.targets is not None and targets is None):
        return None
    if review and approval is None:
        return None
    return Guardrail(
        id=f"{stem}:guardrail:{spec.name}",
        name=str(spec.name),
        where=where,
        detect=frozenset(spec.detect),
        verdict=Verdict.REVIEW if review else Verdict.DENY,
        enforce=spec.enforce,
        targets=targets,
        identities=identities,
        exempt=exempt,
        approval=approval,
        description=spec.description,
    )


def _compile_review(spec: _ReviewSpec, stem: str, where: str, problems: _Problems) -> Review | None:
    when = spec.when
    ok = True
    if all(getattr(when, field.name) is None for field in attrs.fields(_WhenSpec)):
        problems.error(f"{where}.when", "give at least one condition: statements, tables, findings, risk_over or rows_over")
        ok = False
    for key in ("statements", "findings"):
        if getattr(when, key) is not None and not getattr(when, key):
            problems.error(f"{where}.when.{key}", "an empty list never matches; leave the key out instead")
            ok = False
    _warn_about_near_misses(when.statements or (), f"{where}.when.statements", problems)
    tables = _patterns(when.tables, f"{where}.when.tables", problems, case_sensitive=False, empty="an empty list never matches; leave the key out instead")
    identities = _identities(spec.identities, f"{where}.identities", problems, required=False)
    exempt = _identities(spec.exempt, f"{where}.exempt", problems, required=False) if spec.exempt is not None else None
    targets = _patterns(spec.targets, f"{where}.targets", problems, case_sensitive=True, empty="leave the key out to cover every target")
    approval = _approval(spec.approvers, spec.timeout, spec.min_approvals, spec.max_window, where, problems)
    if not ok or approval is None or identities is None or (when.tables is not None and tables is None):
        return None
    if (spec.exempt is not None and exempt is None) or (spec.targets is not None and targets is None):
        return None
    return Review(
        id=f"{stem}:review:{spec.name}",
        name=str(spec.name),
        where=where,
        when=ReviewCondition(
            statements=frozenset(when.statements) if when.statements is not None else None,
            tables=tables,
            findings=frozenset(when.findings) if when.findings is not None else None,
            risk_over=int(when.risk_over) if when.risk_over is not None else None,
            rows_over=int(when.rows_over) if when.rows_over is not None else None,
        ),
        approval=approval,
        targets=targets,
        identities=identities,
        exempt=exempt,
        description=spec.description,
    )


def _compile_risk(spec: _RiskSpec, stem: str, problems: _Problems) -> RiskThresholds | None:
    where = "risk"
    ok = True
    if spec.review_over is None and spec.deny_over is None:
        problems.error(where, "give review_over, deny_over or both")
        ok = False
    if spec.review_over is not None and spec.approvers is None:
        problems.error(f"{where}.approvers", 'required with review_over: who may approve, e.g. { groups = ["privacy-officers"] }')
        ok = False
    if spec.review_over is None:
        for key in ("approvers", "timeout", "min_approvals", "max_window"):
            if getattr(spec, key) is not None:
                problems.error(f"{where}.{key}", "only applies with review_over")
                ok = False
    if spec.review_over is not None and spec.deny_over is not None and spec.review_over >= spec.deny_over:
        problems.error(f"{where}.review_over", f"must be below deny_over ({spec.deny_over}), or reviews could never happen")
        ok = False
    approval = _approval(spec.approvers, spec.timeout, spec.min_approvals, spec.max_window, where, problems)
    if not ok or (spec.approvers is not None and approval is None):
        return None
    return RiskThresholds(
        bundle=stem,
        where=where,
        review_over=int(spec.review_over) if spec.review_over is not None else None,
        deny_over=int(spec.deny_over) if spec.deny_over is not None else None,
        approval=approval,
    )


def _compile_mask(spec: _MaskSpec, stem: str, where: str, problems: _Problems) -> Mask | None:
    ok = True
    if not spec.columns:
        problems.error(f"{where}.columns", 'list at least one column, e.g. ["*.ssn"]')
        ok = False
    exempt: frozenset[str] = frozenset()
    if spec.exempt is not None:
        if not spec.exempt.groups:
            problems.error(f"{where}.exempt.groups", "an empty list exempts nobody; leave exempt out instead")
            ok = False
        exempt = frozenset(spec.exempt.groups)
    targets = _patterns(spec.targets, f"{where}.targets", problems, case_sensitive=True, empty="leave the key out to cover every target")
    if not ok or (spec.targets is not None and targets is None):
        return None
    rule_id = f"{stem}:mask:{spec.name}"
    rule = MaskRule(
        name=rule_id,
        columns=tuple(str(c) for c in spec.columns),
        strategy=str(spec.strategy),
        recognizers=tuple(str(r) for r in spec.recognizers),
        exempt_groups=exempt,
    )
    return Mask(id=rule_id, where=where, rule=rule, targets=targets)


def _compile_recognizer(spec: _RecognizerSpec, where: str, problems: _Problems) -> RecognizerRule | None:
    rule = RecognizerRule(name=spec.name, pattern=spec.pattern, validator=spec.validator)
    try:
        compile_custom(rule)
    except RecognizerError as exc:
        problems.error(where, str(exc))
        return None
    return rule


def bundle_stem(source: str) -> str:
    """The bundle's name in rule ids: the file name without directories and ``.toml``."""
    name = source.replace("\\", "/").rsplit("/", 1)[-1]
    return name[: -len(".toml")] if name.endswith(".toml") else name


def bundle_from_data(data: Any, source: str, text: str | None = None) -> Bundle:
    """Check and compile a bundle already read as TOML. ``text`` (the file's exact text) feeds the
    version; without it a canonical JSON form of ``data`` does. Raises :class:`BundleError`."""
    problems = _Problems(source)
    stem = bundle_stem(source)
    if not _RULE_NAME.fullmatch(stem):
        problems.error("", f'the file name "{stem}" cannot name rules: use letters, digits, "-", "_" and "." (at most 64)')
    if not isinstance(data, dict):
        raise BundleError([f"{source}: expected TOML tables, got {type(data).__name__}"])
    for key in data:
        if key not in SECTIONS:
            problems.error(str(key), f'unknown section "{key}"' + _known(str(key), SECTIONS))

    grants, guardrails, reviews, masks, recognizers, recognizer_sources = [], [], [], [], [], []
    names: dict[str, dict[str, str]] = {kind: {} for kind in ("grant", "guardrail", "review", "mask", "recognizer")}
    for where, item in _array(data, "grant", problems):
        spec = problems.structure(item, _GrantSpec, where)
        if spec is not None and _unique(spec.name, where, names["grant"], "grant", problems):
            grants.append(_compile_grant(spec, stem, where, problems))
    for where, item in _array(data, "guardrail", problems):
        spec = problems.structure(item, _GuardrailSpec, where)
        if spec is not None and _unique(spec.name, where, names["guardrail"], "guardrail", problems):
            guardrails.append(_compile_guardrail(spec, stem, where, problems))
    for where, item in _array(data, "review", problems):
        spec = problems.structure(item, _ReviewSpec, where)
        if spec is not None and _unique(spec.name, where, names["review"], "review", problems):
            reviews.append(_compile_review(spec, stem, where, problems))
    for where, item in _array(data, "mask", problems):
        spec = problems.structure(item, _MaskSpec, where)
        if spec is not None and _unique(spec.name, where, names["mask"], "mask", problems):
            masks.append(_compile_mask(spec, stem, where, problems))
    for where, item in _array(data, "recognizer", problems):
        spec = problems.structure(item, _RecognizerSpec, where)
        if spec is not None and _unique(spec.name, where, names["recognizer"], "recognizer", problems):
            recognizers.append(_compile_recognizer(spec, where, problems))
            recognizer_sources.append(f"{source}: {where}")

    risk = None
    if "risk" in data:
        spec = problems.structure(data["risk"], _RiskSpec, "risk")
        risk = _compile_risk(spec, stem, problems) if spec is not None else None
    masking = None
    if "masking" in data:
        spec = problems.structure(data["masking"], _MaskingSpec, "masking")
        if spec is not None:
            masking = MaskingSettings(untraced=str(spec.untraced), default_recognizers=tuple(str(r) for r in spec.default_recognizers))

    if problems.errors:
        raise BundleError(problems.errors)
    canonical = text if text is not None else json.dumps(data, sort_keys=True, default=str)
    return Bundle(
        name=stem,
        source=source,
        digest=hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest(),
        grants=tuple(g for g in grants if g is not None),
        guardrails=tuple(g for g in guardrails if g is not None),
        reviews=tuple(r for r in reviews if r is not None),
        risk=risk,
        masks=tuple(m for m in masks if m is not None),
        recognizers=tuple(r for r in recognizers if r is not None),
        recognizer_sources=tuple(recognizer_sources),
        masking=masking,
        warnings=tuple(problems.warnings),
    )


def parse_bundle(text: str, source: str) -> Bundle:
    """Parse one bundle's TOML text; ``source`` is its file name (messages, and the rule ids'
    stem). Raises :class:`BundleError`."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise BundleError([f"{source}: not valid TOML: {exc}"]) from None
    return bundle_from_data(data, source, text)


def load_bundle_file(path: Path | str) -> Bundle:
    """Read and parse one bundle file (the only file access in this module)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise BundleError([f"{path}: cannot read the bundle: {reason}"]) from None
    return parse_bundle(text, path.name)


def load_policy_files(paths: Iterable[Path | str]) -> PolicySet:
    """Load and merge bundle files, reporting the problems of all of them at once."""
    bundles, errors = [], []
    for path in paths:
        try:
            bundles.append(load_bundle_file(path))
        except BundleError as exc:
            errors.extend(exc.errors)
    if errors:
        raise BundleError(errors)
    return merge(bundles)


def shipped_bundle(name: str) -> Path:
    """The path of a bundle that ships with Bastion (``hipaa-baseline``, ``read-only-analytics``)."""
    path = SHIPPED_BUNDLES_DIR / f"{name}.toml"
    if not path.is_file():
        known = sorted(p.stem for p in SHIPPED_BUNDLES_DIR.glob("*.toml"))
        raise BundleError([f'no shipped bundle is called "{name}"' + _known(name, known)])
    return path


def policy_version(bundles: Iterable[Bundle]) -> str:
    digest = hashlib.sha256()
    for bundle in sorted(bundles, key=lambda b: b.name):
        digest.update(f"{bundle.name}\0{bundle.digest}\n".encode())
    return digest.hexdigest()[:_VERSION_HEX_DIGITS]


def merge(bundles: Iterable[Bundle]) -> PolicySet:
    """One policy set from several bundles. Raises :class:`BundleError` for clashes between them
    and for mask rules naming recognizers nobody defines."""
    bundles = sorted(bundles, key=lambda b: b.name)
    errors: list[str] = []
    stems: dict[str, str] = {}
    for bundle in bundles:
        if bundle.name in stems:
            errors.append(f'{bundle.source}: another bundle is also called "{bundle.name}" ({stems[bundle.name]}); rule ids would clash')
        stems.setdefault(bundle.name, bundle.source)

    recognizers: list[RecognizerRule] = []
    defined: dict[str, str] = {}
    for bundle in bundles:
        for rule, where in zip(bundle.recognizers, bundle.recognizer_sources, strict=True):
            if rule.name in defined:
                errors.append(f'{where}.name: the recognizer "{rule.name}" is already defined in {defined[rule.name]}')
                continue
            defined[rule.name] = where
            recognizers.append(rule)
    known = [*BUILTIN_RECOGNIZERS, *defined]
    for bundle in bundles:
        for mask in bundle.masks:
            for index, name in enumerate(mask.rule.recognizers):
                if name not in known:
                    errors.append(f'{bundle.source}: {mask.where}.recognizers[{index}]: unknown recognizer "{name}"' + _known(name, known))
        for index, name in enumerate(bundle.masking.default_recognizers if bundle.masking else ()):
            if name not in known:
                errors.append(f'{bundle.source}: masking.default_recognizers[{index}]: unknown recognizer "{name}"' + _known(name, known))
            elif BUILTIN_RECOGNIZERS.get(name) is not None and BUILTIN_RECOGNIZERS[name].column_only:
                errors.append(f'{bundle.source}: masking.default_recognizers[{index}]: "{name}" only works on columns a mask rule names')

    settings = [b.masking for b in bundles if b.masking is not None]
    masking = MaskingSettings(
        untraced="deny" if any(s.untraced == "deny" for s in settings) else "mask-all",
        default_recognizers=tuple(dict.fromkeys(name for s in settings for name in s.default_recognizers)),
    )
    masks = tuple(m for b in bundles for m in b.masks)
    if not errors:
        try:  # the masking module's own checks, so a policy that loads is one it can compile
            check_policy([m.rule for m in masks], recognizers, masking)
        except MaskingConfigError as exc:
            errors.append(f"masking: {exc}")
    if errors:
        raise BundleError(errors)
    return PolicySet(
        bundles=tuple(bundles),
        version=policy_version(bundles),
        grants=tuple(g for b in bundles for g in _relocated(b, b.grants)),
        guardrails=tuple(g for b in bundles for g in _relocated(b, b.guardrails)),
        reviews=tuple(r for b in bundles for r in _relocated(b, b.reviews)),
        risks=tuple(_relocated_one(b, b.risk) for b in bundles if b.risk is not None),
        masks=tuple(m for b in bundles for m in _relocated(b, b.masks)),
        recognizers=tuple(recognizers),
        masking=masking,
        warnings=tuple(w for b in bundles for w in b.warnings),
    )


def _relocated_one(bundle: Bundle, rule: Any) -> Any:
    """The rule with ``where`` prefixed by its file, so messages about it stand on their own."""
    return attrs.evolve(rule, where=f"{bundle.source}: {rule.where}")


def _relocated(bundle: Bundle, rules: Iterable[Any]) -> list[Any]:
    return [_relocated_one(bundle, rule) for rule in rules]
