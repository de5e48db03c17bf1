"""`python -m users`: serve the users service (STRATUS_USERS_PORT, 0 = any free port)."""
from bus.service import serve
from bus.settings import load

from .app import create_app


def main() -> None:
    serve(create_app, "users", load().users_port)


if __name__ == "__main__":
    main()
