"""The ``bastion`` command.

Core commands live here (serve, check, plugins); plugins add their own through the
``bastion_add_commands`` hook (tokens, sessions, audit, policy, approvals…). Every handler returns
the exit status: 0 on success, 1 on a problem the user can fix (reported in a sentence), 2 on
bad usage.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import trio

from bastion.core.config import ConfigError
from bastion.core.errors import GatewayError
from bastion.core.loading import Loaded, load
from bastion.core.plugins import PluginError, build_plugin_manager, describe_plugins

log = logging.getLogger("bastion")


def add_config_argument(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument(
        "-c",
        "--config",
        type=Path,
        required=required and "BASTION_CONFIG" not in os.environ,
        default=os.environ.get("BASTION_CONFIG"),
        help="configuration file (default: $BASTION_CONFIG)",
    )


def load_for_command(args: argparse.Namespace) -> tuple[Any, Any]:
    """(config, hooks) for a sub-command. Raises ConfigError, which ``main`` reports."""
    loaded = load(args.config)
    return loaded.config, loaded.hooks


def load_all_for_command(args: argparse.Namespace) -> Loaded:
    return load(args.config)


# --- serve -------------------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    if args.workers > 1:
        return _serve_workers(args)
    loaded = load(args.config)
    from bastion.core.server import Gateway

    gateway = Gateway(loaded.config, loaded.hooks, policy=loaded.policy, worker_index=args.worker_index)
    try:
        trio.run(_serve, gateway, args.worker_index is not None)
    except GatewayError as exc:
        print(f"bastion: {exc}", file=sys.stderr)
        return 1
    return 0


async def _serve(gateway: Any, reuse_port: bool) -> None:
    await gateway.run(handle_signals=True, reuse_port=reuse_port)


def _serve_workers(args: argparse.Namespace) -> int:
    """N processes sharing the listening ports (SO_REUSEPORT); each keeps its own audit chain."""
    load(args.config)  # fail fast, once, with a readable error
    children = [
        subprocess.Popen(
            [sys.executable, "-m", "bastion.core.cli", "serve", "-c", str(args.config), "--worker-index", str(i)],
        )
        for i in range(args.workers)
    ]

    def forward(signum: int, _frame: Any) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    status = 0
    for child in children:
        status = max(status, child.wait())
    return status


# --- check -------------------------------------------------------------------------------------------


def cmd_check(args: argparse.Namespace) -> int:
    loaded = load(args.config)
    config, hooks, policy = loaded.config, loaded.hooks, loaded.policy
    print(f"{args.config}: ok")
    print(f"targets ({len(config.targets)}):")
    for target in config.targets:
        tls = " tls" if target.tls else ""
        print(f"  {target.name}: {target.protocol} on {target.listen}{tls} -> {target.upstream}")
    print(f"identity providers ({len(config.identity)}):")
    for section in config.identity:
        print(f"  {section.name} ({section.kind})")
    sinks = ", ".join(s.kind for s in config.audit.sinks) or "file (default)"
    print(f"audit: {sinks}; fail_closed = {str(config.audit.fail_closed).lower()}")
    print(f"plugins: {', '.join(name for name, _, _ in describe_plugins(loaded.pm))}")
    if policy is not None:
        print(f"policy {policy.version}: {policy.summary()}")
        for warning in policy.warnings:
            print(f"  warning: {warning}")
    return 0


# --- plugins -----------------------------------------------------------------------------------------


def cmd_plugins(args: argparse.Namespace) -> int:
    pm = load(args.config).pm if args.config else build_plugin_manager()
    for name, origin, hooks in describe_plugins(pm):
        print(f"{name}  ({origin})")
        for hook in hooks:
            print(f"    {hook}")
    return 0


# --- main --------------------------------------------------------------------------------------------


def build_parser(pm=None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bastion", description="Bastion: a Layer-7 access gateway.")
    parser.add_argument("--log-level", default=os.environ.get("BASTION_LOG_LEVEL", "info"))
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the gateway")
    add_config_argument(serve)
    serve.add_argument("--workers", type=int, default=1, help="worker processes sharing the ports")
    serve.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    serve.set_defaults(handler=cmd_serve)

    check = sub.add_parser("check", help="validate a configuration and its policy bundles")
    add_config_argument(check)
    check.set_defaults(handler=cmd_check)

    plugins = sub.add_parser("plugins", help="list loaded plugins and the hooks each implements")
    add_config_argument(plugins, required=False)
    plugins.set_defaults(handler=cmd_plugins)

    if pm is None:
        try:
            pm = build_plugin_manager()
        except PluginError:  # a broken plugin must not make `bastion --help` useless; the
            pm = build_plugin_manager(entry_points=False)  # command itself reports it
    from bastion.core.hooks import Hooks

    Hooks(pm).add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        return int(handler(args) or 0)
    except ConfigError as exc:
        print(f"bastion: configuration errors:\n{_indent(str(exc))}", file=sys.stderr)
        return 1
    except GatewayError as exc:
        print(f"bastion: {exc}", file=sys.stderr)
        return 1
    except PluginError as exc:
        print(f"bastion: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _indent(text: str) -> str:
    return "\n".join(f"  {line}" for line in text.splitlines())


if __name__ == "__main__":  # used by `serve --workers`
    sys.exit(main())
