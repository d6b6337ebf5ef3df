"""The ``keycloak`` identity provider, talking to the test issuer through python-keycloak."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from keycloak import KeycloakOpenID

from bastion.core.config import ConfigError, Registry, load_config
from bastion.core.secrets import SecretRef
from bastion.plugins import identity_keycloak
from bastion.plugins.identity_keycloak import KeycloakOptions, KeycloakProvider
from bastion.policies.model import AuthStatus, Credential
from tests.issuer import DOWN_503, FakeClock, component_context, issuer, trio_test  # noqa: F401

BASTION_CLIENT = "bastion"
BASTION_SECRET_ENV = "BASTION_TEST_KEYCLOAK_SECRET"


@pytest.fixture
def realm(issuer, monkeypatch):  # noqa: F811
    """A realm with Bastion's own (confidential) client and a CI service account that may use it."""
    realm = issuer.realm("clinic")
    realm.add_client(BASTION_CLIENT, "bastion-client-secret")
    realm.add_client(
        "ci-runner",
        "ci-runner-secret",
        audience=(BASTION_CLIENT,),
        realm_roles=("phi-reader", "offline_access"),
        client_roles={BASTION_CLIENT: ("read", "export"), "account": ("view-profile",)},
        groups=("/clinic/billing",),
    )
    realm.add_client("ec-runner", "ec-runner-secret", audience=(BASTION_CLIENT,), alg="ES256")
    realm.add_client("stranger", "stranger-secret")  # no audience mapper for Bastion
    monkeypatch.setenv(BASTION_SECRET_ENV, "bastion-client-secret")
    realm.base_url = issuer.base_url
    return realm


def provider_for(realm, *, clock: FakeClock | None = None, **overrides) -> KeycloakProvider:
    settings = {"server_url": realm.base_url, "realm": realm.name, "client_id": BASTION_CLIENT, **overrides}
    return KeycloakProvider(KeycloakOptions(**settings), component_context("sso"), clock=clock or FakeClock())


async def client_credentials_token(realm, client_id: str, secret: str) -> str:
    """A token from the issuer's token endpoint, fetched the way a CI job would: python-keycloak."""

    def fetch() -> str:
        caller = KeycloakOpenID(
            server_url=realm.base_url + "/", realm_name=realm.name, client_id=client_id, client_secret_key=secret, timeout=10
        )
        return caller.token(grant_type="client_credentials")["access_token"]

    # abandon the thread on cancellation, so the test's deadline holds even for a blocking call
    return await trio.to_thread.run_sync(fetch, abandon_on_cancel=True)


async def authenticate(provider, token: str):
    return await provider.authenticate(Credential(secret=token))


@trio_test
async def test_a_service_account_token_maps_roles_and_groups(realm):
    provider = provider_for(realm)
    token = await client_credentials_token(realm, "ci-runner", "ci-runner-secret")

    outcome = await authenticate(provider, token)

    assert outcome.status is AuthStatus.OK, outcome.reason
    identity = outcome.identity
    assert identity.subject == "service-account-ci-runner"
    assert identity.issuer == f"{realm.base_url}/realms/clinic"
    assert identity.provider == "sso"
    assert identity.groups == {
        "phi-reader",
        "offline_access",
        "bastion:read",
        "bastion:export",
        "account:view-profile",
        "/clinic/billing",
    }
    assert identity.auth_method == "jwt" and identity.token_id
    await provider.aclose()


@trio_test
async def test_es256_realm_keys_work_and_sub_can_be_the_subject(realm):
    provider = provider_for(realm, subject_template="{sub}")
    token = await client_credentials_token(realm, "ec-runner", "ec-runner-secret")

    outcome = await authenticate(provider, token)

    assert outcome.status is AuthStatus.OK, outcome.reason
    assert outcome.identity.subject == realm.clients["ec-runner"].service_account_id
    await provider.aclose()


@trio_test
async def test_a_token_without_bastion_in_its_audience_is_rejected(realm):
    provider = provider_for(realm)
    token = await client_credentials_token(realm, "stranger", "stranger-secret")
    outcome = await authenticate(provider, token)
    assert outcome.status is AuthStatus.REJECT
    assert "no audience" in outcome.reason
    await provider.aclose()


@trio_test
async def test_id_and_refresh_tokens_are_not_access_tokens(realm):
    provider = provider_for(realm)
    for token_type in ("ID", "Refresh"):
        token = realm.token_for("ci-runner", claims={"typ": token_type})
        outcome = await authenticate(provider, token)
        assert outcome.status is AuthStatus.REJECT
        assert f"a '{token_type}' token is not an access token" in outcome.reason
    await provider.aclose()


@trio_test
async def test_tokens_of_another_realm_are_left_to_the_next_provider(realm, issuer):  # noqa: F811
    other = issuer.realm("research")
    other.add_client("ci-runner", "x", audience=(BASTION_CLIENT,))
    provider = provider_for(realm)
    outcome = await authenticate(provider, other.token_for("ci-runner"))
    assert outcome.status is AuthStatus.UNKNOWN
    await provider.aclose()


@trio_test
async def test_introspection_rejects_a_revoked_token(realm):
    provider = provider_for(realm, introspect=True, client_secret=SecretRef("env", BASTION_SECRET_ENV))
    token = await client_credentials_token(realm, "ci-runner", "ci-runner-secret")
    other = await client_credentials_token(realm, "ci-runner", "ci-runner-secret")

    before = await authenticate(provider, token)
    realm.revoke(token)
    after = await authenticate(provider, token)
    unaffected = await authenticate(provider, other)

    assert before.status is AuthStatus.OK, before.reason
    assert after.status is AuthStatus.REJECT
    assert "inactive" in after.reason
    assert unaffected.status is AuthStatus.OK, unaffected.reason
    assert realm.requests("introspect") == 3
    await provider.aclose()


