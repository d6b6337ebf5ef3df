"""The plugin guide and the hook specifications never drift apart."""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import pytest

from bastion.core import hookspecs

GUIDE = Path(__file__).resolve().parent.parent / "docs" / "plugins.md"
SPECS = {name: fn for name, fn in vars(hookspecs).items() if name.startswith("bastion_") and callable(fn)}


def documented() -> dict[str, list[str]]:
    headings = re.findall(r"^### `(bastion_\w+)\(([^)]*)\)`", GUIDE.read_text(), flags=re.M)
    return {name: [p.strip() for p in params.split(",") if p.strip()] for name, params in headings}


def test_every_hookspec_is_documented_with_its_signature():
    docs = documented()
    assert set(docs) == set(SPECS), "docs/plugins.md and core/hookspecs.py list different hooks"
    for name, fn in SPECS.items():
        assert docs[name] == list(inspect.signature(fn).parameters), f"{name}: documented parameters differ"


@pytest.mark.parametrize("name", sorted(SPECS))
def test_every_hookspec_documents_its_parameters_and_result(name):
    doc = inspect.getdoc(SPECS[name]) or ""
    assert doc, f"{name} has no docstring"
    for parameter in inspect.signature(SPECS[name]).parameters:
        assert f":param {parameter}:" in doc, f"{name} does not document {parameter}"
    if inspect.signature(SPECS[name]).return_annotation not in ("None", None):
        assert ":return:" in doc, f"{name} does not say what it returns"


@pytest.mark.parametrize("name", sorted(SPECS))
def test_every_documented_hook_has_an_example(name):
    text = GUIDE.read_text()
    section = text.split(f"### `{name}(", 1)[1].split("\n### ", 1)[0]
    assert "```python" in section and f"def {name}(" in section


def _resolve(dotted: str) -> object:
    """Import the longest module prefix of ``dotted`` and walk the rest as attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            target = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            target = getattr(target, name)
        return target
    raise ImportError(dotted)


def test_every_reference_in_the_hookspecs_and_the_guide_exists():
    """The hookspecs point readers at the session docstring for the order of calls: a renamed or
    removed target must fail here, not leave a dangling pointer (it once named Session.run)."""
    source = Path(hookspecs.__file__).read_text()
    references = set(re.findall(r":(?:mod|class|meth|func|attr):`~?([\w.]+)`", source))
    references |= set(re.findall(r"`(bastion\.[\w.]+)`", GUIDE.read_text()))
    assert "bastion.core.session.Session" in references
    for dotted in sorted(references):
        try:
            _resolve(dotted)
        except (ImportError, AttributeError):
            pytest.fail(f"{dotted} is referred to but does not exist")


def test_the_session_docstring_lists_the_hook_order():
    from bastion.core.session import Session

    doc = inspect.getdoc(Session) or ""
    positions = [doc.find(hook) for hook in ("authenticate(", "bastion_parse", "bastion_authorize(request)", "bastion_transform", "SessionEnded")]
    assert -1 not in positions and positions == sorted(positions)
