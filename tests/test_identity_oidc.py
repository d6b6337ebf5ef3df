"""The ``oidc`` identity provider: strict JWT checks against a live (loopback) issuer."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import attrs
import jwt
import pytest
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bastion.core.config import ConfigError, Registry, load_config
from bastion.core.secrets import SecretRef
from bastion.plugins import identity_oidc
from bastion.plugins.identity_oidc import (
    MAX_TOKEN_BYTES,
    JWKSCache,
    JWTProvider,
    JWTVerifier,
    OIDCOptions,
    OIDCProvider,
    TokenRejected,
    claim_at,
    parse_jwks,
    peek,
    render_subject,
    template_fields,
    verification_policy,
)
from bastion.policies.model import AuthStatus, Credential
from tests.issuer import DOWN_503, DOWN_DROP, DOWN_REFUSE, FakeClock, component_context, issuer, public_jwk, trio_test  # noqa: F401

AUDIENCE = "bastion"


def options_for(authority, **overrides) -> OIDCOptions:
    settings_ = {"issuer": authority.issuer_url, "audience": AUDIENCE, **overrides}
    return OIDCOptions(**settings_)


def provider_for(authority, clock: FakeClock | None = None, **overrides) -> OIDCProvider:
    return OIDCProvider(options_for(authority, **overrides), component_context("oidc-test"), clock=clock or FakeClock())


async def authenticate(provider: OIDCProvider, token: str):
    return await provider.authenticate(Credential(secret=token))


def claims_for(authority, **claims):
    return {"aud": AUDIENCE, "sub": "svc-etl", **claims}


# --- accepted tokens -----------------------------------------------------------------------------


@trio_test
async def test_a_valid_rs256_token_gives_an_identity_with_every_field(issuer):
    realm = issuer.realm()
    provider = provider_for(realm, groups_claim="realm_access.roles", ci_claims=("azp", "missing"))
    token = realm.mint(claims_for(realm, azp="ci-runner", realm_access={"roles": ["phi-reader", "etl"]}))
    expected = jwt.decode(token, options={"verify_signature": False})

    outcome = await authenticate(provider, token)

    assert outcome.status is AuthStatus.OK, outcome.reason
    identity = outcome.identity
    assert identity.provider == "oidc-test"
    assert identity.issuer == realm.issuer_url
    assert identity.subject == "svc-etl"
    assert identity.groups == {"phi-reader", "etl"}
    assert identity.auth_method == "jwt"
    assert identity.token_id == expected["jti"]
    assert identity.expires_at == datetime.fromtimestamp(expected["exp"], UTC)
    assert identity.ci == {"azp": "ci-runner"}
    await provider.aclose()


@trio_test
async def test_a_valid_es256_token_is_accepted(issuer):
    realm = issuer.realm()
    provider = provider_for(realm)
    token = realm.mint(claims_for(realm), alg="ES256")
    assert jwt.get_unverified_header(token)["alg"] == "ES256"

    outcome = await authenticate(provider, token)

    assert outcome.status is AuthStatus.OK, outcome.reason
    await provider.aclose()


@trio_test
async def test_any_configured_audience_is_accepted_in_a_list_audience(issuer):
    realm = issuer.realm()
    provider = provider_for(realm, audience=["other", AUDIENCE])
    token = realm.mint(claims_for(realm, aud=["account", AUDIENCE]))
    assert (await authenticate(provider, token)).status is AuthStatus.OK
    await provider.aclose()


@trio_test
async def test_jwks_uri_without_discovery(issuer):
    realm = issuer.realm()
    provider = provider_for(realm, discovery=False, jwks_uri=realm.discovery()["jwks_uri"])
    outcome = await authenticate(provider, realm.mint(claims_for(realm)))
    assert outcome.status is AuthStatus.OK, outcome.reason
    assert realm.requests("discovery") == 0
    assert realm.requests("certs") == 1
    await provider.aclose()


# --- not ours: unknown ------------------------------------------------------------------------------


@trio_test
async def test_a_token_of_another_issuer_is_left_to_the_next_provider(issuer):
    ours, theirs = issuer.realm("clinic"), issuer.realm("other")
    provider = provider_for(ours)

    outcome = await authenticate(provider, theirs.mint(claims_for(theirs)))

    assert outcome.status is AuthStatus.UNKNOWN
    assert theirs.issuer_url in outcome.reason
    assert ours.requests("certs") == 0  # not ours: no reason to fetch anything
    await provider.aclose()


@pytest.mark.parametrize("secret", [None, "", "hunter2", "bst_0123456789ab_" + "x" * 43, "a.b", "a.b.c.d.e"])
def test_credentials_that_are_not_jwts_are_unknown(secret):
    provider = OIDCProvider(
        OIDCOptions(issuer="https://issuer.example", audience=AUDIENCE), component_context("oidc-test")
    )
    outcome = trio.run(provider.authenticate, Credential(secret=secret))
    assert outcome.status is AuthStatus.UNKNOWN


# --- ours and wrong: reject ----------------------------------------------------------------------------


@trio_test
async def test_wrong_audience_is_rejected(issuer):
    realm = issuer.realm()
    provider = provider_for(realm)
    outcome = await authenticate(provider, realm.mint(claims_for(realm, aud="someone-else")))
    assert outcome.status is AuthStatus.REJECT
    assert "audience 'someone-else'" in outcome.reason
    await provider.aclose()


@trio_test
async def test_a_token_without_audience_is_rejected(issuer):
    realm = issuer.realm()
    provider = provider_for(realm)
    outcome = await authenticate(provider, realm.mint(claims_for(realm), drop=("aud",)))
    assert outcome.status is AuthStatus.REJECT
    assert "no audience" in outcome.reason
    await provider.aclose()


@trio_test
async def test_expired_tokens_are_rejected_beyond_the_leeway_only(issuer):
    realm = issuer.realm()
    provider = provider_for(realm, leeway=30)
    now = int(time.time())
    long_expired = realm.mint(claims_for(realm, iat=now - 3600, exp=now - 600))
    just_expired = realm.mint(claims_for(realm, iat=now - 3600, exp=now - 5))  # within 30 s leeway

    rejected = await authenticate(provider, long_expired)
    accepted = await authenticate(provider, just_expired)

    assert rejected.status is AuthStatus.REJECT and "expired" in rejected.reason
    assert accepted.status is AuthStatus.OK, accepted.reason
    await provider.aclose()


@trio_test
async def test_a_token_without_expiry_is_rejected(issuer):
    realm = issuer.realm()
    provider = provider_for(realm)
    outcome = await authenticate(provider, realm.mint(claims_for(realm), drop=("exp",)))
    assert outcome.status is AuthStatus.REJECT
    assert "no expiry" in outcome.reason
    await provider.aclose()


@pytest.mark.parametrize("bad_exp", ["99999999999", True, None, [1]])
def test_non_numeric_time_claims_are_rejected(bad_exp):
    verifier = JWTVerifier(
        identity_oidc.VerificationPolicy("https://i", ("a",), frozenset({"RS256"}), 30.0), keys=None  # type: ignore[arg-type]
    )
    with pytest.raises(TokenRejected, match="exp"):
        verifier.check_claims({"iss": "https://i", "aud": "a", "exp": bad_exp})


@trio_test
async def test_a_token_not_yet_valid_is_rejected(issuer):
    realm = issuer.realm()
    provider = provider_for(realm)
    outcome = await authenticate(provider, realm.mint(claims_for(realm, nbf=int(time.time()) + 600)))
    assert outcome.status is AuthStatus.REJECT
    assert "not valid before" in outcome.reason
    await provider.aclose()


@trio_test
async def test_a_token_issued_in_the_future_is_rejected(issuer):
    realm = issuer.realm()
    provider = provider_for(realm)
    now = int(time.time())
    outcome = await authenticate(provider, realm.mint(claims_for(realm, iat=now + 600, exp=now + 1200)))
    assert outcome.status is AuthStatus.REJECT
    assert "issued in the future" in outcome.reason
    await provider.aclose()


def _segments(token: str) -> list[str]:
    return token.split(".")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _json_b64(document) -> str:
    return _b64(json.dumps(document).encode())


@trio_test
async def test_alg_none_is_rejected(issuer):
    realm = issuer.realm()
    provider = provider_for(realm)
    now = int(time.time())
    payload = {"iss": realm.issuer_url, "aud": AUDIENCE, "sub": "admin", "exp": now + 300, "iat": now}
    for alg in ("none", "None", "NONE"):
        token = f"{_json_b64({'alg': alg, 'typ': 'JWT'})}.{_json_b64(payload)}."
        outcome = await authenticate(provider, token)
        assert outcome.status is AuthStatus.REJECT, alg
        assert "algorithm" in outcome.reason
    await provider.aclose()


@trio_test
async def test_hs256_keyed_with_the_public_key_pem_is_rejected(issuer):
    """The classic algorithm confusion: HMAC with the RSA public key's PEM as the secret."""
    realm = issuer.realm()
    provider = provider_for(realm)
    pem = realm.rsa_key.private_key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    now = int(time.time())
    header = _json_b64({"alg": "HS256", "typ": "JWT", "kid": realm.rsa_key.kid})
    payload = _json_b64({"iss": realm.issuer_url, "aud": AUDIENCE, "sub": "admin", "exp": now + 300, "iat": now})
    signature = _b64(hmac.new(pem, f"{header}.{payload}".encode(), hashlib.sha256).digest())

    outcome = await authenticate(provider, f"{header}.{payload}.{signature}")

    assert outcome.status is AuthStatus.REJECT
    assert "'HS256' is not allowed" in outcome.reason
    await provider.aclose()


