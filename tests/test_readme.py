"""What the README shows works: its configuration and policy examples load, its commands exist."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from bastion.core.cli import build_parser
from bastion.core.config import load_config
from bastion.core.hooks import Hooks
from bastion.core.plugins import build_plugin_manager
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
