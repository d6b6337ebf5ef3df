"""What the README shows works: its configuration and policy examples load, its commands exist."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import typing
from pathlib import Path

import attrs
import pytest

from bastion.core import config
from bastion.core.cli import build_parser
from bastion.core.config import load_config
from bastion.core.hooks import Hooks
from bastion.core.plugins import build_plugin_manager
from bastion.core.secrets import SecretRef
from bastion.policies.bundle import parse_bundle

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", README, flags=re.S)


def blocks(language: str) -> list[str]:
    return [body for lang, body in BLOCKS if lang == language]


def test_every_policy_example_is_a_valid_bundle():
    policy_blocks = [b for b in blocks("toml") if "[[grant]]" in b or "[[mask]]" in b]
    assert policy_blocks
    for body in policy_blocks:
        parse_bundle(body, "readme.toml")


def test_every_configuration_example_loads(tmp_path):
    registry = Hooks(build_plugin_manager()).registry()
    configs = [b for b in blocks("toml") if "[[targets]]" in b or "[[identity]]" in b or "[approvals]" in b or "[gateway]" in b]
    assert len(configs) >= 3
    target = '\n[[targets]]\nname = "clinic-db"\nprotocol = "postgres"\nlisten = "127.0.0.1:6432"\nupstream = "127.0.0.1:5432"\ndatabase = "clinic"\nallow_plaintext_auth = true\n'
    for number, body in enumerate(configs):
        text = re.sub(r"^policies = .*$", "", body, flags=re.M)  # bundle files of the reader's own
        if "[[targets]]" not in text:
            text += target
        path = tmp_path / f"readme-{number}.toml"
        path.write_text(text)
        load_config(path, registry)


def test_every_bastion_command_the_readme_shows_exists():
    parser = build_parser()
    shown = set()
    for line in README.splitlines():
        for match in re.finditer(r"(?:^|[\s$(`])(?:\.venv/bin/)?bastion ((?:[a-z-]+ ?){1,2})", line):
            words = match.group(1).split()
            shown.add(tuple(words))
    assert ("demo",) in shown and ("policy", "explain") in shown
    for words in shown:
        arguments = [w for w in words if not w.startswith("-")]
        try:
            parser.parse_args([*arguments, "--help"])
        except SystemExit as exit:
            assert exit.code == 0, f"bastion {' '.join(arguments)} is not a command"


def test_the_quickstart_configuration_checks(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "bastion.core.cli", "check", "-c", str(ROOT / "examples" / "quickstart.toml")],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "local-pg: postgres on 127.0.0.1:6432" in result.stdout


# --- every configuration key is documented ----------------------------------------------------------
#
# The configuration's attrs classes are the contract; the README's configuration reference documents
# each key in the section it belongs to, and the keys of a plugin kind (a protocol, an identity
# provider, an audit sink) next to that kind's name, so the docs cannot drift from the code.

APPROVALS_GUIDE = (ROOT / "docs" / "approvals.md").read_text()
# what the loader fills in itself, or the structured form of a kind's own keys
INTERNAL_FIELDS = {(config.TargetConfig, "options"), (config.PluginSection, "options"), (config.Config, "source")}
README_SECTIONS = {
    "`[gateway]`": (config.GatewaySection,),
    "`[[targets]]`": (config.TargetConfig, config.Credentials, config.ListenerTLS, config.UpstreamTLS),
    "`[audit]`": (config.AuditSection,),
    "`[[identity]]`": (config.PluginSection,),
}
APPROVALS_CLASSES = (config.ApprovalsSection, config.ApprovalsPostgres, config.ApprovalWebhook)
# values with a syntax of their own ("host:port", { env = "NAME" }), not sections
VALUE_TYPES = {config.Address, SecretRef}
KIND = re.compile(r'(?:kind|protocol) = "([\w-]+)"')


def attrs_classes(cls: type) -> set[type]:
    """``cls`` and every attrs class its fields hold (through ``X | None``, tuples, lists)."""
    found = {cls}
    hints = typing.get_type_hints(cls)
    todo = [hints[field.name] for field in attrs.fields(cls) if (cls, field.name) not in INTERNAL_FIELDS]
    while todo:
        type_ = todo.pop()
        todo.extend(typing.get_args(type_))
        if attrs.has(type_) and type_ not in found and type_ not in VALUE_TYPES:
            found |= attrs_classes(type_)
    return found


def keys_of(cls: type) -> set[str]:
    return {f.name for f in attrs.fields(cls) if (cls, f.name) not in INTERNAL_FIELDS}


def documented_names(text: str) -> set[str]:
    """Names written as code (in backticks) or as TOML keys and table names in examples."""
    names = {word for span in re.findall(r"`([^`\n]+)`", text) for word in re.findall(r"\w+", span)}
    names |= set(re.findall(r"^\s*(\w+)\s*=", text, flags=re.M))
    names |= {header.split(".")[-1] for header in re.findall(r"^\[\[?([\w.]+)\]\]?", text, flags=re.M)}
    return names


def readme_section(heading: str) -> str:
    """The text under ``### {heading}`` up to the next heading of that level or above."""
    match = re.search(rf"^### {re.escape(heading)}\n(.*?)(?=^##? |^### |\Z)", README, flags=re.S | re.M)
    assert match, f"README has no ### {heading} section"
    return match[1]


