"""``[[identity]] kind = "oidc"``: JSON Web Tokens from any OpenID Connect issuer.

One section per issuer (GitHub Actions, GitLab CI, a Kubernetes API server, Keycloak…); several
may be configured at once. A token whose ``iss`` is not this section's issuer, or that is not a
JWT at all, is answered *unknown* so the next provider can try it; a token that names this issuer
and fails any check is *rejected* with the precise reason for the audit trail.

Checks, all of them always: the signature, with a key from the issuer's published JWKS whose type
suits the token's algorithm; the algorithm, against an allowlist that can never contain ``none`` or
an HMAC algorithm; ``iss`` exactly; ``aud`` against the configured audiences; ``exp`` (required),
``nbf`` and ``iat`` within a small leeway; any configured required claims and claim values.

Keys come from the JWKS (found through discovery, or configured directly) and are cached. A token
naming an unknown key id triggers a refetch, at most once per ``jwks_min_refresh_interval``, so a
flood of forged tokens cannot make us hammer the issuer. When the issuer is down, cached keys keep
working (up to ``cache_max_stale``) and unknown key ids are refused.

The verification machinery here (:class:`JWKSCache`, :class:`JWTVerifier`, :class:`JWTProvider`)
is shared by the ``keycloak`` provider, which differs only in how it fetches keys and maps roles.

Example::

    [[identity]]
    kind = "oidc"
    name = "github"
    issuer = "https://token.actions.githubusercontent.com"
    audience = "https://bastion.example.org"
    subject_template = "repo:{repository}:ref:{ref}"
    ci_claims = ["repository", "workflow", "run_id", "run_attempt", "sha", "actor"]
    required_claim_values = { repository_owner = "acme" }
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import logging
import math
import re
import ssl
import string
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import attrs
import httpx
import jwt
import trio
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from bastion.core.config import Duration
from bastion.core.hookspecs import hookimpl
from bastion.core.secrets import SecretRef
from bastion.core.specs import ComponentContext, IdentityProviderSpec
from bastion.policies.model import AuthOutcome, Credential, Identity

log = logging.getLogger("bastion.identity.oidc")

# --- limits and allowlists -----------------------------------------------------------------------

# Real access tokens are a few KiB even with many roles; anything bigger is refused before any
# base64 or JSON work, so an oversized credential costs us nothing.
MAX_TOKEN_BYTES = 16 * 1024

# A discovery document or JWKS is a few KiB; the cap bounds what a broken or hostile endpoint can
# make us buffer.
MAX_METADATA_BYTES = 512 * 1024

# Asymmetric algorithms only: the verifier holds public keys, and those must never double as a MAC
# secret (the RS256/HS256 confusion attack), nor may an unsigned token (``none``) ever pass.
SUPPORTED_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
# What every mainstream CI / workload issuer signs with; EdDSA must be asked for explicitly.
DEFAULT_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512")
REFUSED_ALGORITHMS = frozenset({"none", "HS256", "HS384", "HS512"})

# (JWK kty, JWK crv) a key must have to verify each algorithm; None: any curve (RSA has none).
KEY_TYPE_FOR_ALGORITHM: dict[str, tuple[str, str | None]] = {
    "RS256": ("RSA", None), "RS384": ("RSA", None), "RS512": ("RSA", None),
    "PS256": ("RSA", None), "PS384": ("RSA", None), "PS512": ("RSA", None),
    "ES256": ("EC", "P-256"), "ES384": ("EC", "P-384"), "ES512": ("EC", "P-521"),
    "EdDSA": ("OKP", "Ed25519"),
}  # fmt: skip

# NIST and every issuer we target use at least 2048-bit RSA; smaller keys are factorable.
MIN_RSA_KEY_BITS = 2048

# Clocks in a healthy fleet agree to well under a second; a large leeway silently extends the life
# of every token (and of every stolen one), so it is capped.
MAX_LEEWAY_SECONDS = 300.0
DEFAULT_LEEWAY_SECONDS = 30.0

# Token lifetimes are minutes to hours; one refetch per 30 s is plenty to pick up a key rotation
# and little enough that a flood of forged key ids cannot hammer the issuer.
DEFAULT_MIN_REFRESH_SECONDS = 30.0
# Issuers publish a new key well before signing with it, so an hourly refresh sees rotations
# in time; unknown key ids refresh sooner anyway.
DEFAULT_CACHE_TTL_SECONDS = 3600.0
# While the issuer is unreachable, keys it published keep verifying for this long. Beyond it we
# would be trusting keys the issuer may have withdrawn (e.g. after a compromise), so we stop.
DEFAULT_CACHE_MAX_STALE_SECONDS = 24 * 3600.0
DEFAULT_HTTP_TIMEOUT_SECONDS = 10.0

# Latest expiry we can represent as a datetime; a larger exp is a broken issuer, not a token.
LATEST_TIMESTAMP = datetime(9999, 12, 31, tzinfo=UTC).timestamp()

# Compact JWS: three base64url segments; the signature is empty for ``alg: none`` tokens, which
# must still reach the algorithm check so they are rejected, not passed on as "not a JWT".
_JWT_SHAPE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
# A claim path: names separated by dots. No brackets, attributes or format specs, so a template
# can never reach into Python objects the way str.format can.
_CLAIM_PATH = re.compile(r"[A-Za-z0-9_$@-]+(?:\.[A-Za-z0-9_$@-]+)*")
# JWK members holding private key material; a JWKS that publishes them is misconfigured.
_PRIVATE_JWK_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "k"})
_LOOPBACK_NAMES = frozenset({"localhost"})


# --- configuration -------------------------------------------------------------------------------


def _check_algorithms(_instance: Any, attribute: attrs.Attribute, value: tuple[str, ...]) -> None:
    if not value:
        raise ValueError("name at least one algorithm", attribute, None, value)
    for algorithm in value:
        if algorithm in REFUSED_ALGORITHMS:
            why = "unsigned tokens" if algorithm == "none" else "an HMAC algorithm, never used with public keys"
            raise ValueError(f'"{algorithm}" is refused ({why})', attribute, None, value)
        if algorithm not in SUPPORTED_ALGORITHMS:
            known = ", ".join(sorted(SUPPORTED_ALGORITHMS))
            raise ValueError(f'unsupported algorithm "{algorithm}" (supported: {known})', attribute, None, value)


def _check_leeway(_instance: Any, attribute: attrs.Attribute, value: float) -> None:
    if value > MAX_LEEWAY_SECONDS:
        raise ValueError(f"at most {MAX_LEEWAY_SECONDS:.0f} seconds, got {value:g}", attribute, None, value)


def _check_positive(_instance: Any, attribute: attrs.Attribute, value: float) -> None:
    if value <= 0:
        raise ValueError(f"must be more than zero, got {value:g}", attribute, None, value)


def _check_claim_paths(_instance: Any, attribute: attrs.Attribute, value: Iterable[str]) -> None:
    for path in value:
        if not _CLAIM_PATH.fullmatch(path):
            raise ValueError(f'"{path}" is not a claim name or dotted claim path', attribute, None, value)


def _check_optional_claim_path(instance: Any, attribute: attrs.Attribute, value: str | None) -> None:
    if value is not None:
        _check_claim_paths(instance, attribute, (value,))


def check_template(_instance: Any, attribute: attrs.Attribute, value: str) -> None:
    try:
        template_fields(value)
    except ValueError as exc:
        raise ValueError(str(exc), attribute, None, value) from None


def _audiences(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(a, str) and a for a in value):
        raise ValueError("audience: expected a non-empty string or a non-empty list of strings")
    return tuple(value)


def template_fields(template: str) -> tuple[str, ...]:
    """The claim paths a subject template names; ValueError when it is not a plain template.

    Only ``{claim}`` and ``{dotted.claim.path}`` placeholders are allowed (``{{``/``}}`` for
    literal braces): no conversions, no format specs, no indexing or attribute access.
    """
    fields = []
    try:
        pieces = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"not a valid template: {exc}") from None
    for _literal, field, spec, conversion in pieces:
        if field is None:
            continue
        if spec or conversion:
            raise ValueError(f'placeholder "{{{field}}}" may not have a format spec or conversion')
        if not _CLAIM_PATH.fullmatch(field):
            raise ValueError(f'placeholder "{{{field}}}" is not a claim name')
        fields.append(field)
    if not fields and not template:
        raise ValueError("the template is empty")
    return tuple(fields)


@attrs.frozen(kw_only=True)
class TokenCheckOptions:
    """Settings every JWT-verifying provider shares (``oidc``, ``keycloak``)."""

    algorithms: tuple[str, ...] = attrs.field(default=DEFAULT_ALGORITHMS, validator=_check_algorithms)
    leeway: Duration = attrs.field(default=Duration(DEFAULT_LEEWAY_SECONDS), validator=_check_leeway)
    subject_template: str = attrs.field(default="{sub}", validator=check_template)
    ci_claims: tuple[str, ...] = attrs.field(default=(), validator=_check_claim_paths)
    required_claims: tuple[str, ...] = attrs.field(default=(), validator=_check_claim_paths)
    required_claim_values: dict[str, str] = attrs.field(factory=dict, hash=False)
    http_timeout: Duration = attrs.field(default=Duration(DEFAULT_HTTP_TIMEOUT_SECONDS), validator=_check_positive)
    jwks_min_refresh_interval: Duration = Duration(DEFAULT_MIN_REFRESH_SECONDS)
    cache_ttl: Duration = attrs.field(default=Duration(DEFAULT_CACHE_TTL_SECONDS), validator=_check_positive)
    cache_max_stale: Duration = Duration(DEFAULT_CACHE_MAX_STALE_SECONDS)
    ca: Path | None = None  # CA bundle for an issuer behind a private CA
    allow_http: bool = False  # plain http to a non-loopback issuer: only for in-cluster setups

    def __attrs_post_init__(self) -> None:
        for path in self.required_claim_values:
            if not _CLAIM_PATH.fullmatch(path):
                raise ValueError(f'required_claim_values: "{path}" is not a claim name or dotted claim path')
        if self.cache_max_stale < self.cache_ttl:
            raise ValueError("cache_max_stale: must be at least cache_ttl")


@attrs.frozen(kw_only=True)
class OIDCOptions(TokenCheckOptions):
    """``[[identity]] kind = "oidc"``.

    ``issuer`` is compared exactly with each token's ``iss``; ``audience`` (one string or a list)
    must appear in each token's ``aud``. With ``discovery = true`` (the default) the JWKS address is
    read from ``<issuer>/.well-known/openid-configuration``; otherwise give ``jwks_uri``.
    ``groups_claim`` is a dotted path to a list of strings (``groups``, ``realm_access.roles``).
    ``http_token`` is sent as a bearer token when fetching keys (a Kubernetes API server wants one).
    """

    issuer: str
    audience: Any = attrs.field(converter=_audiences)
    discovery: bool = True
    jwks_uri: str | None = None
    groups_claim: str | None = attrs.field(default=None, validator=_check_optional_claim_path)
    http_token: SecretRef | None = None

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        check_url(self.issuer, "issuer", allow_http=self.allow_http, allow_query=False)
        if self.discovery and self.jwks_uri is not None:
            raise ValueError("jwks_uri: only used with discovery = false (discovery finds it otherwise)")
        if not self.discovery:
            if self.jwks_uri is None:
                raise ValueError("jwks_uri: required when discovery = false")
            check_url(self.jwks_uri, "jwks_uri", allow_http=self.allow_http, allow_query=True)


def is_loopback_host(host: str) -> bool:
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_url(url: str, key: str, *, allow_http: bool, allow_query: bool) -> None:
    """ValueError unless ``url`` is https (or http to loopback, or http with ``allow_http``).

    Keys fetched over plain http can be swapped by anyone on the path, which would let them sign
    any identity, so http is refused unless the issuer is on this machine or it is asked for.
    """
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
    except ValueError:
        raise ValueError(f'{key}: "{url}" is not a URL') from None
    if parts.scheme not in ("https", "http") or not host:
        raise ValueError(f'{key}: expected an https:// URL, got "{url}"')
    if parts.scheme == "http" and not (allow_http or is_loopback_host(host)):
        raise ValueError(f'{key}: "{url}" is plain http; use https (or allow_http = true for an in-cluster issuer)')
    if parts.fragment or (parts.query and not allow_query):
        raise ValueError(f'{key}: "{url}" may not have a query or fragment')


# --- fetching issuer metadata ----------------------------------------------------------------------


class KeySourceUnavailable(Exception):
    """The issuer's keys could not be fetched; the message says why, in a sentence."""


