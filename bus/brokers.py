"""The broker nodes named by STRATUS_AMQP_URL.

Contract: STRATUS_AMQP_URL holds one AMQP URL, or several separated by commas,
one per node of a RabbitMQ cluster (scripts/services.sh prints them for
STRATUS_BROKER_NODES > 1):

    amqp://stratus-worker:PW@127.0.0.1:5672/%2F,amqp://stratus-worker:PW@127.0.0.1:5673/%2F

Unset, it is the component's own account, read from the secrets directory
(bus/settings.py default_amqp_url, bus/broker_accounts.py); when that cannot be
read the value is empty and `amqp_urls` reports why.

Every URL names the same account and virtual host; the first URL's account
and vhost are the ones that count (`account_of`), the others only add nodes.
Clients try the nodes in turn (bus/client.py connection_params). Code that
reads the account, the vhost or the host out of STRATUS_AMQP_URL must take
them from `first_url`, and code that hands the address to someone else with
another account (a tenant's instances) must rewrite every URL (`with_account`),
never the first one alone: the rest would carry the platform's password.

STRATUS_AMQP_MANAGEMENT_URL names the same nodes' management HTTP APIs
(bus/broker_admin.py): one base URL, or several separated by commas, one per
node, tried in turn (`management_urls`):

    http://127.0.0.1:15672,http://127.0.0.1:15673,http://127.0.0.1:15674

Unset (or empty), it is derived from STRATUS_AMQP_URL
(`default_management_url`): with one AMQP URL, http://127.0.0.1:15672 (the
local node, as always: tests put a proxy in STRATUS_AMQP_URL); with several,
one base per node, the node's host and its AMQP port + 10000 (RabbitMQ's own
5672/15672 pairing, and scripts/services.sh's layout), https for amqps.
The platform's account authenticates the calls, so a management URL carries
no credentials: one that does is refused.

No imports from the rest of bus/, so any module may use it."""
from __future__ import annotations

import urllib.parse


_missing_account = ""


def missing_account(reason: str) -> None:
    """Why STRATUS_AMQP_URL's default is empty (bus/settings.py): the error
    an empty value raises here."""
    global _missing_account
    _missing_account = reason


def amqp_urls(value: str) -> list[str]:
    """The URLs in `value`, in order, blanks dropped. ValueError when none,
    or when one is not an amqp:// or amqps:// URL with a host."""
    urls = [u.strip() for u in (value or "").split(",") if u.strip()]
    if not urls:
        raise ValueError(_missing_account if not (value or "").strip(", ") and _missing_account
                         else "STRATUS_AMQP_URL holds no URL")
    for u in urls:
        p = urllib.parse.urlparse(u)
        if p.scheme not in ("amqp", "amqps") or not p.hostname:
            raise ValueError(f"STRATUS_AMQP_URL: {_safe(u)!r} is not an amqp:// URL with a host")
        try:
            p.port
        except ValueError:
            raise ValueError(f"STRATUS_AMQP_URL: {_safe(u)!r} has a malformed port") from None
    return urls


def first_url(value: str) -> str:
    """The first node's URL: the one to parse for the account and vhost."""
    return amqp_urls(value)[0]


def account_of(value: str) -> tuple[str, str, str]:
    """(user, password, vhost) of the first URL ("" for what is absent, "/" for the vhost)."""
    p = urllib.parse.urlparse(first_url(value))
    vhost = urllib.parse.unquote(p.path[1:]) if p.path not in ("", "/") else "/"
    return urllib.parse.unquote(p.username or ""), urllib.parse.unquote(p.password or ""), vhost


