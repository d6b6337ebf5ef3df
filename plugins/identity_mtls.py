"""``[[identity]] kind = "mtls"``: the caller's TLS client certificate is its identity.

The listener has already verified the certificate chain against the target's ``tls.client_ca``
(core does the TLS handshake); this provider turns the verified certificate into an identity. With
``ca`` set it verifies the chain once more, against that CA alone, and rejects certificates it did
not issue — useful when one listener trusts several CAs but this provider should accept only one.
Either way, a certificate outside its validity period is rejected.

Options:

- ``subject_from``: ``"cn"`` (the subject's common name), ``"san-uri"`` (e.g. a SPIFFE id
  ``spiffe://cluster.local/ns/etl/sa/nightly``), ``"san-dns"`` or ``"san-email"``. The chosen field
  must hold exactly one value; a certificate with none or several is rejected, never guessed at.
- ``groups``: groups every identity from this provider gets (e.g. ``["workloads"]``).
- ``groups_from_ou``: each organisational unit (OU) of the subject becomes a group as well.
- ``ca``: a PEM file of CA certificates to verify the chain against again.

The identity: subject as above, issuer = the issuing CA's distinguished name (RFC 4514),
auth_method ``mtls``, token_id = the certificate's serial number (hex), expires_at = notAfter.
No certificate presented: *unknown* (the next provider may know the caller another way).

Example::

    [[identity]]
    kind = "mtls"
    subject_from = "san-uri"
    ca = "pki/workload-ca.pem"
    groups = ["workloads"]
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import attrs
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import Criticality, ExtensionPolicy, PolicyBuilder, Store, VerificationError

from bastion.core.hookspecs import hookimpl
from bastion.core.specs import ComponentContext, IdentityProviderSpec
from bastion.policies.model import AuthOutcome, Credential, Identity

log = logging.getLogger("bastion.identity.mtls")

SUBJECT_SOURCES = ("cn", "san-uri", "san-dns", "san-email")
# A real chain is leaf, an intermediate or two, and the root; a longer one is not ours.
MAX_CHAIN_CERTIFICATES = 8
# Same limit for what a caller can make us parse: a certificate is a few KiB.
MAX_CERTIFICATE_BYTES = 64 * 1024



def _require_client_auth(_policy: Any, _certificate: x509.Certificate, usage: x509.ExtendedKeyUsage | None) -> None:
    """A leaf that limits its key usage must allow client authentication (RFC 5280 §4.2.1.12)."""
    if usage is not None and ExtendedKeyUsageOID.CLIENT_AUTH not in usage and ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE not in usage:
        raise ValueError("the certificate's extended key usage does not allow client authentication")


# The Web PKI profile for leaf certificates, except for the criticality of subjectAltName and
# extendedKeyUsage. Marking them critical is a profile nicety, not a trust question, and private
# CAs (trustme among them) routinely do it; the chain, signatures, validity, basic constraints and
# the clientAuth key usage (checked here instead) still decide.
_LEAF_POLICY = (
    ExtensionPolicy.webpki_defaults_ee()
    .may_be_present(x509.SubjectAlternativeName, Criticality.AGNOSTIC, None)
    .may_be_present(x509.ExtendedKeyUsage, Criticality.AGNOSTIC, _require_client_auth)
)

_SAN_TYPE = {"san-uri": x509.UniformResourceIdentifier, "san-dns": x509.DNSName, "san-email": x509.RFC822Name}


def _check_groups(_instance: Any, attribute: attrs.Attribute, value: tuple[str, ...]) -> None:
    for group in value:
        if not group or group != group.strip():
            raise ValueError(f"{group!r} is not a group name", attribute, None, value)


@attrs.frozen(kw_only=True)
class MTLSOptions:
    subject_from: str = attrs.field(default="cn", validator=attrs.validators.in_(SUBJECT_SOURCES))
    ca: Path | None = None
    groups: tuple[str, ...] = attrs.field(default=(), validator=_check_groups)
    groups_from_ou: bool = False


class CertificateRejected(Exception):
    """The certificate cannot be an identity; the message is the audit reason."""


def load_ca_store(path: Path) -> Store:
    """The CA certificates in a PEM file; ValueError with a sentence when there are none."""
    try:
        certificates = x509.load_pem_x509_certificates(path.read_bytes())
    except OSError as exc:
        raise ValueError(f"ca: cannot read {path}: {exc.strerror}") from None
    except ValueError:
        raise ValueError(f"ca: {path} holds no PEM certificates") from None
    return Store(certificates)


def _single(values: list[str], what: str) -> str:
    if len(values) != 1:
        raise CertificateRejected(f"the certificate has {len(values)} {what} values; exactly one is needed for the subject")
    return values[0]


def subject_of(certificate: x509.Certificate, source: str) -> str:
    if source == "cn":
        names = [attribute.value for attribute in certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        subject = _single([n if isinstance(n, str) else n.decode("utf-8", "replace") for n in names], "common name")
    else:
        try:
            san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            raise CertificateRejected(f"the certificate has no subject alternative names ({source} wanted)") from None
        subject = _single(list(san.get_values_for_type(_SAN_TYPE[source])), source)
    if not subject.strip() or any(ord(c) < 0x20 or ord(c) == 0x7F for c in subject):
        raise CertificateRejected("the certificate's subject is empty or has control characters")
    return subject


class MTLSProvider:
    """``clock`` returns the current UTC time; it is for tests."""

    def __init__(self, options: MTLSOptions, context: ComponentContext, *, clock: Callable[[], datetime] | None = None) -> None:
        self.options = options
        self.name = context.name
        self._clock = clock or (lambda: datetime.now(UTC))
        # load now, so a bad path fails at start-up rather than on the first caller
        self._store = load_ca_store(options.ca) if options.ca is not None else None

    async def authenticate(self, credential: Credential) -> AuthOutcome:
        if not credential.peer_certificate:
            return AuthOutcome.unknown("no client certificate")
        try:
            identity = self._identity(credential)
        except CertificateRejected as exc:
            return AuthOutcome.reject(f"{self.name}: {exc}")
        return AuthOutcome.ok(identity)

    def _identity(self, credential: Credential) -> Identity:
        leaf = self._load(credential.peer_certificate)
        now = self._clock()
        if now < leaf.not_valid_before_utc:
            raise CertificateRejected(f"the certificate is not valid before {leaf.not_valid_before_utc.isoformat()}")
        if now > leaf.not_valid_after_utc:
            raise CertificateRejected(f"the certificate expired at {leaf.not_valid_after_utc.isoformat()}")
        if self._store is not None:
            self._verify_chain(leaf, credential.peer_certificate_chain, now)
        groups = set(self.options.groups)
        if self.options.groups_from_ou:
            for attribute in leaf.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME):
                if isinstance(attribute.value, str) and attribute.value.strip():
                    groups.add(attribute.value)
        return Identity(
            provider=self.name,
            subject=subject_of(leaf, self.options.subject_from),
            issuer=leaf.issuer.rfc4514_string(),
            groups=groups,
            auth_method="mtls",
            token_id=f"{leaf.serial_number:x}",
            expires_at=leaf.not_valid_after_utc,
        )

    @staticmethod
    def _load(der: bytes) -> x509.Certificate:
        if len(der) > MAX_CERTIFICATE_BYTES:
            raise CertificateRejected("the client certificate is implausibly large")
        try:
            return x509.load_der_x509_certificate(der)
        except ValueError:
            raise CertificateRejected("the client certificate is not valid DER") from None

    def _verify_chain(self, leaf: x509.Certificate, chain: tuple[bytes, ...], now: datetime) -> None:
        if len(chain) > MAX_CHAIN_CERTIFICATES:
            raise CertificateRejected(f"the certificate chain has {len(chain)} certificates, over {MAX_CHAIN_CERTIFICATES}")
        # the listener may hand over the whole chain, leaf first; the verifier wants intermediates
        intermediates = [c for c in (self._load(der) for der in chain) if c != leaf]
        verifier = (
            PolicyBuilder()
            .store(self._store)
            .time(now)
            .extension_policies(ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=_LEAF_POLICY)
            .build_client_verifier()
        )
        try:
            verifier.verify(leaf, intermediates)
        except VerificationError as exc:
            raise CertificateRejected(f"the certificate was not issued by the configured ca ({exc})") from None

    async def aclose(self) -> None:
        pass


def make_provider(options: MTLSOptions, context: ComponentContext) -> MTLSProvider:
    return MTLSProvider(options, context)


@hookimpl
def bastion_register_identity_providers() -> list[IdentityProviderSpec]:
    return [
        IdentityProviderSpec(
            kind="mtls",
            factory=make_provider,
            options=MTLSOptions,
            description="TLS client certificates (subject from CN or a SAN; optional CA pinning)",
        )
    ]