def text_per_kind(section: str) -> dict[str, str]:
    """The text about each kind in a section: from a bold label naming it (``**`kind = "oidc"`**``)
    to the next label, or the rows of a table whose first cell names it (and the rows after it
    whose first cell is empty)."""
    texts: dict[str, list[str]] = {}
    current: set[str] = set()
    for line in section.splitlines():
        if line.startswith("**"):
            current = set(KIND.findall(line.split("**")[1]))
        elif line.startswith("|"):
            first = line.split("|")[1]
            if KIND.search(first):
                current = set(KIND.findall(first))
        for kind in current:
            texts.setdefault(kind, []).append(line)
    return {kind: "\n".join(lines) for kind, lines in texts.items()}


def test_the_sections_checked_cover_every_configuration_class():
    checked = {cls for classes in README_SECTIONS.values() for cls in classes} | set(APPROVALS_CLASSES) | {config.Config}
    assert attrs_classes(config.Config) <= checked, "a new configuration class: add it to README_SECTIONS"


@pytest.mark.parametrize("heading", sorted(README_SECTIONS))
def test_every_core_configuration_key_is_in_its_readme_section(heading):
    names = documented_names(readme_section(heading))
    for cls in README_SECTIONS[heading]:
        missing = sorted(keys_of(cls) - names)
        assert not missing, f"README {heading} does not document {cls.__name__}: {missing}"


def test_every_approvals_key_is_in_the_approvals_guide():
    assert "docs/approvals.md" in README
    names = documented_names(APPROVALS_GUIDE)
    for cls in APPROVALS_CLASSES:
        missing = sorted(keys_of(cls) - names)
        assert not missing, f"docs/approvals.md does not document {cls.__name__}: {missing}"


def plugin_kinds() -> list:
    """Every kind the installed plugins register (entry points included, e.g. bastion-redis)."""
    registry = Hooks(build_plugin_manager()).registry()
    groups = (("protocol", "`[[targets]]`", registry.protocols), ("identity", "`[[identity]]`", registry.identity), ("sink", "`[audit]`", registry.sinks))
    return [
        pytest.param(heading, kind, options, id=f"{group}-{kind}")
        for group, heading, kinds in groups
        for kind, options in sorted(kinds.items())
    ]


@pytest.mark.parametrize(("heading", "kind", "options"), plugin_kinds())
def test_every_key_of_every_registered_kind_is_in_the_readme_next_to_its_kind(heading, kind, options):
    texts = text_per_kind(readme_section(heading))
    assert kind in texts, f'README {heading} has no table or label for "{kind}"'
    names = documented_names(texts[kind])
    for cls in attrs_classes(options):
        missing = sorted(keys_of(cls) - names)
        assert not missing, f'README {heading}, "{kind}": {cls.__name__} keys not documented: {missing}'


def test_the_key_check_notices_an_undocumented_key():
    @attrs.frozen
    class Options:
        documented: int = 0
        forgotten: int = 0

    texts = text_per_kind('**`kind = "x"`**\n\n| key | meaning |\n| `documented` | yes |\n\n**`kind = "y"`**: `forgotten`\n')
    assert keys_of(Options) - documented_names(texts["x"]) == {"forgotten"}


def test_the_readme_shows_a_measured_benchmark_table_with_its_command():
    section = README.split("## Benchmarks", 1)[1]
    assert "benchmarks/run.py" in section and "Latest run:" in section
    table = [line for line in section.splitlines() if line.startswith("| simple |") or line.startswith("| prepared |")]
    assert len(table) == 4  # 1 and 8 clients for each shown mode
    assert (ROOT / "benchmarks" / "run.py").exists()