@trio_test
async def test_a_tampered_payload_is_rejected(issuer):
    realm = issuer.realm()
    provider = provider_for(realm)
    header, payload, signature = _segments(realm.mint(claims_for(realm, sub="svc-readonly")))
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["sub"] = "svc-admin"

    outcome = await authenticate(provider, f"{header}.{_json_b64(claims)}.{signature}")

    assert outcome.status is AuthStatus.REJECT
    assert "signature does not verify" in outcome.reason
    await provider.aclose()


@trio_test
async def test_a_token_signed_by_a_foreign_key_under_a_known_kid_is_rejected(issuer):
    realm = issuer.realm()
    provider = provider_for(realm)
    forged = realm.mint(claims_for(realm), private_key=rsa.generate_private_key(public_exponent=65537, key_size=2048))
    outcome = await authenticate(provider, forged)
    assert outcome.status is AuthStatus.REJECT
    assert "signature does not verify" in outcome.reason
    await provider.aclose()


@trio_test
async def test_an_algorithm_the_named_key_cannot_verify_is_rejected(issuer):
    """An ES256 token naming the RSA key's id must not be tried with the RSA key."""
    realm = issuer.realm()
    provider = provider_for(realm)
    token = realm.mint(claims_for(realm), alg="ES256", kid=realm.rsa_key.kid)
    outcome = await authenticate(provider, token)
    assert outcome.status is AuthStatus.REJECT
    assert "cannot verify ES256" in outcome.reason
    await provider.aclose()


