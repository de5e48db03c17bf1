"""Apps (paas.md, Apps): the validation and storage layer under the app
controller and routes.

    manifest.py   a manifest -> frozen Manifest/Role, every paas.md rule (400),
                  route ownership (409) and the instance quota (409)
    packages.py   an uploaded .tar.gz: size (413), readability and member
                  paths (400), stored by digest under the state dir; safe unpack
    desired.py    the desired state of every app in ZooKeeper, compare-and-set

Every refusal is an AppError carrying the HTTP status and a message for the
JSON body, so a route answers `{"error": e.message}` with `e.status`."""
from __future__ import annotations


class AppError(Exception):
    """A refusal with its HTTP status (400, 404, 409, 413, 503)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.status}, {self.message!r})"
