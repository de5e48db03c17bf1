"""python -m catalog: the catalog service on settings.catalog_port (8084)."""
from bus.service import serve
from bus.settings import load

from .app import create_app


def main() -> None:
    settings = load()
    serve(lambda: create_app(settings), "catalog", settings.catalog_port, settings=settings)


if __name__ == "__main__":
    main()