@trio_test
async def test_an_algorithm_outside_the_allowlist_is_rejected(issuer):
    realm = issuer.realm()
    provider = provider_for(realm, algorithms=["ES256"])
    outcome = await authenticate(provider, realm.mint(claims_for(realm), alg="RS256"))
    assert outcome.status is AuthStatus.REJECT
    assert "'RS256' is not allowed" in outcome.reason
    await provider.aclose()


@trio_test
async def test_critical_header_extensions_are_rejected(issuer):
    realm = issuer.realm()
    provider = provider_for(realm)
    token = realm.mint(claims_for(realm), headers={"crit": ["exp-ext"], "exp-ext": 1})
    outcome = await authenticate(provider, token)
    assert outcome.status is AuthStatus.REJECT
    assert "critical" in outcome.reason
    await provider.aclose()


@trio_test
async def test_a_huge_token_is_rejected_before_anything_is_parsed_or_fetched(issuer):
    realm = issuer.realm()
    provider = provider_for(realm)
    padding = "x" * (MAX_TOKEN_BYTES + 1)
    token = realm.mint(claims_for(realm, padding=padding))

    outcome = await authenticate(provider, token)

    assert outcome.status is AuthStatus.REJECT
    assert "larger than" in outcome.reason
    assert realm.requests("discovery") == realm.requests("certs") == 0
    await provider.aclose()


@trio_test
async def test_required_claims_and_values(issuer):
    realm = issuer.realm()
    provider = provider_for(realm, required_claims=("azp",), required_claim_values={"realm_access.tier": "prod"})
    good = realm.mint(claims_for(realm, azp="ci", realm_access={"tier": "prod"}))
    missing = realm.mint(claims_for(realm, realm_access={"tier": "prod"}))
    wrong = realm.mint(claims_for(realm, azp="ci", realm_access={"tier": "dev"}))

    assert (await authenticate(provider, good)).status is AuthStatus.OK
    missing_outcome = await authenticate(provider, missing)
    wrong_outcome = await authenticate(provider, wrong)

    assert missing_outcome.status is AuthStatus.REJECT and "'azp' is missing" in missing_outcome.reason
    assert wrong_outcome.status is AuthStatus.REJECT and "'dev', not 'prod'" in wrong_outcome.reason
    await provider.aclose()


