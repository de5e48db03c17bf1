"""The token granting service: credentials in, a JSON Web Token out
(shared spec paas.md, Words; platform.md, Routes through the gateway).

    token   JWT, HS256 (PyJWT), signed with the gateway's secret as it is
            (STRATUS_TOKEN_SECRET, else $STRATUS_STATE_DIR/token-secret), so
            any JWT library reads it given the secret
    claims  exactly sub, role, iat, exp; plus tenant for the roles tenant
            and user
    roles   admin      username "admin", STRATUS_ADMIN_PASSWORD (else generated)
            tenant     a tenant's owner: a platform account of kind "tenant"
                       (bus.accounts); tenant = its name
            developer  a platform account of kind "developer"
            user       a RideShare user (RideShare's users table, read in the
                       tenant rideshare); tenant = "rideshare"

Credentials are tried in that order: admin, a platform account, a RideShare
user. A token is accepted only with alg HS256, a valid signature, every
required claim, an `exp` in the future and a known role (with its tenant);
anything else (alg none, HS512, an RS256 header, a tampered or expired token)
raises InvalidToken, which the gateway answers 401. When the bus cannot answer
a credentials check, ServiceUnavailable (503): never a refusal."""
from __future__ import annotations

import hmac
import logging
import threading
import time

import jwt

from bus import accounts, tenancy
from bus.tenancy import USER_DIRECTORY
from bus.errors import DBError, Timeout, Unavailable

from .config import GatewayConfig
from .secrets import load_or_create

log = logging.getLogger("stratus.gateway.tokens")

ROLES = ("admin", "developer", "tenant", "user")
TENANT_ROLES = ("tenant", "user")      # the roles whose tokens name a tenant
RIDESHARE, USERS = USER_DIRECTORY     # the tenant whose users log in here, and their table (bus.tenancy)
ALGORITHM = "HS256"
REQUIRED = ["sub", "role", "exp", "iat"]
MAX_TOKEN = 4096
_VERIFIED_MAX = 4096                   # verified tokens remembered (decoding costs ~35 µs)


class InvalidToken(Exception):
    pass


class ServiceUnavailable(Exception):
    """The credentials could not be checked now (the bus is down)."""


