"""The per-directory bring-up: orchestrator/ first (it creates the network),
then users/, rides/, catalog/, order/, gateway/ and dashboard/, each with
its own `docker-compose up -d` (the dashboard, in its own project, is routed
to by the gateway at /dashboard/ through the registry). Run this way, each service registers itself under its
own name and no app is deployed: the test publishes the route entries that
send the built-in paths to those names (dockerkit.publish_builtin_routes,
by "test"); ZooKeeper's volume keeps them across `down` and `up`.
Then `down` (keeping volumes) and `up` again: the orchestrator removed its
worker containers on the way down, and RabbitMQ's and ZooKeeper's named
volumes kept the data."""
import pytest
from dockerkit import Http, grader_sequence, toystore_smoke, wait_for

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(900)]

DIRS = ["orchestrator", "users", "rides", "catalog", "order", "gateway", "dashboard"]


def dashboard_served(s) -> bool:
    status, body = s.gateway.get("/dashboard/login")
    return status == 200 and isinstance(body, str) and 'name="csrf_token"' in body


def test_per_directory_bring_up_down_and_up_again(make_stack):
    s = make_stack("dirs")
    for d in DIRS:
        s.up(d)
    s.wait_gateway()
    assert s.gateway.get("/api/v1/rides?source=1&destination=2")[0] == 404   # no route yet
    s.publish_builtin_routes()
    s.wait_rideshare()
    grader_sequence(s.gateway, "dirs")
    wait_for(lambda: s.gateway.get("/products/Tux")[0] == 200, 60, what="the catalog behind the gateway")
    toystore_smoke(s.gateway)
    # The gateway (its own project) reaches the orchestrator by name for the admin routes.
    admin = Http(s.gateway.base, token=s.admin_token())
    status, view = admin.get("/api/v1/cluster")
    assert status == 200 and view["cluster"] == s.id and view["leader"], (status, view)
    assert s.gateway.get("/api/v1/cluster")[0] == 401
    assert s.gateway.put("/api/v1/users", {"username": "keeper", "password": "b" * 40}) == (201, {})
    assert len(s.running_workers()) >= 2
    wait_for(lambda: dashboard_served(s), 90, what="the dashboard's sign-in form through the gateway")

    for d in reversed(DIRS):
        s.compose(d, "down", "-t", "45")
    # The orchestrator removed its workers on SIGTERM (runtime.close).
    assert s.worker_containers(all_=True) == []

    for d in DIRS:
        s.up(d)
    s.wait_gateway()
    s.wait_rideshare()
    wait_for(lambda: (lambda r: r[0] == 200 and "keeper" in r[1])(s.gateway.get("/api/v1/users")), 60,
             what="the user written before `down` to be there after `up`")
    grader_sequence(s.gateway, "dirs2")
    wait_for(lambda: dashboard_served(s), 90, what="the dashboard's sign-in form through the gateway after `up`")