def http_client(options: TokenCheckOptions) -> httpx.AsyncClient:
    """An HTTP client for issuer metadata.

    Redirects are not followed (a redirect could lead to plain http or elsewhere) and the
    environment is not consulted (no proxy or CA bundle switched in from outside the config).
    """
    verify: ssl.SSLContext | bool = True
    if options.ca is not None:
        verify = ssl.create_default_context(cafile=str(options.ca))
    return httpx.AsyncClient(
        verify=verify,
        timeout=httpx.Timeout(float(options.http_timeout)),
        follow_redirects=False,
        trust_env=False,
    )


async def fetch_json(client: httpx.AsyncClient, url: str, *, timeout: float, headers: Mapping[str, str] | None = None) -> Any:
    """GET ``url`` and parse its JSON body, reading at most :data:`MAX_METADATA_BYTES`."""
    try:
        with trio.fail_after(timeout):
            async with client.stream("GET", url, headers=dict(headers or {})) as response:
                if response.status_code != 200:
                    raise KeySourceUnavailable(f"{url} answered HTTP {response.status_code}")
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_METADATA_BYTES:
                        raise KeySourceUnavailable(f"{url} sent more than {MAX_METADATA_BYTES} bytes")
    except trio.TooSlowError:
        raise KeySourceUnavailable(f"{url} did not answer within {timeout:g} s") from None
    except httpx.HTTPError as exc:
        raise KeySourceUnavailable(f"cannot fetch {url}: {type(exc).__name__}") from None
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        raise KeySourceUnavailable(f"{url} did not send JSON") from None