# --- keys: rotation, refetch rate limit, issuer down ------------------------------------------------------


@trio_test
async def test_an_unknown_kid_after_a_key_rotation_triggers_a_refetch(issuer):
    realm = issuer.realm()
    clock = FakeClock()
    provider = provider_for(realm, clock=clock, jwks_min_refresh_interval=30)
    before = realm.mint(claims_for(realm))
    assert (await authenticate(provider, before)).status is AuthStatus.OK
    assert realm.requests("certs") == 1

    realm.rotate_keys()
    clock.advance(31)
    after = realm.mint(claims_for(realm))
    assert jwt.get_unverified_header(after)["kid"] != jwt.get_unverified_header(before)["kid"]

    outcome = await authenticate(provider, after)

    assert outcome.status is AuthStatus.OK, outcome.reason
    assert realm.requests("certs") == 2
    # the retired key is gone from the JWKS, so tokens it signed no longer verify
    retired = await authenticate(provider, before)
    assert retired.status is AuthStatus.REJECT and "unknown key id" in retired.reason
    await provider.aclose()


@trio_test
async def test_a_flood_of_unknown_kids_refetches_at_most_once_per_interval(issuer):
    realm = issuer.realm()
    clock = FakeClock()
    provider = provider_for(realm, clock=clock, jwks_min_refresh_interval=30)
    assert (await authenticate(provider, realm.mint(claims_for(realm)))).status is AuthStatus.OK
    assert realm.requests("certs") == 1
    outcomes = []

    async def forge() -> None:
        outcomes.append(await authenticate(provider, realm.mint(claims_for(realm), kid=uuid.uuid4().hex)))

    async with trio.open_nursery() as nursery:
        for _ in range(50):
            nursery.start_soon(forge)

    assert len(outcomes) == 50
    assert all(o.status is AuthStatus.REJECT and "unknown key id" in o.reason for o in outcomes)
    assert realm.requests("certs") == 1  # the last fetch was less than an interval ago

    clock.advance(31)
    async with trio.open_nursery() as nursery:
        for _ in range(50):
            nursery.start_soon(forge)

    assert realm.requests("certs") == 2  # one refetch for the whole second wave
    await provider.aclose()


@pytest.mark.parametrize("mode", [DOWN_503, DOWN_DROP, DOWN_REFUSE])
@trio_test
async def test_when_the_issuer_is_down_cached_keys_work_and_unknown_kids_are_refused(issuer, mode):
    realm = issuer.realm()
    clock = FakeClock()
    provider = provider_for(realm, clock=clock, jwks_min_refresh_interval=30, cache_ttl=600, cache_max_stale=3600)
    assert (await authenticate(provider, realm.mint(claims_for(realm)))).status is AuthStatus.OK

    issuer.go_down(mode)
    clock.advance(601)  # past the cache TTL: a refresh is attempted and fails
    still_good = await authenticate(provider, realm.mint(claims_for(realm)))
    clock.advance(31)
    unknown = await authenticate(provider, realm.mint(claims_for(realm), kid="never-published"))

    assert still_good.status is AuthStatus.OK, still_good.reason
    assert unknown.status is AuthStatus.REJECT
    assert "unknown key id 'never-published'" in unknown.reason and "cannot be reached" in unknown.reason

    clock.advance(3600)  # beyond cache_max_stale: the old keys are no longer trusted
    stale = await authenticate(provider, realm.mint(claims_for(realm)))
    assert stale.status is AuthStatus.REJECT and "cache_max_stale" in stale.reason

    issuer.come_up()
    clock.advance(31)
    recovered = await authenticate(provider, realm.mint(claims_for(realm)))
    assert recovered.status is AuthStatus.OK, recovered.reason
    await provider.aclose()


@trio_test
async def test_an_issuer_down_from_the_start_rejects_and_does_not_hammer(issuer):
    realm = issuer.realm()
    clock = FakeClock()
    provider = provider_for(realm, clock=clock, jwks_min_refresh_interval=30)
    issuer.go_down(DOWN_503)

    outcomes = [await authenticate(provider, realm.mint(claims_for(realm))) for _ in range(5)]

    assert all(o.status is AuthStatus.REJECT and "unavailable" in o.reason for o in outcomes)
    assert realm.requests("discovery") == 1
    await provider.aclose()