def issue(secret: str, subject: str, role: str, ttl: int, *, tenant: str | None = None,
          now: float | None = None) -> str:
    """A signed token with exactly the claims of paas.md."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}")
    if (role in TENANT_ROLES) != (tenant is not None):
        raise ValueError(f"the role {role} {'needs' if role in TENANT_ROLES else 'takes no'} tenant")
    now = int(time.time() if now is None else now)
    claims = {"sub": subject, "role": role, "iat": now, "exp": now + int(ttl)}
    if tenant is not None:
        claims["tenant"] = tenant
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def verify(secret: str, token: str) -> dict:
    """The token's claims; InvalidToken when it is not one this gateway issued
    and still valid."""
    if not token or len(token) > MAX_TOKEN:
        raise InvalidToken("malformed token")
    try:
        claims = jwt.decode(token, secret, algorithms=[ALGORITHM], options={"require": REQUIRED})
    except jwt.ExpiredSignatureError:
        raise InvalidToken("token expired") from None
    except jwt.InvalidTokenError:
        raise InvalidToken("invalid token") from None
    role, tenant = claims.get("role"), claims.get("tenant")
    if role not in ROLES or not isinstance(claims.get("sub"), str) or \
            (role in TENANT_ROLES and not (isinstance(tenant, str) and tenant)):
        raise InvalidToken("invalid token")
    return claims


def _platform_client(cfg: GatewayConfig):
    from bus.client import DBClient
    return DBClient(cfg.base, name="gateway-auth", connect_timeout=2.0)


class TokenService:
    """Checks credentials and issues tokens. Platform accounts and RideShare
    users are read through the bus, with the platform's own account; the
    admin's password comes from the settings or a generated secret."""

    def __init__(self, cfg: GatewayConfig, *, db_factory=_platform_client):
        self.cfg = cfg
        state = cfg.base.state_path
        try:
            self.secret = cfg.token_secret or load_or_create(state / "token-secret", nbytes=32)
            self.admin_password = cfg.admin_password or load_or_create(state / "admin-password")
        except OSError as exc:
            raise SystemExit(f"gateway: cannot keep generated secrets in {state} ({exc}); make STRATUS_STATE_DIR "
                             "writable, or set STRATUS_TOKEN_SECRET and STRATUS_ADMIN_PASSWORD") from None
        if len(self.secret.encode()) < 32:
            log.warning("STRATUS_TOKEN_SECRET is shorter than 32 bytes, the least RFC 7518 recommends for HS256")
        self._db_factory = db_factory
        self._db = None
        self._db_lock = threading.Lock()
        self._verified: dict[str, dict] = {}   # token -> claims, for tokens that verified

    # -- the bus client, made on first use ---------------------------------------
    def db(self):
        with self._db_lock:
            if self._db is None:
                self._db = self._db_factory(self.cfg)
            return self._db

    def close(self) -> None:
        with self._db_lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    # -- credentials --------------------------------------------------------------
    @staticmethod
    def _same(a: str, b: str) -> bool:
        return hmac.compare_digest(a.encode("utf-8", "surrogatepass"), b.encode("utf-8", "surrogatepass"))

    def authenticate(self, username: str, password: str, *, min_lsn: int = 0) -> tuple[str, str | None] | None:
        """(role, tenant or None) for these credentials, or None. Raises
        ServiceUnavailable when they cannot be checked now."""
        if username == "admin":
            return ("admin", None) if self._same(password, self.admin_password) else None
        if tenancy.is_tenant_name(username):   # only such names can be platform accounts
            acct = self._account(username, password)
            if acct is not None:
                return ("tenant", acct["name"]) if acct.get("kind") == "tenant" else ("developer", None)
        return ("user", RIDESHARE) if self._check_user(username, password, min_lsn) else None

    def _account(self, username: str, password: str) -> dict | None:
        try:
            return accounts.verify(self.db(), username, password)
        except DBError as exc:   # Unavailable, Timeout, or a worker that cannot answer now
            raise ServiceUnavailable(str(exc)) from None

    def _check_user(self, username: str, password: str, min_lsn: int) -> bool:
        query = {"op": "select", "table": USERS, "where": [["username", "=", username]]}
        try:
            rows = self.db().read(query, min_lsn=min_lsn or None, timeout=5.0, tenant=RIDESHARE).result
        except (Unavailable, Timeout) as exc:
            raise ServiceUnavailable(str(exc)) from None
        except DBError as exc:
            if exc.code in ("unknown_table", "unknown_column"):
                rows = []  # no users table yet: no such user
            else:
                raise ServiceUnavailable(str(exc)) from None
        stored = ""
        if isinstance(rows, list) and rows and isinstance(rows[0], dict):
            stored = str(rows[0].get("password") or "")
        # Compare even when there is no such user, so timing says nothing.
        match = self._same(password.lower(), (stored or "!" * 40).lower())
        return bool(stored) and match

    def grant(self, username: str, password: str, *, min_lsn: int = 0) -> dict | None:
        """{"token", "role", "expires_in"} for good credentials, else None."""
        found = self.authenticate(username, password, min_lsn=min_lsn)
        if found is None:
            return None
        role, tenant = found
        ttl = self.cfg.token_ttl
        return {"token": issue(self.secret, username, role, ttl, tenant=tenant), "role": role, "expires_in": ttl}

    def verify(self, token: str) -> dict:
        """The claims of a valid token (InvalidToken otherwise). Tokens that
        verified are remembered, so a client's next requests skip decoding;
        the expiry is still checked on every use."""
        claims = self._verified.get(token)
        if claims is not None:
            if claims["exp"] > time.time():
                return claims
            raise InvalidToken("token expired")
        claims = verify(self.secret, token)
        if len(self._verified) >= _VERIFIED_MAX:
            self._verified.clear()
        self._verified[token] = claims
        return claims