def with_account(value: str, user: str, password: str) -> str:
    """`value` with every URL's credentials replaced by user:password (the
    nodes, vhost and query kept), comma-separated again."""
    cred = f"{urllib.parse.quote(user, safe='')}:{urllib.parse.quote(password, safe='')}"
    out = []
    for u in amqp_urls(value):
        p = urllib.parse.urlparse(u)
        host = p.hostname or "127.0.0.1"
        if ":" in host:   # an IPv6 literal
            host = f"[{host}]"
        out.append(urllib.parse.urlunparse(p._replace(netloc=f"{cred}@{host}" + (f":{p.port}" if p.port else ""))))
    return ",".join(out)


def nodes(value: str) -> list[tuple[str, int]]:
    """(host, port) of every URL (5672, or 5671 for amqps, when absent)."""
    out = []
    for u in amqp_urls(value):
        p = urllib.parse.urlparse(u)
        out.append((p.hostname or "127.0.0.1", p.port or (5671 if p.scheme == "amqps" else 5672)))
    return out


DEFAULT_MANAGEMENT_URL = "http://127.0.0.1:15672"


def management_urls(value: str, amqp_url: str = "") -> list[str]:
    """The management API base URLs in `value` (STRATUS_AMQP_MANAGEMENT_URL),
    in order, blanks and trailing slashes dropped, duplicates kept once; when
    `value` is empty, the default derived from `amqp_url`. ValueError when one
    is not an http:// or https:// URL with a host, has a malformed port, or
    carries credentials (the message never shows them)."""
    if not (value or "").strip(","):
        value = default_management_url(amqp_url)
    out: list[str] = []
    for u in (x.strip().rstrip("/") for x in value.split(",")):
        if not u:
            continue
        p = urllib.parse.urlparse(u)
        if p.scheme not in ("http", "https") or not p.hostname:
            raise ValueError(f"STRATUS_AMQP_MANAGEMENT_URL: {_safe_http(u)!r} is not an http:// URL with a host")
        if "@" in p.netloc:
            raise ValueError(f"STRATUS_AMQP_MANAGEMENT_URL: {_safe_http(u)!r} carries credentials "
                             "(the platform's account in STRATUS_AMQP_URL is used)")
        try:
            p.port
        except ValueError:
            raise ValueError(f"STRATUS_AMQP_MANAGEMENT_URL: {_safe_http(u)!r} has a malformed port") from None
        if p.query or p.fragment:
            raise ValueError(f"STRATUS_AMQP_MANAGEMENT_URL: {u!r} has a query or fragment")
        if u not in out:
            out.append(u)
    if not out:
        raise ValueError("STRATUS_AMQP_MANAGEMENT_URL holds no URL")
    return out


def default_management_url(amqp_url: str) -> str:
    """STRATUS_AMQP_MANAGEMENT_URL's default for STRATUS_AMQP_URL = amqp_url:
    http://127.0.0.1:15672 for one node (or a malformed list: the error is
    STRATUS_AMQP_URL's to report), else one base per node at its AMQP port + 10000."""
    try:
        urls = amqp_urls(amqp_url)
    except ValueError:
        return DEFAULT_MANAGEMENT_URL
    if len(urls) == 1:
        return DEFAULT_MANAGEMENT_URL
    out = []
    for u in urls:
        p = urllib.parse.urlparse(u)
        host = p.hostname or "127.0.0.1"
        if ":" in host:   # an IPv6 literal
            host = f"[{host}]"
        tls = p.scheme == "amqps"
        port = (p.port or (5671 if tls else 5672)) + 10000
        out.append(f"{'https' if tls else 'http'}://{host}:{port}")
    return ",".join(out)


def _safe_http(url: str) -> str:
    """An http URL without its user information, for messages."""
    p = urllib.parse.urlparse(url)
    if "@" not in p.netloc:
        return url
    return urllib.parse.urlunparse(p._replace(netloc="***@" + p.netloc.rpartition("@")[2]))


def _safe(url: str) -> str:
    """A URL without its password, for messages."""
    p = urllib.parse.urlparse(url)
    if p.password is None:
        return url
    return url.replace(f":{p.password}@", ":***@", 1)
