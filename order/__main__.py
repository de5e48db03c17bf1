"""python -m order: the order service on settings.order_port (8085)."""
from bus.service import serve
from bus.settings import load

from .app import create_app


def main() -> None:
    settings = load()
    serve(lambda: create_app(settings), "order", settings.order_port, settings=settings)


if __name__ == "__main__":
    main()
