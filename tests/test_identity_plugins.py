"""The identity plugins together, through core: one configuration with every kind (two OIDC
issuers among them), each credential verified by the real ``Session.authenticate`` of a running
gateway, which asks the providers in configuration order."""

from __future__ import annotations

from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from bastion.core import events
from bastion.core.errors import AuthenticationFailed
from bastion.core.hookspecs import hookimpl
from bastion.core.session import Session
from bastion.plugins.identity_static import add_key
from bastion.policies.model import Credential
from tests.gateway_helpers import running_gateway
from tests.issuer import issuer, trio_test  # noqa: F401


def write_config(directory: Path, issuer_base: str) -> Path:  # noqa: F811
    # connecting needs a grant: one per provider name, so a wrong name is refused, not just misreported
    (directory / "grants.toml").write_text(
        """
[[grant]]
name = "every-provider"
identities = { providers = ["keys", "github", "partners", "sso", "workloads"] }
targets = ["db"]
statements = ["select"]
"""
    )
    config = directory / "bastion.toml"
    config.write_text(
        f"""
[gateway]
admin_listen = "127.0.0.1:0"
state_dir = "state"
policies = ["grants.toml"]

[[targets]]
name = "db"
protocol = "tcp"
listen = "127.0.0.1:0"
upstream = "127.0.0.1:1"

[[identity]]
kind = "static-token"
name = "keys"
tokens_file = "tokens.toml"

[[identity]]
kind = "oidc"
name = "github"
issuer = "{issuer_base}/github"
audience = "bastion"
subject_template = "repo:{{repository}}:ref:{{ref}}"
ci_claims = ["repository", "run_id"]

[[identity]]
kind = "oidc"
name = "partners"
issuer = "{issuer_base}/realms/partners"
audience = "bastion"
subject_template = "{{preferred_username}}"
groups_claim = "groups"

[[identity]]
kind = "keycloak"
name = "sso"
server_url = "{issuer_base}"
realm = "clinic"
client_id = "bastion"

[[identity]]
kind = "mtls"
name = "workloads"
subject_from = "cn"
"""
    )
    return config


class Recorder:
    """Keeps every audit event the gateway records (through the real ``bastion_record`` hook)."""

    def __init__(self) -> None:
        self.events: list[events.AuditEvent] = []

    @hookimpl
    def bastion_record(self, event):
        self.events.append(event)

    def of(self, cls: type, session_id: str) -> list:
        return [e for e in self.events if isinstance(e, cls) and e.session_id == session_id]


@trio_test
async def test_every_credential_is_routed_to_its_provider_by_core(tmp_path, issuer):  # noqa: F811
    github = issuer.github
    partners = issuer.realm("partners")  # a second OIDC issuer: another realm, another issuer URL
    clinic = issuer.realm("clinic")
    clinic.add_client("ci-runner", "s", audience=("bastion",), realm_roles=("phi-reader",))
    partners.add_client("billing-export", "s", audience=("bastion",), groups=("billing",))
    strangers = issuer.realm("strangers")  # served by the same issuer, configured nowhere
    strangers.add_client("intruder", "s", audience=("bastion",))
    key = add_key(tmp_path / "tokens.toml", "svc-backup", ["backup"]).key
    leaf = trustme.CA().issue_cert("w.internal", common_name="etl-worker")
    certificate = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes()).public_bytes(serialization.Encoding.DER)

    cases = {
        "keys": (Credential(secret=key), "svc-backup"),
        "github": (Credential(secret=github.workflow_token(audience="bastion")), "repo:acme/clinic-etl:ref:refs/heads/main"),
        "partners": (Credential(secret=partners.token_for("billing-export")), "service-account-billing-export"),
        "sso": (Credential(secret=clinic.token_for("ci-runner")), "service-account-ci-runner"),
        "workloads": (Credential(peer_certificate=certificate), "etl-worker"),
    }
    recorder = Recorder()
    async with running_gateway(write_config(tmp_path, issuer.base_url), extra_plugins=[recorder]) as gateway:
        assert [name for name, _ in gateway.runtime.identity_providers] == ["keys", "github", "partners", "sso", "workloads"]
        target = gateway.targets["db"]
        for expected, (credential, subject) in cases.items():
            session = Session(gateway.runtime, target, "127.0.0.1:40000")
            identity = await session.authenticate(credential, client_user="whoever")
            assert (identity.provider, identity.subject) == (expected, subject)
            (started,) = recorder.of(events.SessionStarted, session.id)
            assert started.identity == identity and started.decision == "allow"
        partner = next(e.identity for e in recorder.events if isinstance(e, events.SessionStarted) and e.identity.provider == "partners")
        assert partner.issuer == partners.issuer_url and partner.groups == frozenset({"billing"}) and partner.auth_method == "jwt"

        # a token signed like the others (the test issuer's keys are shared) but from an issuer no
        # section names: every provider says "not mine", so core refuses it
        session = Session(gateway.runtime, target, "127.0.0.1:40001")
        with pytest.raises(AuthenticationFailed, match="no identity provider recognised the credential"):
            await session.authenticate(Credential(secret=strangers.token_for("intruder")), client_user="intruder")
        (failed,) = recorder.of(events.AuthenticationFailed, session.id)
        assert failed.provider is None and failed.reason == "no identity provider recognised the credential"
        assert not recorder.of(events.SessionStarted, session.id)

        # a JWT naming a configured issuer but signed with a key that issuer never published is
        # that provider's to refuse: the answer stops there, the providers after it are not asked
        forged = strangers.mint({"iss": partners.issuer_url, "aud": "bastion", "sub": "x", "preferred_username": "x"}, private_key=_unpublished_rsa_key())
        session = Session(gateway.runtime, target, "127.0.0.1:40002")
        with pytest.raises(AuthenticationFailed):
            await session.authenticate(Credential(secret=forged))
        (failed,) = recorder.of(events.AuthenticationFailed, session.id)
        assert failed.provider == "partners"


def _unpublished_rsa_key():
    from tests.issuer import pooled_key

    return pooled_key("RSA", 1)  # never published by any authority of this test
