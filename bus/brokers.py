"""The broker nodes named by STRATUS_AMQP_URL.

Contract: STRATUS_AMQP_URL holds one AMQP URL, or several separated by commas,
one per node of a RabbitMQ cluster (scripts/services.sh prints them for
STRATUS_BROKER_NODES > 1):

    amqp://guest:guest@127.0.0.1:5672/%2F,amqp://guest:guest@127.0.0.1:5673/%2F

Every URL names the same account and virtual host; the first URL's account
and vhost are the ones that count (`account_of`), the others only add nodes.
Clients try the nodes in turn (bus/client.py connection_params). Code that
reads the account, the vhost or the host out of STRATUS_AMQP_URL must take
them from `first_url`, and code that hands the address to someone else with
another account (a tenant's instances) must rewrite every URL (`with_account`),
never the first one alone: the rest would carry the platform's password.

No imports from the rest of bus/, so any module may use it."""
from __future__ import annotations

import urllib.parse


def amqp_urls(value: str) -> list[str]:
    """The URLs in `value`, in order, blanks dropped. ValueError when none,
    or when one is not an amqp:// or amqps:// URL with a host."""
    urls = [u.strip() for u in (value or "").split(",") if u.strip()]
    if not urls:
        raise ValueError("STRATUS_AMQP_URL holds no URL")
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
    """(user, password, vhost) of the first URL (guest/guest and "/" when absent)."""
    p = urllib.parse.urlparse(first_url(value))
    vhost = urllib.parse.unquote(p.path[1:]) if p.path not in ("", "/") else "/"
    return urllib.parse.unquote(p.username or "guest"), urllib.parse.unquote(p.password or "guest"), vhost


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


def _safe(url: str) -> str:
    """A URL without its password, for messages."""
    p = urllib.parse.urlparse(url)
    if p.password is None:
        return url
    return url.replace(f":{p.password}@", ":***@", 1)
