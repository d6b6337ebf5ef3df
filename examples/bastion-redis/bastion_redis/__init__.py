"""Redis for Bastion: ``protocol = "redis"`` on a target, added by a separately installed plugin.

* :mod:`bastion_redis.resp` — the sans-IO RESP codec (no I/O, no trio);
* :mod:`bastion_redis.commands` — what a command is, for the audit trail and for policies;
* :mod:`bastion_redis.handler` — the proxy for one client connection;
* :mod:`bastion_redis.plugin` — the hook implementations Bastion finds through the entry point.
"""

__version__ = "0.1.0"
