"""Errors a DB request can end in. Each carries a stable code (on the wire)
and the HTTP status a service should answer with."""
from __future__ import annotations


class DBError(Exception):
    code = "internal"
    status = 500

    def __init__(self, message: str, *, code: str | None = None, op: int | None = None, tag: str | None = None):
        super().__init__(message)
        self.message = message
        if code:
            self.code = code
        self.op = op      # index of the failing operation in a write, if any
        self.tag = tag    # the caller's label for a failed precondition

    def to_wire(self) -> dict:
        d = {"code": self.code, "message": self.message}
        if self.op is not None:
            d["op"] = self.op
        if self.tag is not None:
            d["tag"] = self.tag
        return d

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code}: {self.message})"


class BadRequest(DBError):
    """Malformed request, unknown table or column, wrong type, a value out of
    range or too large, a schema conflict: the request can never succeed as it is."""
    code = "bad_request"
    status = 400


class ConstraintViolation(DBError):
    code = "constraint"
    status = 400


class PreconditionFailed(DBError):
    """A `require` or `expect` did not hold; nothing was written."""
    code = "precondition_failed"
    status = 400


class Forbidden(DBError):
    """The request's identity may not do this (no validated user_id, or a
    tenant asking for what only the platform may)."""
    code = "forbidden"
    status = 403


class QuotaExceeded(DBError):
    """The tenant's storage quota is used up: nothing was written (reads
    and deletes still work)."""
    code = "storage_quota"
    status = 507


class Unavailable(DBError):
    """The bus or the database cannot take the request now. It was not done."""
    code = "unavailable"
    status = 503


class Timeout(DBError):
    """No reply in time. Not a refusal: a write may still happen."""
    code = "timeout"
    status = 504


_BY_CODE = {
    "forbidden": Forbidden,
    "storage_quota": QuotaExceeded,
    "bad_request": BadRequest,
    "unknown_table": BadRequest,
    "unknown_column": BadRequest,
    "bad_type": BadRequest,
    "unsupported_version": BadRequest,
    "out_of_range": BadRequest,     # an integer past 64 bits, a non-finite real, an add that would overflow
    "too_large": BadRequest,        # a request, text value or list past its limit
    "schema_conflict": BadRequest,  # create_table of a name taken by another definition or index
    "rejected": BadRequest,         # the database refused the request (its message says why)
    "constraint": ConstraintViolation,
    "precondition_failed": PreconditionFailed,
    "unavailable": Unavailable,
    "not_master": Unavailable,
    "timeout": Timeout,
}


def from_wire(err: dict) -> DBError:
    code = str(err.get("code", "internal"))
    cls = _BY_CODE.get(code, DBError)
    return cls(str(err.get("message", code)), code=code, op=err.get("op"), tag=err.get("tag"))