@trio_test
async def test_a_discovery_document_for_another_issuer_is_refused(issuer):
    realm = issuer.realm()
    # an issuer URL whose discovery document (the realm's) names a different issuer
    impostor = attrs.evolve(options_for(realm), issuer=realm.issuer_url + "/")
    provider = OIDCProvider(impostor, component_context("oidc-test"), clock=FakeClock())
    token = realm.mint(claims_for(realm, iss=realm.issuer_url + "/"))

    outcome = await authenticate(provider, token)

    assert outcome.status is AuthStatus.REJECT
    assert "names issuer" in outcome.reason
    assert realm.requests("certs") == 0
    await provider.aclose()


# --- GitHub Actions: subject template and CI context -------------------------------------------------------


@trio_test
async def test_github_actions_subject_template_and_ci_claims(issuer):
    github = issuer.github
    provider = provider_for(
        github,
        subject_template="repo:{repository}:ref:{ref}",
        ci_claims=("repository", "workflow", "run_id", "run_attempt"),
        required_claim_values={"repository_owner": "acme"},
    )
    token = github.workflow_token(audience=AUDIENCE, repository="acme/clinic-etl", ref="refs/heads/main", run_id="777")

    outcome = await authenticate(provider, token)

    assert outcome.status is AuthStatus.OK, outcome.reason
    assert outcome.identity.subject == "repo:acme/clinic-etl:ref:refs/heads/main"
    assert outcome.identity.issuer == github.issuer_url
    assert outcome.identity.ci == {"repository": "acme/clinic-etl", "workflow": "nightly-export", "run_id": "777", "run_attempt": "1"}

    # any GitHub repository can ask for a token with our audience; only acme's are accepted
    outsider = await authenticate(provider, github.workflow_token(audience=AUDIENCE, repository="mallory/fork"))
    assert outsider.status is AuthStatus.REJECT and "repository_owner" in outsider.reason
    await provider.aclose()


@trio_test
async def test_a_claim_missing_from_the_subject_template_rejects(issuer):
    github = issuer.github
    provider = provider_for(github, subject_template="repo:{repository}:env:{environment}")
    outcome = await authenticate(provider, github.workflow_token(audience=AUDIENCE))
    assert outcome.status is AuthStatus.REJECT
    assert "'environment' needed by subject_template is missing" in outcome.reason
    await provider.aclose()


# --- malformed input never escapes authenticate --------------------------------------------------------


class _StaticJWKS:
    """A key source that serves a fixed JWKS without any network, for property tests."""

    def __init__(self, jwks):
        self.jwks = jwks

    async def __call__(self):
        return self.jwks


_PROPERTY_ISSUER = "https://issuer.example"


class _OfflineProvider(JWTProvider):
    """The shared JWT authenticate flow over a fixed JWKS: no network, cheap to build per example."""

    def __init__(self, jwks) -> None:
        options = OIDCOptions(issuer=_PROPERTY_ISSUER, audience=AUDIENCE)
        super().__init__(options, component_context("oidc-test"))
        cache = JWKSCache(_StaticJWKS(jwks), name="oidc-test", min_refresh_interval=30, ttl=600, max_stale=3600, clock=FakeClock())
        self.verifier = JWTVerifier(verification_policy(options, _PROPERTY_ISSUER, [AUDIENCE]), cache)


def _offline_provider(jwks) -> _OfflineProvider:
    return _OfflineProvider(jwks)


_EC_KEY = ec.generate_private_key(ec.SECP256R1())
_OFFLINE_JWKS = {"keys": [public_jwk(_EC_KEY, "ES256")]}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=8,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=300) | st.text("AZaz09_-.", max_size=200))
def test_arbitrary_strings_never_raise_out_of_authenticate(text):
    outcome = trio.run(_offline_provider(_OFFLINE_JWKS).authenticate, Credential(secret=text))
    assert outcome.status in (AuthStatus.UNKNOWN, AuthStatus.REJECT)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    header=st.dictionaries(st.sampled_from(["alg", "kid", "typ", "crit", "b64", "x"]), json_values, max_size=4),
    claims=st.dictionaries(st.sampled_from(["aud", "exp", "nbf", "iat", "sub", "jti", "y"]), json_values, max_size=6),
    signature=st.binary(max_size=80),
)
def test_jwt_shaped_garbage_for_our_issuer_is_always_rejected(header, claims, signature):
    token = f"{_json_b64(header)}.{_json_b64({**claims, 'iss': _PROPERTY_ISSUER})}.{_b64(signature)}"
    outcome = trio.run(_offline_provider(_OFFLINE_JWKS).authenticate, Credential(secret=token))
    assert outcome.status is AuthStatus.REJECT


