"""Golden cases: a deployment's own examples of what its policy must decide, for ``bastion policy test``.

A golden file is TOML with one ``[[case]]`` per example::

    [[case]]
    name = "nightly job reads visits"          # required, unique in the file
    identity = { subject = "ci-nightly", groups = ["analytics-jobs"] }
    target = "clinic-db"                        # a configured target name
    statement = "SELECT id, visited_at FROM public.visits"
    expect = "allow"                            # allow | review | deny
    # optional:
    dialect = "postgres"                        # SQL dialect of the statement (default postgres)
    protocol = "postgres"                       # protocol the statement arrives by (default postgres)
    rules = ["read-only-analytics:grant:analytics-read"]   # each must be among the decision's rules
    findings = ["no-limit"]                     # each must be among the statement's findings

``identity`` takes ``subject`` (required), ``groups`` and ``provider`` (default ``"golden"``).
An expected rule ``x`` also matches the decision's ``x (not enforced)`` (a dry-run guardrail).

Parsing is pure (:func:`parse_golden`; :func:`load_golden_file` only reads the text). Running
needs a callable that decides one case — the CLI builds it from the gateway's SQL analysis and
:func:`bastion.policies.engine.evaluate` — and returns a :class:`Decision` or an :class:`Outcome`
(a decision and the request's finding names, needed when a case expects findings). Every case
gets a :class:`CaseResult` with a sentence; a case whose callable raises fails, the rest still run.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import attrs
import cattrs
from cattrs.errors import ForbiddenExtraKeysError

from bastion.policies.model import Decision, Identity, Verdict

DEFAULT_PROVIDER = "golden"
DEFAULT_DIALECT = "postgres"
DEFAULT_PROTOCOL = "postgres"
_NOT_ENFORCED = " (not enforced)"


class GoldenError(Exception):
    """Problems with a golden file; ``errors`` are located plain sentences."""

    def __init__(self, errors: Iterable[str]) -> None:
        self.errors = tuple(errors)
        super().__init__("\n".join(self.errors))


@attrs.frozen
class GoldenCase:
    name: str
    where: str  # "golden.toml: case[2]"
    identity: Identity
    target: str
    statement: str
    expect: Verdict
    dialect: str = DEFAULT_DIALECT
    protocol: str = DEFAULT_PROTOCOL
    rules: tuple[str, ...] = ()
    findings: tuple[str, ...] = ()


@attrs.frozen
class Outcome:
    """What deciding a case produced: the decision and the names of the request's findings."""

    decision: Decision
    findings: tuple[str, ...] = attrs.field(default=(), converter=tuple)


@attrs.frozen
class CaseResult:
    case: GoldenCase
    passed: bool
    sentence: str
    decision: Decision | None = None

    def line(self) -> str:
        return f"{'PASS' if self.passed else 'FAIL'} {self.case.name}: {self.sentence}"


# --- what the file says ----------------------------------------------------------------------------


@attrs.frozen
class _IdentitySpec:
    subject: str
    groups: tuple[str, ...] = ()
    provider: str = DEFAULT_PROVIDER


@attrs.frozen
class _CaseSpec:
    name: str
    identity: _IdentitySpec
    target: str
    statement: str
    expect: str
    dialect: str = DEFAULT_DIALECT
    protocol: str = DEFAULT_PROTOCOL
    rules: tuple[str, ...] = ()
    findings: tuple[str, ...] = ()


def _strict(type_: type, word: str) -> Any:
    def hook(value: Any, _: type) -> Any:
        if type(value) is not type_:
            raise ValueError(f"expected {word}, got {value!r}")
        return value

    return hook


def _string_list(value: Any, _: type) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValueError(f'expected a list of strings such as ["a", "b"], got {value!r}')
    return tuple(value)


def _make_converter() -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=True)
    conv.register_structure_hook(str, _strict(str, "a string"))
    conv.register_structure_hook_func(lambda type_: type_ == tuple[str, ...], _string_list)
    return conv


_CONVERTER = _make_converter()


def _describe(exc: BaseException) -> list[tuple[str, str]]:
    def sentence(error: BaseException, type_: Any) -> str:
        if isinstance(error, ForbiddenExtraKeysError):
            known = ", ".join(field.name for field in attrs.fields(error.cl))
            return f"unknown key{'s' if len(error.extra_fields) > 1 else ''} {', '.join(sorted(error.extra_fields))} (known: {known})"
        if isinstance(error, KeyError):
            return "required key is missing"
        if isinstance(error, ValueError):
            return str(error)
        return "expected a table ({ key = value, … })" if attrs.has(type_) else f"unexpected value ({type(error).__name__})"

    located = []
    for line in cattrs.transform_error(exc, path="$", format_exception=sentence):
        message, _, where = line.rpartition(" @ ")
        located.append((where.removeprefix("$").removeprefix("."), message))
    return located


