"""``[[identity]] kind = "keycloak"``: Keycloak access tokens, optionally confirmed by introspection.

Keys and the realm's metadata are fetched with python-keycloak (``KeycloakOpenID.a_well_known``,
``a_certs``, ``a_introspect``); token verification is the ``oidc`` provider's
(:class:`bastion.plugins.identity_oidc.JWTVerifier`), with the same strict checks, key cache and
refetch rate limit.

The audience checked is ``client_id``: the Keycloak client that stands for Bastion. Keycloak only
puts it in ``aud`` when the caller's client has an *Audience* protocol mapper for it, so add one
(Client scopes → dedicated scope → Add mapper → Audience, included client = Bastion's client).

Groups of the identity, all together:

- realm roles (``realm_access.roles``) as they are: ``phi-reader``;
- client roles (``resource_access.<client>.roles``) as ``<client>:<role>``: ``bastion:read``;
- Keycloak groups (the ``groups`` claim of a *Group Membership* mapper) as they are, which with
  "full group path" on is ``/clinic/billing``.

With ``introspect = true`` every token that verifies locally is also shown to the realm's
introspection endpoint (RFC 7662) with Bastion's client credentials; a token the realm reports
inactive — revoked, or its session ended — is rejected, and so is every token while introspection
is unavailable (fail closed).

Example::

    [[identity]]
    kind = "keycloak"
    name = "sso"
    server_url = "https://sso.example.org"
    realm = "clinic"
    client_id = "bastion"
    client_secret = { file = "/run/secrets/bastion-client-secret" }
    introspect = true
"""

from __future__ import annotations

import logging
import math
import re
import ssl
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import trio
from keycloak import KeycloakOpenID
from keycloak.exceptions import KeycloakError

from bastion.core.hookspecs import hookimpl
from bastion.core.secrets import SecretRef
from bastion.core.specs import ComponentContext, IdentityProviderSpec
from bastion.plugins.identity_oidc import (
    JWKSCache,
    JWTProvider,
    JWTVerifier,
    KeySourceUnavailable,
    TokenCheckOptions,
    TokenRejected,
    check_template,
    check_url,
    claim_strings,
    verification_policy,
)

log = logging.getLogger("bastion.identity.keycloak")

# Keycloak realm names used in URLs; anything else would change the path we ask for.
_REALM_NAME = re.compile(r"[A-Za-z0-9._-]+")
# Keycloak marks its access tokens "Bearer"; ID ("ID"), refresh ("Refresh") and logout tokens are
# signed by the same realm keys and must not pass as access tokens.
ACCESS_TOKEN_TYPE = "Bearer"
# How a client role becomes a group: "<client>:<role>". A colon cannot start a realm role or a
# group path, so the three kinds of group never collide by accident.
CLIENT_ROLE_SEPARATOR = ":"


def _check_realm(_instance: Any, attribute: attrs.Attribute, value: str) -> None:
    if not _REALM_NAME.fullmatch(value):
        raise ValueError(f'"{value}" is not a realm name (letters, digits, ".", "_", "-")', attribute, None, value)


def _check_not_empty(_instance: Any, attribute: attrs.Attribute, value: str) -> None:
    if not value:
        raise ValueError("may not be empty", attribute, None, value)


@attrs.frozen(kw_only=True)
class KeycloakOptions(TokenCheckOptions):
    """``[[identity]] kind = "keycloak"``.

    ``issuer`` defaults to ``<server_url>/realms/<realm>``; set it when Keycloak's public
    (frontend) URL differs from the ``server_url`` Bastion reaches it by. ``subject_template``
    defaults to ``{preferred_username}`` (unique in a realm, and what people write in grants;
    a service account is ``service-account-<client>``); use ``{sub}`` for the immutable user id.
    """

    server_url: str
    realm: str = attrs.field(validator=_check_realm)
    client_id: str = attrs.field(validator=_check_not_empty)
    client_secret: SecretRef | None = None
    introspect: bool = False
    issuer: str | None = None
    subject_template: str = attrs.field(default="{preferred_username}", validator=check_template)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        check_url(self.server_url, "server_url", allow_http=self.allow_http, allow_query=False)
        if self.issuer is not None:
            check_url(self.issuer, "issuer", allow_http=self.allow_http, allow_query=False)
        if self.introspect and self.client_secret is None:
            raise ValueError("client_secret: required with introspect = true (introspection needs a confidential client)")

    @property
    def realm_issuer(self) -> str:
        return self.issuer or f"{self.server_url.rstrip('/')}/realms/{self.realm}"


