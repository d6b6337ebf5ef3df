"""The masking plugin: plans compiled once per shape and session, counts kept per result."""

from __future__ import annotations

from bastion.core.config import Address, TargetConfig
from bastion.core.session import SessionInfo
from bastion.plugins import masking as masking_plugin
from bastion.policies.bundle import parse_bundle, merge
from bastion.policies.model import Column, Identity, ResultShape

BUNDLE = """
[[grant]]
name = "read"
identities = { groups = ["jobs"] }
targets = ["db"]
statements = ["select"]

[[mask]]
name = "ssn"
columns = ["*.ssn"]
strategy = "redact"
exempt = { groups = ["privacy-officers"] }
"""

SHAPE = ResultShape(columns=(Column("id", type_oid=23, table="public.p"), Column("ssn", type_oid=25, table="public.p")))


def session(groups=("jobs",)) -> SessionInfo:
    target = TargetConfig(name="db", protocol="postgres", listen=Address("127.0.0.1", 0), upstream=Address("127.0.0.1", 0))
    return SessionInfo(
        id="s", target=target, client="c", identity=Identity(provider="t", subject="job", groups=groups),
        policy=merge([parse_bundle(BUNDLE, "policy.toml")]), target_state={"gateway.hash_key": b"k" * 32},
    )


def test_each_result_counts_only_its_own_cells_while_the_plan_is_compiled_once(monkeypatch):
    compiled = []
    real = masking_plugin.masking.compile_plan
    monkeypatch.setattr(masking_plugin.masking, "compile_plan", lambda *a, **k: compiled.append(1) or real(*a, **k))
    info = session()
    first = masking_plugin.bastion_transform(info, None, SHAPE)
    row = [b"1", b"123-45-6789"]
    first.apply(row)
    first.apply([b"2", b"987-65-4320"])
    assert row == [b"1", b"[REDACTED]"]
    assert sum(first.counts().values()) == 2  # read when the result ends, as the relay does
    second = masking_plugin.bastion_transform(info, None, SHAPE)
    second.apply([b"3", b"123-45-6789"])
    assert sum(second.counts().values()) == 1
    assert len(compiled) == 1


def test_exempt_identities_get_no_plan_and_unmasked_shapes_none():
    assert masking_plugin.bastion_transform(session(("jobs", "privacy-officers")), None, SHAPE) is None
    plain = ResultShape(columns=(Column("id", type_oid=23, table="public.p"),))
    assert masking_plugin.bastion_transform(session(), None, plain) is None


def test_free_text_is_masked_only_where_masking_applies():
    text = "Key (ssn)=(123-45-6789) already exists."
    masked = masking_plugin.bastion_text_transform(session(), text)
    assert "123-45-6789" not in masked
    assert masking_plugin.bastion_text_transform(session(("jobs", "privacy-officers")), text) is None