def golden_from_data(data: Any, source: str) -> tuple[GoldenCase, ...]:
    """Check golden cases already read as TOML. Raises :class:`GoldenError`."""
    errors: list[str] = []
    if not isinstance(data, dict):
        raise GoldenError([f"{source}: expected TOML tables, got {type(data).__name__}"])
    for key in data:
        if key != "case":
            errors.append(f'{source}: {key}: unknown section "{key}" (a golden file holds [[case]] sections)')
    raw_cases = data.get("case", [])
    if not isinstance(raw_cases, list):
        raise GoldenError([*errors, f"{source}: case: expected [[case]] sections (an array of tables)"])
    if not raw_cases and not errors:
        errors.append(f"{source}: no [[case]] sections: nothing to test")
    cases: list[GoldenCase] = []
    seen: dict[str, str] = {}
    for index, raw in enumerate(raw_cases):
        where = f"case[{index}]"
        if not isinstance(raw, dict):
            errors.append(f"{source}: {where}: expected a table, got {raw!r}")
            continue
        try:
            spec = _CONVERTER.structure(raw, _CaseSpec)
        except Exception as exc:  # cattrs raises several kinds; all are reported
            for path, message in _describe(exc):
                joined = ".".join(p for p in (where, path) if p).replace(".[", "[")
                errors.append(f"{source}: {joined}: {message}")
            continue
        problems = []
        if not spec.name.strip():
            problems.append(("name", "a case needs a name"))
        elif spec.name in seen:
            problems.append(("name", f'another case is already called "{spec.name}" ({seen[spec.name]})'))
        seen.setdefault(spec.name, where)
        if spec.expect not in {v.value for v in Verdict}:
            problems.append(("expect", f'expected "allow", "review" or "deny", got "{spec.expect}"'))
        for key in ("target", "statement"):
            if not getattr(spec, key).strip():
                problems.append((key, f"the {key} cannot be empty"))
        if not spec.identity.subject.strip():
            problems.append(("identity.subject", "the subject cannot be empty"))
        if problems:
            errors.extend(f"{source}: {where}.{key}: {message}" for key, message in problems)
            continue
        cases.append(
            GoldenCase(
                name=spec.name,
                where=f"{source}: {where}",
                identity=Identity(provider=spec.identity.provider, subject=spec.identity.subject, groups=spec.identity.groups),
                target=spec.target,
                statement=spec.statement,
                expect=Verdict(spec.expect),
                dialect=spec.dialect,
                protocol=spec.protocol,
                rules=spec.rules,
                findings=spec.findings,
            )
        )
    if errors:
        raise GoldenError(errors)
    return tuple(cases)


def parse_golden(text: str, source: str) -> tuple[GoldenCase, ...]:
    """Parse a golden file's text; ``source`` names it in messages. Raises :class:`GoldenError`."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise GoldenError([f"{source}: not valid TOML: {exc}"]) from None
    return golden_from_data(data, source)


def load_golden_file(path: Path | str) -> tuple[GoldenCase, ...]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise GoldenError([f"{path}: cannot read the golden file: {reason}"]) from None
    return parse_golden(text, path.name)


# --- running ---------------------------------------------------------------------------------------


def check_case(case: GoldenCase, outcome: Decision | Outcome) -> CaseResult:
    """Compare what was decided with what the case expects."""
    if isinstance(outcome, Decision):
        decision, findings = outcome, None
    else:
        decision, findings = outcome.decision, set(outcome.findings)
    problems = []
    if decision.verdict is not case.expect:
        why = f" ({decision.summary})" if decision.reasons else ""
        problems.append(f"expected {case.expect.value}, got {decision.verdict.value}{why}")
    decided_rules = {rule.removesuffix(_NOT_ENFORCED) for rule in decision.rules} | set(decision.rules)
    missing_rules = [rule for rule in case.rules if rule not in decided_rules]
    if missing_rules:
        problems.append(f"expected rule{'s' if len(missing_rules) > 1 else ''} {', '.join(missing_rules)} among {', '.join(decision.rules) or 'none'}")
    if case.findings:
        if findings is None:
            problems.append("the case expects findings, but the runner reported none to compare")
        else:
            missing = [name for name in case.findings if name not in findings]
            if missing:
                problems.append(f"expected finding{'s' if len(missing) > 1 else ''} {', '.join(missing)} among {', '.join(sorted(findings)) or 'none'}")
    if problems:
        return CaseResult(case, False, "; ".join(problems), decision)
    return CaseResult(case, True, f"{decision.verdict.value} as expected ({', '.join(decision.rules)})", decision)


def run_cases(cases: Iterable[GoldenCase], decide: Callable[[GoldenCase], Decision | Outcome]) -> list[CaseResult]:
    """Decide and check every case; a case whose ``decide`` raises fails with the exception type."""
    results = []
    for case in cases:
        try:
            outcome = decide(case)
        except Exception as exc:  # one broken case must not hide the others' results
            results.append(CaseResult(case, False, f"deciding the case failed ({type(exc).__name__}: {exc})"))
            continue
        results.append(check_case(case, outcome))
    return results


def summary(results: Iterable[CaseResult]) -> str:
    results = list(results)
    failed = sum(not r.passed for r in results)
    return f"{len(results) - failed} of {len(results)} cases passed" + (f", {failed} failed" if failed else "")