@settings(max_examples=100, deadline=None)
@given(claims=st.dictionaries(st.sampled_from(["aud", "exp", "nbf", "iat", "sub", "jti"]), json_values, max_size=6))
def test_properly_signed_tokens_with_arbitrary_claims_are_accepted_only_when_valid(claims):
    """Whatever the claim values, the provider answers ok or reject, and ok only for valid claims."""
    token = jwt.encode({**claims, "iss": _PROPERTY_ISSUER}, _EC_KEY, algorithm="ES256", headers={"kid": _OFFLINE_JWKS["keys"][0]["kid"]})
    outcome = trio.run(_offline_provider(_OFFLINE_JWKS).authenticate, Credential(secret=token))
    assert outcome.status in (AuthStatus.OK, AuthStatus.REJECT)
    if outcome.status is AuthStatus.OK:
        assert claims["aud"] == AUDIENCE or AUDIENCE in claims["aud"]
        assert isinstance(claims["exp"], (int, float)) and claims["exp"] > time.time() - 30
        assert isinstance(claims["sub"], str)


@settings(max_examples=300)
@given(st.text(max_size=200))
def test_peek_never_raises(text):
    result = peek(text)
    assert result is None or (isinstance(result[0], dict) and isinstance(result[1], dict))


@settings(max_examples=300)
@given(st.text(max_size=60))
def test_template_parser_accepts_only_plain_claim_placeholders(template):
    try:
        fields = template_fields(template)
    except ValueError:
        return
    for field in fields:
        assert identity_oidc._CLAIM_PATH.fullmatch(field)
    # whatever claims a token has, rendering a valid template reads claims or rejects
    try:
        render_subject(template, {"sub": "x", **{f: "v" for f in fields}})
    except TokenRejected:
        pass


@pytest.mark.parametrize("template", ["{sub[0]}", "{sub!r}", "{sub:>10}", "{}", "{0}x{", "{sub}}"])
def test_templates_that_reach_beyond_claims_are_refused(template):
    with pytest.raises(ValueError):
        template_fields(template)


def test_a_template_reads_claims_never_python_attributes():
    """Placeholders are claim paths resolved by us, not str.format fields: no attribute access."""
    assert render_subject("{sub.__class__}", {"sub": {"__class__": "a-claim"}}) == "a-claim"
    with pytest.raises(TokenRejected, match="missing"):
        render_subject("{sub.__class__}", {"sub": "svc"})


claim_names = st.builds(
    lambda name, suffix: name + suffix, st.text("abc_", min_size=1, max_size=6), st.sampled_from(["", ".io", ".x"])
)


@settings(max_examples=100)
@given(
    path=st.lists(claim_names, min_size=1, max_size=4),
    value=st.text(max_size=5),
)
def test_claim_paths_find_nested_values_and_dotted_names(path, value):
    claims: dict = value  # type: ignore[assignment]
    for name in reversed(path):
        claims = {name: claims}
    assert claim_at(claims, ".".join(path)) == value


def test_dotted_claim_names_resolve_longest_first():
    claims = {"kubernetes.io": {"namespace": "etl", "serviceaccount": {"name": "nightly"}}}
    assert claim_at(claims, "kubernetes.io.namespace") == "etl"
    assert claim_at(claims, "kubernetes.io.serviceaccount.name") == "nightly"
    assert claim_at(claims, "kubernetes.missing") is identity_oidc._MISSING


# --- the JWKS parser ---------------------------------------------------------------------------------


