"""bus/broker_accounts.py: the account files and the definitions that
scripts/services.sh imports (the broker side is tests/integration/test_broker_accounts.py)."""
from __future__ import annotations

import base64
import hashlib
import re
import stat

from bus import brokers, settings, tenancy
from bus.broker_accounts import ACCOUNTS, COMPONENTS, PLATFORM_ACCOUNTS, bootstrap, rabbit_hash, url_file

ONE = "amqp://127.0.0.1:5672/%2F"
THREE = "amqp://127.0.0.1:5780/%2F,amqp://127.0.0.1:5781/%2F,amqp://127.0.0.1:5782/%2F"


def test_files_are_private_and_passwords_kept_across_starts(tmp_path):
    d = tmp_path / "secrets"
    defs = bootstrap(d, ONE)
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    first = {c: url_file(d, c).read_text().strip() for c in COMPONENTS}
    for c, url in first.items():
        assert stat.S_IMODE(url_file(d, c).stat().st_mode) == 0o600
        user, password, vhost = brokers.account_of(url)
        assert (user, vhost) == (f"stratus-{c}", "/") and len(password) >= 24
    assert len({brokers.account_of(u)[1] for u in first.values()}) == len(COMPONENTS)   # one password each
    assert {u["name"] for u in defs["users"]} == PLATFORM_ACCOUNTS and "guest" not in str(defs)
    # Again, now with three nodes: same passwords, every node in the URL.
    bootstrap(d, THREE)
    for c in COMPONENTS:
        url = url_file(d, c).read_text().strip()
        assert brokers.account_of(url)[:2] == brokers.account_of(first[c])[:2]
        assert [p for _, p in brokers.nodes(url)] == [5780, 5781, 5782]
    # A file of another account (or unreadable) gets a new password.
    url_file(d, "worker").write_text("amqp://someone:else@127.0.0.1/%2F\n")
    bootstrap(d, ONE)
    user, password, _ = brokers.account_of(url_file(d, "worker").read_text())
    assert user == "stratus-worker" and password != "else"


def test_definitions_hold_hashes_rabbitmq_checks(tmp_path):
    defs = bootstrap(tmp_path, ONE)
    for u in defs["users"]:
        comp = u["name"].removeprefix("stratus-")
        password = brokers.account_of(url_file(tmp_path, comp).read_text())[1]
        assert password not in str(defs)
        raw = base64.b64decode(u["password_hash"])
        salt, digest = raw[:4], raw[4:]
        assert digest == hashlib.sha256(salt + password.encode()).digest()
        assert u["hashing_algorithm"] == "rabbit_password_hashing_sha256"
    assert rabbit_hash("x") != rabbit_hash("x")   # salted


def test_least_privilege_regexes():
    def may(comp, kind, name):
        i = {"configure": 1, "write": 2, "read": 3}[kind]
        return re.search(ACCOUNTS[comp][i], name) is not None
    c = "stratus.my.cluster."
    # The worker: the request queues, the log, the default exchange (replies).
    for name in ("readQ", "writeQ", "readQ.master", "syncQ.log", "snapshotQ", "deadQ"):
        assert may("worker", "read", c + name) and may("worker", "configure", c + name)
    assert may("worker", "write", c + "syncQ") and may("worker", "write", "amq.default")
    assert not may("worker", "read", c + "responseQ.acme.x") and not may("worker", "read", c + "tasks.acme")
    # The gateway: no log, no log exchange, no default exchange; its replies.
    assert not may("gateway", "read", c + "syncQ.log") and not may("gateway", "write", c + "syncQ")
    assert not may("gateway", "write", "amq.default")
    assert may("gateway", "write", c + "requests") and may("gateway", "read", c + "responseQ.platform.gw.1")
    assert may("gateway", "read", "amq.gen-abc") and may("gateway", "read", c + "invalidate.toystore")
    assert "administrator" not in ACCOUNTS["worker"][0] + ACCOUNTS["gateway"][0]


def test_platform_accounts_act_as_the_platform_and_tenants_never(monkeypatch):
    own = tenancy.platform_accounts("guest-of-docker")
    assert tenancy.tenant_of("stratus-orchestrator", cluster="c", platform=own) == tenancy.PLATFORM
    assert tenancy.tenant_of("guest-of-docker", cluster="c", platform=own) == tenancy.PLATFORM
    assert tenancy.tenant_of("stratus.c.acme", cluster="c", platform=own) == "acme"
    assert tenancy.tenant_of("stratus-nobody", cluster="c", platform=own) is None
    # A client on a platform account is the platform's (it may name tenants).
    assert tenancy.tenant_of("stratus-gateway", cluster="c", platform="") is None


def test_the_component_picks_its_file(tmp_path, monkeypatch):
    bootstrap(tmp_path, ONE)
    monkeypatch.delenv("STRATUS_AMQP_URL", raising=False)
    monkeypatch.delenv("STRATUS_COMPONENT", raising=False)
    monkeypatch.setenv("STRATUS_SECRETS_DIR", str(tmp_path))
    monkeypatch.setattr(settings, "_component", None)
    assert tenancy.platform_user(settings.load().amqp_url) == "stratus-admin"   # tools and tests
    monkeypatch.setenv("STRATUS_COMPONENT", "gateway")
    assert tenancy.platform_user(settings.load().amqp_url) == "stratus-gateway"
    settings.set_component("worker")   # an entry point's own word wins over an inherited variable
    assert tenancy.platform_user(settings.load().amqp_url) == "stratus-worker"
    settings.set_component("dashboard")   # no account, and no error until one is used
    assert settings.load().amqp_url == ""
    monkeypatch.setenv("STRATUS_AMQP_URL", "amqp://a:b@h/%2F")
    assert settings.load().amqp_url == "amqp://a:b@h/%2F"
