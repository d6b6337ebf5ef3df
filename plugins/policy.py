"""The authorize hook: policy bundles (policies.bundle) judged by the pure engine (policies.engine).

Also the ``bastion policy explain`` and ``bastion policy test`` commands, which go through the same
parse and authorize hooks as the gateway, so what they print is what the gateway would decide.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bastion.core.hookspecs import hookimpl
from bastion.policies import engine
from bastion.policies.model import Decision, Request

# a request that runs nothing needs no grant beyond the connection's own
HARMLESS_ACTIONS = frozenset({"empty"})


@hookimpl
def bastion_authorize(session, request: Request):
    policy = session.policy
    if policy is None or session.identity is None:
        return None
    if request.action in HARMLESS_ACTIONS:
        return Decision.allow("harmless", "the message runs nothing", getattr(policy, "version", ""))
    return engine.evaluate(policy, session.identity, session.target.name, request)


# --- commands ------------------------------------------------------------------------------------


@hookimpl
def bastion_add_commands(subparsers):
    from bastion.core.cli import add_config_argument

    policy = subparsers.add_parser("policy", help="explain and test policy decisions")
    commands = policy.add_subparsers(dest="policy_command", metavar="COMMAND", required=True)

    explain = commands.add_parser("explain", help="show the analysis of a statement and the decision on it")
    add_config_argument(explain)
    explain.add_argument("--identity", required=True, help="subject of the caller")
    explain.add_argument("--groups", default="", help="comma-separated groups of the caller")
    where = explain.add_mutually_exclusive_group(required=True)
    where.add_argument("--target", help="a configured target (its protocol gives the dialect)")
    where.add_argument("--dialect", choices=("postgres", "mysql"), help="judge for no particular target")
    explain.add_argument("--json", action="store_true", help="print one JSON object")
    explain.add_argument("statement", help="the SQL text")
    explain.set_defaults(handler=cmd_explain)

    test = commands.add_parser("test", help="run golden cases (statement -> expected decision)")
    add_config_argument(test)
    test.add_argument("golden", type=Path, help="TOML file of [[case]] entries")
    test.add_argument("--json", action="store_true")
    test.set_defaults(handler=cmd_test)


DIALECTS = {"postgres": "postgres", "mysql": "mysql"}


def _offline_session(loaded, target_name: str | None, protocol: str, identity):
    """A SessionInfo like the gateway's, for deciding without a connection."""
    from bastion.core.config import Address, TargetConfig
    from bastion.core.session import SessionInfo

    if target_name is not None:
        target = loaded.config.target(target_name)
    else:
        target = TargetConfig(name="(no target)", protocol=protocol, listen=Address("127.0.0.1", 0), upstream=Address("127.0.0.1", 0))
    return SessionInfo(id="offline", target=target, client="cli", identity=identity, policy=loaded.policy)


def decide(loaded, session, text: str, dialect: str):
    from bastion.core.session import combine_statements
    from bastion.policies.model import Message

    message = Message(protocol=session.target.protocol, kind="statement", text=text, dialect=dialect)
    requests = loaded.hooks.parse(session, message)
    decisions = [loaded.hooks.authorize(session, request) for request in requests]
    return requests, combine_statements(decisions)


def cmd_explain(args: argparse.Namespace) -> int:
    from bastion.core.cli import load_all_for_command
    from bastion.policies.model import Identity

    loaded = load_all_for_command(args)
    identity = Identity(provider="cli", subject=args.identity, groups=[g for g in args.groups.split(",") if g])
    if args.target is not None:
        try:
            target = loaded.config.target(args.target)
        except KeyError:
            print(f"bastion: no target called {args.target!r}", file=sys.stderr)
            return 1
        dialect = DIALECTS.get(target.protocol)
        if dialect is None:
            print(f"bastion: target {args.target!r} speaks {target.protocol}, not SQL", file=sys.stderr)
            return 1
        session = _offline_session(loaded, args.target, target.protocol, identity)
    else:
        dialect = args.dialect
        session = _offline_session(loaded, None, dialect, identity)
    requests, decision = decide(loaded, session, args.statement, dialect)
    report = {
        "decision": decision.verdict.value,
        "rules": list(decision.rules),
        "reasons": list(decision.reasons),
        "policy_version": decision.policy_version,
        "findings": [
            {"name": f.name, "weight": f.weight, "sentence": f.sentence} for r in requests for f in r.findings
        ],
        "statements": [
            {
                "statement": r.redacted_text,
                "kind": r.action,
                "tables_read": sorted(r.tables_read),
                "tables_written": sorted(r.tables_written),
                "columns_read": sorted(r.columns_read),
                "functions": sorted(r.functions),
                "risk": r.risk,
                "fingerprint": r.fingerprint,
            }
            for r in requests
        ],
        "reviews": [
            {"rule": r.rule, "approver_groups": sorted(r.approver_groups), "rows_over": r.rows_over, "timeout_seconds": r.timeout_seconds}
            for r in decision.reviews
        ],
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for number, statement in enumerate(report["statements"], 1):
        print(f"statement {number}: {statement['statement']}")
        print(f"  kind: {statement['kind']}   risk: {statement['risk']}")
        for key in ("tables_read", "tables_written", "columns_read", "functions"):
            if statement[key]:
                print(f"  {key.replace('_', ' ')}: {', '.join(statement[key])}")
    for finding in report["findings"]:
        print(f"  finding {finding['name']} (+{finding['weight']}): {finding['sentence']}")
    print(f"decision: {report['decision']}")
    for rule, reason in zip(decision.rules, decision.reasons, strict=False):
        print(f"  {rule}: {reason}")
    for review in report["reviews"]:
        print(f"  review by {', '.join(review['approver_groups']) or 'any reviewer'} ({review['rule']})")
    return 0


def cmd_test(args: argparse.Namespace) -> int:
    from bastion.core.cli import load_all_for_command
    from bastion.policies import golden

    loaded = load_all_for_command(args)
    try:
        cases = golden.load_golden_file(args.golden)
    except golden.GoldenError as exc:
        for error in exc.errors:
            print(f"bastion: {error}", file=sys.stderr)
        return 1

    def decide_case(case):
        target_names = {t.name for t in loaded.config.targets}
        session = _offline_session(loaded, case.target if case.target in target_names else None, case.protocol, case.identity)
        if case.target not in target_names:
            import attrs

            session = attrs.evolve(session, target=attrs.evolve(session.target, name=case.target))
        requests, decision = decide(loaded, session, case.statement, case.dialect)
        return golden.Outcome(decision, tuple(f.name for r in requests for f in r.findings))

    results = golden.run_cases(cases, decide_case)
    if args.json:
        print(json.dumps([{"case": r.case.name, "passed": r.passed, "sentence": r.sentence} for r in results], indent=2))
    else:
        for result in results:
            print(result.line())
        print(golden.summary(results))
    return 0 if all(r.passed for r in results) else 1
