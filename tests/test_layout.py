"""The shape of the project: one import name, pure protocols/ and policies/, installable."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"core": "bastion.core", "plugins": "bastion.plugins", "protocols": "bastion.protocols", "policies": "bastion.policies"}
PURE = ("protocols", "policies")
FORBIDDEN_IN_PURE = {"trio", "pluggy", "bastion.core", "bastion.plugins"}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("folder", PURE)
def test_pure_layers_import_neither_trio_nor_pluggy(folder: str) -> None:
    offenders = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for name in _imports(path):
            if any(name == f or name.startswith(f + ".") for f in FORBIDDEN_IN_PURE):
                offenders.append(f"{path.relative_to(ROOT)} imports {name}")
    assert offenders == []


def test_pure_layers_do_not_pull_trio_in_transitively() -> None:
    modules = [
        "bastion.policies." + p.stem for p in (ROOT / "policies").glob("*.py") if p.stem != "__init__"
    ] + ["bastion.protocols." + ".".join(p.relative_to(ROOT / "protocols").with_suffix("").parts).removesuffix(".__init__") for p in (ROOT / "protocols").rglob("*.py") if p.name != "__init__.py" or p.parent != ROOT / "protocols"]
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}:\n    importlib.import_module(m)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('trio', 'pluggy'))\n"
        "print(','.join(bad))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def test_every_package_directory_is_listed_in_pyproject() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    assert config["package-dir"] == {v: k for k, v in FOLDERS.items()}
    found = set()
    for folder, package in FOLDERS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((package, *relative)))
    data_only = {name for name in config["package-data"] if name not in found}  # e.g. the shipped bundles
    assert found | data_only == listed


@pytest.mark.slow
def test_wheel_installs_only_the_bastion_namespace(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("bastion_gateway-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"bastion"}
    assert "bastion/__init__.py" not in names  # a namespace: plugins may add bastion.* packages
    for package in FOLDERS.values():
        assert package.replace(".", "/") + "/__init__.py" in names
    assert "bastion/policies/bundles/hipaa-baseline.toml" in names or not (ROOT / "policies/bundles/hipaa-baseline.toml").exists()
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "bastion = bastion.core.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