@trio_test
async def test_without_introspection_a_revoked_token_still_verifies_locally(realm):
    """Documents the trade-off: revocation needs introspect = true (or short token lifetimes)."""
    provider = provider_for(realm)
    token = await client_credentials_token(realm, "ci-runner", "ci-runner-secret")
    realm.revoke(token)
    assert (await authenticate(provider, token)).status is AuthStatus.OK
    assert realm.requests("introspect") == 0
    await provider.aclose()


@trio_test
async def test_introspection_with_a_wrong_client_secret_fails_closed(realm, monkeypatch):
    monkeypatch.setenv(BASTION_SECRET_ENV, "not-the-secret")
    provider = provider_for(realm, introspect=True, client_secret=SecretRef("env", BASTION_SECRET_ENV))
    token = await client_credentials_token(realm, "ci-runner", "ci-runner-secret")
    outcome = await authenticate(provider, token)
    assert outcome.status is AuthStatus.REJECT
    assert "introspection failed (HTTP 401)" in outcome.reason
    await provider.aclose()


@trio_test
async def test_introspection_unreachable_fails_closed_even_with_cached_keys(realm, issuer):  # noqa: F811
    provider = provider_for(realm, introspect=True, client_secret=SecretRef("env", BASTION_SECRET_ENV))
    token = await client_credentials_token(realm, "ci-runner", "ci-runner-secret")
    assert (await authenticate(provider, token)).status is AuthStatus.OK

    issuer.go_down(DOWN_503)
    outcome = await authenticate(provider, token)

    assert outcome.status is AuthStatus.REJECT
    assert "introspection failed" in outcome.reason
    await provider.aclose()


@trio_test
async def test_key_rotation_is_picked_up_through_python_keycloak(realm):
    clock = FakeClock()
    provider = provider_for(realm, clock=clock)
    assert (await authenticate(provider, realm.token_for("ci-runner"))).status is AuthStatus.OK
    realm.rotate_keys()
    clock.advance(31)

    outcome = await authenticate(provider, realm.token_for("ci-runner"))

    assert outcome.status is AuthStatus.OK, outcome.reason
    assert realm.requests("certs") == 2
    assert realm.requests("discovery") == 1  # the realm's issuer is confirmed once
    await provider.aclose()


@trio_test
async def test_a_keycloak_token_also_verifies_with_the_generic_oidc_provider(realm):
    """The issuer is standard OIDC: `kind = "oidc"` works too, with groups from one claim."""
    from bastion.plugins.identity_oidc import OIDCOptions, OIDCProvider

    options = OIDCOptions(issuer=f"{realm.base_url}/realms/clinic", audience=BASTION_CLIENT, groups_claim="realm_access.roles")
    provider = OIDCProvider(options, component_context("oidc"), clock=FakeClock())
    token = await client_credentials_token(realm, "ci-runner", "ci-runner-secret")
    outcome = await authenticate(provider, token)
    assert outcome.status is AuthStatus.OK, outcome.reason
    assert outcome.identity.groups == {"phi-reader", "offline_access"}
    await provider.aclose()


# --- configuration ---------------------------------------------------------------------------------


def _load(tmp_path: Path, body: str):
    config = tmp_path / "bastion.toml"
    config.write_text(
        '[[targets]]\nname = "db"\nprotocol = "tcp"\nlisten = "127.0.0.1:0"\nupstream = "127.0.0.1:1"\n\n'
        '[[identity]]\nkind = "keycloak"\n' + body
    )
    from bastion.plugins.tcp import TCPOptions

    return load_config(config, Registry(protocols={"tcp": TCPOptions}, identity={"keycloak": KeycloakOptions}))


def test_a_full_section_loads(tmp_path):
    config = _load(
        tmp_path,
        'server_url = "https://sso.example.org"\nrealm = "clinic"\nclient_id = "bastion"\n'
        'client_secret = { file = "kc-secret" }\nintrospect = true\nci_claims = ["azp"]\n',
    )
    options = config.identity[0].options
    assert options.realm_issuer == "https://sso.example.org/realms/clinic"
    assert options.client_secret == SecretRef("file", "kc-secret")
    assert options.subject_template == "{preferred_username}"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('server_url = "https://sso"\nrealm = "clinic"\nclient_id = "b"\nintrospect = true\n', "client_secret: required with introspect"),
        ('server_url = "https://sso"\nrealm = "a/b"\nclient_id = "b"\n', "identity[0].realm:"),
        ('server_url = "https://sso"\nrealm = "clinic"\nclient_id = "b"\nclient_secret = "inline"\n', "inline secrets are not accepted"),
        ('server_url = "http://sso.example.org"\nrealm = "clinic"\nclient_id = "b"\n', "plain http"),
        ('server_url = "https://sso"\nrealm = "clinic"\nclient_id = "b"\nalgorithms = ["HS512"]\n', '"HS512" is refused'),
    ],
)
def test_configuration_errors(tmp_path, body, message):
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, body)
    assert any(message in error for error in caught.value.errors), caught.value.errors


def test_the_plugin_registers_the_keycloak_kind():
    (spec,) = identity_keycloak.bastion_register_identity_providers()
    assert spec.kind == "keycloak" and spec.options is KeycloakOptions
