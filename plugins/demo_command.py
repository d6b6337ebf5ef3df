"""``bastion demo``: Bastion in front of a throwaway clinic database, with a scripted CI extract.

The command is a thin shell around :mod:`bastion.core.demo`, which says what the demo does.
It needs PostgreSQL's server programs (initdb, pg_ctl, postgres); without them it says how to
install them and exits with status 1.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bastion.core.hookspecs import hookimpl


@hookimpl
def bastion_add_commands(subparsers: argparse._SubParsersAction) -> None:
    demo = subparsers.add_parser(
        "demo",
        help="try Bastion in a minute: a throwaway PostgreSQL with synthetic PHI and a scripted CI job",
        description=(
            "Start a throwaway PostgreSQL with a synthetic clinic database, put Bastion in front of it "
            "(HIPAA baseline plus a demo grant and review), and run a CI job's nightly extract through "
            "it: a masked query, a blocked DELETE, a bulk export approved by a reviewer, a denied table. "
            "Then replay the session and verify the audit trail."
        ),
    )
    demo.add_argument("--keep", action="store_true", help="leave everything running until Ctrl-C or SIGTERM, and print how to try it by hand")
    demo.add_argument("--state-dir", type=Path, default=None, metavar="DIR", help="keep Bastion's files (configuration, keys, audit trail, approvals) in DIR, a new or empty directory, and leave them there afterwards (default: a temporary directory, removed)")
    demo.add_argument("--pg-bin-dir", type=Path, default=None, metavar="DIR", help="where PostgreSQL's initdb, pg_ctl and postgres are (default: the newest /usr/lib/postgresql/*/bin, else PATH)")
    demo.set_defaults(handler=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from bastion.core.demo import DemoOptions, run

    return run(DemoOptions(keep=args.keep, state_dir=args.state_dir, pg_bin_dir=args.pg_bin_dir))
