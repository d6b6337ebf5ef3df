"""Loading everything a command needs from one configuration file, in the right order.

The configuration decides which plugins are disabled, and plugins decide what the rest of the
configuration may contain, so: read the TOML, build the plugin manager without the disabled
plugins, structure the configuration with the classes plugins registered, then load the policy
bundles it names and check them against the configured targets.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import attrs
import pluggy

from bastion.core.config import Config, ConfigError, disabled_plugins, load_config, read_toml
from bastion.core.hooks import HookError, Hooks
from bastion.core.plugins import PluginError, build_plugin_manager


@attrs.frozen
class Loaded:
    config: Config
    hooks: Hooks
    policy: Any
    pm: pluggy.PluginManager


def load(path: Path | str, *, extra_plugins: Iterable[object] = (), entry_points: bool = True) -> Loaded:
    """Raises :class:`ConfigError` with every problem found (config, plugins and policies)."""
    path = Path(path)
    raw = read_toml(path)
    try:
        pm = build_plugin_manager(disabled_plugins(raw), entry_points=entry_points, extra=extra_plugins)
        hooks = Hooks(pm)
        registry = hooks.registry()
    except (PluginError, HookError) as exc:
        raise ConfigError([f"plugins: {exc}"], str(path)) from None
    config = load_config(path, registry, raw)
    policy = load_policy(config)
    return Loaded(config, hooks, policy, pm)


def load_policy(config: Config) -> Any:
    """The merged policy set of every bundle ``gateway.policies`` names."""
    from bastion.policies import bundle

    try:
        policy = bundle.load_policy_files(config.gateway.policies)
    except bundle.BundleError as exc:
        raise ConfigError(list(exc.errors), "") from None
    errors = policy.check_targets([t.name for t in config.targets])
    if errors:
        raise ConfigError(list(errors), "")
    return policy