# --- keys ----------------------------------------------------------------------------------------


@attrs.frozen
class VerificationKey:
    """One public key from a JWKS."""

    kid: str | None
    kty: str
    curve: str | None
    alg: str | None  # the JWK's own "alg" member; when present, the only algorithm it verifies
    public_key: Any = attrs.field(eq=False, repr=False)

    def mismatch(self, algorithm: str) -> str | None:
        """Why this key cannot verify ``algorithm``, or None when it can."""
        kty, curve = KEY_TYPE_FOR_ALGORITHM[algorithm]
        if self.kty != kty or (curve is not None and self.curve != curve):
            described = f"{self.kty} {self.curve}" if self.curve else self.kty
            return f"key {self.kid!r} is an {described} key and cannot verify {algorithm}"
        if self.alg is not None and self.alg != algorithm:
            return f"key {self.kid!r} is published for {self.alg}, not {algorithm}"
        return None


def parse_jwks(document: Any) -> tuple[VerificationKey, ...]:
    """The usable signature-verification keys of a JWKS; unusable keys are skipped with a log line.

    Raises :class:`KeySourceUnavailable` when the document is not a JWKS at all.
    """
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise KeySourceUnavailable('the JWKS is not a JSON object with a "keys" list')
    keys = []
    for index, jwk in enumerate(document["keys"]):
        try:
            keys.append(_parse_jwk(jwk))
        except ValueError as exc:
            log.debug("JWKS key %d skipped: %s", index, exc)
    return tuple(keys)


