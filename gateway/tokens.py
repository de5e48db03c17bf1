"""The token granting service: credentials in, an HMAC-SHA256 signed token
out. A token is `base64url(payload).base64url(signature)`; the payload is
JSON {"sub", "role", "iat", "exp"}. Signatures are compared in constant time;
an expired or altered token is refused."""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import threading
import time

from bus.errors import DBError, Timeout, Unavailable

from .config import GatewayConfig
from .secrets import load_or_create

log = logging.getLogger("stratus.gateway.tokens")

ROLES = ("user", "admin", "tenant")


def _b64e(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _b64d(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class InvalidToken(Exception):
    pass


class ServiceUnavailable(Exception):
    """The credentials could not be checked now (the bus is down)."""


class Signer:
    def __init__(self, secret: str):
        self._key = hashlib.sha256(b"stratus-token:" + secret.encode()).digest()

    def _sig(self, payload: bytes) -> bytes:
        return hmac.new(self._key, payload, hashlib.sha256).digest()

    def issue(self, subject: str, role: str, ttl: int, *, now: float | None = None) -> str:
        now = time.time() if now is None else now
        body = json.dumps({"sub": subject, "role": role, "iat": int(now), "exp": int(now) + int(ttl)},
                          separators=(",", ":")).encode()
        return f"{_b64e(body)}.{_b64e(self._sig(body))}"

    def verify(self, token: str, *, now: float | None = None) -> dict:
        """The token's claims; raises InvalidToken when it is malformed,
        tampered with or expired."""
        if not token or len(token) > 4096 or token.count(".") != 1:
            raise InvalidToken("malformed token")
        body_part, sig_part = token.split(".")
        try:
            body, sig = _b64d(body_part), _b64d(sig_part)
        except (ValueError, TypeError):
            raise InvalidToken("malformed token") from None
        if not hmac.compare_digest(sig, self._sig(body)):
            raise InvalidToken("bad signature")
        try:
            claims = json.loads(body)
        except ValueError:
            raise InvalidToken("malformed token") from None
        if not isinstance(claims, dict) or claims.get("role") not in ROLES or not isinstance(claims.get("exp"), int):
            raise InvalidToken("malformed token")
        if claims["exp"] <= (time.time() if now is None else now):
            raise InvalidToken("token expired")
        return claims


def _users_client(cfg: GatewayConfig):
    from bus.client import DBClient
    return DBClient(cfg.base, name="gateway-auth", connect_timeout=2.0)


class TokenService:
    """Checks credentials and issues tokens. RideShare users are read from
    the `users` table through the bus; the admin and the optional tenant
    account come from settings or generated secrets."""

    def __init__(self, cfg: GatewayConfig, *, db_factory=_users_client):
        self.cfg = cfg
        state = cfg.base.state_path
        try:
            self.signer = Signer(cfg.token_secret or load_or_create(state / "token-secret", nbytes=32))
            self.admin_password = cfg.admin_password or load_or_create(state / "admin-password")
        except OSError as exc:
            raise SystemExit(f"gateway: cannot keep generated secrets in {state} ({exc}); make STRATUS_STATE_DIR "
                             "writable, or set STRATUS_TOKEN_SECRET and STRATUS_ADMIN_PASSWORD") from None
        self._db_factory = db_factory
        self._db = None
        self._db_lock = threading.Lock()

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

    def authenticate(self, username: str, password: str, *, min_lsn: int = 0) -> str | None:
        """The role these credentials grant, or None. Raises
        ServiceUnavailable when the users table cannot be read now."""
        if username == "admin":
            return "admin" if self._same(password, self.admin_password) else None
        if self.cfg.tenant_username and username == self.cfg.tenant_username:
            ok = bool(self.cfg.tenant_password) and self._same(password, self.cfg.tenant_password)
            return "tenant" if ok else None
        return "user" if self._check_user(username, password, min_lsn) else None

    def _check_user(self, username: str, password: str, min_lsn: int) -> bool:
        query = {"op": "select", "table": "users", "where": [["username", "=", username]]}
        try:
            rows = self.db().read(query, min_lsn=min_lsn or None, timeout=5.0).result
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
        role = self.authenticate(username, password, min_lsn=min_lsn)
        if role is None:
            return None
        ttl = self.cfg.token_ttl
        return {"token": self.signer.issue(username, role, ttl), "role": role, "expires_in": ttl}

    def verify(self, token: str) -> dict:
        return self.signer.verify(token)
