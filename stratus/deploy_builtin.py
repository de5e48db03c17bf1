"""`python -m stratus.deploy_builtin`: create the built-in tenants and deploy
their apps through the orchestrator's API, as `stratus up` does
(stratus/up.py, stratus/builtin.py), from a copy of the repository's sources.
The Docker stack's one-shot service `deploy` (compose/docker-compose.yml)
runs it; it works the same from a checkout.

Contract:
  sources   STRATUS_SOURCE_DIR (or --source), default the repository root
            (stratus.builtin.ROOT). It holds <tenant>/manifest.json,
            <tenant>/package.txt and the directories package.txt names
            (rideshare/, users/, rides/, toystore/, catalog/, order/). The stratus/deploy image
            (docker/deploy.Dockerfile) carries them in /opt/stratus-src, since
            an installed stratus package has no repository above it.
  API       settings.orchestrator_base_url() (STRATUS_ORCHESTRATOR_URL, in
            compose http://orchestrator:8081): the orchestrator's own port,
            which needs no token (platform.md).
  steps     1. the tenants rideshare and toystore: POST /api/v1/tenants, a
               409 (it exists) kept as it is; a new owner's password goes to
               $STRATUS_STATE_DIR/tenants/<name>-password (stratus.up.ensure_tenants),
               retried while the orchestrator answers 5xx or not at all;
            2. per built-in tenant: PUT the package (a reproducible tar.gz of
               the directories package.txt lists), PUT the manifest naming its
               digest (an unchanged checkout changes nothing), retried on 5xx
               or no answer, then wait until every role runs its desired count.
  output    one line per tenant and per app, as `stratus up` prints them.
  exit      0 every app runs; 1 a tenant or an app failed (said why);
            2 bad usage or no sources. Every wait is bounded by --timeout."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from bus.settings import load

from . import builtin
from .up import ensure_tenants

SOURCE_ENV = "STRATUS_SOURCE_DIR"


def source_root(explicit: str | None = None) -> Path:
    """Where the built-in apps' directories are: --source, else
    $STRATUS_SOURCE_DIR, else the repository above the stratus package."""
    return Path(explicit or os.environ.get(SOURCE_ENV) or builtin.ROOT)


def package(root: Path, tenant: str) -> tuple[dict, bytes]:
    """(manifest, package bytes) of built-in app `tenant` under `root`."""
    return builtin.builtin_package(tenant, root)


def deploy_app(base: str, root: Path, tenant: str, *, timeout: float) -> dict:
    """Deploy the built-in app `tenant` from `root` (retried while the
    orchestrator answers 5xx or not at all), then wait until it runs;
    returns the app's view. DeployError on failure."""
    deadline = time.monotonic() + timeout
    builtin.deploy_builtin(base, tenant, timeout=timeout, root=root)
    return builtin.wait_running(base, tenant, tenant, timeout=max(1.0, deadline - time.monotonic()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m stratus.deploy_builtin",
                                 description="Create the built-in tenants and deploy their apps through the API.")
    ap.add_argument("--source", help=f"the directory holding rideshare/ and toystore/ (default ${SOURCE_ENV} or the repository)")
    ap.add_argument("--timeout", type=float, default=300.0,
                    help="seconds allowed for the tenants, and for each app to run (default 300)")
    opts = ap.parse_args(argv)
    if opts.timeout <= 0:
        ap.error("--timeout must be positive")
    root = source_root(opts.source)
    missing = [t for t in builtin.BUILT_IN if not (root / t / "manifest.json").is_file()]
    if missing:
        print(f"deploy: no {missing[0]}/manifest.json under {root} (set {SOURCE_ENV})", file=sys.stderr)
        return 2
    settings = load()
    base = settings.orchestrator_base_url()
    print(f"deploy: the built-in apps from {root} to {base}", flush=True)
    ok = True
    tenants = ensure_tenants(settings, builtin.BUILT_IN, timeout=opts.timeout)
    for name, outcome in tenants.items():
        print(f"  tenant {name:<10} {outcome}", flush=True)
        ok = ok and outcome in ("created", "exists")
    for tenant in builtin.BUILT_IN:
        if tenants.get(tenant) not in ("created", "exists"):
            continue
        t0 = time.monotonic()
        try:
            view = deploy_app(base, root, tenant, timeout=opts.timeout)
        except builtin.DeployError as exc:
            print(f"  app    {tenant + '/' + tenant:<20} not running: {exc}", flush=True)
            ok = False
            continue
        roles = ", ".join(f"{r} {v['running']}/{v['desired']}" for r, v in view["roles"].items())
        print(f"  app    {tenant + '/' + tenant:<20} deployed in {time.monotonic() - t0:.1f}s ({roles})", flush=True)
    print("deploy: done" if ok else "deploy: FAILED", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
