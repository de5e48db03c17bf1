"""`python -m dashboard`: serve the dashboard (STRATUS_DASHBOARD_PORT, 8086;
0 = any free port), registered as the service "dashboard"."""
import argparse

from bus.service import serve
from bus.settings import load, set_component

from .app import create_app


def main() -> None:
    set_component("dashboard")   # no broker account: it never connects to the broker
    ap = argparse.ArgumentParser(prog="python -m dashboard", description="Serve the Stratus dashboard.")
    ap.add_argument("--port", type=int, default=None, help="port (default STRATUS_DASHBOARD_PORT, 8086; 0: any)")
    opts = ap.parse_args()
    settings = load()
    serve(create_app, "dashboard", settings.dashboard_port if opts.port is None else opts.port, settings=settings)


if __name__ == "__main__":
    main()