class KeycloakProvider(JWTProvider):
    """Verifies one realm's access tokens. ``clock`` (monotonic seconds) is for tests."""

    def __init__(self, options: KeycloakOptions, context: ComponentContext, *, clock: Callable[[], float] | None = None) -> None:
        super().__init__(options, context)
        self.options: KeycloakOptions = options
        # python-keycloak hands `verify` to httpx for its async calls, which takes an SSL context
        verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=str(options.ca)) if options.ca else True
        self.keycloak = KeycloakOpenID(
            # a trailing slash, or urljoin drops a path prefix such as the legacy "/auth"
            server_url=options.server_url.rstrip("/") + "/",
            realm_name=options.realm,
            client_id=options.client_id,
            verify=verify,  # type: ignore[arg-type]
            timeout=max(1, math.ceil(float(options.http_timeout))),
        )
        self._issuer_confirmed = False
        keys = JWKSCache(
            self._fetch_jwks,
            name=context.name,
            min_refresh_interval=float(options.jwks_min_refresh_interval),
            ttl=float(options.cache_ttl),
            max_stale=float(options.cache_max_stale),
            clock=clock,
        )
        self.verifier = JWTVerifier(verification_policy(options, options.realm_issuer, [options.client_id]), keys)

    def groups(self, claims: Mapping[str, Any]) -> set[str]:
        groups = set(claim_strings(claims, "realm_access.roles"))
        resource_access = claims.get("resource_access")
        if isinstance(resource_access, dict):
            for client, access in resource_access.items():
                if isinstance(access, dict):
                    groups.update(f"{client}{CLIENT_ROLE_SEPARATOR}{role}" for role in claim_strings(access, "roles"))
        groups.update(claim_strings(claims, "groups"))
        return groups

    async def _fetch_jwks(self) -> Any:
        try:
            with trio.fail_after(float(self.options.http_timeout)):
                if not self._issuer_confirmed:
                    # the realm must call itself what we expect, or every token would be "not ours"
                    document = await self.keycloak.a_well_known()
                    if document.get("issuer") != self.options.realm_issuer:
                        raise KeySourceUnavailable(
                            f"realm {self.options.realm} names issuer {document.get('issuer')!r}, "
                            f"not {self.options.realm_issuer!r} (set issuer = … if its public URL differs)"
                        )
                    self._issuer_confirmed = True
                return await self.keycloak.a_certs()
        except trio.TooSlowError:
            raise KeySourceUnavailable(f"Keycloak did not answer within {float(self.options.http_timeout):g} s") from None
        except KeycloakError as exc:
            raise KeySourceUnavailable(f"Keycloak refused or is unreachable ({_describe(exc)})") from None
        except (TypeError, ValueError, AttributeError):
            raise KeySourceUnavailable("Keycloak answered with something that is not JSON metadata") from None

    async def after_verify(self, token: str, claims: Mapping[str, Any]) -> None:
        token_type = claims.get("typ")
        if token_type is not None and token_type != ACCESS_TOKEN_TYPE:
            raise TokenRejected(f"a {token_type!r} token is not an access token")
        if self.options.introspect:
            await self._introspect(token)

    async def _introspect(self, token: str) -> None:
        assert self.options.client_secret is not None  # options check
        try:
            secret = await trio.to_thread.run_sync(self.context.resolve_secret, self.options.client_secret)
        except Exception as exc:
            raise TokenRejected(f"introspection is impossible: cannot read client_secret ({exc})") from None
        try:
            with trio.fail_after(float(self.options.http_timeout)):
                # python-keycloak reads the secret when it builds the request, before its first
                # await, so setting it just before the call cannot mix up concurrent requests
                self.keycloak.client_secret_key = secret.reveal()
                try:
                    answer = await self.keycloak.a_introspect(token)
                finally:
                    self.keycloak.client_secret_key = None
        except trio.TooSlowError:
            raise TokenRejected("introspection did not answer in time") from None
        except KeycloakError as exc:
            raise TokenRejected(f"introspection failed ({_describe(exc)})") from None
        except (TypeError, ValueError):
            raise TokenRejected("introspection answered with something that is not JSON") from None
        if answer.get("active") is not True:
            raise TokenRejected("the issuer reports the token inactive (revoked, or its session ended)")

    async def aclose(self) -> None:
        await self.keycloak.connection.aclose()


def _describe(exc: KeycloakError) -> str:
    code = getattr(exc, "response_code", None)
    return f"HTTP {code}" if code else (getattr(exc, "error_message", "") or type(exc).__name__)


def make_provider(options: KeycloakOptions, context: ComponentContext) -> KeycloakProvider:
    return KeycloakProvider(options, context)


@hookimpl
def bastion_register_identity_providers() -> list[IdentityProviderSpec]:
    return [
        IdentityProviderSpec(
            kind="keycloak",
            factory=make_provider,
            options=KeycloakOptions,
            description="Keycloak access tokens (service accounts), roles and groups, optional introspection",
        )
    ]