def _parse_jwk(jwk: Any) -> VerificationKey:
    if not isinstance(jwk, dict):
        raise ValueError("not a JSON object")
    kty, kid, alg, use, ops = (jwk.get(k) for k in ("kty", "kid", "alg", "use", "key_ops"))
    if use is not None and use != "sig":
        raise ValueError(f"use is {use!r}, not a signature key")
    if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
        raise ValueError("key_ops does not include verify")
    if kid is not None and not isinstance(kid, str):
        raise ValueError("kid is not a string")
    if alg is not None and (not isinstance(alg, str) or alg not in SUPPORTED_ALGORITHMS):
        raise ValueError(f"alg {alg!r} is not an algorithm we verify")
    if _PRIVATE_JWK_MEMBERS & set(jwk):
        log.warning("the JWKS publishes private key material for key %r; that key is ignored", kid)
        raise ValueError("carries private key material")
    curve = jwk.get("crv")
    try:
        if kty == "RSA":
            public_key = RSAAlgorithm.from_jwk(jwk)
            if public_key.key_size < MIN_RSA_KEY_BITS:
                raise ValueError(f"RSA key of {public_key.key_size} bits, under {MIN_RSA_KEY_BITS}")
            curve = None
        elif kty == "EC":
            public_key = ECAlgorithm.from_jwk(jwk)
        elif kty == "OKP" and curve == "Ed25519":
            public_key = OKPAlgorithm.from_jwk(jwk)
        else:
            raise ValueError(f"unsupported key type {kty!r}")
    except ValueError:
        raise
    except Exception as exc:  # untrusted input to a third-party parser: any failure is "unusable"
        raise ValueError(f"not a valid {kty} key: {type(exc).__name__}") from None
    return VerificationKey(kid=kid, kty=kty, curve=curve, alg=alg, public_key=public_key)


