"""The ``mtls`` identity provider: client certificates (made with trustme) become identities."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
import trio
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from bastion.core.config import ConfigError, Registry, load_config
from bastion.plugins import identity_mtls
from bastion.plugins.identity_mtls import MTLSOptions, MTLSProvider
from bastion.policies.model import AuthStatus, Credential
from tests.issuer import component_context


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def other_ca() -> trustme.CA:
    return trustme.CA()


def der(leaf: trustme.LeafCert) -> bytes:
    return x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes()).public_bytes(serialization.Encoding.DER)


def ca_file(tmp_path: Path, authority: trustme.CA) -> Path:
    path = tmp_path / "ca.pem"
    authority.cert_pem.write_to_path(str(path))
    return path


def provider(tmp_path: Path | None = None, *, ca: trustme.CA | None = None, **options) -> MTLSProvider:
    if ca is not None:
        options["ca"] = ca_file(tmp_path, ca)
    return MTLSProvider(MTLSOptions(**options), component_context("mtls"))


def authenticate(mtls: MTLSProvider, certificate: bytes | None, chain: tuple[bytes, ...] = ()):
    return trio.run(mtls.authenticate, Credential(peer_certificate=certificate, peer_certificate_chain=chain))


def custom_leaf(
    authority: trustme.CA,
    names: list[x509.GeneralName],
    *,
    common_name: str = "custom",
    usage: tuple[x509.ObjectIdentifier, ...] = (ExtendedKeyUsageOID.CLIENT_AUTH,),
) -> bytes:
    """A client certificate with exactly the SANs given (trustme cannot make URI SANs)."""
    issuer_key = serialization.load_pem_private_key(authority.private_key_pem.bytes(), password=None)
    issuer_cert = x509.load_pem_x509_certificate(authority.cert_pem.bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(issuer_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage(list(usage)), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .sign(issuer_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    return certificate.public_bytes(serialization.Encoding.DER)


# --- subjects --------------------------------------------------------------------------------


def test_subject_from_the_common_name(ca):
    leaf = ca.issue_cert("runner.ci.internal", common_name="ci-nightly")
    certificate = x509.load_der_x509_certificate(der(leaf))

    outcome = authenticate(provider(subject_from="cn"), der(leaf))

    assert outcome.status is AuthStatus.OK, outcome.reason
    identity = outcome.identity
    assert identity.subject == "ci-nightly"
    assert identity.provider == "mtls" and identity.auth_method == "mtls"
    assert identity.issuer == certificate.issuer.rfc4514_string()
    assert identity.expires_at == certificate.not_valid_after_utc
    assert identity.token_id == f"{certificate.serial_number:x}"


def test_subject_from_a_dns_san(ca):
    leaf = ca.issue_cert("runner.ci.internal", common_name="ignored")
    outcome = authenticate(provider(subject_from="san-dns"), der(leaf))
    assert outcome.status is AuthStatus.OK, outcome.reason
    assert outcome.identity.subject == "runner.ci.internal"


def test_subject_from_an_email_san(ca):
    leaf = ca.issue_cert("etl@clinic.example")
    outcome = authenticate(provider(subject_from="san-email"), der(leaf))
    assert outcome.identity.subject == "etl@clinic.example"


def test_subject_from_a_uri_san_such_as_a_spiffe_id(ca, tmp_path):
    spiffe = "spiffe://cluster.local/ns/etl/sa/nightly"
    certificate = custom_leaf(ca, [x509.UniformResourceIdentifier(spiffe), x509.DNSName("nightly.etl.svc")])
    outcome = authenticate(provider(tmp_path, ca=ca, subject_from="san-uri"), certificate)
    assert outcome.status is AuthStatus.OK, outcome.reason
    assert outcome.identity.subject == spiffe


def test_an_ambiguous_subject_is_rejected_not_guessed(ca):
    leaf = ca.issue_cert("a.internal", "b.internal")
    outcome = authenticate(provider(subject_from="san-dns"), der(leaf))
    assert outcome.status is AuthStatus.REJECT
    assert "2 san-dns values" in outcome.reason


def test_a_missing_subject_field_is_rejected(ca):
    leaf = ca.issue_cert("runner.ci.internal")  # no CN, no URI
    assert authenticate(provider(subject_from="cn"), der(leaf)).status is AuthStatus.REJECT
    assert authenticate(provider(subject_from="san-uri"), der(leaf)).status is AuthStatus.REJECT


# --- groups ----------------------------------------------------------------------------------


def test_static_groups_and_groups_from_the_organisational_unit(ca):
    leaf = ca.issue_cert("r.internal", common_name="svc", organization_unit_name="etl-jobs")
    outcome = authenticate(provider(groups=("workloads",), groups_from_ou=True), der(leaf))
    assert outcome.identity.groups == {"workloads", "etl-jobs"}
    without_ou = authenticate(provider(groups=("workloads",)), der(leaf))
    assert without_ou.identity.groups == {"workloads"}


# --- trust -----------------------------------------------------------------------------------


def test_no_certificate_is_unknown():
    assert authenticate(provider(), None).status is AuthStatus.UNKNOWN


def test_a_certificate_from_the_configured_ca_is_accepted(ca, tmp_path):
    leaf = ca.issue_cert("r.internal", common_name="svc")
    assert authenticate(provider(tmp_path, ca=ca), der(leaf)).status is AuthStatus.OK


def test_a_certificate_from_another_ca_is_rejected(ca, other_ca, tmp_path):
    leaf = other_ca.issue_cert("r.internal", common_name="svc")
    outcome = authenticate(provider(tmp_path, ca=ca), der(leaf))
    assert outcome.status is AuthStatus.REJECT
    assert "not issued by the configured ca" in outcome.reason


def test_a_server_only_certificate_is_rejected_by_the_ca_check(ca, tmp_path):
    certificate = custom_leaf(ca, [x509.DNSName("db.internal")], usage=(ExtendedKeyUsageOID.SERVER_AUTH,))
    outcome = authenticate(provider(tmp_path, ca=ca), certificate)
    assert outcome.status is AuthStatus.REJECT
    assert "client authentication" in outcome.reason


def test_an_intermediate_needs_its_chain(ca, tmp_path):
    intermediate = ca.create_child_ca()
    leaf = intermediate.issue_cert("r.internal", common_name="svc")
    chain = tuple(
        x509.load_pem_x509_certificate(blob.bytes()).public_bytes(serialization.Encoding.DER) for blob in leaf.cert_chain_pems
    )
    mtls = provider(tmp_path, ca=ca)

    with_chain = authenticate(mtls, chain[0], chain)
    without_chain = authenticate(mtls, chain[0])

    assert with_chain.status is AuthStatus.OK, with_chain.reason
    assert without_chain.status is AuthStatus.REJECT


def test_an_expired_certificate_is_rejected_even_without_a_ca(ca):
    now = dt.datetime.now(dt.UTC)
    leaf = ca.issue_cert("r.internal", common_name="svc", not_before=now - dt.timedelta(days=10), not_after=now - dt.timedelta(days=1))
    outcome = authenticate(provider(), der(leaf))
    assert outcome.status is AuthStatus.REJECT
    assert "expired" in outcome.reason


def test_a_certificate_not_yet_valid_is_rejected(ca):
    now = dt.datetime.now(dt.UTC)
    leaf = ca.issue_cert("r.internal", common_name="svc", not_before=now + dt.timedelta(days=1), not_after=now + dt.timedelta(days=10))
    outcome = authenticate(provider(), der(leaf))
    assert outcome.status is AuthStatus.REJECT
    assert "not valid before" in outcome.reason


@settings(max_examples=200)
@given(st.binary(max_size=600))
def test_arbitrary_bytes_as_a_certificate_never_raise(data):
    outcome = authenticate(provider(), data)
    assert outcome.status in (AuthStatus.REJECT, AuthStatus.UNKNOWN)
    if data:
        assert outcome.status is AuthStatus.REJECT


# --- configuration ---------------------------------------------------------------------------------


def _load(tmp_path: Path, body: str):
    config = tmp_path / "bastion.toml"
    config.write_text(
        '[[targets]]\nname = "db"\nprotocol = "tcp"\nlisten = "127.0.0.1:0"\nupstream = "127.0.0.1:1"\n\n'
        '[[identity]]\nkind = "mtls"\n' + body
    )
    from bastion.plugins.tcp import TCPOptions

    return load_config(config, Registry(protocols={"tcp": TCPOptions}, identity={"mtls": MTLSOptions}))


def test_a_section_loads_with_paths_relative_to_the_config(tmp_path):
    options = _load(tmp_path, 'subject_from = "san-uri"\nca = "pki/ca.pem"\ngroups = ["workloads"]\n').identity[0].options
    assert options.ca == tmp_path.resolve() / "pki" / "ca.pem"
    assert options.groups == ("workloads",)


def test_an_unknown_subject_source_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, 'subject_from = "o"\n')
    assert any(e.startswith("identity[0].subject_from:") for e in caught.value.errors), caught.value.errors


def test_an_unreadable_ca_file_fails_at_start_up(tmp_path):
    with pytest.raises(ValueError, match="cannot read"):
        MTLSProvider(MTLSOptions(ca=tmp_path / "absent.pem"), component_context("mtls"))


def test_the_plugin_registers_the_mtls_kind():
    (spec,) = identity_mtls.bastion_register_identity_providers()
    assert spec.kind == "mtls" and spec.options is MTLSOptions
