"""Building the plugin manager: hook specs, built-in plugins, then entry-point plugins.

Built-in plugins are registered exactly like third-party ones — by name, as modules — so
``gateway.disable_plugins`` can switch any of them off. Third-party distributions advertise
plugins in the ``bastion`` entry-point group (see examples/bastion-redis).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable

import pluggy

from bastion.core import hookspecs

ENTRY_POINT_GROUP = "bastion"

# name -> module. The name is what `gateway.disable_plugins` and `bastion plugins` use.
BUILTIN_PLUGINS: dict[str, str] = {
    "tcp": "bastion.plugins.tcp",
    "postgres": "bastion.plugins.postgres",
    "sql": "bastion.plugins.sql",
    "policy": "bastion.plugins.policy",
    "masking": "bastion.plugins.masking",
    "static-token": "bastion.plugins.identity_static",
    "oidc": "bastion.plugins.identity_oidc",
    "keycloak": "bastion.plugins.identity_keycloak",
    "mtls": "bastion.plugins.identity_mtls",
    "audit-sinks": "bastion.plugins.audit_sinks",
    "audit-commands": "bastion.plugins.audit_commands",
    "approvals-commands": "bastion.plugins.approvals_commands",
    "demo": "bastion.plugins.demo_command",
}


class PluginError(Exception):
    pass


def build_plugin_manager(disable: Iterable[str] = (), *, entry_points: bool = True, extra: Iterable[object] = ()) -> pluggy.PluginManager:
    """The one place plugins are loaded.

    :param disable: plugin names to leave out (built-in or entry-point names).
    :param entry_points: also load third-party plugins from the ``bastion`` entry-point group.
    :param extra: plugin objects a program registers in code (library use).
    """
    disable = set(disable)
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    for name in disable:
        pm.set_blocked(name)
    for name, module_name in BUILTIN_PLUGINS.items():
        if name in disable:
            continue
        pm.register(importlib.import_module(module_name), name=name)
    for plugin in extra:
        if not pm.is_registered(plugin):  # a built-in named again by a program is already there
            pm.register(plugin)
    pm.bastion_distributions = {}  # id(plugin) -> the distribution an entry point came from
    if entry_points:
        _load_entry_points(pm)
    registered = {name for name, plugin in pm.list_name_plugin() if plugin is not None}
    unknown = disable - registered - set(BUILTIN_PLUGINS) - _entry_point_names()
    if unknown:
        raise PluginError(f"gateway.disable_plugins names unknown plugins: {', '.join(sorted(unknown))}")
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"plugin {_name_of(pm, exc.plugin)!r}: {exc}{_SWITCH_OFF}") from None
    return pm


_SWITCH_OFF = " (fix or uninstall it, or leave it out with gateway.disable_plugins)"


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    """Each plugin of the ``bastion`` group, by its entry-point name; a broken one is named."""
    from importlib.metadata import entry_points

    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        if pm.get_plugin(entry_point.name) is not None or pm.is_blocked(entry_point.name):
            continue
        dist = getattr(entry_point, "dist", None)
        origin = f" (from {dist.name} {dist.version})" if dist is not None else ""
        try:
            plugin = entry_point.load()
            pm.register(plugin, name=entry_point.name)
        except Exception as exc:  # an import error, a missing object, a bad hook signature…
            raise PluginError(f"cannot load the plugin {entry_point.name!r}{origin}: {type(exc).__name__}: {exc}{_SWITCH_OFF}") from None
        if dist is not None:
            pm.bastion_distributions[id(plugin)] = f"{dist.name} {dist.version}"


def _name_of(pm: pluggy.PluginManager, plugin: object) -> str:
    return pm.get_name(plugin) or getattr(plugin, "__name__", repr(plugin))


def _entry_point_names() -> set[str]:
    from importlib.metadata import entry_points

    return {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)}


def describe_plugins(pm: pluggy.PluginManager) -> list[tuple[str, str, list[str]]]:
    """(name, where it comes from, hooks it implements) for each registered plugin."""
    dists = getattr(pm, "bastion_distributions", {})
    rows = []
    for name, plugin in pm.list_name_plugin():
        if plugin is None:  # blocked
            continue
        origin = dists.get(id(plugin)) or ("built-in" if name in BUILTIN_PLUGINS else "registered in code")
        hooks = sorted(caller.name for caller in pm.get_hookcallers(plugin) or ())
        rows.append((name, origin, hooks))
    return rows
