"""Who a message comes from: tenants, their broker accounts, and the rules
that tie a validated AMQP `user_id` to exactly one tenant (paas.md, Data
isolation).

    tenant name        2-32 of a-z 0-9 -, starting with a letter; not reserved
    broker account     stratus.<cluster>.<tenant>      (one per tenant and cluster)
    platform accounts  stratus-<component> (bus/broker_accounts.py), or the
                       account of an explicit STRATUS_AMQP_URL: those that
                       act for tenants have the broker's `impersonator` tag
                       and name the tenant in `user_id`; their own user_id
                       means the platform itself (tenant PLATFORM, the
                       platform's tables)

RabbitMQ validates `user_id` against the publishing connection's account
(406 PRECONDITION_FAILED otherwise), so a worker that maps the validated
user_id with `tenant_of` knows for certain which tenant sent a request. A
message without a user_id, or with one that maps to no tenant, is refused.

A tenant account may publish only to the cluster's request exchange and may
declare, read and delete only its own reply queues, whose names therefore
start with `responseQ.<tenant>.`: see `permissions`."""
from __future__ import annotations

import hashlib
import hmac
import re
import secrets

PLATFORM = "platform"
RESERVED = frozenset({"admin", "platform", "stratus"})
_TENANT_RE = re.compile(r"^[a-z][a-z0-9-]{1,31}$")


class InvalidName(ValueError):
    pass


def check_tenant_name(name) -> str:
    """A new tenant's (or developer's) name, or InvalidName with the reason."""
    if not isinstance(name, str) or not _TENANT_RE.fullmatch(name):
        raise InvalidName("a name is 2-32 characters of a-z, 0-9 and '-', starting with a letter")
    if name in RESERVED:
        raise InvalidName(f"{name!r} is reserved")
    return name


def is_tenant_name(name) -> bool:
    try:
        check_tenant_name(name)
    except InvalidName:
        return False
    return True


def broker_user(cluster: str, tenant: str) -> str:
    return f"stratus.{cluster}.{tenant}"


def platform_user(amqp_url: str) -> str:
    """The account of STRATUS_AMQP_URL (its first node's, with several: one account for all)."""
    from . import brokers
    return brokers.account_of(amqp_url)[0]


def platform_accounts(own: str) -> frozenset[str]:
    """The accounts whose user_id means the platform itself, for a worker
    whose own account is `own`: the platform's component accounts
    (bus/broker_accounts.py), and `own` (an explicit STRATUS_AMQP_URL's, as
    the Docker stack's). No tenant's account has such a name."""
    from .broker_accounts import PLATFORM_ACCOUNTS
    return PLATFORM_ACCOUNTS | {own} if own else PLATFORM_ACCOUNTS


def tenant_of(user_id: str | None, *, cluster: str, platform) -> str | None:
    """The tenant a validated user_id stands for: PLATFORM for the platform's
    own account (`platform`: one account's name, "" for none, or a set of
    them: platform_accounts), the tenant for its broker account, None for
    anything else."""
    if not user_id:
        return None
    if user_id == platform or (not isinstance(platform, str) and user_id in platform):
        return PLATFORM
    prefix = f"stratus.{cluster}."
    if user_id.startswith(prefix) and is_tenant_name(user_id[len(prefix):]):
        return user_id[len(prefix):]
    return None


# The built-in tenant whose end users log in with the platform's token
# service (platform.md, rideshare.md): their accounts are the rows of its
# table `users` (username, password = SHA-1 hex). The one place the platform
# names a tenant's table.
USER_DIRECTORY = ("rideshare", "users")


def permissions(names, tenant: str) -> dict[str, str]:
    """The broker permissions of a tenant account (regular expressions over
    object names, RabbitMQ's configure/write/read): its own reply queues, and
    publishing to the request exchange. Not the default exchange: through it
    a routing key reaches any queue, the replication stream included.

    Tasks (bus/tasks.py): its own task exchange `tasks.<tenant>` and its own
    task queues `tasks.<tenant>.<app>.<role>[.dead]`, to declare, bind,
    publish to and consume; nothing under another tenant's name (a tenant
    name has no '.', so the prefix `tasks.<tenant>.` is no other tenant's).
    Publishing to its own invalidation fanout `invalidate.<tenant>`."""
    own = "^" + re.escape(names.response_prefix + tenant + ".") + ".*"
    tasks = "^" + re.escape(names.task_exchange(tenant)) + r"(\..*)?$"
    mine = own + "|" + tasks
    notices = "|^" + re.escape(names.invalidate_exchange_of(tenant)) + "$"
    return {"configure": mine, "write": mine + notices + "|^" + re.escape(names.request_exchange) + "$",
            "read": mine}


# --- passwords ----------------------------------------------------------------
# scrypt (RFC 7914) from the standard library: n=2**14, r=8, p=1 takes about
# 30 ms and 16 MiB here, per attempt.
_N, _R, _P = 2 ** 14, 8, 1


def new_password() -> str:
    return secrets.token_urlsafe(18)


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=_N, r=_R, p=_P, dklen=32)
    return f"scrypt${_N}${_R}${_P}${salt.hex()}${digest.hex()}"


def check_password(password: str, stored: str) -> bool:
    """Constant-time comparison against a hash_password() string."""
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        got = hashlib.scrypt(password.encode(), salt=bytes.fromhex(salt), n=int(n), r=int(r), p=int(p),
                             dklen=len(digest) // 2)
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got.hex(), digest)
