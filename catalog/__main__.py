"""python -m catalog: the catalog service on settings.catalog_port (8084)."""
import os

from bus.service import serve
from bus.settings import load

from .app import create_app


def main() -> None:
    settings = load()
    # Deployed as the toy store's app, the restocker is a worker role of its
    # own (RESTOCKER=off in the manifest's env); run alone, catalog runs it.
    restocker = os.environ.get("RESTOCKER", "on") != "off"
    serve(lambda: create_app(settings, restocker=restocker), "catalog", settings.catalog_port, settings=settings)


if __name__ == "__main__":
    main()