class KeyLookupFailed(Exception):
    """No key can verify this token; the message is the audit reason."""


class JWKSCache:
    """An issuer's keys, fetched on demand and cached.

    ``fetch`` returns the JWKS document (raising :class:`KeySourceUnavailable`). Fetches happen
    when there are no keys yet, when the cache is older than ``ttl``, and when a token names an
    unknown key id — each at most once per ``min_refresh_interval`` (counting failed attempts, so
    a down issuer is not hammered either), and never two at once. ``clock`` is monotonic seconds.
    """

    def __init__(
        self,
        fetch: Callable[[], Awaitable[Any]],
        *,
        name: str,
        min_refresh_interval: float,
        ttl: float,
        max_stale: float,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._fetch = fetch
        self._name = name
        self._min_refresh_interval = min_refresh_interval
        self._ttl = ttl
        self._max_stale = max_stale
        self._clock = clock or trio.current_time
        self._keys: tuple[VerificationKey, ...] = ()
        self._fetched_at: float | None = None
        self._attempted_at: float | None = None
        self._last_error = ""
        self._lock = trio.Lock()

    async def key_for(self, kid: str | None, algorithm: str) -> VerificationKey:
        """The key that verifies a token with this ``kid`` and ``algorithm``; else KeyLookupFailed."""
        if self._fetched_at is None or self._clock() - self._fetched_at > self._ttl:
            await self._refresh()
        if self._fetched_at is None:
            raise KeyLookupFailed(f"the issuer's keys are unavailable ({self._last_error})")
        if self._clock() - self._fetched_at > self._max_stale:
            await self._refresh()
            if self._clock() - self._fetched_at > self._max_stale:
                raise KeyLookupFailed(
                    f"the issuer's keys were last fetched {self._clock() - self._fetched_at:.0f} s ago, "
                    f"over cache_max_stale, and cannot be refreshed ({self._last_error})"
                )
        if kid is not None and not any(key.kid == kid for key in self._keys):
            await self._refresh()
            if not any(key.kid == kid for key in self._keys):
                why = f"; the issuer cannot be reached ({self._last_error})" if self._last_error else ""
                raise KeyLookupFailed(f"unknown key id {kid!r}{why}")
        return self._choose(kid, algorithm)

    def _choose(self, kid: str | None, algorithm: str) -> VerificationKey:
        candidates = [key for key in self._keys if kid is None or key.kid == kid]
        suitable = [key for key in candidates if key.mismatch(algorithm) is None]
        if kid is None and len(suitable) != 1:
            raise KeyLookupFailed(
                f"the token names no key id and the issuer has {len(suitable)} keys for {algorithm}"
            )
        if not suitable:
            raise KeyLookupFailed(candidates[0].mismatch(algorithm) or "no suitable key")
        return suitable[0]

    async def _refresh(self) -> None:
        async with self._lock:
            now = self._clock()
            if self._attempted_at is not None and now - self._attempted_at < self._min_refresh_interval:
                return  # someone just fetched (or tried): use what that gave
            self._attempted_at = now
            try:
                keys = parse_jwks(await self._fetch())
            except KeySourceUnavailable as exc:
                self._last_error = str(exc)
                log.warning("identity provider %s: cannot refresh the issuer's keys: %s", self._name, exc)
                return
            self._keys, self._fetched_at, self._last_error = keys, self._clock(), ""


# --- tokens --------------------------------------------------------------------------------------


class TokenRejected(Exception):
    """The token names our issuer and fails a check; the message is the audit reason."""


def _b64url_json(segment: str) -> Any:
    raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    return json.loads(raw)


def peek(token: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The unverified (header, payload) of a compact JWS, or None when it is not one.

    Nothing read here is trusted: it only says whether the token is meant for a given issuer.
    """
    if not _JWT_SHAPE.fullmatch(token):
        return None
    header_segment, payload_segment, _signature = token.split(".")
    try:
        header, payload = _b64url_json(header_segment), _b64url_json(payload_segment)
    except (ValueError, binascii.Error, RecursionError):
        return None
    if not isinstance(header, dict) or not isinstance(payload, dict):
        return None
    return header, payload


_MISSING = object()


def claim_at(claims: Mapping[str, Any], path: str) -> Any:
    """The value at a dotted claim path, or :data:`_MISSING`.

    Claim names may contain dots themselves (Kubernetes puts its claims under ``kubernetes.io``),
    so at each level the longest name that exists wins: ``kubernetes.io.namespace`` finds
    ``claims["kubernetes.io"]["namespace"]``.
    """
    parts = path.split(".")
    node: Any = claims
    while parts:
        if not isinstance(node, dict):
            return _MISSING
        for take in range(len(parts), 0, -1):
            name = ".".join(parts[:take])
            if name in node:
                node, parts = node[name], parts[take:]
                break
        else:
            return _MISSING
    return node


def has_claim(claims: Mapping[str, Any], path: str) -> bool:
    value = claim_at(claims, path)
    return value is not _MISSING and value is not None


def _numeric_date(claims: Mapping[str, Any], name: str) -> float | None:
    """A NumericDate claim (RFC 7519 §2): a finite JSON number, not a string or a boolean."""
    if name not in claims:
        return None
    value = claims[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TokenRejected(f"the {name} claim is not a number")
    if not 0 <= value <= LATEST_TIMESTAMP:
        raise TokenRejected(f"the {name} claim is out of range")
    return float(value)


@attrs.frozen
class VerificationPolicy:
    """What a verified token must satisfy besides its signature."""

    issuer: str
    audiences: tuple[str, ...]
    algorithms: frozenset[str]
    leeway: float
    required_claims: tuple[str, ...] = ()
    required_claim_values: tuple[tuple[str, str], ...] = ()


class JWTVerifier:
    """Verify compact JWS tokens of one issuer against its JWKS and a :class:`VerificationPolicy`."""

    def __init__(self, policy: VerificationPolicy, keys: JWKSCache, *, wall_clock: Callable[[], float] = time.time) -> None:
        self.policy = policy
        self.keys = keys
        self._wall_clock = wall_clock
        # signature checks only; every claim is checked below, strictly, with our own reasons
        self._jws = jwt.PyJWS(algorithms=sorted(SUPPORTED_ALGORITHMS))

    def not_mine(self, token: str) -> str | None:
        """Why the token is not for this issuer (answer unknown), or None when it claims to be."""
        parts = peek(token)
        if parts is None:
            return "not a JWT"
        iss = parts[1].get("iss")
        if iss != self.policy.issuer:
            return f"issued by {iss!r}, not {self.policy.issuer!r}" if isinstance(iss, str) else "the JWT names no issuer"
        return None

    async def verify(self, token: str) -> dict[str, Any]:
        """The verified claims; :class:`TokenRejected` with the reason otherwise.

        Call :meth:`not_mine` first: this assumes the token is a JWT claiming our issuer.
        """
        parts = peek(token)
        if parts is None:
            raise TokenRejected("not a JWT")
        header, _unverified = parts
        algorithm = header.get("alg")
        if not isinstance(algorithm, str) or algorithm not in self.policy.algorithms:
            raise TokenRejected(f"the token's algorithm {algorithm!r} is not allowed")
        if "crit" in header:  # RFC 7515 §4.1.11: extensions we do not implement must be refused
            raise TokenRejected("the token has critical header extensions we do not understand")
        if header.get("b64", True) is not True:
            raise TokenRejected("unencoded (b64 = false) payloads are not accepted")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise TokenRejected("the token's kid is not a string")
        try:
            key = await self.keys.key_for(kid, algorithm)
        except KeyLookupFailed as exc:
            raise TokenRejected(str(exc)) from None
        try:
            decoded = self._jws.decode_complete(token, key=key.public_key, algorithms=[algorithm])
        except jwt.InvalidSignatureError:
            raise TokenRejected(f"the signature does not verify with key {key.kid!r}") from None
        except jwt.PyJWTError as exc:
            raise TokenRejected(f"the token is malformed: {exc}") from None
        try:
            claims = json.loads(decoded["payload"])
        except (ValueError, RecursionError):
            raise TokenRejected("the payload is not JSON") from None
        if not isinstance(claims, dict):
            raise TokenRejected("the payload is not a JSON object")
        self.check_claims(claims)
        return claims

    def check_claims(self, claims: Mapping[str, Any]) -> None:
        policy = self.policy
        now = self._wall_clock()
        if claims.get("iss") != policy.issuer:
            raise TokenRejected(f"issuer {claims.get('iss')!r} is not {policy.issuer!r}")
        audience = claims.get("aud")
        token_audiences = [audience] if isinstance(audience, str) else audience
        if not isinstance(token_audiences, list) or not all(isinstance(a, str) for a in token_audiences):
            raise TokenRejected("the token has no audience (aud)")
        if not set(token_audiences) & set(policy.audiences):
            raise TokenRejected(f"audience {audience!r} is not one of {list(policy.audiences)!r}")
        expires = _numeric_date(claims, "exp")
        if expires is None:
            raise TokenRejected("the token has no expiry (exp)")
        if expires <= now - policy.leeway:
            raise TokenRejected(f"the token expired at {_iso(expires)}")
        not_before = _numeric_date(claims, "nbf")
        if not_before is not None and not_before > now + policy.leeway:
            raise TokenRejected(f"the token is not valid before {_iso(not_before)}")
        issued = _numeric_date(claims, "iat")
        if issued is not None and issued > now + policy.leeway:
            raise TokenRejected(f"the token claims to be issued in the future ({_iso(issued)})")
        for name in ("sub", "jti"):
            if name in claims and not isinstance(claims[name], str):
                raise TokenRejected(f"the {name} claim is not a string")
        for path in policy.required_claims:
            if not has_claim(claims, path):
                raise TokenRejected(f"the required claim {path!r} is missing")
        for path, expected in policy.required_claim_values:
            value = claim_at(claims, path)
            if value != expected:
                shown = "missing" if value is _MISSING else repr(value)
                raise TokenRejected(f"claim {path!r} is {shown}, not {expected!r}")


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat().replace("+00:00", "Z")


# --- claims to identity ----------------------------------------------------------------------------


def render_subject(template: str, claims: Mapping[str, Any]) -> str:
    """Fill ``template`` from the claims; TokenRejected when a claim is missing or not a string.

    Substitution is done here, not by str.format, so a placeholder can only ever read a claim.
    """
    out = []
    for literal, field, _spec, _conversion in string.Formatter().parse(template):
        out.append(literal)
        if field is None:
            continue
        value = claim_at(claims, field)
        if value is _MISSING or value is None:
            raise TokenRejected(f"the claim {field!r} needed by subject_template is missing")
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise TokenRejected(f"the claim {field!r} needed by subject_template is not a string")
        out.append(str(value))
    subject = "".join(out)
    if not subject.strip():
        raise TokenRejected("the subject is empty")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in subject):
        raise TokenRejected("the subject contains control characters")
    return subject


def claim_strings(claims: Mapping[str, Any], path: str) -> list[str]:
    """A claim holding a string or a list of strings, as a list (non-strings are left out)."""
    value = claim_at(claims, path)
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [item for item in value if isinstance(item, str)]
    return []


def ci_context(claims: Mapping[str, Any], paths: Iterable[str]) -> dict[str, str]:
    """The configured CI claims, as strings, keyed by their configured path."""
    context = {}
    for path in paths:
        value = claim_at(claims, path)
        if value is _MISSING or value is None:
            continue
        if isinstance(value, str):
            context[path] = value
        elif isinstance(value, bool):
            context[path] = "true" if value else "false"
        else:
            context[path] = json.dumps(value, separators=(",", ":"), sort_keys=True)
    return context


# --- the provider ---------------------------------------------------------------------------------


class JWTProvider:
    """The authenticate flow every JWT provider shares; subclasses say how claims map to groups.

    Subclasses set ``self.verifier`` and may override :meth:`groups` and :meth:`after_verify`.
    """

    verifier: JWTVerifier

    def __init__(self, options: TokenCheckOptions, context: ComponentContext) -> None:
        self.options = options
        self.context = context

    def groups(self, claims: Mapping[str, Any]) -> set[str]:
        return set()

    async def after_verify(self, token: str, claims: Mapping[str, Any]) -> None:
        """Further checks once the signature and claims passed; raise TokenRejected to refuse."""

    async def authenticate(self, credential: Credential) -> AuthOutcome:
        token = credential.secret
        if not token:
            return AuthOutcome.unknown("no bearer token presented")
        if len(token) > MAX_TOKEN_BYTES or len(token.encode("utf-8", "surrogatepass")) > MAX_TOKEN_BYTES:
            return AuthOutcome.reject(f"the token is larger than {MAX_TOKEN_BYTES} bytes")
        why_not = self.verifier.not_mine(token)
        if why_not is not None:
            return AuthOutcome.unknown(why_not)
        try:
            claims = await self.verifier.verify(token)
            await self.after_verify(token, claims)
            identity = self.identity(claims)
        except TokenRejected as exc:
            return AuthOutcome.reject(f"{self.context.name}: {exc}")
        return AuthOutcome.ok(identity)

    def identity(self, claims: Mapping[str, Any]) -> Identity:
        expires = claims["exp"]  # checked present and in range by the verifier
        return Identity(
            provider=self.context.name,
            subject=render_subject(self.options.subject_template, claims),
            issuer=self.verifier.policy.issuer,
            groups=self.groups(claims),
            auth_method="jwt",
            token_id=claims.get("jti"),
            expires_at=datetime.fromtimestamp(expires, UTC),
            ci=ci_context(claims, self.options.ci_claims),
        )

    async def aclose(self) -> None:
        pass


def verification_policy(options: TokenCheckOptions, issuer: str, audiences: Iterable[str]) -> VerificationPolicy:
    return VerificationPolicy(
        issuer=issuer,
        audiences=tuple(audiences),
        algorithms=frozenset(options.algorithms),
        leeway=float(options.leeway),
        required_claims=options.required_claims,
        required_claim_values=tuple(sorted(options.required_claim_values.items())),
    )


class OIDCProvider(JWTProvider):
    """Verifies tokens of one OpenID Connect issuer. ``clock`` (monotonic seconds) is for tests."""

    def __init__(self, options: OIDCOptions, context: ComponentContext, *, clock: Callable[[], float] | None = None) -> None:
        super().__init__(options, context)
        self.options: OIDCOptions = options
        self._client = http_client(options)
        self._jwks_uri: str | None = options.jwks_uri
        keys = JWKSCache(
            self._fetch_jwks,
            name=context.name,
            min_refresh_interval=float(options.jwks_min_refresh_interval),
            ttl=float(options.cache_ttl),
            max_stale=float(options.cache_max_stale),
            clock=clock,
        )
        self.verifier = JWTVerifier(verification_policy(options, options.issuer, options.audience), keys)

    def groups(self, claims: Mapping[str, Any]) -> set[str]:
        return set(claim_strings(claims, self.options.groups_claim)) if self.options.groups_claim else set()

    async def _headers(self) -> dict[str, str]:
        if self.options.http_token is None:
            return {}
        try:
            secret = await trio.to_thread.run_sync(self.context.resolve_secret, self.options.http_token)
        except Exception as exc:  # an unavailable secret is an unavailable key source, not a crash
            raise KeySourceUnavailable(f"cannot read http_token: {exc}") from None
        return {"Authorization": f"Bearer {secret.reveal()}"}

    async def _fetch_jwks(self) -> Any:
        timeout = float(self.options.http_timeout)
        headers = await self._headers()
        if self.options.discovery:
            # Discovery every time the keys are refreshed: an issuer may move its JWKS, and the
            # refresh rate is already bounded by the cache.
            self._jwks_uri = await self._discover(headers, timeout)
        assert self._jwks_uri is not None  # options check: discovery, or jwks_uri given
        return await fetch_json(self._client, self._jwks_uri, timeout=timeout, headers=headers)

    async def _discover(self, headers: Mapping[str, str], timeout: float) -> str:
        url = self.options.issuer.rstrip("/") + "/.well-known/openid-configuration"
        document = await fetch_json(self._client, url, timeout=timeout, headers=headers)
        if not isinstance(document, dict):
            raise KeySourceUnavailable(f"{url} is not a discovery document")
        # OpenID Connect Discovery §4.3: the document's issuer must be exactly the one we asked
        if document.get("issuer") != self.options.issuer:
            raise KeySourceUnavailable(f"{url} names issuer {document.get('issuer')!r}, not {self.options.issuer!r}")
        jwks_uri = document.get("jwks_uri")
        if not isinstance(jwks_uri, str):
            raise KeySourceUnavailable(f"{url} has no jwks_uri")
        try:
            check_url(jwks_uri, "jwks_uri", allow_http=self.options.allow_http, allow_query=True)
        except ValueError as exc:
            raise KeySourceUnavailable(f"discovery gave an unusable {exc}") from None
        return jwks_uri

    async def aclose(self) -> None:
        await self._client.aclose()


def make_provider(options: OIDCOptions, context: ComponentContext) -> OIDCProvider:
    return OIDCProvider(options, context)


@hookimpl
def bastion_register_identity_providers() -> list[IdentityProviderSpec]:
    return [
        IdentityProviderSpec(
            kind="oidc",
            factory=make_provider,
            options=OIDCOptions,
            description="JWTs from an OpenID Connect issuer (CI workload tokens, Kubernetes, Keycloak)",
        )
    ]