def test_jwks_parsing_keeps_only_usable_signature_keys():
    good_rsa = public_jwk(rsa.generate_private_key(public_exponent=65537, key_size=2048), "RS256")
    good_ec = public_jwk(_EC_KEY, "ES256")
    small_rsa = public_jwk(rsa.generate_private_key(public_exponent=65537, key_size=1024), "RS256")
    encryption = {**good_rsa, "kid": "enc", "use": "enc"}
    private = {**jwt.algorithms.ECAlgorithm.to_jwk(_EC_KEY, as_dict=True), "kid": "private"}
    hmac_key = {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"}
    jwks = {"keys": [good_rsa, good_ec, small_rsa, encryption, private, hmac_key, "junk", {"kty": "RSA", "kid": "broken"}]}

    keys = parse_jwks(jwks)

    assert [(k.kid, k.kty) for k in keys] == [(good_rsa["kid"], "RSA"), (good_ec["kid"], "EC")]


@settings(max_examples=100)
@given(json_values | st.fixed_dictionaries({"keys": st.lists(st.dictionaries(st.sampled_from(["kty", "kid", "crv", "n", "e", "x", "y", "use", "alg"]), json_values, max_size=6), max_size=3)}))
def test_jwks_parser_never_raises_anything_but_key_source_unavailable(document):
    try:
        parse_jwks(document)
    except identity_oidc.KeySourceUnavailable:
        pass


# --- configuration ---------------------------------------------------------------------------------


def _load(tmp_path: Path, body: str):
    config = tmp_path / "bastion.toml"
    config.write_text(
        '[[targets]]\nname = "db"\nprotocol = "tcp"\nlisten = "127.0.0.1:0"\nupstream = "127.0.0.1:1"\n\n'
        '[[identity]]\nkind = "oidc"\nname = "ci"\n' + body
    )
    from bastion.plugins.tcp import TCPOptions

    return load_config(config, Registry(protocols={"tcp": TCPOptions}, identity={"oidc": OIDCOptions}))


def test_a_full_section_loads(tmp_path):
    config = _load(
        tmp_path,
        'issuer = "https://token.actions.githubusercontent.com"\naudience = ["bastion", "bastion-staging"]\n'
        'subject_template = "repo:{repository}:ref:{ref}"\nci_claims = ["repository", "run_id"]\n'
        'leeway = "10s"\njwks_min_refresh_interval = "1m"\nhttp_token = { env = "K8S_TOKEN" }\n'
        "required_claim_values = { repository_owner = \"acme\" }\n",
    )
    options = config.identity[0].options
    assert options.audience == ("bastion", "bastion-staging")
    assert options.leeway == 10 and options.jwks_min_refresh_interval == 60
    assert options.http_token == SecretRef("env", "K8S_TOKEN")
    assert options.required_claim_values == {"repository_owner": "acme"}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('issuer = "https://i.example"\n', "identity[0].audience: required key is missing"),
        ('issuer = "https://i.example"\naudience = []\n', "audience: expected a non-empty string"),
        ('issuer = "https://i.example"\naudience = "a"\nalgorithms = ["none"]\n', '"none" is refused'),
        ('issuer = "https://i.example"\naudience = "a"\nalgorithms = ["RS256", "HS256"]\n', '"HS256" is refused'),
        ('issuer = "https://i.example"\naudience = "a"\nalgorithms = ["RS1"]\n', "unsupported algorithm"),
        ('issuer = "http://idp.example"\naudience = "a"\n', "plain http"),
        ('issuer = "https://i.example"\naudience = "a"\ndiscovery = false\n', "jwks_uri: required"),
        ('issuer = "https://i.example"\naudience = "a"\njwks_uri = "https://i.example/k"\n', "only used with discovery = false"),
        ('issuer = "https://i.example"\naudience = "a"\nsubject_template = "{sub[0]}"\n', "not a claim name"),
        ('issuer = "https://i.example"\naudience = "a"\nleeway = "1h"\n', "identity[0].leeway: at most 300"),
        ('issuer = "https://i.example"\naudience = "a"\ncolour = "blue"\n', 'unknown key "colour"'),
    ],
)
def test_configuration_errors_are_located_sentences(tmp_path, body, message):
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, body)
    assert any(message in error for error in caught.value.errors), caught.value.errors


def test_http_is_allowed_to_loopback_or_when_asked(tmp_path):
    assert _load(tmp_path, 'issuer = "http://127.0.0.1:8080/realms/x"\naudience = "a"\n').identity
    assert _load(tmp_path, 'issuer = "http://keycloak.auth.svc:8080/realms/x"\naudience = "a"\nallow_http = true\n').identity


def test_the_plugin_registers_the_oidc_kind():
    (spec,) = identity_oidc.bastion_register_identity_providers()
    assert spec.kind == "oidc" and spec.options is OIDCOptions
