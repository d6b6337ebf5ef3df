"""A custom gateway: Bastion used as a library, with a rule of your own registered in code.

``bastion serve`` finds plugins through entry points, which suits rules you package and share.
For a rule that belongs to one deployment, a small program can import Bastion, register plugin
objects in code and serve a configuration. Everything else — identity providers, policy bundles,
the audit trail, the admin endpoint, clean shutdown on SIGTERM — works exactly as with
``bastion serve``.

This one adds two plugins:

* ``OfficeHours`` (a ``bastion_authorize`` hook) refuses every request, connections included,
  outside office hours. Inside them it abstains, so the policy bundles still decide: a hook can
  only make Bastion stricter unless it explicitly allows.
* ``Tally`` (a ``bastion_record`` hook) counts the audit events and the rules that denied
  something, and prints a summary when the gateway stops.

Usage::

    python examples/custom_gateway.py bastion.toml --hours 08:00-18:00 --timezone Europe/Berlin
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter
from datetime import datetime, time
from functools import partial
from zoneinfo import ZoneInfo

import trio

from bastion.core.config import ConfigError
from bastion.core.errors import GatewayError
from bastion.core.hookspecs import hookimpl
from bastion.core.loading import load
from bastion.core.server import Gateway
from bastion.policies.model import Decision


class OfficeHours:
    """Deny everything outside ``opens``–``closes`` (local to ``zone``), Monday to Friday."""

    def __init__(self, opens: time, closes: time, zone: ZoneInfo, weekends: bool = False) -> None:
        self.opens, self.closes, self.zone, self.weekends = opens, closes, zone, weekends

    def is_open(self, moment: datetime) -> bool:
        local = moment.astimezone(self.zone)
        if local.weekday() >= 5 and not self.weekends:
            return False
        now = local.time()
        if self.opens <= self.closes:
            return self.opens <= now < self.closes
        return now >= self.opens or now < self.closes  # a night shift, e.g. 22:00-06:00

    @hookimpl
    def bastion_authorize(self, session, request):
        if self.is_open(datetime.now(self.zone)):
            return None  # abstain: the policy bundles decide
        return Decision.deny(
            "office-hours",
            f"outside office hours ({self.opens:%H:%M}-{self.closes:%H:%M} {self.zone.key})",
        )


class Tally:
    """Count what the gateway records; ``summary()`` says it in a few lines."""

    def __init__(self) -> None:
        self.events: Counter[str] = Counter()
        self.denials: Counter[str] = Counter()

    @hookimpl
    def bastion_record(self, event):
        self.events[event.type] += 1
        verdict = getattr(event, "verdict", None) or getattr(event, "decision", None)
        if verdict == "deny":
            self.denials.update(getattr(event, "rules", ()))

    def summary(self) -> str:
        lines = [f"audit events: {sum(self.events.values())}"]
        lines += [f"  {kind}: {count}" for kind, count in sorted(self.events.items())]
        lines += [f"denied by {rule}: {count}" for rule, count in self.denials.most_common()]
        return "\n".join(lines)


async def serve(gateway: Gateway) -> None:
    async with trio.open_nursery() as nursery:
        # handle_signals: SIGTERM/SIGINT stop accepting, let sessions finish, flush the trail
        await nursery.start(partial(gateway.run, handle_signals=True))
        for name, address in gateway.addresses.items():
            print(f"serving {name} on {address}", flush=True)


def hours(text: str) -> tuple[time, time]:
    opens, _, closes = text.partition("-")
    try:
        return time.fromisoformat(opens), time.fromisoformat(closes)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected "HH:MM-HH:MM", got "{text}"') from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="a Bastion configuration file")
    parser.add_argument("--hours", type=hours, default=hours("08:00-18:00"), help="HH:MM-HH:MM")
    parser.add_argument("--timezone", type=ZoneInfo, default=ZoneInfo("UTC"))
    parser.add_argument("--weekends", action="store_true", help="open on Saturdays and Sundays too")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    tally = Tally()
    office_hours = OfficeHours(*args.hours, args.timezone, args.weekends)
    try:
        # extra_plugins: registered next to the built-in and entry-point plugins
        loaded = load(args.config, extra_plugins=[office_hours, tally])
        gateway = Gateway(loaded.config, loaded.hooks, policy=loaded.policy)
        trio.run(serve, gateway)
    except (ConfigError, GatewayError) as exc:
        print(f"custom_gateway: {exc}", file=sys.stderr)
        return 1
    print(tally.summary(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
