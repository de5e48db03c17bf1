"""`python -m rides`: serve the rides service (STRATUS_RIDES_PORT, 0 = any free port)."""
from bus.service import serve
from bus.settings import load

from .app import create_app


def main() -> None:
    serve(create_app, "rides", load().rides_port)


if __name__ == "__main__":
    main()
