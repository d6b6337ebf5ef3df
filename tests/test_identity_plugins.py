"""The four identity plugins together: registration, one configuration, providers asked in order."""

from __future__ import annotations

from pathlib import Path

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from bastion.core.loading import load
from bastion.core.plugins import BUILTIN_PLUGINS
from bastion.plugins import identity_keycloak, identity_mtls, identity_oidc, identity_static
from bastion.plugins.identity_static import add_key
from bastion.policies.model import AuthOutcome, AuthStatus, Credential
from tests.issuer import component_context, issuer, trio_test  # noqa: F401

PLUGINS = [identity_static, identity_oidc, identity_keycloak, identity_mtls]


def write_config(directory: Path, issuer_base: str) -> Path:  # noqa: F811
    config = directory / "bastion.toml"
    config.write_text(
        f"""
[gateway]
admin_listen = "127.0.0.1:0"

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


async def ask_in_order(providers: list[tuple[str, object]], credential: Credential) -> tuple[str | None, AuthOutcome]:
    """What core does: the first ok or reject wins; unknown asks the next."""
    for name, provider in providers:
        outcome = await provider.authenticate(credential)
        if outcome.status is not AuthStatus.UNKNOWN:
            return name, outcome
    return None, AuthOutcome.reject("no identity provider recognised the credential")


@trio_test
async def test_one_configuration_with_every_kind_routes_each_credential_to_its_provider(tmp_path, issuer):  # noqa: F811
    not_yet_built_in = [m for m in PLUGINS if m.__name__ not in BUILTIN_PLUGINS.values()]
    loaded = load(write_config(tmp_path, issuer.base_url), extra_plugins=not_yet_built_in, entry_points=False)
    specs = loaded.hooks.identity_providers()
    assert {"static-token", "oidc", "keycloak", "mtls"} <= set(specs)
    providers = [
        (section.name, specs[section.kind].factory(section.options, component_context(section.name, tmp_path)))
        for section in loaded.config.identity
    ]
    realm = issuer.realm("clinic")
    realm.add_client("ci-runner", "s", audience=("bastion",), realm_roles=("phi-reader",))
    key = add_key(tmp_path / "tokens.toml", "svc-backup", ["backup"]).key
    leaf = trustme.CA().issue_cert("w.internal", common_name="etl-worker")
    certificate = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes()).public_bytes(serialization.Encoding.DER)

    cases = {
        "keys": Credential(secret=key),
        "github": Credential(secret=issuer.github.workflow_token(audience="bastion")),
        "sso": Credential(secret=realm.token_for("ci-runner")),
        "workloads": Credential(peer_certificate=certificate),
    }
    subjects = {}
    for expected, credential in cases.items():
        name, outcome = await ask_in_order(providers, credential)
        assert name == expected and outcome.status is AuthStatus.OK, (expected, outcome.reason)
        subjects[name] = outcome.identity.subject

    assert subjects == {
        "keys": "svc-backup",
        "github": "repo:acme/clinic-etl:ref:refs/heads/main",
        "sso": "service-account-ci-runner",
        "workloads": "etl-worker",
    }
    stranger, outcome = await ask_in_order(providers, Credential(secret="not-a-credential"))
    assert stranger is None and outcome.status is AuthStatus.REJECT
    for _, provider in providers:
        await provider.aclose()
