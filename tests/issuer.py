"""A Keycloak-compatible OpenID Connect issuer served by the test suite, on 127.0.0.1.

It speaks enough of Keycloak's HTTP API for python-keycloak to use it unchanged:

- ``GET  /realms/<realm>/.well-known/openid-configuration``
- ``GET  /realms/<realm>/protocol/openid-connect/certs`` (a JWKS with an RSA and an EC key)
- ``POST /realms/<realm>/protocol/openid-connect/token`` (client_credentials grant: real RS256 or
  ES256 access tokens with Keycloak's claims: iss, aud, azp, sub, typ, exp, iat, jti,
  realm_access, resource_access, groups, preferred_username…)
- ``POST /realms/<realm>/protocol/openid-connect/token/introspect`` (RFC 7662, client auth)

plus a GitHub-Actions-shaped issuer at ``/github`` (discovery, ``/github/.well-known/jwks``, and
tokens with repository, ref, workflow, run_id…). It runs in a thread (``http.server``), so sync
code (python-keycloak's blocking calls) and trio code can both talk to it.

Test controls: :meth:`Authority.rotate_keys`, :meth:`Realm.revoke`, :meth:`TestIssuer.go_down` /
:meth:`TestIssuer.come_up` (answer 503, drop every connection unanswered, or stop listening so
connections are refused), request counts per
endpoint (:meth:`Authority.requests`), and :meth:`Authority.mint` for tokens shaped any way a test
needs (expired, wrong audience, unknown kid…).

Use the :func:`issuer` fixture, or :func:`running_issuer` as a context manager. The helpers at
the end (:func:`trio_test`, :class:`FakeClock`, :func:`component_context`) are shared by the
identity provider tests.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import json
import threading
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs

import attrs
import jwt
import pytest
import trio
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

# Keys are slow to generate (RSA especially); tests draw them from a pool shared by every issuer
# instance, so each test's issuer starts with key pair 0 and a rotation moves to the next one.
_KEY_POOL: dict[str, list[Any]] = {"RSA": [], "EC": []}
_KEY_POOL_LOCK = threading.Lock()
TEST_RSA_KEY_BITS = 2048  # the smallest size the providers accept
DEFAULT_TOKEN_LIFETIME = 300  # seconds; Keycloak's default access token lifespan
# how often the server thread looks for a shutdown request; the default half second would be paid
# by every test at teardown
SHUTDOWN_POLL_SECONDS = 0.02
CURRENT_KEY_ID = object()  # mint(): name the signing key's own kid in the header


def pooled_key(kind: str, index: int) -> Any:
    """The ``index``-th private key of ``kind`` ("RSA" or "EC" P-256), generated once per run."""
    with _KEY_POOL_LOCK:
        pool = _KEY_POOL[kind]
        while len(pool) <= index:
            if kind == "RSA":
                pool.append(rsa.generate_private_key(public_exponent=65537, key_size=TEST_RSA_KEY_BITS))
            else:
                pool.append(ec.generate_private_key(ec.SECP256R1()))
        return pool[index]


def key_id(public_key: Any) -> str:
    """A short, stable key id derived from the public key."""
    jwk = (RSAAlgorithm if isinstance(public_key, rsa.RSAPublicKey) else ECAlgorithm).to_jwk(public_key, as_dict=True)
    material = "|".join(str(jwk[k]) for k in sorted(jwk))
    return base64.urlsafe_b64encode(hashlib.sha256(material.encode()).digest()[:12]).decode().rstrip("=")


def public_jwk(private_key: Any, alg: str) -> dict[str, Any]:
    public = private_key.public_key()
    algorithm = RSAAlgorithm if alg.startswith(("RS", "PS")) else ECAlgorithm
    jwk = algorithm.to_jwk(public, as_dict=True)
    jwk.update({"kid": key_id(public), "use": "sig", "alg": alg})
    return jwk


@attrs.frozen
class SigningKey:
    alg: str
    private_key: Any = attrs.field(repr=False)

    @property
    def kid(self) -> str:
        return key_id(self.private_key.public_key())

    @property
    def jwk(self) -> dict[str, Any]:
        return public_jwk(self.private_key, self.alg)


class Authority:
    """Keys, token minting and request counts shared by the Keycloak realm and the GitHub issuer."""

    def __init__(self, issuer_url: str) -> None:
        self.issuer_url = issuer_url
        self.generation = 0
        self.retained: list[SigningKey] = []  # keys still published after a rotation
        self.counts: Counter[str] = Counter()
        self.lock = threading.Lock()

    # --- keys ---

    @property
    def rsa_key(self) -> SigningKey:
        return SigningKey("RS256", pooled_key("RSA", self.generation))

    @property
    def ec_key(self) -> SigningKey:
        return SigningKey("ES256", pooled_key("EC", self.generation))

    def signing_key(self, alg: str) -> SigningKey:
        return self.rsa_key if alg == "RS256" else self.ec_key

    def published_keys(self) -> list[SigningKey]:
        with self.lock:
            return [self.rsa_key, self.ec_key, *self.retained]

    def jwks(self) -> dict[str, Any]:
        return {"keys": [key.jwk for key in self.published_keys()]}

    def rotate_keys(self, *, keep_old: bool = False) -> None:
        """Switch to fresh keys; the old ones stay published only with ``keep_old``."""
        with self.lock:
            old = [self.rsa_key, self.ec_key]
            self.generation += 1
            self.retained = [*self.retained, *old] if keep_old else []

    # --- tokens ---

    def mint(
        self,
        claims: Mapping[str, Any] | None = None,
        *,
        alg: str = "RS256",
        kid: str | None | object = CURRENT_KEY_ID,
        headers: Mapping[str, Any] | None = None,
        lifetime: int = DEFAULT_TOKEN_LIFETIME,
        drop: tuple[str, ...] = (),
        private_key: Any = None,
    ) -> str:
        """A token signed with the current key for ``alg`` (or ``private_key``).

        ``claims`` are laid over the defaults (iss, iat, exp, jti); ``drop`` removes claims; ``kid``
        overrides the header's key id (None leaves it out).
        """
        now = int(time.time())
        payload: dict[str, Any] = {"iss": self.issuer_url, "iat": now, "exp": now + lifetime, "jti": str(uuid.uuid4())}
        payload.update(claims or {})
        for name in drop:
            payload.pop(name, None)
        key = self.signing_key(alg)
        header: dict[str, Any] = {"kid": key.kid if kid is CURRENT_KEY_ID else kid}
        if header["kid"] is None:
            del header["kid"]
        header.update(headers or {})
        return jwt.encode(payload, private_key or key.private_key, algorithm=alg, headers=header)

    def decode(self, token: str) -> dict[str, Any] | None:
        """The claims of a token this authority signed with a published key and that has not expired."""
        try:
            kid = jwt.get_unverified_header(token).get("kid")
        except jwt.PyJWTError:
            return None
        for key in self.published_keys():
            if key.kid == kid:
                try:
                    return jwt.decode(
                        token, key.private_key.public_key(), algorithms=[key.alg], options={"verify_aud": False}, issuer=self.issuer_url
                    )
                except jwt.PyJWTError:
                    return None
        return None

    def count(self, endpoint: str) -> None:
        with self.lock:
            self.counts[endpoint] += 1

    def requests(self, endpoint: str) -> int:
        """How many requests ``endpoint`` ("discovery", "certs", "token", "introspect") has had."""
        with self.lock:
            return self.counts[endpoint]


@attrs.frozen
class Client:
    """A Keycloak client; its service account is what a token from the client_credentials grant names."""

    client_id: str
    secret: str
    audience: tuple[str, ...] = ()
    realm_roles: tuple[str, ...] = ()
    client_roles: Mapping[str, tuple[str, ...]] = attrs.field(factory=dict)
    groups: tuple[str, ...] = ()
    alg: str = "RS256"

    @property
    def service_account_id(self) -> str:
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"service-account:{self.client_id}"))


class Realm(Authority):
    """A Keycloak realm: clients, their service accounts, revocation."""

    def __init__(self, issuer_url: str, name: str) -> None:
        super().__init__(issuer_url)
        self.name = name
        self.clients: dict[str, Client] = {}
        self.revoked: set[str] = set()

    def add_client(self, client_id: str, secret: str = "", **settings: Any) -> Client:
        client = Client(client_id, secret or f"{client_id}-secret", **settings)
        with self.lock:
            self.clients[client_id] = client
        return client

    def revoke(self, token_or_jti: str) -> None:
        """Revoke a token (by its text or its jti): introspection reports it inactive from now on."""
        jti = token_or_jti
        if token_or_jti.count(".") == 2:
            jti = jwt.decode(token_or_jti, options={"verify_signature": False})["jti"]
        with self.lock:
            self.revoked.add(jti)

    def access_token_claims(self, client: Client) -> dict[str, Any]:
        audience: str | list[str] = list(client.audience)
        if len(client.audience) == 1:  # Keycloak writes a single audience as a string
            audience = client.audience[0]
        claims: dict[str, Any] = {
            "aud": audience,
            "sub": client.service_account_id,
            "typ": "Bearer",
            "azp": client.client_id,
            "acr": "1",
            "scope": "profile email",
            "clientId": client.client_id,
            "clientHost": "127.0.0.1",
            "preferred_username": f"service-account-{client.client_id}",
            "email_verified": False,
            "realm_access": {"roles": list(client.realm_roles)},
            "resource_access": {name: {"roles": list(roles)} for name, roles in client.client_roles.items()},
        }
        if client.groups:
            claims["groups"] = list(client.groups)
        if not client.audience:
            del claims["aud"]
        return claims

    def token_for(self, client_id: str, **mint_options: Any) -> str:
        """An access token for ``client_id`` as the token endpoint would issue it."""
        client = self.clients[client_id]
        extra = mint_options.pop("claims", {})
        return self.mint({**self.access_token_claims(client), **extra}, alg=mint_options.pop("alg", client.alg), **mint_options)

    def introspect(self, token: str) -> dict[str, Any]:
        claims = self.decode(token)
        if claims is None or claims.get("jti") in self.revoked:
            return {"active": False}
        return {**claims, "active": True, "client_id": claims.get("azp"), "username": claims.get("preferred_username"), "token_type": "Bearer"}

    def discovery(self) -> dict[str, Any]:
        base = f"{self.issuer_url}/protocol/openid-connect"
        return {
            "issuer": self.issuer_url,
            "authorization_endpoint": f"{base}/auth",
            "token_endpoint": f"{base}/token",
            "introspection_endpoint": f"{base}/token/introspect",
            "userinfo_endpoint": f"{base}/userinfo",
            "end_session_endpoint": f"{base}/logout",
            "jwks_uri": f"{base}/certs",
            "grant_types_supported": ["client_credentials", "authorization_code", "refresh_token"],
            "response_types_supported": ["code"],
            "subject_types_supported": ["public", "pairwise"],
            "id_token_signing_alg_values_supported": ["RS256", "ES256"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
            "introspection_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
        }


class GitHubActionsIssuer(Authority):
    """Tokens shaped like GitHub Actions' (``token.actions.githubusercontent.com``)."""

    def discovery(self) -> dict[str, Any]:
        return {
            "issuer": self.issuer_url,
            "jwks_uri": f"{self.issuer_url}/.well-known/jwks",
            "subject_types_supported": ["public", "pairwise"],
            "response_types_supported": ["id_token"],
            "claims_supported": ["sub", "aud", "exp", "iat", "iss", "jti", "nbf", "ref", "repository", "run_id", "workflow"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "scopes_supported": ["openid"],
        }

    def workflow_token(
        self,
        *,
        audience: str,
        repository: str = "acme/clinic-etl",
        ref: str = "refs/heads/main",
        workflow: str = "nightly-export",
        run_id: str = "1234567890",
        **overrides: Any,
    ) -> str:
        owner = repository.split("/", 1)[0]
        now = int(time.time())
        claims = {
            "aud": audience,
            "sub": f"repo:{repository}:ref:{ref}",
            "nbf": now - 5,
            "ref": ref,
            "ref_type": "branch",
            "sha": "0123456789abcdef0123456789abcdef01234567",
            "repository": repository,
            "repository_owner": owner,
            "repository_id": "424242",
            "run_id": run_id,
            "run_number": "17",
            "run_attempt": "1",
            "actor": "release-bot",
            "workflow": workflow,
            "workflow_ref": f"{repository}/.github/workflows/{workflow}.yml@{ref}",
            "job_workflow_ref": f"{repository}/.github/workflows/{workflow}.yml@{ref}",
            "event_name": "schedule",
            "runner_environment": "github-hosted",
        }
        claims.update(overrides)
        return self.mint(claims)


# --- the HTTP server ------------------------------------------------------------------------------

DOWN_503 = "503"  # answer every request with 503 Service Unavailable
DOWN_DROP = "drop"  # accept connections, then close them without answering
DOWN_REFUSE = "refuse"  # stop listening (connection refused); open connections are dropped


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        issuer = self.server.issuer
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        route = issuer.route(method, self.path.split("?", 1)[0])
        if route is not None:
            route[0].count(route[1])
        if issuer.down_mode in (DOWN_DROP, DOWN_REFUSE):
            self.close_connection = True
            return
        if issuer.down_mode == DOWN_503:
            self._send(503, {"error": "temporarily_unavailable"})
            return
        if route is None:
            self._send(404, {"error": "not found"})
            return
        authority, endpoint = route
        form = {k: v[0] for k, v in parse_qs(body.decode()).items()}
        status, answer = issuer.answer(authority, endpoint, form, self.headers.get("Authorization"))
        self._send(status, answer)

    def _send(self, status: int, document: Any) -> None:
        body = json.dumps(document).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    issuer: TestIssuer


class TestIssuer:
    """The running issuer: ``realm(name)`` for Keycloak realms, ``github`` for the Actions issuer."""

    __test__ = False  # not a test class, whatever pytest thinks of its name

    def __init__(self) -> None:
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._listen(0)
        assert self._server is not None
        host, port = self._server.server_address[:2]
        self.port = port
        self.base_url = f"http://{host}:{port}"
        self.realms: dict[str, Realm] = {}
        self.github = GitHubActionsIssuer(f"{self.base_url}/github")
        self.down_mode: str | None = None

    def _listen(self, port: int) -> None:
        server = _Server(("127.0.0.1", port), _Handler)
        server.issuer = self
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": SHUTDOWN_POLL_SECONDS}, name="test-issuer", daemon=True
        )
        self._server = server
        self._thread.start()

    def stop(self) -> None:
        """Stop listening; the port is refused until :meth:`come_up` (or for good)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            assert self._thread is not None
            self._thread.join()
            self._server = self._thread = None

    def realm(self, name: str = "clinic") -> Realm:
        """The realm called ``name``, created on first use."""
        if name not in self.realms:
            self.realms[name] = Realm(f"{self.base_url}/realms/{name}", name)
        return self.realms[name]

    def go_down(self, mode: str = DOWN_503) -> None:
        """Fail every request from now on: ``DOWN_503``, ``DOWN_DROP`` or ``DOWN_REFUSE``."""
        self.down_mode = mode
        if mode == DOWN_REFUSE:
            self.stop()

    def come_up(self) -> None:
        """Serve normally again (listening on the same port after ``DOWN_REFUSE``)."""
        if self._server is None:
            self._listen(self.port)
        self.down_mode = None

    def route(self, method: str, path: str) -> tuple[Authority, str] | None:
        if path.startswith("/github/"):
            endpoint = {"/github/.well-known/openid-configuration": "discovery", "/github/.well-known/jwks": "certs"}.get(path)
            return (self.github, endpoint) if endpoint and method == "GET" else None
        parts = path.strip("/").split("/")
        if len(parts) < 3 or parts[0] != "realms" or parts[1] not in self.realms:
            return None
        rest = "/".join(parts[2:])
        endpoint = {
            ("GET", ".well-known/openid-configuration"): "discovery",
            ("GET", "protocol/openid-connect/certs"): "certs",
            ("POST", "protocol/openid-connect/token"): "token",
            ("POST", "protocol/openid-connect/token/introspect"): "introspect",
        }.get((method, rest))
        return (self.realms[parts[1]], endpoint) if endpoint else None

    def answer(self, authority: Authority, endpoint: str, form: dict[str, str], authorization: str | None) -> tuple[int, Any]:
        if endpoint == "discovery":
            return 200, authority.discovery()  # type: ignore[attr-defined]
        if endpoint == "certs":
            return 200, authority.jwks()
        assert isinstance(authority, Realm)
        client = self._authenticate_client(authority, form, authorization)
        if client is None:
            return 401, {"error": "unauthorized_client", "error_description": "Invalid client or Invalid client credentials"}
        if endpoint == "token":
            if form.get("grant_type") != "client_credentials":
                return 400, {"error": "unsupported_grant_type"}
            token = authority.token_for(client.client_id)
            return 200, {
                "access_token": token,
                "expires_in": DEFAULT_TOKEN_LIFETIME,
                "refresh_expires_in": 0,
                "token_type": "Bearer",
                "not-before-policy": 0,
                "scope": "profile email",
            }
        return 200, authority.introspect(form.get("token", ""))

    @staticmethod
    def _authenticate_client(realm: Realm, form: dict[str, str], authorization: str | None) -> Client | None:
        client_id, secret = form.get("client_id"), form.get("client_secret")
        if authorization and authorization.startswith("Basic "):
            client_id, _, secret = base64.b64decode(authorization[6:]).decode().partition(":")
        client = realm.clients.get(client_id or "")
        if client is None or not secret or secret != client.secret:
            return None
        return client


@contextlib.contextmanager
def running_issuer() -> Iterator[TestIssuer]:
    """Serve a fresh issuer on a free port of 127.0.0.1 until the block ends."""
    issuer = TestIssuer()
    try:
        yield issuer
    finally:
        issuer.stop()


@pytest.fixture
def issuer() -> Iterator[TestIssuer]:
    """A fresh :class:`TestIssuer` per test (keys come from a shared pool, so this is cheap)."""
    with running_issuer() as running:
        yield running


# --- helpers for identity provider tests ------------------------------------------------------------

# Every test that touches the network runs under this absolute deadline: a hung fetch fails the
# test instead of stalling the run. Generous, because it is a safety net, not an assertion.
TEST_DEADLINE_SECONDS = 20


def trio_test(fn: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    """Run an async test function under trio with an absolute deadline (pytest fixtures still work)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        async def main() -> None:
            with trio.fail_after(TEST_DEADLINE_SECONDS):
                await fn(*args, **kwargs)

        trio.run(main)

    return wrapper


class FakeClock:
    """A monotonic clock tests move by hand, for cache lifetimes and refetch rate limits."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def component_context(name: str, directory: Path | None = None) -> Any:
    """A :class:`~bastion.core.specs.ComponentContext` resolving secrets the way core does."""
    from bastion.core.secrets import resolve
    from bastion.core.specs import ComponentContext

    directory = directory or Path.cwd()
    return ComponentContext(name=name, state_dir=directory, config_dir=directory, resolve_secret=resolve)
